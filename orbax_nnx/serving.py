"""Serve-time loading of Params only, and export of param-only (decode) checkpoints.

`load_params` reads just the bytes of the selected leaves (never the optimizer
moments), casts while reading, places shards on the target sharding, and stacks or
unrolls layers to match the target. `export_params` writes a decode checkpoint,
streaming like `convert`.
"""

from __future__ import annotations

import dataclasses
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from orbax_nnx import errors, nnx_tree, options, safetensors_export, sizes
from orbax_nnx.conversion import ConvertReport, run_conversion
from orbax_nnx.io import operation
from orbax_nnx.lazy_flax import nnx, nnx_loaded
from orbax_nnx.planning.planner import plan
from orbax_nnx.restoring import restore_planned
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item


def _cast_abstract(state: nnx.State, dtype) -> nnx.State:
  """Floating leaves of an (abstract or live) state as ShapeDtypeStructs of `dtype`."""
  def cast(x):
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=getattr(x, 'sharding', None))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(cast, state)


@options.takes_options('mapping')
@listing.looking_once
@operation.moves_bytes
def load_params(path: epath.PathLike, target: Any, *, dtype: Any = None, filter: Any = None,
                mesh: jax.sharding.Mesh | None = None, mapping: options.Mapping | None = None,
                missing: str = 'error', extra: str = 'ignore', memory_budget: int | str | None = None,
                step: int | None = None, item: str | None = None) -> Any:
  """Loads only the `filter` Variables (default: Params) of any training or decode checkpoint.

  Reads just their bytes (never the optimizer moments), casts while reading, places each shard on the
  target's sharding, and stacks or unrolls layers to match the target. Works on Linen and NNX train states
  (either flavour, scanned or unrolled), MaxText layouts, decode checkpoints, Hugging Face safetensors
  (with `rules`) and manager roots.

      model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
      state = orbax_nnx.load_params('ckpt', model, dtype=jnp.bfloat16, mesh=mesh)

  Args:
    path: an item dir, step dir, manager root (latest step unless `step`) or safetensors folder.
    target: the NNX model the data lands in: an abstract model or state (`nnx.eval_shape`,
      `nnx.get_abstract_model`), or a live module (updated in place and returned).
    dtype: casts floating leaves while reading (e.g. `jnp.bfloat16`); None keeps the target's dtypes.
    filter: a Flax filter (`nnx.Param`, `nnx.LoRAParam`, `(nnx.Param, nnx.BatchStat)`, ...) selecting the
      target's Variables to load; None (the default) is `nnx.Param`.
    mesh: shards leaves by their `out_sharding` names when the target carries no shardings.
    mapping: how the checkpoint's leaves map onto the target (`orbax_nnx.Mapping`: rules, layout, groups,
      scan_axis, param_scan_axis); its fields may also be passed as keywords.
    missing: 'error', or 'keep': leaves the checkpoint lacks keep the target's own (concrete) values.
    extra: 'ignore' (a training checkpoint holds more than the params), or 'error'.
    memory_budget: bytes held besides the loaded arrays (an int, or '512MiB', '5GB'): decoded chunks and host
      buffers in flight (see `NNXRestore`).
    step: the step of a manager root.
    item: the item inside a step dir with several items.

  Returns:
    The loaded `nnx.State` of the selected Variables, or the module when `target` is one.

  Raises:
    NotACheckpointError: nothing readable at `path`.
    StructureMismatchError: target leaves the checkpoint lacks (with `missing='error'`), or checkpoint leaves
      the target lacks (with `extra='error'`).
    ShapeMismatchError, LayoutError, PlanError: the checkpoint cannot be mapped onto the target.
    OptionError: an option outside its accepted values, or a filter that selects nothing.
  """
  errors.check_choice('missing', missing, ('error', 'keep'))
  errors.check_choice('extra', extra, ('error', 'ignore'))
  directory = resolve_item(path, step=step, item=item)
  module = target if nnx_tree.is_graph_node(target) else None
  if filter is None:
    filter = nnx.Param
  state = nnx.state(target, filter) if module is not None else _filter(target, filter)
  if not jax.tree.leaves(state) and jax.tree.leaves(target):
    raise errors.OptionError(f'filter={filter!r} selects no Variable of the target, so nothing would load.'
                             ' load_params selects nnx Variables (pass the model or its nnx.State); restore a tree of'
                             ' plain arrays with orbax_nnx.restore.')
  if mesh is not None:
    shardings = nnx.get_named_sharding(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  abstract = _cast_abstract(state, dtype)
  meta = read_item_metadata(directory)
  kept = []
  if missing == 'keep':  # leaves the checkpoint lacks keep the target's values, uncast
    absent = set(plan(directory, abstract, mapping=mapping).missing)
    kept = [(p, v) for p, v in nnx.to_flat_state(state) if nnx_tree.path_str(p) in absent]
    abstract_leaves = [(p, v) for p, v in nnx.to_flat_state(abstract) if nnx_tree.path_str(p) not in absent]
    abstract = nnx.from_flat_state(abstract_leaves)
    abstract_kept = [nnx_tree.path_str(p) for p, v in kept if not isinstance(v.get_value(), (jax.Array, np.ndarray))]
    if abstract_kept:
      raise errors.StructureMismatchError(abstract_kept, [], where=f"at {directory} (missing='keep' keeps only"
                                          ' concrete target values; these are abstract)')
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  loaded = restore_planned(meta, abstract, missing='error', extra=extra, memory_budget=memory_budget,
                           **mapping.as_kwargs())
  if module is not None:
    nnx.update(module, loaded)
    return module
  if kept:
    loaded = nnx.from_flat_state(list(nnx.to_flat_state(loaded)) + kept)
  return loaded


def _filter(state: Any, filter: Any) -> nnx.State:
  if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], nnx.GraphDef):
    state = state[1]
  if not isinstance(state, nnx.State):
    state = nnx.state(state)
  return nnx.filter_state(state, filter) if hasattr(nnx, 'filter_state') else state.filter(filter)


