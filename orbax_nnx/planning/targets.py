"""Targets described by a layout name instead of a model: `--to nnx|linen`, `--scan-layers`.

`layout_target(layout, to=..., scan_layers=...)` derives, from a source Layout alone,
every leaf of the converted checkpoint: its canonical path (for the planner), shape,
dtype and Variable kind, and where it is stored in the target framework's tree.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from orbax_nnx import errors
from orbax_nnx.mapping.axes import Evidence, layer_axis
from orbax_nnx.mapping.groups import MODEL, OPTIMIZER, model_start
from orbax_nnx.mapping.layout import CanonPath, LayerGroup, Layout
from orbax_nnx.nnx_tree import VALUE_KEY, DiskPath
from orbax_nnx.planning.expressions import promote
from orbax_nnx.planning.planner import TargetLeaf, lookup_axis

Framework = Literal['nnx', 'linen']

_NON_PARAM_TYPES = ('RngKey', 'RngCount', 'RngState', 'BatchStat', 'Cache', 'Intermediate')
_RNG_NAMES = {'rngs', 'rng', 'dropout_rng'}


@dataclasses.dataclass(frozen=True)
class LayoutTarget:
  """Target leaves plus, for each, the path it is written at and its Variable type."""

  leaves: list[TargetLeaf]
  disk: Mapping[tuple, DiskPath]  # target path -> stored path in the target framework
  types: Mapping[tuple, str]  # target path -> Variable class name (qualified, for our records)
  framework: Framework
  scan_axes: Mapping[str, int]  # canonical stacked path -> layer axis in the target
  source_axes: Mapping[str, int]  # canonical stacked path -> layer axis in the source (unrolled/moved)
  stacked: Mapping[tuple, int]  # target path -> layer axis, for leaves written stacked
  records: Mapping[tuple, dict] = dataclasses.field(default_factory=dict)  # target path -> Variable record (JSON)

  def planner_axes(self) -> dict[str, int]:
    """`scan_axis` for the planner: source axes where the source is stacked, else target axes."""
    out = {re.escape(k): v for k, v in self.scan_axes.items()}
    out.update({re.escape(k): v for k, v in self.source_axes.items()})
    return out


def _is_param_like(layout: Layout, canon: CanonPath, disk: DiskPath) -> bool:
  record = layout.meta.record_of(disk)
  if record is not None:
    return record.type_name.rsplit('.', 1)[-1] not in _NON_PARAM_TYPES
  if any(disk[: len(root)] == root for root in layout.aux_roots):
    return False
  return not (set(canon) & _RNG_NAMES)


def _variable_type(layout: Layout, canon: CanonPath, disk: DiskPath, param_like: bool) -> str:
  record = layout.meta.record_of(disk)
  if record is not None:
    return record.type_name
  if canon[0] == OPTIMIZER:
    if canon[-1] == 'step':
      return 'flax.nnx.training.optimizer.OptState'
    return 'flax.nnx.training.optimizer.OptVariable' if len(canon) > model_start(canon) else \
        'flax.nnx.training.optimizer.OptArray'
  if not param_like:
    if canon[-1] == 'key':
      return 'flax.nnx.rnglib.RngKey'
    if canon[-1] == 'count':
      return 'flax.nnx.rnglib.RngCount'
    return 'flax.nnx.variablelib.BatchStat'
  return 'flax.nnx.variablelib.Param'


def _group_of(canon: CanonPath, groups: Sequence[LayerGroup]) -> tuple[LayerGroup, int] | None:
  """The group a canonical path belongs to (model or moment mirror), with the group key's index."""
  start = model_start(canon)
  model_part = canon[start:]
  for group in groups:
    gp = group.path[1:]  # drop 'model'
    if group.style == 'stacked' and model_part[: len(gp)] == gp:
      return group, start + len(gp) - 1
    if group.style != 'stacked' and len(model_part) > len(gp):
      head = model_part[: len(gp)]
      if group.style == 'unrolled_suffix' and head[:-1] == gp[:-1] and re.fullmatch(
          re.escape(gp[-1]) + r'_\d+', head[-1]):
        return group, start + len(gp) - 1
      if group.style == 'unrolled_index' and head == gp and model_part[len(gp)].isdigit():
        return group, start + len(gp)
  return None


