"""`NNXCheckpointHandler`, its args `NNXSave` / `NNXRestore`, and `nnx_registry`.

The handler writes exactly what `ocp.StandardCheckpointer().save(dir, nnx.state(x))`
writes (plus our extras in Orbax custom metadata), so plain Orbax reads it, and it
reads both NNX flavours (`.../value`-wrapped and pure dict) into any NNX target.
Bytes move through Orbax's own PyTree machinery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint._src import asyncio_utils

from orbax_nnx import errors, nnx_tree, restoring, version
from orbax_nnx.metadata import CUSTOM_KEY, read_item_metadata

PyTree = Any


@dataclasses.dataclass
class NNXSave(ocp.args.CheckpointArgs):
  """Save args: an `nnx.State`, Module, Optimizer, or nested dicts of these.

  Attributes:
    item: what to save.
    custom_metadata: JSON-able user metadata, stored beside ours.
    flavour: 'raw' writes `.../kernel/value` (the Flax guide format, default);
      'pure' writes `.../kernel` (the `nnx.to_pure_dict` format).
    exclude: an nnx Filter of Variables never saved (default: Cache, Intermediate).
  """

  item: PyTree = None
  custom_metadata: Any = None
  flavour: nnx_tree.Flavour = 'raw'
  exclude: Any = nnx_tree.DEFAULT_EXCLUDE


@dataclasses.dataclass
class NNXRestore(ocp.args.CheckpointArgs):
  """Restore args. Every field has a default so a no-args manager restore works.

  Attributes:
    target: None (returns an `nnx.State` rebuilt from our metadata), an abstract
      `nnx.State`, a live Module/Optimizer (updated in place and returned), a
      `(graphdef, abstract_state)` pair (returns the merged module), or a dict of these.
    missing: 'error' (default) or 'keep': keep the target's own value for
      leaves absent from the checkpoint (target leaves must be concrete).
    extra: 'error' (default) or 'ignore': checkpoint leaves with no place in the target.
    default_sharding: for leaves whose target gives no sharding and whose saved
      sharding does not fit the current devices.
    exclude: Variables the target never restores (default: Cache, Intermediate).
    rules: regex renames `(pattern, replacement)` over canonical source paths
      (e.g. `('model/(.*)', r'reference_model/\1')`), applied before layout rules.
    scan_axis: the layer axis of stacked source arrays when shapes leave it
      ambiguous: an int, or `{regex over canonical paths: axis}`.
    param_scan_axis: the convention for Params when nothing else decides (MaxText: 1).

  When the stored layout differs from the target (Linen train state, MaxText,
  other NNX flavour, stacked vs unrolled layers), the restore goes through a plan
  evaluated lazily per target shard; see `orbax_nnx.plan`.
  """

  target: PyTree = None
  missing: restoring.MissingPolicy = 'error'
  extra: restoring.ExtraPolicy = 'error'
  default_sharding: jax.sharding.Sharding | None = None
  exclude: Any = nnx_tree.DEFAULT_EXCLUDE
  rules: Sequence[tuple[str, str]] = ()
  scan_axis: Any = None
  param_scan_axis: int = 1


class NNXCheckpointHandler(ocp.AsyncCheckpointHandler):
  """Orbax handler for Flax NNX objects (and any plain PyTree).

  Accepts `NNXSave`/`NNXRestore`, and also `StandardSave`/`StandardRestore` and
  `PyTreeSave`/`PyTreeRestore`, so one handler serves an item whatever args the
  caller uses. Plain (non-NNX) trees are passed to Orbax unchanged.
  """

  def __init__(self, **options: Any):
    """`options` are passed to `ocp.StandardCheckpointHandler` (e.g. use_ocdbt)."""
    self._options = options
    self._standard: ocp.StandardCheckpointHandler | None = None

  @classmethod
  def typestr(cls) -> str:
    return 'orbax_nnx.NNXCheckpointHandler'

  @property
  def _std(self) -> ocp.StandardCheckpointHandler:
    if self._standard is None:  # created lazily: a closed handler can be reused
      self._standard = ocp.StandardCheckpointHandler(**self._options)
    return self._standard

  @property
  def _pytree(self) -> ocp.PyTreeCheckpointHandler:
    return self._std._impl  # pylint: disable=protected-access

  # -- save -------------------------------------------------------------------

  async def async_save(self, directory: epath.Path, args: ocp.args.CheckpointArgs):
    if isinstance(args, NNXSave):
      return await self._async_save_nnx(directory, args.item, args.custom_metadata, args.flavour, args.exclude)
    if isinstance(args, ocp.args.StandardSave):
      if nnx_tree.contains_nnx(args.item):
        if args.save_args is not None:
          raise errors.OrbaxNNXError('StandardSave(save_args=...) is not supported for NNX items.')
        return await self._async_save_nnx(directory, args.item, args.custom_metadata)
      return await self._std.async_save(directory, args=args)
    if isinstance(args, ocp.args.PyTreeSave):
      if nnx_tree.contains_nnx(args.item):
        if args.save_args is not None:
          raise errors.OrbaxNNXError('PyTreeSave(save_args=...) is not supported for NNX items.')
        return await self._async_save_nnx(directory, args.item, args.custom_metadata)
      return await self._pytree.async_save(directory, args=args)
    raise TypeError(f'NNXCheckpointHandler cannot save with {type(args).__name__}.')

  async def _async_save_nnx(self, directory, item, custom_metadata, flavour='raw', exclude=nnx_tree.DEFAULT_EXCLUDE):
    tree, ours = to_save_tree(item, flavour, exclude)
    return await self._pytree.async_save(
        directory,
        args=ocp.args.PyTreeSave(item=tree, custom_metadata=_merge_custom(custom_metadata, ours)),
    )

  def save(self, directory: epath.Path, *args, **kwargs) -> None:
    async def run():
      futures = await self.async_save(directory, *args, **kwargs)
      for f in futures or ():
        f.result()

    asyncio_utils.run_sync(run())

  # -- restore ----------------------------------------------------------------

  def restore(self, directory: epath.Path, args: ocp.args.CheckpointArgs | None = None) -> Any:
    if args is None:
      args = NNXRestore()
    if isinstance(args, NNXRestore):
      return self._restore_nnx(directory, args)
    if isinstance(args, ocp.args.StandardRestore):
      if args.item is None or nnx_tree.contains_nnx(args.item):
        return self._restore_nnx(directory, NNXRestore(target=args.item, default_sharding=args.fallback_sharding))
      return self._std.restore(directory, args=args)
    if isinstance(args, ocp.args.PyTreeRestore):
      if nnx_tree.contains_nnx(args.item):
        extra = 'ignore' if args.partial_restore else 'error'
        return self._restore_nnx(directory, NNXRestore(target=args.item, extra=extra))
      return self._pytree.restore(directory, args=args)
    raise TypeError(f'NNXCheckpointHandler cannot restore with {type(args).__name__}.')

  def _restore_nnx(self, directory: epath.Path, args: NNXRestore) -> Any:
    return self.restore_item(read_item_metadata(directory, self._pytree), args)

  def restore_item(self, meta, args: NNXRestore) -> Any:
    """Restores from already-read item metadata (used by `orbax_nnx.restore`)."""
    target = args.target
    if target is None:
      return restoring.restore_untargeted(self._pytree, meta, args.default_sharding)
    graphdef = None
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], nnx.GraphDef):
      graphdef, target = target
    restored = restoring.restore_target(
        self._pytree, meta, target, missing=args.missing, extra=args.extra,
        default_sharding=args.default_sharding, exclude=args.exclude, rules=tuple(args.rules),
        scan_axis=args.scan_axis, param_scan_axis=args.param_scan_axis,
    )
    return nnx.merge(graphdef, restored) if graphdef is not None else restored

  # -- the rest ---------------------------------------------------------------

  def metadata(self, directory: epath.Path):
    return self._pytree.metadata(directory)

  def finalize(self, directory: epath.Path) -> None:
    self._pytree.finalize(directory)

  def close(self) -> None:
    if self._standard is not None:
      self._standard.close()
      self._standard = None


ocp.args.register_with_handler(NNXCheckpointHandler, for_save=True)(NNXSave)
ocp.args.register_with_handler(NNXCheckpointHandler, for_restore=True)(NNXRestore)


def to_save_tree(item: PyTree, flavour: nnx_tree.Flavour = 'raw', exclude=nnx_tree.DEFAULT_EXCLUDE):
  """(nested dict of arrays as Orbax will write it, our custom metadata block)."""
  tree: dict = {}
  records = []
  for path, leaf in nnx_tree.flatten(item, exclude):
    is_var = isinstance(leaf, nnx.Variable)
    value = leaf.get_value() if is_var else leaf
    if is_var:
      records.append(nnx_tree.record_for(path, leaf).to_json())
    disk = nnx_tree.disk_path(path, is_var, flavour)
    bad = [k for k in disk if '/' in k or k in ('', '.', '..')]
    if bad:
      raise errors.OrbaxNNXError(f'Cannot save {nnx_tree.path_str(path)!r}: key {bad[0]!r} is not a valid'
                                 ' checkpoint key (no "/", ".", ".." or empty keys); rename it.')
    if getattr(value, 'size', 1) == 0:
      raise errors.OrbaxNNXError(f'Cannot save {nnx_tree.path_str(path)!r}: it has zero size {value.shape}, which'
                                 ' Orbax cannot store; drop it from the item or give it at least one element.')
    if not disk:
      raise errors.OrbaxNNXError('Cannot save a single Variable or array as an item; wrap it in a dict.')
    nnx_tree.set_path(tree, disk, value)
  ours = {'version': version.__version__, 'flavour': flavour, 'variables': records}
  return tree, ours


def _merge_custom(user: Any, ours: Mapping[str, Any]) -> dict:
  if user is None:
    return {CUSTOM_KEY: dict(ours)}
  if not isinstance(user, Mapping):
    raise errors.OrbaxNNXError('custom_metadata must be a JSON-able dict for NNX items.')
  if CUSTOM_KEY in user:
    raise errors.OrbaxNNXError(f'custom_metadata key {CUSTOM_KEY!r} is reserved by orbax_nnx.')
  return {**user, CUSTOM_KEY: dict(ours)}


class _FreshHandlerRegistry(ocp.handlers.DefaultCheckpointHandlerRegistry):
  """A registry that hands each copy (each CheckpointManager) its own handler.

  CompositeCheckpointHandler copies the registry it is given and later closes
  the handlers it holds; a fresh NNXCheckpointHandler per copy keeps managers
  independent of one another.
  """

  def get_all_entries(self):
    fresh = NNXCheckpointHandler()
    return {
        key: fresh if isinstance(handler, NNXCheckpointHandler) else handler
        for key, handler in super().get_all_entries().items()
    }


def _build_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = _FreshHandlerRegistry()
  add_to_registry(registry)
  return registry


def add_to_registry(registry, item: str | None = None, handler: NNXCheckpointHandler | None = None) -> None:
  """Routes NNX, Standard and PyTree save/restore args of `item` (None: any item) to one handler.

  Use it to add NNX support to a registry you build yourself:

      registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
      orbax_nnx.add_to_registry(registry)          # or for one item: item='model'
      registry.add('metrics', ocp.args.JsonSave)   # your own entries
  """
  handler = handler or NNXCheckpointHandler()
  for args_type in (NNXSave, NNXRestore, ocp.args.StandardSave, ocp.args.StandardRestore,
                    ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
    registry.add(item, args_type, handler)


nnx_registry = _build_registry()
