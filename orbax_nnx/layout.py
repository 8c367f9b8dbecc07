"""Layout detection from Orbax metadata alone: what tree, which flavour, which layer groups.

Every stored leaf is given a *canonical* path in one NNX-like namespace:

    ('model', <module path>)                       params, and MaxText `nnx_aux/model/...`
    ('optimizer', 'step')                          step (Linen `step`)
    ('optimizer', 'opt_state', <chain>, <path>)    optax state; moments mirror the model path

with `value` wrappers stripped and Linen's extra `params` level dropped (also inside Adam
`mu`/`nu`). Conversions between layouts are then differences in canonical paths: only
scanned (stacked) vs unrolled layer groups remain, which `plan` resolves.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Literal

from orbax_nnx import errors
from orbax_nnx.metadata import ItemMetadata, LeafInfo, read_item_metadata
from orbax_nnx.nnx_tree import VALUE_KEY, DiskPath

Kind = Literal['nnx', 'linen', 'maxtext', 'params', 'safetensors']
CanonPath = tuple[str, ...]

MODEL, OPTIMIZER = 'model', 'optimizer'
UNROLLED_SUFFIX = re.compile(r'^(?P<name>.*[^\d_])_(?P<index>\d+)$')
LINEN_STATE_COLLECTIONS = ('batch_stats',)  # Linen variable collections that NNX keeps inside the model
STACK_HINT_NAMES = ('layers', 'layers_per_stage', 'circular_repeats', 'stage', 'blocks')
# The names real models give their layer groups. Anything else ending in `_N` (Linen's auto-named
# submodules `Dense_0`, `Conv_1`, ...) is an ordinary module, never unrolled layers.
LAYER_GROUP_NAME = re.compile(r'layers?|blocks?|h|stages?|layers_per_stage|circular_repeats|[a-z0-9_]*_(layers|blocks)')


def is_group_name(name: str) -> bool:
  """Whether `name` names a group of layers (`layers`, `blocks`, `h`, `moe_layers`, ...)."""
  return LAYER_GROUP_NAME.fullmatch(name) is not None


def unrolled_member(canon: CanonPath, k: int) -> tuple[CanonPath, str, int] | None:
  """`(group path, style, index)` when `canon[k]` is one layer of an unrolled group, else None.

  The one place that decides: `layers_3` (suffix) or `layers/3` (index), the group named by
  `is_group_name`.
  """
  m = UNROLLED_SUFFIX.match(canon[k])
  if m and is_group_name(m['name']):
    return canon[:k] + (m['name'],), 'unrolled_suffix', int(m['index'])
  if canon[k].isdigit() and k > 0 and is_group_name(canon[k - 1]):
    return canon[:k], 'unrolled_index', int(canon[k])
  return None


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """A group of layers: stacked in one array per leaf, or unrolled as `name_N` / `name/N`."""

  path: CanonPath  # canonical path of the group (for unrolled: the common name, e.g. ('model', 'layers'))
  style: Literal['stacked', 'unrolled_suffix', 'unrolled_index']
  length: int
  indices: tuple[int, ...] = ()

  def __str__(self) -> str:
    where = '/'.join(self.path)
    if self.style == 'stacked':
      return f'{where}: stacked, {self.length} layers'
    form = f'{self.path[-1]}_N' if self.style == 'unrolled_suffix' else f'{self.path[-1]}/N'
    return f'{where}: unrolled ({form}), {self.length} layers'


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a checkpoint item holds, from metadata alone."""

  kind: Kind
  flavour: Literal['raw', 'pure', 'mixed']
  params_root: DiskPath | None
  opt_root: DiskPath | None
  step_path: DiskPath | None
  aux_roots: tuple[DiskPath, ...]  # model-mirroring non-param state: nnx_aux/model, batch_stats
  groups: tuple[LayerGroup, ...]
  canonical: Mapping[CanonPath, DiskPath]  # canonical path -> stored path
  leaves: Mapping[DiskPath, LeafInfo]
  meta: ItemMetadata

  @property
  def framework(self) -> Literal['nnx', 'linen']:
    return 'nnx' if self.kind in ('nnx', 'params', 'safetensors') else 'linen'

  def rule_key(self, canon: CanonPath) -> str:
    """What a rule pattern fullmatches for a source leaf: the tensor name as stored (safetensors),
    else the canonical path joined with `/`."""
    return '.'.join(canon[1:]) if self.kind == 'safetensors' else '/'.join(canon)

  def rule_target(self, replacement: str) -> CanonPath:
    """The canonical target path a rule's replacement names: a path in the target tree (safetensors),
    else a canonical path."""
    parts = tuple(replacement.split('/'))
    return (MODEL,) + parts if self.kind == 'safetensors' else parts

  def info(self, canon: CanonPath) -> LeafInfo:
    return self.leaves[self.canonical[canon]]

  def summary(self) -> str:
    lines = [f'layout: {self.kind} ({self.flavour} flavour)']
    for label, root in (('params', self.params_root), ('optimizer', self.opt_root),
                        ('step', self.step_path)) + tuple(('aux', r) for r in self.aux_roots):
      if root is not None:
        lines.append(f'  {label:9} at {"/".join(root) or "<root>"}')
    lines += [f'  group     {g}' for g in self.groups]
    return '\n'.join(lines)


