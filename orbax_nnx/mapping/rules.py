"""Applying user rules: a stored leaf renamed to a target path, or split into target paths through views;
views compiled into plan expressions.

A target path may end in `[i]`: the stored leaf (after its view) fills sub-array `i` along axis 0 of that
target, e.g. one expert of a stacked mixture-of-experts projection (`layers/0/mlp/gate_proj[7]`); `Slot` is
such a target.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from orbax_nnx import errors
from orbax_nnx.mapping.axes import normalize_axis
from orbax_nnx.mapping.groups import MODEL, OPTIMIZER
from orbax_nnx.mapping.layout import CanonPath, Layout
from orbax_nnx.mapping.views import View
from orbax_nnx.planning.expressions import Concat, Expr, Reshape, Slice, Take, Transpose, cast


@dataclasses.dataclass(frozen=True)
class Slot:
  """A rule's target `path[index]`: sub-array `index` along axis 0 of the target at `path`."""

  path: CanonPath
  index: int


_SLOT = re.compile(r'(.+)\[(\d+)\]')


def split_slot(path: str) -> tuple[str, int | None]:
  """`'a/b[3]'` -> `('a/b', 3)`; a path without a trailing `[i]` -> `(path, None)`. Brackets anywhere else, or
  an index that is not a non-negative integer, are an OptionError (no target path has them)."""
  match = _SLOT.fullmatch(path)
  if match is not None and '[' not in match[1] and ']' not in match[1]:
    return match[1], int(match[2])
  if '[' in path or ']' in path:
    raise errors.OptionError(f'rule target {path!r}: a target path may end in one [i] (i a non-negative integer,'
                             ' a slot along axis 0 of the target, e.g. layers/0/mlp/gate_proj[7]); nothing else'
                             ' takes brackets.')
  return path, None


def rename(layout: Layout, canon: CanonPath, rules, matched: set[int], prefix: CanonPath,
           literal_model: bool = False) -> CanonPath | dict[CanonPath | Slot, View]:
  """The first matching rule's result: a renamed path, or {target path: view} for a view rule.

  A pattern fullmatches the stored path as `inspect` prints it, else the canonical path as `plan`
  prints it (a catch-all such as `(.*)` thus sees the stored path). A replacement names a path in the target
  tree (`layers/0/mlp/kernel` in a model); one already starting at the target's canonical root (`model/...`,
  or `optimizer/...` in a train state) is taken as canonical, unless `literal_model` (the target model has a
  submodule called `model`, which such a path then names). A raw-flavour `value` wrapper a stored-path match
  carries over is dropped. A replacement ending in `[i]` gives a `Slot` (a rename with a slot is the
  identity view into it).
  """
  wrapped = layout.kind != 'safetensors' and layout.canonical[canon][-1] == 'value' and canon[-1] != 'value'

  def target(path: str) -> CanonPath | Slot:
    path, index = split_slot(path)
    if index is not None:
      return Slot(target(path), index)
    parts = tuple(path.split('/'))
    parts = parts[:-1] if wrapped and parts[-1] == 'value' else parts
    if parts[:1] == (prefix or parts)[:1] and parts[0] in (MODEL, OPTIMIZER) and not literal_model:
      return parts  # already canonical
    return (prefix or (MODEL,)) + parts  # a train-state target's rules name model paths

  for i, (pattern, repl) in enumerate(rules):
    match = next((m for key in (layout.stored_name(canon), '/'.join(canon)) if (m := pattern.fullmatch(key))), None)
    if match is not None:
      matched.add(i)
      if isinstance(repl, Mapping):
        return {target(expand(match, r)): v.resolve(lambda t: expand(match, t)) for r, v in repl.items()}
      renamed = target(expand(match, repl))
      return {renamed: View()} if isinstance(renamed, Slot) else renamed
  return canon


