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

from orbax_nnx import compat, errors, nnx_tree, options
from orbax_nnx.lazy_flax import nnx, nnx_loaded
from orbax_nnx.mapping.axes import AmbiguousAxisError, Evidence, layer_axis
from orbax_nnx.mapping.groups import MODEL, OPTIMIZER, is_train_state, model_start
from orbax_nnx.mapping.layout import CanonPath, Layout
from orbax_nnx.mapping.rules import Slot, apply_view, rename
from orbax_nnx.mapping.views import View, compile_rules
from orbax_nnx.nnx_tree import DiskPath, Path, path_str
from orbax_nnx.planning.expressions import Const, Expr, Read, Stack, Take, Transpose, cast, reads
from orbax_nnx.sources import listing

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


def target_leaves(target: Any, exclude=nnx_tree.DEFAULT_EXCLUDE) -> list[TargetLeaf]:
  """Flattens a target and gives each leaf its canonical path.

  A target whose top-level keys are `model`/`optimizer` only is a train state; one with `opt_state` and `step` an optimizer; anything else a model.
  """
  flat = list(nnx_tree.flatten(target, exclude))
  top = {str(p[0]) for p, _ in flat if p}
  if is_train_state(top):
    prefix: tuple = ()
  elif {'opt_state', 'step'} <= top:
    prefix = (OPTIMIZER,)
  else:
    prefix = (MODEL,)
  out = []
  non_param = (nnx.RngState, nnx.BatchStat, nnx.Cache, nnx.Intermediate) if nnx_loaded() else ()
  for path, leaf in flat:
    value = nnx_tree.value_of(leaf)
    canon = prefix + tuple(str(k) for k in path)
    shape, dtype, impl = tuple(value.shape), value.dtype, None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      impl = compat.key_impl(dtype)
      shape, dtype = shape + tuple(impl.key_shape), np.dtype('uint32')
    param_like = not isinstance(leaf, non_param)
    sharding = leaf.get_metadata().get('out_sharding') if isinstance(leaf, nnx.Variable) else None
    out.append(TargetLeaf(tuple(path), canon, shape, np.dtype(dtype), impl, param_like,
                          tuple(sharding) if sharding else None))
  return out


