"""Serve-time loading of Params only, and export of param-only (decode) checkpoints.

`load_params` reads just the bytes of the selected leaves (never the optimizer
moments), casts while reading, places shards on the target sharding, and stacks or
unrolls layers to match the target. `export_params` writes a decode checkpoint,
streaming like `convert`.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from orbax_nnx import errors, nnx_tree, safetensors_export, sizes
from orbax_nnx.conversion import ConvertReport, convert
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item
from orbax_nnx.planning.planner import plan
from orbax_nnx.restoring import restore_planned
from orbax_nnx.mapping.views import check_rules
from orbax_nnx.sources import listing


def _cast_abstract(state: nnx.State, dtype) -> nnx.State:
  """Floating leaves of an (abstract or live) state as ShapeDtypeStructs of `dtype`."""
  def cast(x):
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=getattr(x, 'sharding', None))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(cast, state)


@listing.looking_once
def load_params(path: epath.PathLike, target: Any, *, dtype: Any = None, filter: Any = nnx.Param,
                mesh: jax.sharding.Mesh | None = None, rules=(), scan_axis=None, param_scan_axis: int = 1,
                step: int | None = None, item: str | None = None, missing: str = 'error',
                extra: str = 'ignore', memory_budget: int | str | None = None, layout: str | None = None,
                groups=None) -> Any:
  """Loads only the `filter` leaves (default: Params) of any training or decode checkpoint.

  `target`: an abstract NNX state/model (`nnx.get_abstract_model`, `nnx.eval_shape`) or a live
  module (updated in place and returned). `dtype` casts floating leaves while reading (e.g.
  `jnp.bfloat16`); `mesh` shards leaves by their `out_sharding` names when the target has
  no shardings. Works on Linen and NNX train states (either flavour, scanned or unrolled),
  MaxText layouts, decode checkpoints, and manager roots (latest step unless `step`).
  `missing='keep'` keeps the target's own (concrete) values for leaves the checkpoint lacks;
  `extra='error'` refuses checkpoint leaves the target has no place for (default: ignored,
  since a training checkpoint holds more than the params). `memory_budget` (an int of bytes, or a
  string such as '512MiB' or '5GB') bounds the bytes held besides the loaded arrays (decoded chunks and
  host buffers in flight; see `NNXRestore`);
  `layout` forces a preset and `groups` declares layer-group names (see `orbax_nnx.detect_layout`).
  Returns the loaded state (an `nnx.State` of the selected Variables), or the module.
  """
  errors.check_int('param_scan_axis', param_scan_axis)
  errors.check_choice('missing', missing, ('error', 'keep'))
  errors.check_choice('extra', extra, ('error', 'ignore'))
  rules = check_rules(rules)
  directory = resolve_item(path, step=step, item=item)
  module = target if nnx_tree.is_graph_node(target) else None
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
    absent = set(plan(directory, abstract, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis,
                      layout=layout, groups=groups).missing)
    kept = [(p, v) for p, v in nnx.to_flat_state(state) if nnx_tree.path_str(p) in absent]
    abstract_leaves = [(p, v) for p, v in nnx.to_flat_state(abstract) if nnx_tree.path_str(p) not in absent]
    abstract = nnx.from_flat_state(abstract_leaves)
    abstract_kept = [nnx_tree.path_str(p) for p, v in kept if not isinstance(v.get_value(), (jax.Array, np.ndarray))]
    if abstract_kept:
      raise errors.StructureMismatchError(abstract_kept, [], where=f"at {directory} (missing='keep' keeps only"
                                          ' concrete target values; these are abstract)')
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  loaded = restore_planned(meta, abstract, missing='error', extra=extra, rules=rules, scan_axis=scan_axis,
                           param_scan_axis=param_scan_axis, memory_budget=memory_budget, layout=layout,
                           groups=groups)
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


@listing.looking_once
def export_params(src: epath.PathLike, dst: epath.PathLike, *, dtype: Any = 'bfloat16',
                  scan_layers: bool | None = None, format: Literal['nnx', 'linen', 'safetensors'] = 'nnx',
                  overwrite: bool = False, step: int | None = None, item: str | None = None,
                  scan_axis=None, param_scan_axis: int = 1, buffer_bytes: int | str | None = None,
                  progress=None, filter: Literal['Param', 'LoRAParam'] = 'Param',
                  merge_lora: bool = False, target: Any = None, rules=(),
                  max_shard_size: int | str = safetensors_export.DEFAULT_SHARD_BYTES, layout: str | None = None,
                  groups=None, memory_budget: int | str | None = None) -> ConvertReport:
  """Writes a param-only decode checkpoint of `src` at `dst` (streaming, atomic).

  NNX format (default): the model's Param leaves at the root (`.../kernel/value`), no
  step, no optimizer. Linen format: `step` = 0 and `params/params/...`. Floating leaves
  are cast to `dtype` (None keeps them); `scan_layers=False` unrolls for decoding.
  `filter='LoRAParam'` exports only the LoRA adapters; `merge_lora=True` folds each
  `nnx.LoRALinear` adapter into its kernel (`W + A @ B`, computed in float32) and drops it.

  `format='safetensors'` writes Hugging Face-style files (`model.safetensors`, or
  `model-0000K-of-0000N.safetensors` of at most `max_shard_size` bytes plus
  `model.safetensors.index.json`): `src` is planned into `target` (the abstract model;
  stacked layers are exported per layer), then `rules` name each tensor, with views,
  from the model path (e.g. `orbax_nnx.llama.hf_export_rules(cfg)`). A view's own
  `.astype` wins over `dtype`. `src` may also be a live model (its Params are exported from
  memory; `target` defaults to it). `merge_lora=True` folds LoRA adapters into their kernels first.
  `layout` forces SRC's preset and `groups` declares layer-group names (see `orbax_nnx.detect_layout`).
  `memory_budget` (an int of bytes, or a string such as '512MiB' or '5GB') bounds the bytes held besides
  the writer's own (see `convert`; safetensors: decoded chunks kept and row blocks evaluated ahead).
  """
  errors.check_choice('format', format, ('nnx', 'linen', 'safetensors'))
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  buffer_bytes = sizes.parse_bytes(buffer_bytes, 'buffer_bytes')
  max_shard_size = sizes.parse_bytes(max_shard_size, 'max_shard_size', allow_none=False)
  errors.check_choice('filter', filter, ('Param', 'LoRAParam'))
  errors.check_choice('merge_lora', merge_lora, (True, False))
  if format == 'safetensors':
    given = [name for name, on in (('scan_layers', scan_layers is not None), ('filter', filter != 'Param'),
                                   ('progress', progress is not None)) if on]
    if given:
      raise errors.UnsupportedArgumentError(f"{', '.join(given)}: not supported with format='safetensors' (the target"
                                            ' model decides the layout; export rules name the tensors).')
    t0 = time.perf_counter()
    if memory_budget is not None and buffer_bytes is not None:
      raise errors.OptionError('memory_budget= and buffer_bytes= both bound the bytes in flight: pass one.')
    given = memory_budget if memory_budget is not None else buffer_bytes
    options = {} if given is None else {'buffer_bytes': given}
    count, read, written = safetensors_export.export_safetensors(
        src, dst, target=target, rules=rules, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        step=step, item=item, scan_axis=scan_axis, param_scan_axis=param_scan_axis, merge_lora=merge_lora,
        layout=layout, groups=groups, **options)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind = 'checkpoint' if isinstance(src, (str, epath.Path)) or hasattr(src, '__fspath__') else 'live model'
    return ConvertReport(str(src) if kind == 'checkpoint' else kind, str(dst), kind, 'safetensors', count, read, written,
                         time.perf_counter() - t0, rss)
  if target is not None or rules:
    raise errors.UnsupportedArgumentError("target= and rules= apply to format='safetensors' only.")
  options = {} if buffer_bytes is None else {'buffer_bytes': buffer_bytes}
  if memory_budget is not None:
    options['memory_budget'] = memory_budget
  if filter == 'LoRAParam' and merge_lora:
    raise errors.OptionError('filter=LoRAParam and merge_lora=True exclude each other: export the adapters, or merge them.')
  lora = 'only' if filter == 'LoRAParam' else 'merge' if merge_lora else None
  if lora is not None:
    options['lora'] = lora
  return convert(src, dst, to=format, scan_layers=scan_layers, include='params', dtype=dtype,
                 overwrite=overwrite, step=step, item=item, scan_axis=scan_axis,
                 param_scan_axis=param_scan_axis, progress=progress, layout=layout, groups=groups, **options)