def expand(match: 're.Match', template: str) -> str:
  """A rule's replacement for one fullmatched path: `template` with its backreferences (`\\1`, `\\g<name>`)
  filled from `match`, as `re.Match.expand` does (never a substitution inside the path)."""
  try:
    return match.expand(template)
  except (re.error, IndexError) as e:
    raise errors.OptionError(f'rule replacement {template!r} for pattern {match.re.pattern!r}: {e}.') from e


def _axis(axis: int, rank: int, where: str, v: View) -> int:
  """An axis of a view validated as numpy does: negatives count from the end, out of range is an error."""
  try:
    return normalize_axis(axis, rank, f'{where}: {v}')
  except errors.PlanError:
    raise errors.PlanError(f'{where}: {v} names axis {axis}, but the array has {rank} dimensions'
                           f' (axes {-rank}..{rank - 1}).') from None


def apply_view(v: View, expr: Expr, where: str, lookup=None) -> Expr:
  """Compiles a view's operations into lazy expressions over `expr` (read per shard later).

  `lookup(name)` gives the expression of another stored array, for `concat`.
  """
  for op in v.ops:
    rank = len(expr.shape)
    if op[0] == 'concat':
      if lookup is None:
        raise errors.PlanError(f'{where}: {v}: concat needs stored arrays to join; it has none here.')
      parts, axis = (expr,) + tuple(lookup(name) for name in op[1]), _axis(op[2], rank, where, v)
      for part in parts[1:]:
        if len(part.shape) != rank or any(a != b for k, (a, b) in enumerate(zip(part.shape, expr.shape)) if k != axis):
          raise errors.PlanError(f'{where}: {v} joins {part} of shape {part.shape} to shape {expr.shape} on axis'
                                 f' {axis}: the other axes differ.')
      expr = Concat(parts, axis)  # parts keep their dtypes: each is cast straight to the target's (expressions.cast)
    elif op[0] == 'take':
      if rank == 0 or not -expr.shape[0] <= op[1] < expr.shape[0]:
        raise errors.PlanError(f'{where}: {v} indexes {op[1]} into shape {expr.shape}.')
      expr = Take(expr, op[1] % expr.shape[0], 0)
    elif op[0] == 'slice':
      axis, start, stop = op[1:]
      if axis >= rank:
        raise errors.PlanError(f'{where}: {v} slices axis {axis} of shape {expr.shape}.')
      start, stop, _ = slice(start, stop).indices(expr.shape[axis])
      if stop <= start:
        raise errors.PlanError(f'{where}: {v} selects nothing of axis {axis} (size {expr.shape[axis]}).')
      expr = expr if (start, stop) == (0, expr.shape[axis]) else Slice(expr, axis, start, stop)
    elif op[0] == 'reshape':
      size = int(np.prod(expr.shape, dtype=np.int64))
      shape = list(op[1])
      if shape.count(-1) == 1:
        known = int(np.prod([n for n in shape if n != -1], dtype=np.int64))
        shape[shape.index(-1)] = size // known if known and size % known == 0 else -1
      if any(n < 0 for n in shape) or int(np.prod(shape, dtype=np.int64)) != size:
        raise errors.PlanError(f'{where}: {v} cannot reshape {expr.shape} ({size} elements) into {tuple(op[1])}.')
      expr = expr if tuple(shape) == tuple(expr.shape) else Reshape(expr, tuple(shape))
    elif op[0] in ('transpose', 'swapaxes'):
      if op[0] == 'swapaxes':
        perm = list(range(rank))
        a, b = _axis(op[1], rank, where, v), _axis(op[2], rank, where, v)
        perm[a], perm[b] = perm[b], perm[a]
        perm = tuple(perm)
      else:
        perm = tuple(reversed(range(rank))) if op[1] is None else tuple(_axis(p, rank, where, v) for p in op[1])
      if sorted(perm) != list(range(rank)):
        raise errors.PlanError(f'{where}: {v} is not a permutation of the {rank} axes of shape {expr.shape}.')
      expr = expr if perm == tuple(range(rank)) else Transpose(expr, perm)
    else:
      expr = cast(expr, op[1])
  return expr