# -- the plan -----------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """Target path -> expression over stored leaves, plus what could not be matched (`orbax_nnx.plan`).

  Attributes:
    source: the `Layout` planned from.
    entries: target path -> the expression that computes it (reads, views, stacks, casts).
    leaves: target path -> the target leaf (shape, dtype, sharding).
    missing: target paths no stored leaf fills.
    unused: stored paths no target leaf reads.
    inferred: the layer axes that only the group's other leaves decided (`plan` prints `# INFERRED`).
  """

  source: Layout
  entries: dict[Path, Expr]
  leaves: dict[Path, TargetLeaf]
  missing: list[str]
  unused: list[str]
  inferred: list[str] = dataclasses.field(default_factory=list)  # layer axes the shapes alone left open

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
    lines += [f'# INFERRED {note}' for note in self.inferred]
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
    self.slots: dict[CanonPath, dict[int, tuple[CanonPath, View]]] = {}  # stacked target -> index -> (source, view)
    self.renamed_of: dict[CanonPath, CanonPath] = {}
    prefix = self.prefix = _target_prefix(targets)
    literal_model = prefix == (MODEL,) and any(t.canon[1:2] == (MODEL,) for t in targets)
    by_rule: dict[CanonPath, CanonPath] = {}  # target path -> the stored leaf a rule sends there
    for canon in layout.canonical:
      renamed = rename(layout, canon, compiled, matched, prefix, literal_model)
      if isinstance(renamed, dict):  # a view rule: the source keeps its path, its views name targets
        for target, v in renamed.items():
          if isinstance(target, Slot):
            self._fill(target, canon, v)
          else:
            _claim(by_rule, target, canon, layout)
            self.views[target] = (canon, v)
        renamed = canon
      elif renamed != canon:
        _claim(by_rule, renamed, canon, layout)
      self.renamed_of[canon] = renamed
    for target, filled in self.slots.items():
      if target in by_rule:
        raise errors.PlanError(f'rules fill {self._named(target)} slot by slot ([i]) and also send'
                               f' {layout.stored_name(by_rule[target])} to it whole; keep one of the two.')
      by_rule[target] = filled[min(filled)][0]
    # a stored leaf whose own path a rule gives to another leaf is displaced: read by nothing, so unused
    self.displaced = [canon for canon, renamed in self.renamed_of.items()
                      if renamed == canon and by_rule.get(canon, canon) != canon]
    view_sources = {source for source, _ in self.views.values()} | {
        source for filled in self.slots.values() for source, _ in filled.values()}
    for canon in set(self.displaced) & view_sources:
      raise errors.PlanError(f'a rule sends {layout.stored_name(by_rule[canon])} to {"/".join(canon)}, the path of a'
                             ' stored leaf that a view rule reads; rename one of them.')
    for canon, renamed in self.renamed_of.items():
      if canon not in self.displaced:
        self.src[renamed] = layout.canonical[canon]
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
    self.source_group_indices = self.names.unrolled_groups(list(self.src) + list(self.views) + list(self.slots))
    self.used: set[CanonPath] = set()
    self.by_rule_key = {layout.stored_name(c): c for c in layout.canonical}
    self.recorded_axes = dict(layout.meta.ours.get('scan_axes') or {})
    self.decided: dict[tuple, set[int]] = {}  # (group, side, param-like) -> axes decided without the group
    self.use_group_axes = False  # second pass: leaves left ambiguous follow their group
    self.inferred: list[str] = []  # what the second pass inferred, for `plan`

  def _named(self, canon: CanonPath) -> str:
    """A target path as the user names it (as `plan` prints it): without the canonical root."""
    return '/'.join(canon[len(self.prefix):])

  def _fill(self, slot: Slot, source: CanonPath, v: View) -> None:
    """Records that a rule sends stored leaf `source` (through `v`) to `slot`; a slot filled twice is an error."""
    filled = self.slots.setdefault(slot.path, {})
    if slot.index in filled:
      raise errors.SlotError(self._named(slot.path), slot.index, f'rules fill this slot twice, from'
                             f' {self.layout.stored_name(filled[slot.index][0])} and {self.layout.stored_name(source)};'
                             ' make the rules name one stored tensor per slot.')
    filled[slot.index] = (source, v)

  # - axis choice (the decision itself: mapping/axes.py)

  def _explicit_axis(self, canon: CanonPath) -> int | None:
    return lookup_axis(self.scan_axis, canon)

  def _source_evidence(self, stacked: CanonPath, disk: DiskPath, leaf: TargetLeaf, key: tuple) -> Evidence:
    record = self.layout.meta.record_of(disk)
    recorded = self.recorded_axes.get('/'.join(stacked))
    return Evidence(explicit=self._explicit_axis(stacked), recorded=recorded,
                    names=self.names.names_axis(record.metadata.get('out_sharding') if record else None),
                    group=self._group_axis(key), convention=self._convention(leaf))

  def _target_evidence(self, leaf: TargetLeaf, key: tuple, explicit: int | None = None) -> Evidence:
    return Evidence(explicit=leaf.layer_axis if leaf.layer_axis is not None else explicit,
                    names=self.names.names_axis(leaf.out_sharding), group=self._group_axis(key))

  def _convention(self, leaf: TargetLeaf) -> int | None:
    """The Linen/MaxText layer-axis convention, for Linen sources only: NNX models stack on axis 0
    (`nnx.vmap`) or 1 (MaxText NNX) alike, so there an undecided axis is an error, not a guess."""
    if self.layout.framework != 'linen':
      return None
    return self.param_scan_axis if leaf.param_like else 0

  def _group_axis(self, key: tuple) -> int | None:
    """The axis every decided leaf of the same group, side and kind was found on (second pass only)."""
    found = self.decided.get(key, set())
    return next(iter(found)) if self.use_group_axes and len(found) == 1 else None

  def _decide(self, key: tuple, path: CanonPath, shape, candidates, evidence: Evidence, what: str,
              leaf: TargetLeaf) -> int:
    """`layer_axis`, in two passes: the first decides on strong evidence only (explicit, records, names,
    unique shapes) and defers the rest; the second adds the group's axis, then the Linen convention."""
    joined = '/'.join(path)
    try:
      axis = layer_axis(joined, shape, candidates, dataclasses.replace(evidence, group=None, convention=None),
                        what=what, target=path_str(leaf.path))
    except AmbiguousAxisError:
      if not self.use_group_axes:
        raise
      axis = layer_axis(joined, shape, candidates, evidence, what=what, target=path_str(leaf.path))
      how = 'as the other leaves of its group' if axis == evidence.group else 'by the Linen/MaxText convention'
      self.inferred.append(f'{joined}: layer axis {axis} of {tuple(shape)} for {what}, {how}')
      return axis
    self.decided.setdefault(key, set()).add(axis)
    return axis

  @staticmethod
  def _group_key(canon: CanonPath, group_end: int, side: str, leaf: TargetLeaf) -> tuple:
    return canon[model_start(canon):group_end], side, leaf.param_like

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
    if canon in self.slots:  # filled slot by slot: stacked on axis 0 in index order, no inference
      expr = self._slotted(canon, leaf.shape[0] if leaf.shape else 0)
      if tuple(expr.shape) != tuple(leaf.shape):
        first = self.slots[canon][0][0]
        raise errors.ShapeMismatchError(f'{"/".join(self.src[first])} (slot 0 of {len(self.slots[canon])})',
                                        expr.shape, leaf.shape, hint=f'(the slots stacked, for target {path_str(leaf.path)})')
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

  def _slotted(self, canon: CanonPath, count: int | None = None) -> Stack:
    """The target `canon` that rules fill slot by slot: its slots stacked on axis 0, in numeric order. Every slot
    from 0 up must be filled once, and when `count` (the target's first axis) is known, exactly that many."""
    filled, where = self.slots[canon], self._named(canon)
    if count is not None and max(filled) >= count:
      has = f'{count} slots on axis 0 (0..{count - 1})' if count else 'no slots (its axis 0 is empty, or it is a scalar)'
      raise errors.SlotError(where, max(filled), f'the target has {has}; the rules send'
                             f' {self.layout.stored_name(filled[max(filled)][0])} past the end.')
    for i in range(count if count is not None else max(filled) + 1):
      if i not in filled:
        raise errors.SlotError(where, i, f'no stored tensor fills this slot (filled: {_ranges(sorted(filled))}).'
                               ' Check the checkpoint for the missing tensor, or the rule that names the slots.')
    parts = []
    for i in range(len(filled)):
      source, v = filled[i]
      part = apply_view(v, self._read(source), f'{"/".join(self.src[source])} -> {where}[{i}]', self._stored)
      if parts and part.shape != parts[0].shape:
        raise errors.SlotError(where, i, f'{self.layout.stored_name(source)} is {part.shape} after {v}, but slot 0'
                               f' is {parts[0].shape}; every slot of a target has the same shape.')
      parts.append(part)
    return Stack(tuple(parts), 0)

  def _stored(self, name: str) -> Read:
    """A stored array named as rules match it (for `view.concat`)."""
    canon = self.by_rule_key.get(name)
    if canon is None:
      raise errors.PlanError(f'view.concat names {name!r}, which is not stored here; name stored arrays as rules'
                             f' match them, e.g. {sorted(self.by_rule_key)[:3]}.')
    return self._read(self.renamed_of[canon])

  def _member_expr(self, canon: CanonPath) -> Expr:
    """One layer of an unrolled source group: a renamed stored leaf, a view rule's target, or one filled slot by
    slot."""
    if canon in self.slots:
      return self._slotted(canon)
    return self._viewed(canon) if canon in self.views else self._read(canon)

  def _cast(self, expr: Expr, leaf: TargetLeaf) -> Expr:
    return cast(expr, leaf.dtype)

  def _fit(self, expr: Read, leaf: TargetLeaf) -> Expr:
    """Same canonical path: equal shapes read as is, unless the leaf is in a stacked layer group whose layer
    axis is decided to differ on the two sides (then, and only then, the layer axis moves)."""
    src, tgt = tuple(expr.shape), tuple(leaf.shape)
    group = self._stacked_group(leaf.canon)
    n = group.length if group is not None else 0
    said = leaf.layer_axis if leaf.layer_axis is not None else self.names.names_axis(leaf.out_sharding)
    if group is not None and n <= 0 and said is not None and said < len(tgt):
      n = tgt[said]  # the stored shapes left the layer count open: the target's layer axis tells it
    # (stored axis, target axis) pairs the shapes allow: of the layer count, or of any size when it is unknown
    pairs = [(a, b) for a in range(len(src)) for b in range(len(tgt)) if src[a] == tgt[b] and (
        n <= 0 or src[a] == n) and src[:a] + src[a + 1:] == tgt[:b] + tgt[b + 1:]] if group is not None else []
    perms = {_move(len(src), a, b) for a, b in pairs}
    if len(perms) == 1 and n <= 0 and src != tgt:  # every reading of the unknown count moves the same axes
      return Transpose(expr, perms.pop())
    if not pairs:
      if src == tgt:
        return expr
      moved = any(tuple(src[i] for i in p) == tgt for p in _moves(len(src)))
      raise errors.ShapeMismatchError(
          '/'.join(expr.source), src, tgt, hint=f'(target {path_str(leaf.path)}) ' + (
              'Only stacked layer groups move their layer axis; this leaf is in none, so its axes are not'
              ' reinterpreted. Check the model config.' if moved and group is None else 'Check the model config.'))
    end = model_start(leaf.canon) + len(group.path) - 1
    try:
      a = self._decide(self._group_key(leaf.canon, end, 'source', leaf), leaf.canon, src,
                       sorted({a for a, _ in pairs}),
                       self._source_evidence(leaf.canon, expr.source, leaf,
                                             self._group_key(leaf.canon, end, 'source', leaf)),
                       'the stored array', leaf)
    except AmbiguousAxisError:
      if src == tgt and self.use_group_axes and self.layout.framework != 'linen' and said is None:
        return expr  # an NNX or plain source into the same shape, nothing said on either side: as Orbax restores
      raise
    target_key = self._group_key(leaf.canon, end, 'target', leaf)
    try:
      b = self._decide(target_key, leaf.canon, tgt, sorted({b for a2, b in pairs if a2 == a}),
                       self._target_evidence(leaf, target_key), 'the target', leaf)
    except AmbiguousAxisError:
      if src == tgt and self.use_group_axes and self.layout.framework != 'linen':
        return expr
      raise
    perm = _move(len(src), a, b)
    return expr if perm == tuple(range(len(src))) else Transpose(expr, perm)

  def _stacked_group(self, canon: CanonPath):
    """The stacked layer group of the source a canonical path lies in (params or moments), if any."""
    rel = canon[model_start(canon):]
    return next((g for g in self.layout.groups if g.style == 'stacked' and rel[:len(g.path) - 1] == g.path[1:]),
                None)

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
    key = self._group_key(stacked, k + 1, 'source', leaf)
    axis = self._decide(key, stacked, source.shape, cands, self._source_evidence(stacked, source.source, leaf, key),
                        'unrolling', leaf)
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
        if member not in self.src and member not in self.views and member not in self.slots:
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
      key = self._group_key(canon, k + 1, 'target', leaf)
      axis = self._decide(key, canon, leaf.shape, cands, self._target_evidence(leaf, key, self._explicit_axis(canon)),
                          'stacking', leaf)
      return Stack(tuple(reads_), axis)
    return None


