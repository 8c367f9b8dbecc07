"""Layout detection from Orbax metadata alone: what tree, which flavour, which layer groups.

Every stored leaf is given a *canonical* path in one NNX-like namespace:

    ('model', <module path>)                       params, and MaxText `nnx_aux/model/...`
    ('optimizer', 'step')                          step (Linen `step`)
    ('optimizer', 'opt_state', <chain>, <path>)    optax state; moments mirror the model path

by the rules of one preset (`orbax_nnx.mapping.presets`): `value` wrappers stripped, Linen's extra `params`
level dropped (also inside Adam `mu`/`nu`). Conversions between layouts are then differences in
canonical paths: only scanned (stacked) vs unrolled layer groups remain, which `plan` resolves.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

from orbax_nnx import errors
from orbax_nnx.mapping import presets
from orbax_nnx.mapping.groups import DEFAULT_GROUPS, MODEL, OPTIMIZER, GroupNames, group_names
from orbax_nnx.mapping.presets import Kind
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import ItemMetadata, LeafInfo, read_item_metadata, resolve_item

CanonPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """A group of layers: stacked in one array per leaf, or unrolled as `name_N` / `name/N`.

  Attributes:
    path: the group's canonical path (unrolled: the common name, e.g. `('model', 'layers')`).
    style: 'stacked', 'unrolled_suffix' (`layers_0`, `layers_1`) or 'unrolled_index' (`layers/0`).
    length: the number of layers (0 while a stacked group's shapes leave it open).
    indices: the layer numbers of an unrolled group.
  """

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
  """What a checkpoint item holds, from metadata alone (`orbax_nnx.detect_layout`).

  Attributes:
    kind: 'nnx', 'linen', 'maxtext', 'params' (a bare model tree) or 'safetensors'.
    flavour: 'raw' (every leaf under `value`), 'pure', or 'mixed'.
    params_root: where the model's params are stored (e.g. `('params', 'params')`), if anywhere.
    opt_root: where the optimizer state is stored, if anywhere.
    step_path: where the step is stored, if anywhere.
    aux_roots: model-mirroring state besides the params (`nnx_aux/model`, `batch_stats`).
    groups: the layer groups found (`LayerGroup`).
    canonical: canonical path (`model/...`, `optimizer/...`) -> stored path, for every stored leaf.
    leaves: stored path -> shape, dtype and storage facts.
    meta: the item's metadata as read once.
    preset: the layout preset whose rules gave the canonical paths.
    group_names: the layer-group names in force (built-in and declared).
  """

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
  preset: str = ''  # the preset whose rules gave the canonical paths
  group_names: GroupNames = DEFAULT_GROUPS

  @property
  def framework(self) -> Literal['nnx', 'linen']:
    return 'nnx' if self.kind in ('nnx', 'params', 'safetensors') else 'linen'

  def stored_name(self, canon: CanonPath) -> str:
    """A source leaf's path as `inspect` prints it (and rules match it): the tensor name for
    safetensors, else the Orbax tree path joined with `/`."""
    disk = self.canonical[canon]
    return disk[0] if self.kind == 'safetensors' else '/'.join(disk)

  def info(self, canon: CanonPath) -> LeafInfo:
    return self.leaves[self.canonical[canon]]

  def summary(self) -> str:
    lines = [f'layout: {self.kind} ({self.flavour} flavour), preset {self.preset}']
    for label, root in (('params', self.params_root), ('optimizer', self.opt_root),
                        ('step', self.step_path)) + tuple(('aux', r) for r in self.aux_roots):
      if root is not None:
        lines.append(f'  {label:9} at {"/".join(root) or "<root>"}')
    lines += [f'  group     {g}' for g in self.groups]
    return '\n'.join(lines)


def detect(meta: ItemMetadata, *, layout: str | None = None, groups=None) -> Layout:
  """Detects the layout of one Orbax item (or safetensors source) from its metadata.

  `layout` forces a preset by name (see `orbax_nnx.mapping.presets`); `groups` declares more layer-group
  names (names or regexes) beside the built-in ones.
  """
  names = group_names(groups)
  paths = list(meta.leaves)
  if not paths:
    raise errors.LayoutError(f'{meta.directory}: the checkpoint holds no arrays.')
  if meta.format == 'safetensors':
    if layout not in (None, 'safetensors'):
      raise errors.OptionError(f'layout={layout!r}: {meta.directory} is a safetensors source; its only preset'
                               " is 'safetensors'.")
    return _detect_safetensors(meta, names)
  preset = presets.get(layout) if layout is not None else presets.choose(paths, str(meta.directory))
  value_count = sum(1 for p in paths if p[-1] == 'value')
  flavour = 'raw' if value_count == len(paths) else 'pure' if value_count == 0 else 'mixed'
  canonical: dict[CanonPath, DiskPath] = {}
  roots: dict[str, list[DiskPath]] = defaultdict(list)
  for p in paths:
    canon, role = preset.canonical(p)
    if canon in canonical and canonical[canon] != p:
      raise errors.LayoutError(
          f'{meta.directory}: {"/".join(p)} and {"/".join(canonical[canon])} both map to'
          f' {"/".join(canon)} under preset {preset.name!r}; the layout is ambiguous. Pass layout=NAME, or'
          ' rules=[(STORED_PATH, TARGET_PATH)] that tell them apart.')
    canonical[canon] = p
    if role is not None:
      root = _root(p, canon, role)
      if root not in roots[role]:
        roots[role].append(root)
  unmapped = sorted('/'.join(p) for c, p in canonical.items() if c[0] not in (MODEL, OPTIMIZER))
  if layout is not None and unmapped:  # a forced preset that drops stored leaves would lose them silently
    raise errors.LayoutError(
        f'{meta.directory}: layout={layout!r} leaves {len(unmapped)} stored leaves unmapped (e.g.'
        f' {unmapped[:3]}), so they would be lost; this checkpoint is not in that layout: omit layout= to'
        f' detect, or pick another of {sorted(presets.BY_NAME)}.')
  if not any(c[0] in (MODEL, OPTIMIZER) for c in canonical):
    raise errors.LayoutError(f'{meta.directory}: preset {preset.name!r} maps none of the stored paths (e.g.'
                             f' {"/".join(paths[0])}); pick another layout= or omit it to detect.')
  kind = 'maxtext' if preset.kind == 'linen' and any(r[0] == 'nnx_aux' for r in roots['aux']) else preset.kind
  found = find_groups(canonical, meta, 'nnx' if kind in ('nnx', 'params') else 'linen', names)
  return Layout(kind, flavour, (roots['params'] or [None])[0], (roots['opt'] or [None])[0],
                (roots['step'] or [None])[0], tuple(roots['aux']), tuple(found), canonical, meta.leaves, meta,
                preset.name, names)


def _root(stored: DiskPath, canon: CanonPath, role: str) -> DiskPath:
  """Where a rule's part of the tree starts on disk: `params/params` for `params/params/dense/kernel`."""
  if role == 'step':
    return stored
  if role == 'opt':
    return stored[:stored.index('opt_state') + 1]
  rel = len(canon) - 1 + (stored[-1] == 'value' and canon[-1] != 'value')
  joined = '/'.join(stored)
  cut = len(joined)
  for _ in range(rel):  # stored keys may hold '/': count components on the joined path
    cut = max(joined.rfind('/', 0, cut), 0)
  return tuple(joined[:cut].split('/')) if cut > 0 else ()


def _detect_safetensors(meta: ItemMetadata, names: GroupNames) -> Layout:
  """Tensor names split on `.`: `model.layers.3.mlp.up_proj.weight` -> ('model', 'model', 'layers', '3', ...),
  so layer groups are seen; rules match the names as stored (see `Layout.stored_name`)."""
  canonical = {(MODEL,) + tuple(path[0].split('.')): path for path in meta.leaves}
  found = find_groups(canonical, meta, 'nnx', names)
  return Layout('safetensors', 'pure', (), None, None, (), tuple(found), canonical, meta.leaves, meta,
                'safetensors', names)


def find_groups(canonical: Mapping[CanonPath, DiskPath], meta: ItemMetadata, framework: str,
                names: GroupNames = DEFAULT_GROUPS) -> list[LayerGroup]:
  """The layer groups among the model paths, by `names`: unrolled members, and stacked group keys."""
  unrolled: dict[tuple[CanonPath, str], set[int]] = defaultdict(set)
  stacked: set[CanonPath] = set()
  for canon in canonical:
    if canon[0] != MODEL:
      continue
    for k in range(1, len(canon)):
      member = names.unrolled_member(canon, k)
      if member is not None:
        unrolled[member[:2]].add(member[2])
        break
      if names.stacked_at(canon, k):
        stacked.add(canon[: k + 1])
        break
  found = [LayerGroup(path, style, len(idx), tuple(sorted(idx))) for (path, style), idx in sorted(unrolled.items())]
  for path in sorted(stacked):
    found.append(LayerGroup(path, 'stacked', _common_length(canonical, meta, path, framework, names)))
  return found


def _common_length(canonical, meta, prefix: CanonPath, framework: str, names: GroupNames) -> int:
  """The layer count of a stacked group: the dimension every member shares (0 if unclear).

  When several sizes are shared, our recorded layer axes or `out_sharding` names decide, then for Linen sources the
  convention (the size every member has at axis 1, then 0); for NNX sources the size every member has at axis
  0 or 1, when only one of those is consistent (else 0: a plan then needs `scan_axis` or the target's count).
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
  recorded = meta.ours.get('scan_axes') or {}
  for canon, disk in canonical.items():
    if canon[: len(prefix)] != prefix:
      continue
    axis = recorded.get('/'.join(canon))
    if axis is not None and -len(meta.leaves[disk].shape) <= axis < len(meta.leaves[disk].shape):
      return meta.leaves[disk].shape[axis]  # the layer axis a conversion of ours recorded
    record = meta.record_of(disk)
    axis = names.names_axis(record.metadata.get('out_sharding') if record else None)
    if axis is not None:
      return meta.leaves[disk].shape[axis]
  fits = []
  for axis in ((1, 0) if framework == 'linen' else (0, 1)):
    sizes = {s[axis] for s in shapes if len(s) > axis}
    if len(sizes) == 1 and common and sizes <= common and all(len(s) > axis or not s for s in shapes):
      fits.append(sizes.pop())
  if framework == 'linen' and fits:  # the Linen/MaxText convention decides (axis 1, then 0)
    return fits[0]
  # NNX stacks on axis 0 (nnx.vmap) or 1 (MaxText NNX) alike: only one consistent count is a count
  return fits[0] if len(set(fits)) == 1 else 0


@listing.looking_once
def detect_layout(path, *, layout: str | None = None, groups=None, step: int | None = None,
                  item: str | None = None) -> Layout:
  """Reads the metadata of a checkpoint and detects its layout.

      layout = orbax_nnx.detect_layout('ckpt/100/default'); print(layout.summary())

  Args:
    path: an item directory, a step directory, a manager root (latest step) or a safetensors source.
    layout: forces a preset by name (`orbax-nnx presets` lists them).
    groups: declares more layer-group names (names or regexes).
    step: the step of a manager root.
    item: the item inside a step dir with several items.

  Returns:
    The `Layout`: kind, flavour, roots, layer groups, and each stored leaf's canonical path.

  Raises:
    NotACheckpointError: nothing readable at `path`.
    LayoutError: no single preset fits, or a forced one drops stored leaves.
    OptionError: an unknown preset name.
  """
  return detect(read_item_metadata(resolve_item(path, step=step, item=item)), layout=layout, groups=groups)


LINEN_STYLES = ('maxtext', 'flax')


def linen_style(explicit: str | None, template_paths: Sequence[str] = (), source: 'Layout | None' = None) -> str:
  """The Linen tree a conversion writes: 'maxtext' (`params/params/<m>`, batch stats under
  `params/batch_stats/<m>`, NNX-only state under `nnx_aux`) or 'flax' (`params/<m>`, `batch_stats/<m>`).

  Precedence: `explicit` (`linen_style=`) > the template's structure (`params/params/...` is MaxText's) >
  the record of the conversion that made the source (converting back) > 'maxtext'.
  """
  if explicit is not None:
    errors.check_choice('linen_style', explicit, LINEN_STYLES)
    return explicit
  params = [p for p in template_paths if p.startswith('params/')]
  if params:
    return 'maxtext' if all(p.startswith(('params/params/', 'params/batch_stats/')) for p in params) else 'flax'
  record = source.meta.ours.get('conversion') if source is not None and source.meta.ours else None
  preset = record.get('from_preset') if isinstance(record, Mapping) else None
  return 'flax' if preset == 'linen-flax' else 'maxtext'
