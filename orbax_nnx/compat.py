"""Every private Orbax / JAX / Flax API orbax-nnx uses, in one place.

Each name here is pinned by `tests/test_compat.py`, which fails naming the symbol when an
upgrade removes or changes it. No other module imports an underscore name of another package.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

from etils import epath
from jax._src import mesh as _mesh_lib
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.arrays import sharding as _arrays_sharding
from orbax.checkpoint._src.futures import future as future_lib
from orbax.checkpoint._src.handlers import composite_checkpoint_handler as _composite
from orbax.checkpoint._src.handlers import handler_type_registry as _handler_types
from orbax.checkpoint._src.handlers import pytree_checkpoint_handler as _pytree
from orbax.checkpoint._src.handlers import standard_checkpoint_handler as _standard
from orbax.checkpoint._src.metadata import array_metadata_store as array_metadata_store_lib
from orbax.checkpoint._src.metadata import empty_values as _empty_values
from orbax.checkpoint._src.metadata import sharding as _sharding_metadata
from orbax.checkpoint._src.metadata import tree as _tree_metadata
from orbax.checkpoint._src.metadata import value as _value_metadata
from orbax.checkpoint._src.serialization import (
  jax_array_handlers,
  ocdbt_utils,
  tensorstore_utils,
  type_handler_registry,
)
from orbax.checkpoint._src.serialization import types as serialization_types

from orbax_nnx.lazy_flax import graphlib, nnx_loaded

run_sync = asyncio_utils.run_sync
"""Runs a coroutine to completion from synchronous code (Orbax's own helper)."""


def is_graph_node(x: Any) -> bool:
  """`flax.nnx.graphlib.is_graph_node`; False while the program has not imported `flax.nnx` (nothing can be one)."""
  return nnx_loaded() and graphlib.is_graph_node(x)


get_concrete_mesh = _mesh_lib.get_concrete_mesh
get_sharding_or_format = _arrays_sharding.get_sharding_or_format
CommitFuture = future_lib.CommitFutureAwaitingContractedSignals
ArrayMetadataStore = array_metadata_store_lib.Store
ArrayHandler = jax_array_handlers.ArrayHandler
ParamInfo = serialization_types.ParamInfo
SaveArgs = serialization_types.SaveArgs
get_ts_context = tensorstore_utils.get_ts_context
build_array_read_spec = tensorstore_utils.build_array_read_spec


def orbax_node_cache_bytes() -> int:
  """The OCDBT B-tree node cache Orbax gives the databases it writes (`cache_pool#ocdbt`, 100 MB in 0.11)."""
  return int(get_ts_context(use_ocdbt=True)['cache_pool#ocdbt'].to_json()['total_bytes_limit'])


class _WriteSpecInfo:
  """The `ParamInfo` fields Orbax's `build_array_write_spec` reads, as plain attributes (see `write_spec_info`)."""
  __slots__ = ('name', 'parent_dir', 'use_compression', 'use_zarr3', 'ocdbt_target_data_file_size')

  def __init__(self, info: ParamInfo, parent_dir: Any, name: str):
    self.name, self.parent_dir = name, parent_dir
    self.use_compression, self.use_zarr3 = info.use_compression, info.use_zarr3
    self.ocdbt_target_data_file_size = info.ocdbt_target_data_file_size


def parent_dir(info: ParamInfo) -> Any:
  """`info.parent_dir` without Orbax's `typing.Protocol` isinstance on every access of it (about 20 us on Python
  3.11; a streaming save made five per array, 0.1 s of its writer thread per 1,000 arrays): the stored path once
  it is resolved, else Orbax's property (which raises while the directory is still being created)."""
  stored = info._parent_dir  # noqa: SLF001 (Orbax's property only adds that check)
  return stored if isinstance(stored, epath.Path) else info.parent_dir


def planned_parent_dir(info: ParamInfo) -> Any:
  """`info`'s directory, whether it exists yet or is still being created (Orbax's `PathAwaitingCreation`)."""
  stored = info._parent_dir  # noqa: SLF001
  return stored if isinstance(stored, epath.Path) else stored.path


def with_ts_context(info: ParamInfo, context: Any) -> ParamInfo:
  """A copy of `info` (a plain class, not a dataclass) whose tensorstore context is `context`."""
  other = copy.copy(info)
  other.ts_context = context
  return other


async def resolved_parent_dir(info: ParamInfo) -> Any:
  """`info`'s directory once it exists: `await_path_creation` where it is still being created (`parent_dir`)."""
  if not isinstance(info._parent_dir, epath.Path):  # noqa: SLF001
    await info.await_path_creation()
  return parent_dir(info)


def write_spec_info(info: ParamInfo, name: str | None = None) -> _WriteSpecInfo:
  """What `build_array_write_spec` is given for `info`: its fields, the directory resolved once (`parent_dir`);
  `name` in place of its name, if given."""
  return _WriteSpecInfo(info, parent_dir(info), info.name if name is None else name)


build_array_write_spec = tensorstore_utils.build_array_write_spec
process_index_for_subdir = ocdbt_utils.get_process_index_for_subdir
# Orbax's `_sharding` file: one JSON document, each array's serialized sharding under its own key
sharding_file_spec = tensorstore_utils.get_sharding_tensorstore_spec


def serialized_sharding(sharding: Any) -> str | None:
  """What Orbax's `ArrayHandler` writes for `sharding` in the `_sharding` file (None: nothing)."""
  value = _sharding_metadata.from_jax_sharding(sharding) if sharding is not None else None
  return value.to_serialized_string() if value is not None else None


create_type_handler_registry = type_handler_registry.create_type_handler_registry
sharding_from_serialized = _sharding_metadata.from_serialized_string
ZarrMetadata = _value_metadata.ZarrMetadata
# v0 CheckpointManager no-args restores find an item's handler class by the typestr it recorded
register_handler_type = _handler_types.register_handler_type
get_handler_type = _handler_types.get_handler_type
# an item's `metadata()` as Orbax builds it (`InternalTreeMetadata.as_custom_metadata`), from leaves read elsewhere
InternalTreeMetadata = _tree_metadata.InternalTreeMetadata
build_default_tree_metadata = _tree_metadata.build_default_tree_metadata
empty_value_from_typestr = _empty_values.get_empty_value_from_typestr
# the restore args of a StandardCheckpointHandler restore: (target or None, metadata thunk, fallback sharding)
standard_restore_args = _standard._construct_restore_args  # pylint: disable=protected-access


def _keywords(cls: type) -> dict[str, inspect.Parameter]:
  return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
          if name != 'self' and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_handler_options(options: dict[str, Any]) -> None:
  """Raises TypeError naming each option neither `StandardCheckpointHandler` nor `PyTreeCheckpointHandler` takes."""
  unknown = sorted(set(options) - set(_keywords(_standard.StandardCheckpointHandler))
                   - set(_keywords(_pytree.PyTreeCheckpointHandler)))
  if unknown:
    raise TypeError(f'NNXCheckpointHandler got unexpected keyword argument(s) {", ".join(unknown)}: it takes the'
                    ' options of ocp.StandardCheckpointHandler and ocp.PyTreeCheckpointHandler.')


def standard_handler(options: dict[str, Any]) -> Any:
  """A `StandardCheckpointHandler` honouring the options of either handler. Those only `PyTreeCheckpointHandler`
  takes (`use_zarr3`, `type_handler_registry`, ...) go to the PyTree handler it saves and restores through (its
  `_impl`), built with the Standard handler's defaults for the rest, as it builds its own."""
  standard = _keywords(_standard.StandardCheckpointHandler)
  handler = _standard.StandardCheckpointHandler(**{k: v for k, v in options.items() if k in standard})
  if set(options) - set(standard):
    defaults = {k: p.default for k, p in standard.items() if p.default is not p.empty}
    handler._impl = _pytree.PyTreeCheckpointHandler(**{**defaults, **options})  # pylint: disable=protected-access
  return handler


def aggregate_filename(handler: Any) -> str:
  """The msgpack file a PyTreeCheckpointHandler keeps its tree in when an item has no `_METADATA` (older format)."""
  return handler._aggregate_filename  # pylint: disable=protected-access


def v1_context() -> Any:
  """The active Orbax v1 `Context` (a default one outside any `with ocp.Context(...)`)."""
  from orbax.checkpoint.experimental.v1._src.context import context as context_lib

  return context_lib.get_context()


def v1_handler_options(context: Any) -> dict[str, Any]:
  """`NNXCheckpointHandler` options for Orbax v1's `context`: the PyTree handler Orbax v1 builds its own from
  (format, compression, memory limits, hosts: Orbax's own function), and the format flags the wrapping PyTree
  handler reads older items with."""
  from orbax.checkpoint.experimental.v1._src.handlers import pytree_handler

  impl = pytree_handler._create_v0_handler(  # pylint: disable=protected-access
      context, type_handler_registry=type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY)
  saving = context.array.saving
  return {'handler_impl': impl, 'use_ocdbt': saving.use_ocdbt, 'use_zarr3': saving.use_zarr3,
          'pytree_metadata_options': context.pytree.saving.pytree_metadata_options}


def global_type_handler_registry() -> Any:
  """Orbax's global TypeHandler registry (what a handler built without one reads with)."""
  return type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY


def type_handler_registry_of(handler: Any) -> Any:
  """The TypeHandler registry a PyTreeCheckpointHandler reads with (None: it has none of its own)."""
  impl = getattr(handler, '_handler_impl', handler)  # pylint: disable=protected-access
  return getattr(impl, '_type_handler_registry', None)


def type_handler_metadata_key(handler: Any) -> str | None:
  """The zarr header name a TypeHandler was built with (None: the format's default)."""
  return getattr(handler, '_metadata_key', None)


def default_type_handlers() -> list[tuple[type, Any]]:
  """Orbax's default `(type, TypeHandler)` pairs (what its global registry starts with)."""
  return list(type_handler_registry._DEFAULT_TYPE_HANDLERS)  # pylint: disable=protected-access


def key_impl(dtype: Any) -> Any:
  """The PRNG implementation of a typed-key dtype (`key<fry>` -> threefry)."""
  return dtype._impl  # pylint: disable=protected-access


# CompositeCheckpointHandler asks each item's handler for its `typestr()` and warns about items
# "found but could not be restored" without saying which item it is asking about. One handler
# serves every item of an `nnx_registry`, so these two helpers look one frame up for the item
# name and the composite handler. Both return None when Orbax's internals change (pinned by tests).
_COMPOSITE_FRAMES = ('_get_item_handlers', '_get_item_metadata', 'restore')


def _composite_frame(names: tuple[str, ...], depth: int):
  """The nearest CompositeCheckpointHandler method frame named in `names` above our caller's caller."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  for _ in range(depth):
    frame = frame.f_back
    if frame is None:
      return None
    if frame.f_code.co_name in names and isinstance(frame.f_locals.get('self'), _composite.CompositeCheckpointHandler):
      return frame
  return None


def composite_item_in_flight(depth: int = 4) -> str | None:
  """The item name a CompositeCheckpointHandler is asking about, if the caller is one."""
  frame = _composite_frame(('_get_item_handlers',), depth)
  name = frame.f_locals.get('item_name') if frame is not None else None
  return name if isinstance(name, str) else None


def composite_registry_in_flight(depth: int = 12) -> Any:
  """The handler registry of the CompositeCheckpointHandler on the call stack, if any."""
  frame = _composite_frame(_COMPOSITE_FRAMES, depth)
  return getattr(frame.f_locals['self'], '_handler_registry', None) if frame is not None else None


def array_handler_options(handler: Any) -> dict[str, Any]:
  """What an `ArrayHandler` was built with, for writes made beside its `serialize` (per-block writes):
  its array metadata store, its primary host, its metadata key."""
  return {'array_metadata_store': handler._array_metadata_store,  # pylint: disable=protected-access
          'primary_host': handler._primary_host,  # pylint: disable=protected-access
          'metadata_key': handler._metadata_key}  # pylint: disable=protected-access
