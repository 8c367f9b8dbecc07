"""Plans: every target leaf as a lazy expression over stored leaves.

An expression (`orbax_nnx.planning.expressions`) is data; a `Plan` maps each target path to one.
Plans are built from a `Layout` (metadata only) and a target (an abstract NNX state/model),
can be printed and tested without touching arrays, and are evaluated per target shard by
`orbax_nnx.io.reader`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np
from flax import nnx

from orbax_nnx import compat, errors, nnx_tree
from orbax_nnx.mapping.groups import MODEL, OPTIMIZER, model_start
from orbax_nnx.mapping.layout import CanonPath, Layout
from orbax_nnx.nnx_tree import DiskPath, Path, path_str
from orbax_nnx.planning.expressions import Cast, Const, Expr, Read, Stack, Take, Transpose, reads
from orbax_nnx.mapping.rules import apply_view, rename
from orbax_nnx.mapping.views import View, check_rules, compile_rules

ScanAxis = Union[int, Mapping[str, int], None]
Rule = tuple[str, Union[str, Mapping[str, View]]]  # rename, or target replacement -> view


# -- targets ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetLeaf:
  """One target leaf as the planner sees it."""

  path: Path  # target path, original key types
  canon: CanonPath
  shape: tuple[int, ...]  # for typed keys: the key *data* shape
  dtype: Any  # for typed keys: the key data dtype
  key_impl: Any  # PRNG impl for typed keys, else None
  param_like: bool
  out_sharding: tuple | None
  layer_axis: int | None = None  # the target's layer axis when it is known (layout targets)
  const: Any = None  # a constant value instead of a stored leaf


_NON_PARAM = (nnx.RngState, nnx.BatchStat, nnx.Cache, nnx.Intermediate)


def target_leaves(target: Any, exclude=nnx_tree.DEFAULT_EXCLUDE) -> list[TargetLeaf]:
  """Flattens a target and gives each leaf its canonical path.

  A target with top-level `model`/`optimizer` keys is a train state; one with `opt_state` and `step` an optimizer; anything else a model.
  """
  flat = list(nnx_tree.flatten(target, exclude))
  top = {str(p[0]) for p, _ in flat if p}
  if top & {MODEL, OPTIMIZER}:
    prefix: tuple = ()
  elif {'opt_state', 'step'} <= top:
    prefix = (OPTIMIZER,)
  else:
    prefix = (MODEL,)
  out = []
  for path, leaf in flat:
    value = nnx_tree.value_of(leaf)
    canon = prefix + tuple(str(k) for k in path)
    shape, dtype, impl = tuple(value.shape), value.dtype, None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      impl = compat.key_impl(dtype)
      shape, dtype = shape + tuple(impl.key_shape), np.dtype('uint32')
    param_like = not isinstance(leaf, _NON_PARAM)
    sharding = leaf.get_metadata().get('out_sharding') if isinstance(leaf, nnx.Variable) else None
    out.append(TargetLeaf(tuple(path), canon, shape, np.dtype(dtype), impl, param_like,
                          tuple(sharding) if sharding else None))
  return out


# -- the plan -----------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """Target path -> expression, plus what could not be matched."""

  source: Layout
  entries: dict[Path, Expr]
  leaves: dict[Path, TargetLeaf]
  missing: list[str]
  unused: list[str]

  @property
  def is_identity(self) -> bool:
    """True when every target leaf is a plain read of a same-shaped, same-dtype stored leaf."""
    return not self.missing and all(isinstance(e, Read) for e in self.entries.values())

  def bytes_read(self) -> int:
    seen = {r.source for e in self.entries.values() for r in reads(e)}
    return sum(self.source.leaves[s].nbytes for s in seen)

  def __str__(self) -> str:
    lines = [f'# source: {self.source.kind} ({self.source.flavour}); {len(self.entries)} target leaves,'
             f' {self.bytes_read() / 2**20:.1f} MiB to read']
    for path, expr in self.entries.items():
      leaf = self.leaves[path]
      nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
      lines.append(f'{path_str(path)}  <-  {expr}   [{leaf.shape} {leaf.dtype.name}, {nbytes} B]')
    lines += [f'MISSING {m}' for m in self.missing]
    lines += [f'UNUSED  {u}' for u in self.unused]
    return '\n'.join(lines)


class _Planner:
  """Resolves target leaves against a source layout."""

  def __init__(self, layout: Layout, targets: Sequence[TargetLeaf], rules: Sequence[Rule],
               scan_axis: ScanAxis, param_scan_axis: int):
    self.layout = layout
    self.src: dict[CanonPath, DiskPath] = {}
    compiled = compile_rules(rules)
    matched: set[int] = set()
    self.views: dict[CanonPath, tuple[CanonPath, View]] = {}  # target -> (source, view)
    self.renamed_of: dict[CanonPath, CanonPath] = {}
    prefix = _target_prefix(targets)
    for canon, disk in layout.canonical.items():
      renamed = rename(layout, canon, compiled, matched, prefix)
      if isinstance(renamed, dict):  # a view rule: the source keeps its path, its views name targets
        self.views.update({target: (canon, v) for target, v in renamed.items()})
        renamed = canon
      self.src[renamed] = disk
      self.renamed_of[canon] = renamed
    unmatched = [rules[i] for i in range(len(rules)) if i not in matched]
    if unmatched:
      examples = ', '.join(sorted(layout.stored_name(c) for c in layout.canonical)[:5])
      raise errors.PlanError(
          f'rules that match no stored path: {unmatched}. A rule fullmatches a stored path as `orbax-nnx'
          f' inspect` prints it (e.g. {examples}), or its canonical form as `orbax-nnx plan` prints it'
          f' ({", ".join(sorted("/".join(c) for c in layout.canonical)[:2])}); fix the pattern or drop the rule.')
    self.targets = targets
    self.scan_axis = scan_axis
    self.param_scan_axis = param_scan_axis
    self.names = layout.group_names
    self.target_group_sizes = {g: len(i) for (g, _), i in self.names.unrolled_groups(t.canon for t in targets).items()}
    self.source_group_indices = self.names.unrolled_groups(list(self.src) + list(self.views))
    self.used: set[CanonPath] = set()
    self.by_rule_key = {layout.stored_name(c): c for c in layout.canonical}

  # - axis choice

  def _explicit_axis(self, canon: CanonPath) -> int | None:
    return lookup_axis(self.scan_axis, canon)

  def _source_names_axis(self, disk: DiskPath) -> int | None:
    record = self.layout.meta.record_of(disk)
    return self.names.names_axis(record.metadata.get('out_sharding') if record else None)

  def _convention(self, leaf: TargetLeaf) -> int | None:
    """The Linen/MaxText layer-axis convention, for Linen sources only: NNX models stack on axis 0
    (`nnx.vmap`) or 1 (MaxText NNX) alike, so there an undecided axis is an error, not a guess."""
    if self.layout.framework != 'linen':
      return None
    return self.param_scan_axis if leaf.param_like else 0

  def _choose(self, candidates: list, leaf: TargetLeaf, hints: Sequence[int | None], what: str):
    if len(candidates) == 1:
      return candidates[0]
    for hint in hints:
      if hint is not None and hint in candidates:
        return hint
    raise errors.PlanError(
        f'{path_str(leaf.path)}: ambiguous layer axis for {what}: any of axes {candidates} fits.'
        f' Pass scan_axis={{{"/".join(leaf.canon)!r}: AXIS}} (CLI: --scan-axis REGEX=AXIS).'
    )

  # - resolution

  def resolve(self, leaf: TargetLeaf) -> Expr | None:
    canon = leaf.canon
    if leaf.const is not None:
      return Const(leaf.const, leaf.shape, leaf.dtype)
    if canon in self.views:  # a rule with views names this target: no inference, shapes must agree
      expr = self._viewed(canon)
      if tuple(expr.shape) != tuple(leaf.shape):
        source, v = self.views[canon]
        raise errors.ShapeMismatchError('/'.join(self.src[source]), expr.shape, leaf.shape,
                                        hint=f'(after {v}, for target {path_str(leaf.path)})')
      return self._cast(expr, leaf)
    if canon in self.src:
      return self._cast(self._fit(self._read(canon), leaf), leaf)
    start = model_start(canon)
    for k in range(start, len(canon)):
      expr = self._unrolled_target(leaf, k) or self._stacked_target(leaf, k)
      if expr is not None:
        return self._cast(expr, leaf)
    return None

  def _read(self, canon: CanonPath) -> Read:
    self.used.add(canon)
    disk = self.src[canon]
    info = self.layout.leaves[disk]
    return Read(disk, info.shape, np.dtype(info.dtype))

  def _viewed(self, canon: CanonPath) -> Expr:
    """The expression a view rule gives the target path `canon`."""
    source, v = self.views[canon]
    return apply_view(v, self._read(source), f'{"/".join(self.src[source])} -> {"/".join(canon)}', self._stored)

  def _stored(self, name: str) -> Read:
    """A stored array named as rules match it (for `view.concat`)."""
    canon = self.by_rule_key.get(name)
    if canon is None:
      raise errors.PlanError(f'view.concat names {name!r}, which is not stored here; name stored arrays as rules'
                             f' match them, e.g. {sorted(self.by_rule_key)[:3]}.')
    return self._read(self.renamed_of[canon])

  def _member_expr(self, canon: CanonPath) -> Expr:
    """One layer of an unrolled source group: a renamed stored leaf, or a view rule's target."""
    return self._viewed(canon) if canon in self.views else self._read(canon)

  def _cast(self, expr: Expr, leaf: TargetLeaf) -> Expr:
    return expr if expr.dtype == leaf.dtype else Cast(expr, leaf.dtype)

  def _fit(self, expr: Read, leaf: TargetLeaf) -> Expr:
    """Same canonical path: equal shapes read as is; a moved layer axis is transposed."""
    src, tgt = expr.shape, leaf.shape
    if src == tgt:
      return expr
    perms = sorted({p for p in _moves(len(src)) if tuple(src[i] for i in p) == tgt})
    if perms and not (leaf.layer_axis is not None or self._in_stacked_group(leaf.canon)):
      raise errors.ShapeMismatchError(
          '/'.join(expr.source), src, tgt,
          hint=f'(target {path_str(leaf.path)}) Only stacked layer groups move their layer axis; this leaf is in'
          ' none, so its axes are not reinterpreted. Check the model config.')
    if not perms:
      raise errors.ShapeMismatchError('/'.join(expr.source), src, tgt,
                                      hint=f'(target {path_str(leaf.path)}) Check the model config.')
    if len(perms) > 1:
      src_axis = self._explicit_axis(leaf.canon)
      if src_axis is None:
        src_axis = self._source_names_axis(expr.source)
      if src_axis is None:
        src_axis = self._convention(leaf) if self.layout.framework == 'linen' else 0
      tgt_axis = leaf.layer_axis if leaf.layer_axis is not None else (self.names.names_axis(leaf.out_sharding) or 0)
      wanted = _move(len(src), src_axis, tgt_axis)
      if wanted not in perms:
        raise errors.PlanError(
            f'{path_str(leaf.path)}: stored {src} and requested {tgt} differ by a layer-axis move'
            f' that cannot be decided ({len(perms)} fit). Pass scan_axis={{REGEX: AXIS}} for the source.')
      perms = [wanted]
    return Transpose(expr, perms[0])

  def _in_stacked_group(self, canon: CanonPath) -> bool:
    """Whether a canonical path lies inside a stacked layer group of the source (params or moments)."""
    rel = canon[model_start(canon):]
    return any(g.style == 'stacked' and rel[:len(g.path) - 1] == g.path[1:] for g in self.layout.groups)

  def _unrolled_target(self, leaf: TargetLeaf, k: int) -> Expr | None:
    """Target `.../layers_3/...` or `.../layers/3/...` from a stacked source `.../layers/...`."""
    canon = leaf.canon
    member = self.names.unrolled_member(canon, k)
    if member is None:
      return None
    group, _, index = member
    stacked = group + canon[k + 1:]
    if stacked not in self.src:
      return None
    n = self.target_group_sizes.get(group, 0)
    source = self._read(stacked)
    cands = [a for a in range(len(source.shape))
             if source.shape[a] == n and source.shape[:a] + source.shape[a + 1:] == leaf.shape]
    if not cands:
      raise errors.ShapeMismatchError(
          '/'.join(source.source), source.shape, leaf.shape,
          hint=f'(target {path_str(leaf.path)} is layer {index} of {n}: no axis of size {n} whose removal'
          ' gives the requested shape.)')
    axis = self._choose(cands, leaf, (self._explicit_axis(stacked), self._source_names_axis(source.source),
                                      self._convention(leaf)), 'unrolling')
    return Take(source, index, axis)

  def _stacked_target(self, leaf: TargetLeaf, k: int) -> Expr | None:
    """Target `.../layers/...` (stacked) from unrolled sources `layers_N` or `layers/N`."""
    canon = leaf.canon
    for style in ('unrolled_suffix', 'unrolled_index'):
      group = canon[: k + 1]
      indices = self.source_group_indices.get((group, style))
      if not indices:
        continue
      members = []
      for i in range(len(indices)):
        member = (canon[:k] + (f'{canon[k]}_{i}',) + canon[k + 1:] if style == 'unrolled_suffix'
                  else canon[: k + 1] + (str(i),) + canon[k + 1:])
        if member not in self.src and member not in self.views:
          break
        members.append(member)
      if not members:
        continue
      if sorted(indices) != list(range(len(indices))):
        raise errors.LayoutError(
            f'{"/".join(group)}: unrolled layer indices {sorted(indices)} have gaps; cannot stack them'
            f' into {path_str(leaf.path)}.')
      if len(members) != len(indices):
        raise errors.LayoutError(f'{path_str(leaf.path)}: layer {len(members)} of {"/".join(group)} lacks'
                                 f' this leaf ({"/".join(canon[k + 1:])}).')
      reads_ = [self._member_expr(m) for m in members]
      shapes = {r.shape for r in reads_}
      if len(shapes) != 1:
        raise errors.LayoutError(f'{path_str(leaf.path)}: layers of {"/".join(group)} have unequal shapes'
                                 f' {sorted(shapes)}; they cannot be stacked.')
      member_shape, n = reads_[0].shape, len(reads_)
      cands = [a for a in range(len(leaf.shape))
               if leaf.shape[a] == n and leaf.shape[:a] + leaf.shape[a + 1:] == member_shape]
      if not cands:
        raise errors.ShapeMismatchError(
            str(reads_[0]), member_shape, leaf.shape,
            hint=f'(stacking {n} layers into {path_str(leaf.path)}: no axis fits.)')
      axis = self._choose(cands, leaf, (leaf.layer_axis, self._explicit_axis(canon), self.names.names_axis(leaf.out_sharding),
                                        self._convention(leaf)), 'stacking')
      return Stack(tuple(reads_), axis)
    return None