def model_target(layout: Layout, target: Any, *, flavour: Literal['raw', 'pure'] = 'raw',
                 include: Literal['all', 'params'] = 'all', dtype: Any = None) -> LayoutTarget:
  """The converted checkpoint's leaves for an NNX model (or abstract state) `target`: its own paths,
  Variable types and metadata, written as `nnx.state(target)` is saved (NNX `flavour`)."""
  from flax import nnx  # local: the layout-only targets above need no Flax

  from orbax_nnx import nnx_tree
  from orbax_nnx.planning.planner import target_leaves

  state = nnx.state(target, nnx.Param) if include == 'params' else target
  variables = dict(nnx_tree.flatten(state))
  cast_to = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  leaves, disk, types, records = [], {}, {}, {}
  for leaf in target_leaves(state):
    if cast_to is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
      leaf = dataclasses.replace(leaf, dtype=cast_to)
    variable = variables[leaf.path]
    is_variable = isinstance(variable, nnx.Variable)
    leaves.append(leaf)
    disk[leaf.path] = nnx_tree.disk_path(leaf.path, is_variable, flavour)
    if is_variable:
      record = nnx_tree.record_for(leaf.path, variable)
      types[leaf.path], records[leaf.path] = record.type_name, record.to_json()
  return LayoutTarget(leaves, disk, types, 'nnx', {}, {}, {}, records)


MAX_UNROLLED_LAYERS = 1 << 16  # a stacked group claiming more layers is damaged metadata