def _strip_value(path: DiskPath) -> DiskPath:
  return path[:-1] if path and path[-1] == VALUE_KEY else path


def _model_start(canon: CanonPath) -> int:
  """Index where the model-mirroring part of a canonical path starts."""
  if canon[:1] == (MODEL,):
    return 1
  if canon[:2] == (OPTIMIZER, 'opt_state'):
    i = 2
    while i < len(canon) and canon[i].isdigit():
      i += 1
    return i + 1  # skip the state field name ('mu', 'nu', 'count', ...)
  return len(canon)


def model_start(canon: CanonPath) -> int:
  """Public alias: where group names may appear in a canonical path."""
  return _model_start(canon)


def detect(meta: ItemMetadata) -> Layout:
  """Detects the layout of one Orbax item (or safetensors source) from its metadata."""
  paths = list(meta.leaves)
  if not paths:
    raise errors.LayoutError(f'{meta.directory}: the checkpoint holds no arrays.')
  if meta.format == 'safetensors':
    return _detect_safetensors(meta)
  top = {p[0] for p in paths if p}
  value_count = sum(1 for p in paths if p[-1] == VALUE_KEY)
  flavour = 'raw' if value_count == len(paths) else 'pure' if value_count == 0 else 'mixed'
  params_root = opt_root = step_path = None
  aux_roots: list[DiskPath] = []

  # a Linen variables dict ({'params', 'batch_stats', 'counter', ...}, no NNX roots) or train state
  variables_dict = 'params' in top and not top & {'step', 'opt_state', MODEL, OPTIMIZER}
  if 'params' in top and ({'step', 'opt_state'} & top or variables_dict):
    under = [p for p in paths if p[0] == 'params']
    second = {p[1] for p in under if len(p) > 2}
    double = ('params' in second and all(len(p) > 2 for p in under)
              and second <= {'params'} | set(LINEN_STATE_COLLECTIONS))
    params_root = ('params', 'params') if double else ('params',)
    if double:
      aux_roots += [('params', c) for c in LINEN_STATE_COLLECTIONS if c in second]
    aux_roots += [(c,) for c in LINEN_STATE_COLLECTIONS if c in top]
    if variables_dict:  # every other collection mirrors the module tree (e.g. the Flax bridge guide's 'counter')
      aux_roots += [(c,) for c in sorted(top - {'params', 'nnx_aux'} - set(LINEN_STATE_COLLECTIONS))]
    opt_root = ('opt_state',) if 'opt_state' in top else None
    step_path = ('step',) if ('step',) in meta.leaves else None
    if 'nnx_aux' in top:
      aux_roots.append(('nnx_aux', MODEL))
    kind: Kind = 'maxtext' if 'nnx_aux' in top else 'linen'
  elif top & {MODEL, OPTIMIZER}:
    kind = 'nnx'
    params_root = (MODEL,) if MODEL in top else None
    opt_root = (OPTIMIZER, 'opt_state') if OPTIMIZER in top else None
    step_path = next((p for p in paths if _strip_value(p) == (OPTIMIZER, 'step')), None)
  elif {'opt_state', 'step'} <= top:
    kind = 'nnx'
    opt_root = ('opt_state',)
    step_path = next((p for p in paths if _strip_value(p) == ('step',)), None)
  else:
    kind = 'params'
    params_root = ('base',) if top == {'base'} else ()

  canonical: dict[CanonPath, DiskPath] = {}

  def add(canon: CanonPath, disk: DiskPath) -> None:
    if canon in canonical and canonical[canon] != disk:
      raise errors.LayoutError(
          f'{meta.directory}: {"/".join(disk)} and {"/".join(canonical[canon])} both map to'
          f' {"/".join(canon)}; the layout is ambiguous. Convert with explicit --rename rules.'
      )
    canonical[canon] = disk

  param_suffixes = set()
  for p in paths:
    if params_root is not None and p[: len(params_root)] == params_root:
      param_suffixes.add(_strip_value(p[len(params_root):]))
  for p in paths:
    rel = _strip_value(p)
    if params_root is not None and p[: len(params_root)] == params_root:
      add((MODEL,) + rel[len(params_root):], p)
    elif any(p[: len(r)] == r for r in aux_roots):
      root = next(r for r in aux_roots if p[: len(r)] == r)
      add((MODEL,) + rel[len(root):], p)
    elif step_path is not None and p == step_path:
      add((OPTIMIZER, 'step'), p)
    elif opt_root is not None and p[: len(opt_root)] == opt_root:
      add((OPTIMIZER, 'opt_state') + _drop_params_level(rel[len(opt_root):], param_suffixes), p)
    else:
      add(('other',) + rel, p)
  groups = _find_groups(canonical, meta, 'nnx' if kind in ('nnx', 'params') else 'linen')
  return Layout(kind, flavour, params_root, opt_root, step_path, tuple(aux_roots), tuple(groups), canonical,
                meta.leaves, meta)


