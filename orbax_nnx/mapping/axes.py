"""The layer axis of a stacked array: the one decision the planner, conversion targets and exports all ask.

Precedence, first that applies wins:

1. explicit: `scan_axis={regex: axis}` (or a conversion target's own axis);
2. our records: the layer axes a conversion recorded in the item's custom metadata;
3. sharding names: an `out_sharding` axis named `layers`, `layers_per_stage`, `circular_repeats`, ...;
4. the shapes, only when exactly one axis fits (equal dimensions are ambiguous);
5. the axis the other leaves of the same layer group were found on (each decided by 1-4), shown in `plan`;
6. the Linen/MaxText convention (Params on `param_scan_axis`, other variables on 0), for Linen sources only;
7. otherwise a `PlanError` naming the path, the candidate axes and the option that decides.

An explicit or recorded axis that does not fit the shapes is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orbax_nnx import errors


class AmbiguousAxisError(errors.PlanError):
  """No evidence decides between several candidate layer axes (`candidates`)."""

  def __init__(self, message: str, candidates: Sequence[int]):
    self.candidates = tuple(candidates)
    super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Evidence:
  """What is known about one array's layer axis, by precedence (None: nothing known)."""

  explicit: int | None = None
  recorded: int | None = None
  names: int | None = None
  group: int | None = None
  convention: int | None = None


def normalize_axis(axis: int, rank: int, where: str) -> int:
  """`axis` in `range(rank)`, negatives counted from the end as numpy does; out of range is a PlanError."""
  if not isinstance(axis, int) or isinstance(axis, bool) or not -rank <= axis < rank:
    raise errors.PlanError(f'{where}: axis {axis!r} is out of range for {rank} dimensions.')
  return axis % rank


def layer_axis(path: str, shape: Sequence[int], candidates: Sequence[int], evidence: Evidence, *,
               what: str = 'its layers', target: str | None = None) -> int:
  """The layer axis of `shape` among `candidates` (the axes the shapes allow), by the module's precedence.

  Args:
    path: the canonical path, for messages (and for the `scan_axis` the message suggests).
    shape: the array's shape.
    candidates: axes whose size and removal fit the other side of the mapping.
    evidence: what else is known, by precedence.
    what: what the axis is for ('unrolling', 'stacking', ...), for messages.
    target: the target path the decision serves, when it is not `path` (named first in messages).

  Returns:
    The axis.

  Raises:
    PlanError: an explicit or recorded axis that does not fit; AmbiguousAxisError when nothing decides.
  """
  rank = len(shape)
  at = f'{target}: ' if target and target != path else ''
  for source, axis in (('scan_axis', evidence.explicit), ('the recorded layer axis', evidence.recorded)):
    if axis is not None:
      axis = normalize_axis(axis, rank, f'{path} ({source})')
      if axis not in candidates:
        raise errors.PlanError(f'{at}{path}: {source} says axis {axis} of {tuple(shape)} holds the layers for {what},'
                               f' but only axes {list(candidates)} fit; fix scan_axis for this path.')
      return axis
  if evidence.names is not None and evidence.names in candidates:
    return evidence.names
  if len(candidates) == 1:
    return candidates[0]
  for hint in (evidence.group, evidence.convention):
    if hint is not None and hint in candidates:
      return hint
  raise AmbiguousAxisError(
      f'{at}ambiguous layer axis for {what}: axes {list(candidates)} of {path} {tuple(shape)} all fit, and nothing'
      f' says which. Pass scan_axis={{{path!r}: AXIS}} (CLI: --scan-axis REGEX=AXIS), or name the axis'
      " 'layers' in the target Variable's out_sharding.", candidates)