def layout_target(layout: Layout, *, to: Framework, scan_layers: bool | None = None,
                  scan_axis: int | Mapping[str, int] | None = None, param_scan_axis: int = 1,
                  flavour: Literal['raw', 'pure'] = 'raw', linen_params: Literal['double', 'single'] = 'double',
                  include: Literal['all', 'params'] = 'all', original: Mapping | None = None,
                  dtype: Any = None) -> LayoutTarget:
  """The converted checkpoint's leaves for `layout` converted to framework `to`.

  `linen_params='double'` writes the MaxText form (`params/params/...`, NNX-only state under
  `nnx_aux`); `'single'` the flax form (`params/...` as `TrainState.create(params=variables['params'])`
  holds it, batch stats under `batch_stats/...`, NNX rng state left out).
  `original` is the conversion record of a checkpoint we wrote: converting back, each
  leaf goes to its original stored path with its original dtype (bit-exact round trips).
  `include='params'` keeps the model's Params only and writes a decode checkpoint (NNX:
  the model's leaves at the root; Linen: `step`=0 and `params/params/...`); `dtype`
  casts floating leaves.
  """
  cast_to = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  original_paths = dict(original.get('paths', {})) if original else {}
  original_dtypes = dict(original.get('dtypes', {})) if original else {}
  model_at_root = layout.kind == 'params' or include == 'params'
  if original_paths and to == 'nnx':  # leaves new to the original (re-stacked ones) follow its conventions
    model_rels = [(c.split('/', 1)[1], d) for c, d in original_paths.items() if c.startswith(MODEL + '/')]
    model_at_root = model_at_root or any(d in (rel, f'{rel}/{VALUE_KEY}') for rel, d in model_rels)
    flavour = 'raw' if any(d.endswith(f'/{VALUE_KEY}') for d in original_paths.values()) else 'pure'
  known = [_with_length(layout, g, scan_axis) for g in layout.groups]
  if scan_layers is False:
    groups = [g for g in known if g.style == 'stacked']
  elif scan_layers is True:
    groups = [g for g in known if g.style != 'stacked']
  else:
    groups = []
  # stacked groups that stay stacked across frameworks move to the target's layer-axis convention
  moved = [g for g in known if g.style == 'stacked' and g not in groups and to != layout.framework]
  target_recorded = dict(original.get('source_scan_axes', {})) if original else {}
  for g in groups + moved:
    if g.style == 'stacked' and g.length <= 0:
      raise errors.PlanError(f'{"/".join(g.path)}: the number of stacked layers cannot be told from the shapes;'
                             ' pass scan_axis to say where the layer axis is.')
    if g.style == 'stacked' and g.length > MAX_UNROLLED_LAYERS:
      raise errors.PlanError(
          f'{"/".join(g.path)}: unrolling would make {g.length} layers (more than {MAX_UNROLLED_LAYERS}). No model'
          ' has that many: check the stored shapes with `orbax-nnx inspect` (damaged metadata?), or pass scan_axis'
          ' if the layer axis is another one.')
  recorded = layout.meta.ours.get('scan_axes', {}) if isinstance(layout.meta.ours, Mapping) else {}
  member_dtypes = collections.defaultdict(set)  # stacked path -> the dtypes its unrolled layers are stored in
  for canon, disk in layout.canonical.items():
    member_dtypes[_stacked_path(canon, groups)].add(np.dtype(layout.leaves[disk].dtype))
  leaves, disk_of, types, axes, source_axes, stacked_out = [], {}, {}, {}, {}, {}
  seen: set[CanonPath] = set()
  for canon, disk in sorted(layout.canonical.items()):
    if canon[0] not in (MODEL, OPTIMIZER):
      continue
    if include == 'params' and (canon[0] != MODEL or not _is_param_like(layout, canon, disk)):
      continue
    info = layout.leaves[disk]
    param_like = _is_param_like(layout, canon, disk)
    vtype = _variable_type(layout, canon, disk, param_like)
    if to == 'linen' and linen_params == 'single' and _is_rng(vtype):
      continue  # a flax TrainState has no place for NNX rng state
    shape, dtype = tuple(info.shape), np.dtype(info.dtype)
    if canon == (OPTIMIZER, 'step'):
      dtype = np.dtype('uint32') if to == 'nnx' else np.dtype('int32')
    hit = _group_of(canon, groups)
    move = _group_of(canon, moved) if hit is None else None
    outputs: list[tuple[CanonPath, tuple]] = []
    layer_axis = None
    if move is not None:
      src = _unstack_axis(canon, shape, move[0].length, scan_axis, recorded, param_like, param_scan_axis,
                          layout.framework)
      member = shape[:src] + shape[src + 1:]
      dst = min(_stack_axis(canon, None, target_recorded, param_like, param_scan_axis, to), len(member))
      source_axes['/'.join(canon)] = src
      axes['/'.join(canon)] = dst
      layer_axis = dst
      stacked_out[canon] = dst
      outputs.append((canon, member[:dst] + (move[0].length,) + member[dst:]))
    elif hit is None:
      outputs.append((canon, shape))
    elif hit[0].style == 'stacked':
      group, k = hit
      axis = _unstack_axis(canon, shape, group.length, scan_axis, recorded, param_like, param_scan_axis,
                           layout.framework)
      source_axes['/'.join(canon)] = axis
      member = shape[:axis] + shape[axis + 1:]
      outputs += [(canon[:k] + (f'{canon[k]}_{i}',) + canon[k + 1:], member) for i in range(group.length)]
    else:
      group, k = hit
      stacked = _stacked_path(canon, groups)
      if stacked in seen:
        continue
      axis = min(_stack_axis(stacked, scan_axis, target_recorded, param_like, param_scan_axis, to), len(shape))
      axes['/'.join(stacked)] = axis
      stacked_out[stacked] = axis
      outputs.append((stacked, shape[:axis] + (group.length,) + shape[axis:]))
      # layers stored in several dtypes stack in one that holds each exactly (numpy's promotion)
      dtype = promote(member_dtypes[stacked])
    for out_canon, out_shape in outputs:
      seen.add(out_canon)
      key = '/'.join(out_canon)
      out_dtype = np.dtype(original_dtypes[key]) if key in original_dtypes else dtype
      if cast_to is not None and jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = cast_to
      leaf = TargetLeaf(out_canon, out_canon, tuple(out_shape), out_dtype, info.key_impl, param_like, None,
                        layer_axis)
      leaves.append(leaf)
      disk_of[out_canon] = (tuple(original_paths[key].split('/')) if key in original_paths else
                            _stored_path(out_canon, to, flavour, linen_params, param_like, model_at_root, vtype))
      types[out_canon] = vtype
  if include == 'params' and to == 'linen':
    step = (OPTIMIZER, 'step')
    leaves.append(TargetLeaf(step, step, (), np.dtype('int32'), None, False, None, None, 0))
    disk_of[step], types[step] = ('step',), 'flax.nnx.training.optimizer.OptState'
  return LayoutTarget(leaves, disk_of, types, to, axes, source_axes, stacked_out)