def _detect_safetensors(meta: ItemMetadata) -> Layout:
  """Tensor names split on `.`: `model.layers.3.mlp.up_proj.weight` -> ('model', 'model', 'layers', '3', ...),
  so layer groups are seen; rules match the names as stored (see `Layout.rule_key`)."""
  canonical = {(MODEL,) + tuple(path[0].split('.')): path for path in meta.leaves}
  groups = _find_groups(canonical, meta, 'nnx')
  return Layout('safetensors', 'pure', (), None, None, (), tuple(groups), canonical, meta.leaves, meta)


def _drop_params_level(rel: DiskPath, param_suffixes: set) -> DiskPath:
  """Linen moments mirror `params` exactly: `mu/params/<m>` -> `mu/<m>`."""
  for i, key in enumerate(rel):
    if key == 'params' and i > 0 and rel[i + 1:] in param_suffixes:
      return rel[:i] + rel[i + 1:]
  return rel


def _find_groups(canonical: Mapping[CanonPath, DiskPath], meta: ItemMetadata, framework: str) -> list[LayerGroup]:
  unrolled: dict[tuple[CanonPath, str], set[int]] = defaultdict(set)
  stacked: set[CanonPath] = set()
  for canon in canonical:
    if canon[0] != MODEL:
      continue
    for k in range(1, len(canon)):
      key = canon[k]
      member = unrolled_member(canon, k) if k > 1 or not canon[k].isdigit() else None
      if member is not None:
        unrolled[member[:2]].add(member[2])
        break
      if key in STACK_HINT_NAMES and not (k + 1 < len(canon) and canon[k + 1].isdigit()):
        stacked.add(canon[: k + 1])
        break
  groups = [LayerGroup(path, style, len(idx), tuple(sorted(idx))) for (path, style), idx in sorted(unrolled.items())]
  for path in sorted(stacked):
    groups.append(LayerGroup(path, 'stacked', _common_length(canonical, meta, path, framework)))
  return groups


def _common_length(canonical, meta, prefix: CanonPath, framework: str) -> int:
  """The layer count of a stacked group: the dimension every member shares (0 if unclear).

  When several sizes are shared, our recorded `out_sharding` names decide, then the
  convention: the size every member has at axis 1 (Linen/MaxText params) or 0 (NNX).
  """
  common = None
  shapes = []
  for canon, disk in canonical.items():
    if canon[: len(prefix)] == prefix:
      shapes.append(meta.leaves[disk].shape)
      dims = set(meta.leaves[disk].shape)
      common = dims if common is None else common & dims
  if common and len(common) == 1:
    return next(iter(common))
  for canon, disk in canonical.items():
    if canon[: len(prefix)] != prefix:
      continue
    names = meta.record_of(disk)
    sharding = names.metadata.get('out_sharding') if names else None
    if sharding:
      for axis, name in enumerate(sharding):
        if name in STACK_HINT_NAMES:
          return meta.leaves[disk].shape[axis]
  for axis in ((1, 0) if framework == 'linen' else (0, 1)):
    sizes = {s[axis] for s in shapes if len(s) > axis}
    if len(sizes) == 1 and common and sizes <= common and all(len(s) > axis or not s for s in shapes):
      return sizes.pop()
  return 0


def detect_layout(path) -> Layout:
  """Reads the metadata of an Orbax item directory and detects its layout."""
  return detect(read_item_metadata(path))