def lookup_axis(scan_axis: ScanAxis, canon: CanonPath) -> int | None:
  """The axis `scan_axis` (an int, or {regex over canonical paths: axis}) gives `canon`, if any."""
  if scan_axis is None or isinstance(scan_axis, int):
    return scan_axis
  joined = '/'.join(canon)
  for pattern, axis in scan_axis.items():
    if re.fullmatch(pattern, joined):
      return int(axis)
  return None


def _target_prefix(targets: Sequence[TargetLeaf]) -> CanonPath:
  """The canonical root the target tree sits at: ('model',) for a model, () for a train state."""
  for t in targets:
    return t.canon[: len(t.canon) - len(t.path)]
  return (MODEL,)


def _move(rank: int, src: int, dst: int) -> tuple[int, ...]:
  order = [i for i in range(rank) if i != src]
  order.insert(dst, src)
  return tuple(order)


def _moves(rank: int) -> Iterable[tuple[int, ...]]:
  for a in range(rank):
    for b in range(rank):
      if a != b:
        yield _move(rank, a, b)


def build(
    layout: Layout,
    targets: Sequence[TargetLeaf],
    *,
    rules: Sequence[Rule] = (),
    scan_axis: ScanAxis = None,
    param_scan_axis: int = 1,
) -> Plan:
  """Builds the plan for `targets` over `layout` (metadata only; reads no arrays)."""
  planner = _Planner(layout, targets, rules, scan_axis, param_scan_axis)
  entries, missing = {}, []
  for leaf in targets:
    expr = planner.resolve(leaf)
    if expr is None:
      missing.append(path_str(leaf.path))
    else:
      entries[leaf.path] = expr
  roots = {t.canon[0] for t in targets}
  unused = sorted('/'.join(disk) for canon, disk in planner.src.items()
                  if canon not in planner.used and canon[0] in roots)
  return Plan(layout, entries, {t.path: t for t in targets}, missing, unused)


def plan(source, target, *, rules: Sequence[Rule] = (), scan_axis: ScanAxis = None, param_scan_axis: int = 1,
         exclude=nnx_tree.DEFAULT_EXCLUDE, layout: str | None = None, groups=None) -> Plan:
  """`orbax_nnx.plan(path_or_layout, abstract_target)`: the plan, without reading arrays.

  `layout=NAME` forces a preset, `groups=` declares layer-group names (see `detect_layout`).
  """
  from orbax_nnx.mapping.layout import detect_layout  # local: avoid a cycle in type-only users
  from orbax_nnx.sources.metadata import resolve_item

  errors.check_int('param_scan_axis', param_scan_axis)
  rules = check_rules(rules)
  found = source if isinstance(source, Layout) else detect_layout(resolve_item(source), layout=layout, groups=groups)
  return build(found, target_leaves(target, exclude), rules=rules, scan_axis=scan_axis,
               param_scan_axis=param_scan_axis)