def _stacked_path(canon: CanonPath, groups: Sequence[LayerGroup]) -> CanonPath | None:
  """The stacked path an unrolled layer's leaf goes to (`layers_3/w` -> `layers/w`), if it is one."""
  hit = _group_of(canon, groups)
  if hit is None or hit[0].style == 'stacked':
    return None
  group, k = hit
  return canon[:k] + (group.path[-1],) + canon[k + 1:] if group.style == 'unrolled_suffix' else canon[:k] + canon[k + 1:]


def _with_length(layout: Layout, group: LayerGroup, scan_axis) -> LayerGroup:
  """A stacked group whose layer count the shapes left open, counted on the axes `scan_axis` gives."""
  if group.style != 'stacked' or group.length > 0 or scan_axis is None:
    return group
  sizes = set()
  for canon, disk in layout.canonical.items():
    hit = _group_of(canon, [group])
    axis = lookup_axis(scan_axis, canon) if hit is not None else None
    shape = layout.leaves[disk].shape
    if axis is not None and -len(shape) <= axis < len(shape):
      sizes.add(shape[axis])
  return dataclasses.replace(group, length=sizes.pop()) if len(sizes) == 1 else group


def _is_rng(type_name: str) -> bool:
  return type_name.rsplit('.', 1)[-1] in ('RngKey', 'RngCount', 'RngState')


def _unstack_axis(canon, shape, length, scan_axis, recorded, param_like, param_scan_axis, framework) -> int:
  """The layer axis of a stored stacked array, by `mapping.axes.layer_axis`'s precedence."""
  cands = [a for a, n in enumerate(shape) if n == length]
  conv = (param_scan_axis if param_like else 0) if framework == 'linen' else None
  return layer_axis('/'.join(canon), shape, cands, Evidence(
      explicit=lookup_axis(scan_axis, canon), recorded=recorded.get('/'.join(canon)), convention=conv),
      what=f'{length} layers')


def _stack_axis(canon, scan_axis, recorded, param_like, param_scan_axis, to) -> int:
  """Where a conversion writes a stacked layer axis: explicit or recorded, else the target framework's own
  (Linen Params on `param_scan_axis`, all else and NNX on 0); callers clamp it to the member's rank."""
  explicit = lookup_axis(scan_axis, canon)
  if explicit is None:
    explicit = recorded.get('/'.join(canon))
  if explicit is not None:
    return int(explicit)
  return (param_scan_axis if param_like else 0) if to == 'linen' else 0


def _is_batch_stat(type_name: str) -> bool:
  return type_name.rsplit('.', 1)[-1] == 'BatchStat'


def _stored_path(canon: CanonPath, to: Framework, flavour: str, linen_params: str, param_like: bool,
                 model_at_root: bool, vtype: str = '') -> DiskPath:
  if to == 'nnx':
    if model_at_root and canon[0] == MODEL:
      base = canon[1:]
    else:
      base = canon
    return base + ((VALUE_KEY,) if flavour == 'raw' else ())
  # Linen: params (optionally double-nested), opt_state with moments mirroring params, step
  double = linen_params == 'double'
  if canon[0] == MODEL:
    if not param_like:  # batch stats where each style's Linen code reads them; NNX-only state in MaxText's nnx_aux
      if _is_batch_stat(vtype):
        return (('params', 'batch_stats') if double else ('batch_stats',)) + canon[1:]
      return ('nnx_aux', MODEL) + canon[1:] if double else ('batch_stats',) + canon[1:]
    return (('params', 'params') if double else ('params',)) + canon[1:]
  if canon == (OPTIMIZER, 'step'):
    return ('step',)
  start = model_start(canon)
  rel = canon[2:]
  if double and start < len(canon):
    rel = canon[2:start] + ('params',) + canon[start:]
  return ('opt_state',) + rel
