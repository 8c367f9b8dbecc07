"""Compare two checkpoints across layouts: are they the same model (and optimizer)?

Both sides are mapped to one canonical view (NNX paths, layer groups unrolled) through
their plans, so a Linen checkpoint and its NNX conversion, stacked or unrolled, compare
equal. Structure comes from metadata alone; values (`values=True`) are streamed leaf by
leaf in row blocks within `memory_budget`, with rng keys compared by their key data.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from orbax_nnx import errors, options, sizes
from orbax_nnx.io import budget, operation
from orbax_nnx.io.regions import evaluate, row_blocks
from orbax_nnx.io.source_arrays import SourceArrays
from orbax_nnx.mapping.layout import MODEL, OPTIMIZER, Layout, detect
from orbax_nnx.planning.planner import Plan, build
from orbax_nnx.planning.targets import layout_target
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item

DEFAULT_COMPARE_BUDGET = 512 * 2**20  # bytes value comparison holds (row blocks + decoded chunks)

Only = Literal['params', 'optimizer', 'all']


@dataclasses.dataclass
class LeafDiff:
  path: str
  max_abs: float
  max_rel: float
  within: bool


@dataclasses.dataclass
class CompareReport:
  """Structure and (optionally) value differences between checkpoints A and B."""

  a: str
  b: str
  only_a: list[str] = dataclasses.field(default_factory=list)
  only_b: list[str] = dataclasses.field(default_factory=list)
  shape_mismatch: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
  dtype_mismatch: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  values: list[LeafDiff] | None = None
  compared: int = 0

  @property
  def equal(self) -> bool:
    same_structure = not (self.only_a or self.only_b or self.shape_mismatch or self.dtype_mismatch)
    return same_structure and (self.values is None or all(d.within for d in self.values))

  def to_json(self) -> dict:
    return {'a': self.a, 'b': self.b, 'equal': self.equal, 'compared': self.compared,
            'only_a': self.only_a, 'only_b': self.only_b,
            'shape_mismatch': [list(m) for m in self.shape_mismatch],
            'dtype_mismatch': [list(m) for m in self.dtype_mismatch],
            'values': None if self.values is None else [dataclasses.asdict(d) for d in self.values]}

  def summary(self) -> str:
    lines = [f'A: {self.a}', f'B: {self.b}', f'{self.compared} leaves in common']
    lines += [f'only in A: {p}' for p in self.only_a] + [f'only in B: {p}' for p in self.only_b]
    lines += [f'shape {p}: {sa} vs {sb}' for p, sa, sb in self.shape_mismatch]
    lines += [f'dtype {p}: {da} vs {db}' for p, da, db in self.dtype_mismatch]
    if self.values is not None:
      bad = [d for d in self.values if not d.within]
      lines.append(f'values: {len(self.values) - len(bad)}/{len(self.values)} leaves within tolerance')
      lines += [f'  differs {d.path}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}' for d in bad]
    if self.values is None:
      lines.append(('EQUAL' if self.equal else 'DIFFERENT') + ' (structure only: values were not compared; pass'
                   ' values=True, CLI --values)')
    else:
      lines.append('EQUAL' if self.equal else 'DIFFERENT')
    return '\n'.join(lines)


def canonical_view(layout: Layout, only: Only = 'all', unroll: bool = True) -> Plan:
  """A plan giving every leaf of `layout` at its canonical path, layer groups unrolled (or as stored)."""
  target = layout_target(layout, to='nnx', scan_layers=False if unroll else None)
  roots = {'params': {MODEL}, 'optimizer': {OPTIMIZER}, 'all': {MODEL, OPTIMIZER}}[only]
  leaves = [leaf for leaf in target.leaves if leaf.canon[0] in roots]
  return build(layout, leaves, scan_axis=target.planner_axes() or None)


@options.takes_options('mapping')
@listing.looking_once
@operation.moves_bytes
def compare(a, b, *, values: bool = False, atol: float = 0.0, rtol: float = 0.0, only: Only = 'all',
            mapping: options.Mapping | None = None, layout_a: str | None = None, layout_b: str | None = None,
            memory_budget: int | str | None = None, step_a: int | None = None, step_b: int | None = None,
            item_a: str | None = None, item_b: str | None = None) -> CompareReport:
  """Compares checkpoints `a` and `b`, in any layouts: are they the same model (and optimizer)?

  Both sides are mapped to one canonical view (NNX paths, layer groups unrolled where they are stored
  differently), so a Linen checkpoint and its NNX conversion compare equal. Structure comes from metadata.

      report = orbax_nnx.compare('linen_ckpt', 'nnx_ckpt', values=True)
      assert report.equal, report.summary()

  Args:
    a: an item dir, step dir, manager root or safetensors folder.
    b: the same, for the other side.
    values: compare values too, streamed leaf by leaf in row blocks (rng keys by their key data).
    atol: absolute tolerance of unequal values.
    rtol: relative tolerance of unequal values (to B's).
    only: 'params', 'optimizer' or 'all'.
    mapping: `orbax_nnx.Mapping`, its fields also taken as keywords. `rules` map A's stored paths onto B's
      model (needed for Hugging Face safetensors as A, e.g. `orbax_nnx.llama.hf_rules(cfg)`): A is then planned
      into B's view and cast to B's dtypes, and A's leaves no rule places are listed as only in A. `scan_axis`
      and `param_scan_axis` apply to A then; `groups` to both sides; `layout` to both unless `layout_a` /
      `layout_b` say otherwise.
    layout_a: force A's layout preset.
    layout_b: force B's layout preset.
    memory_budget: what value comparison holds (an int, or '512MiB'; default 512 MiB): each side's row block
      a quarter of it, the rest for decoded chunks kept between blocks. None: 512 MiB.
    step_a: the step of A, when it is a manager root.
    step_b: the step of B, when it is a manager root.
    item_a: the item of A, inside a step dir with several items.
    item_b: the item of B, inside a step dir with several items.

  Returns:
    A `CompareReport`: `.equal`, `.summary()`, `.to_json()`, and the differences found.

  Raises:
    NotACheckpointError: nothing readable at `a` or `b`.
    LayoutError, PlanError: a side's layout cannot be mapped.
    OptionError: an option outside its accepted values (e.g. safetensors as A without rules).
  """
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  memory_budget = DEFAULT_COMPARE_BUDGET if memory_budget is None else memory_budget
  errors.check_choice('only', only, ('params', 'optimizer', 'all'))
  errors.check_choice('values', values, (True, False))
  rules, scan_axis, groups = mapping.rules, mapping.scan_axis, mapping.groups
  dir_a, dir_b = resolve_item(a, step=step_a, item=item_a), resolve_item(b, step=step_b, item=item_b)
  layout_a = detect(read_item_metadata(dir_a), layout=layout_a or mapping.layout, groups=groups)
  layout_b = detect(read_item_metadata(dir_b), layout=layout_b or mapping.layout, groups=groups)
  mapped = bool(rules) or layout_a.kind == 'safetensors'
  if mapped:
    view_b = canonical_view(layout_b, only, unroll=False)  # A is mapped onto B's groups as B stores them
    if not rules:
      raise errors.OptionError(f'{dir_a} is a safetensors checkpoint: pass rules= mapping its tensor names onto'
                               f" B's model paths (e.g. orbax_nnx.llama.hf_rules(cfg); CLI --preset).")
    view_a = build(layout_a, list(view_b.leaves.values()), rules=rules, scan_axis=scan_axis,
                   param_scan_axis=mapping.param_scan_axis)
    paths_a = {'/'.join(p): p for p in view_a.entries}
    only_a = list(view_a.unused)
  else:
    # layer groups are unrolled only where the two sides store them differently (a stacked group of an NNX
    # source may not say its layer axis; stored alike, it compares as stored)
    unroll = _groups(layout_a) != _groups(layout_b) or layout_a.framework != layout_b.framework
    if unroll:  # a layer count one side's shapes leave open is the other side's, for the same group
      layout_a, layout_b = _counted(layout_a, layout_b), _counted(layout_b, layout_a)
    view_b = canonical_view(layout_b, only, unroll=unroll)
    view_a = canonical_view(layout_a, only, unroll=unroll)
    paths_a = {'/'.join(p): p for p in view_a.entries}
    only_a = None
  paths_b = {'/'.join(p): p for p in view_b.entries}
  report = CompareReport(str(dir_a), str(dir_b), sorted(set(paths_a) - set(paths_b)) if only_a is None else only_a,
                         sorted(set(paths_b) - set(paths_a)))
  common = sorted(set(paths_a) & set(paths_b))
  report.compared = len(common)
  for name in common:
    la, lb = view_a.leaves[paths_a[name]], view_b.leaves[paths_b[name]]
    if la.shape != lb.shape:
      report.shape_mismatch.append((name, la.shape, lb.shape))
    elif la.dtype != lb.dtype:
      report.dtype_mismatch.append((name, la.dtype.name, lb.dtype.name))
  if values:
    mismatched = {m[0] for m in report.shape_mismatch}
    budget.check_fits(dir_a, [(name, view_a.leaves[paths_a[name]].shape, view_a.leaves[paths_a[name]].dtype, None)
                              for name in common if name not in mismatched],
                      what='comparing values (declared shapes beyond this machine are damaged metadata)',
                      at_once=False, advice='compare structure only (values=False)')
    src_a = SourceArrays(layout_a.meta, cache_bytes=max(1, memory_budget // 4))
    src_b = SourceArrays(layout_b.meta, cache_bytes=max(1, memory_budget // 4))
    report.values = []
    for name in common:
      if name in mismatched:
        continue
      leaf = view_a.leaves[paths_a[name]]
      diffs = [_diff(name, evaluate(view_a.entries[paths_a[name]], block, src_a),
                     evaluate(view_b.entries[paths_b[name]], block, src_b), atol, rtol)
               for block in row_blocks(leaf.shape, leaf.dtype.itemsize, max(1, memory_budget // 4))]
      report.values.append(LeafDiff(name, max((d.max_abs for d in diffs), default=0.0),
                                    max((d.max_rel for d in diffs), default=0.0), all(d.within for d in diffs)))
  return report


def _counted(layout: Layout, other: Layout) -> Layout:
  """`layout` with the layer counts its shapes left open taken from `other`'s group of the same path."""
  counts = {g.path: g.length for g in other.groups if g.length > 0}
  groups = tuple(dataclasses.replace(g, length=counts[g.path]) if g.length <= 0 and g.path in counts else g
                 for g in layout.groups)
  return dataclasses.replace(layout, groups=groups)


def _groups(layout: Layout) -> set:
  return {(g.path, g.style, g.length) for g in layout.groups}


_DIFF_BLOCK = 1 << 22  # elements per float64 block, so the working copies stay small


def _diff(name: str, xa: np.ndarray, xb: np.ndarray, atol: float, rtol: float) -> LeafDiff:
  """Max abs/rel differences and whether every element is within tolerance.

  Equality is decided in the stored dtype: equal elements (infinities of one sign included, NaN with NaN)
  are within any tolerance, and integers are compared exactly (int64 2**60 and 2**60 + 1 differ, and their
  tolerance test uses exact differences). The reported magnitudes, and the tolerance test of unequal floats,
  use float64.
  """
  flat_a, flat_b = np.asarray(xa).reshape(-1), np.asarray(xb).reshape(-1)
  max_abs, max_rel, within = 0.0, 0.0, True
  floating = flat_a.dtype.kind in 'fcV'  # ml_dtypes (bfloat16, float8) are kind 'V'
  for start in range(0, flat_a.size, _DIFF_BLOCK):
    ba, bb = flat_a[start:start + _DIFF_BLOCK], flat_b[start:start + _DIFF_BLOCK]
    same = ba == bb
    if floating:
      same |= np.isnan(ba) & np.isnan(bb)
    if bool(np.all(same)):
      continue
    if flat_a.dtype.kind in 'iu':  # integers: differences in Python ints (int64 has no room for all of them)
      ia, ib = ba[~same].astype(object), bb[~same].astype(object)
      exact = np.abs(ia - ib)
      ok = np.asarray(exact <= atol + rtol * np.abs(ib), dtype=bool)
      diff, fb = exact.astype(np.float64), ib.astype(np.float64)
    else:
      fa, fb = ba[~same].astype(np.float64), bb[~same].astype(np.float64)
      with np.errstate(invalid='ignore', over='ignore'):
        diff = np.abs(fa - fb)
      diff = np.where(np.isnan(diff), np.inf, diff)  # one side infinite or NaN: never within a tolerance
      ok = diff <= atol + rtol * np.abs(fb)
    with np.errstate(invalid='ignore', divide='ignore'):
      rel = diff / np.abs(fb)
    rel = np.where(np.isnan(rel), np.inf, rel)
    max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, float(rel.max()))
    # an unequal pair passes only within a positive tolerance
    within = within and (atol > 0 or rtol > 0) and bool(np.all(ok))
  return LeafDiff(name, max_abs, max_rel, within)