_FILTERS = ('Param', 'LoRAParam')


def _export_filter(filter: Any) -> str:
  """'Param' or 'LoRAParam': what `export_params` accepts as `filter` (the Variable type, or its name)."""
  for name in _FILTERS:
    if (isinstance(filter, str) and filter == name) or (nnx_loaded() and filter is getattr(nnx, name)):
      return name
  raise errors.OptionError(f'filter={filter!r}: export_params exports nnx.Param (default) or nnx.LoRAParam'
                           " (also accepted by name: 'Param', 'LoRAParam').")


@options.takes_options('mapping', 'linen', renamed={'buffer_bytes': 'memory_budget'})
@listing.looking_once
@operation.moves_bytes
def export_params(src: epath.PathLike, dst: epath.PathLike, *, format: Literal['nnx', 'linen', 'safetensors'] = 'nnx',
                  dtype: Any = 'bfloat16', scan_layers: bool | None = None, filter: Any = 'Param',
                  merge_lora: bool = False, target: Any = None, export_rules: Sequence | None = None,
                  mapping: options.Mapping | None = None, linen: options.LinenOutput | None = None,
                  max_shard_size: int | str = safetensors_export.DEFAULT_SHARD_BYTES,
                  memory_budget: int | str | None = None, overwrite: bool = False, step: int | None = None,
                  item: str | None = None, progress: Callable | None = None) -> ConvertReport:
  """Writes a param-only (decode) checkpoint of `src` at `dst`, streaming and atomic.

      orbax_nnx.export_params('ckpt/1000', 'decode', scan_layers=False)           # NNX, bf16, unrolled
      orbax_nnx.export_params('ckpt/1000', 'hf', format='safetensors', target=abstract_model,
                              export_rules=orbax_nnx.llama.hf_export_rules(cfg))

  Args:
    src: an item dir, step dir or manager root (latest step unless `step`); for `format='safetensors'` also a
      live model (its Params are exported from memory).
    dst: the output directory; it must not exist unless `overwrite`.
    format: the output format. 'nnx': the model's Params at the root (`.../kernel/value`), no step, no
      optimizer. 'linen': `step` = 0 and the Linen params tree (see `linen`). 'safetensors': Hugging Face files
      (`model.safetensors`, or `model-0000K-of-0000N.safetensors` of at most `max_shard_size` bytes plus
      `model.safetensors.index.json`).
    dtype: casts floating leaves (default bfloat16; None keeps them). A view's own `.astype` wins.
    scan_layers: False unrolls stacked layer groups (for decoding), True stacks them, None keeps them.
      Not with 'safetensors' (the target model decides).
    filter: `nnx.Param` (default), or `nnx.LoRAParam` to export only the LoRA adapters.
    merge_lora: fold each `nnx.LoRALinear` adapter into its kernel (`W + A @ B`, computed in float32) and drop it.
    target: with 'safetensors', the NNX model (abstract) that `src` is planned into before its leaves are named
      (stacked layers are exported per layer); defaults to `src` when that is a live model.
    export_rules: with 'safetensors', `(model path regex, tensor name)` rules, with views, naming each tensor
      (e.g. `orbax_nnx.llama.hf_export_rules(cfg)`).
    mapping: how SRC's leaves map onto the exported model (`orbax_nnx.Mapping`); its fields may also be passed
      as keywords.
    linen: with 'linen', which Linen tree to write (`orbax_nnx.LinenOutput`: linen_style, template); its fields
      may also be passed as keywords.
    max_shard_size: with 'safetensors', the largest file (an int of bytes, or '5GB', '500MiB'; default 5 GiB).
    memory_budget: the bytes held besides the writer's own (an int, or '512MiB'; see `convert`; 'safetensors':
      half decoded chunks, half row blocks evaluated ahead, default 512 MiB).
    overwrite: replace an existing checkpoint at DST (never anything else).
    step: the step of a manager root.
    item: the item inside a step dir with several items.
    progress: called with each array as it is written (not with 'safetensors').

  Returns:
    A `ConvertReport`.

  Raises:
    DestinationError: DST is SRC, inside it, or exists and is not a checkpoint to overwrite.
    StructureMismatchError, PlanError: SRC cannot be planned into the output, or a leaf no export rule names.
    OptionError, UnsupportedArgumentError: options outside their accepted values, or not for this format.
  """
  errors.check_choice('format', format, ('nnx', 'linen', 'safetensors'))
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  max_shard_size = sizes.parse_bytes(max_shard_size, 'max_shard_size', allow_none=False)
  filter = _export_filter(filter)
  errors.check_choice('merge_lora', merge_lora, (True, False))
  if format == 'safetensors':
    given = [name for name, on in (('scan_layers', scan_layers is not None), ('filter', filter != 'Param'),
                                   ('progress', progress is not None), ('linen', linen.given)) if on]
    if given:
      raise errors.UnsupportedArgumentError(f"{', '.join(given)}: not supported with format='safetensors' (the target"
                                            ' model decides the layout; export rules name the tensors).')
    if export_rules is None and mapping.rules:  # before export_rules=, rules= named the tensors here
      warnings.warn("export_params(format='safetensors', rules=...): the tensor-naming rules are now export_rules=;"
                    ' rules= will mean how SRC maps onto the model, as everywhere else.', DeprecationWarning,
                    stacklevel=3)
      export_rules, mapping = mapping.rules, dataclasses.replace(mapping, rules=())
    t0 = time.perf_counter()
    budget = {} if memory_budget is None else {'memory_budget': memory_budget}
    count, read, written = safetensors_export.export_safetensors(
        src, dst, target=target, rules=export_rules or (), mapping=mapping, dtype=dtype,
        max_shard_size=max_shard_size, overwrite=overwrite, step=step, item=item, merge_lora=merge_lora, **budget)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind = 'checkpoint' if isinstance(src, (str, epath.Path)) or hasattr(src, '__fspath__') else 'live model'
    return ConvertReport(str(src) if kind == 'checkpoint' else kind, str(dst), kind, 'safetensors', count, read, written,
                         time.perf_counter() - t0, rss)
  if target is not None or export_rules is not None:
    raise errors.UnsupportedArgumentError("target= and export_rules= apply to format='safetensors' only.")
  if format == 'nnx' and linen.given:
    raise errors.UnsupportedArgumentError("linen_style= and template= apply to format='linen' only.")
  if filter == 'LoRAParam' and merge_lora:
    raise errors.OptionError('filter=LoRAParam and merge_lora=True exclude each other: export the adapters, or merge them.')
  lora = 'only' if filter == 'LoRAParam' else 'merge' if merge_lora else None
  return run_conversion(src, dst, to=format, scan_layers=scan_layers, flavour='raw', include='params', dtype=dtype,
                        target=None, mapping=mapping, linen=linen, memory_budget=memory_budget,
                        overwrite=overwrite, step=step, item=item, progress=progress, lora=lora)