def _claim(by_rule: dict, target: CanonPath, canon: CanonPath, layout: Layout) -> None:
  """Records that a rule sends stored leaf `canon` to `target`; a second stored leaf there is an error."""
  other = by_rule.setdefault(target, canon)
  if other != canon:
    raise errors.PlanError(
        f'rules send two stored leaves to {"/".join(target)}: {layout.stored_name(other)} and'
        f' {layout.stored_name(canon)}; make the rules name one target per stored leaf.')


def _ranges(indices: Sequence[int]) -> str:
  """Sorted integers as runs: [0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8'."""
  runs: list[list[int]] = []
  for i in indices:
    if runs and i == runs[-1][1] + 1:
      runs[-1][1] = i
    else:
      runs.append([i, i])
  return ', '.join(str(a) if a == b else f'{a}..{b}' for a, b in runs)


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
  resolved, deferred = {}, []
  for leaf in targets:
    try:
      resolved[leaf.path] = planner.resolve(leaf)
    except AmbiguousAxisError:
      deferred.append(leaf)  # decided by its group's other leaves, or refused, in the second pass
  planner.use_group_axes = True
  for leaf in deferred:
    resolved[leaf.path] = planner.resolve(leaf)
  entries, missing = {}, []
  for leaf in targets:
    if resolved[leaf.path] is None:
      missing.append(path_str(leaf.path))
    else:
      entries[leaf.path] = resolved[leaf.path]
  roots = {t.canon[0] for t in targets}
  unused = sorted({'/'.join(disk) for canon, disk in planner.src.items() if canon not in planner.used and
                   canon[0] in roots} | {'/'.join(layout.canonical[c]) for c in planner.displaced if c[0] in roots})
  return Plan(layout, entries, {t.path: t for t in targets}, missing, unused, planner.inferred)


@listing.looking_once
@options.takes_options('mapping')
def plan(source, target, *, mapping: options.Mapping | None = None, exclude=nnx_tree.DEFAULT_EXCLUDE,
         step: int | None = None, item: str | None = None) -> Plan:
  """The plan that maps `source` onto `target`, from metadata alone (no array bytes are read).

      print(orbax_nnx.plan('ckpt/100/default', nnx.state(abstract_model)))

  Args:
    source: an item dir, step dir or manager root (latest step unless `step`), a safetensors folder, or a
      `Layout` from `detect_layout`.
    target: the NNX model the data lands in: an abstract or live model, or its `nnx.State`.
    mapping: how the source's leaves map onto the target (`orbax_nnx.Mapping`: rules, layout, groups,
      scan_axis, param_scan_axis); its fields may also be passed as keywords.
    exclude: Variable types of the target left out (default: Cache, Intermediate).
    step: the step of a manager root.
    item: the item inside a step dir with several items.

  Returns:
    A `Plan`: per target leaf the expression over stored leaves (printing it shows each, and what was
    inferred), plus the target leaves no stored leaf fills (`missing`) and stored leaves left unused.

  Raises:
    NotACheckpointError: nothing readable at `source`.
    LayoutError, PlanError: the source's layout is ambiguous, or a rule or layer axis cannot be applied.
  """
  from orbax_nnx.mapping.layout import detect_layout  # local: avoid a cycle in type-only users
  from orbax_nnx.sources.metadata import resolve_item

  if isinstance(source, Layout):
    found = source
  else:
    found = detect_layout(resolve_item(source, step=step, item=item), layout=mapping.layout, groups=mapping.groups)
  return build(found, target_leaves(target, exclude), rules=mapping.rules, scan_axis=mapping.scan_axis,
               param_scan_axis=mapping.param_scan_axis)
