"""Plan expressions: lazy, printable descriptions of how a target array is made from stored ones.

`Read` names a stored array; `Take`, `Slice`, `Reshape`, `Stack`, `Concat`, `Transpose`, `Cast`,
`Const` and `LoraMerge` build on reads. They are data (frozen dataclasses with `shape`, `dtype`
and a `str` that `orbax-nnx plan` prints); `orbax_nnx.io.reader` evaluates them per target region.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Union

import numpy as np

from orbax_nnx.nnx_tree import DiskPath


@dataclasses.dataclass(frozen=True)
class Read:
  """A whole stored array (regions of it are read on demand)."""

  source: DiskPath
  shape: tuple[int, ...]
  dtype: Any

  def __str__(self) -> str:
    return '/'.join(self.source)


@dataclasses.dataclass(frozen=True)
class Take:
  """Layer `index` of a stacked expression, dropping `axis`."""

  expr: 'Expr'
  index: int
  axis: int

  @property
  def shape(self):
    s = self.expr.shape
    return s[: self.axis] + s[self.axis + 1:]

  @property
  def dtype(self):
    return self.expr.dtype

  def __str__(self) -> str:
    return f'take({self.expr}, {self.index}, axis={self.axis})'


@dataclasses.dataclass(frozen=True)
class Stack:
  """Layers stacked on a new `axis`."""

  exprs: tuple['Expr', ...]
  axis: int

  @property
  def shape(self):
    s = self.exprs[0].shape
    return s[: self.axis] + (len(self.exprs),) + s[self.axis:]

  @property
  def dtype(self):
    return joined_dtype(self.exprs)

  def __str__(self) -> str:
    first, last = self.exprs[0], self.exprs[-1]
    return f'stack([{first} .. {last}] x{len(self.exprs)}, axis={self.axis})'


@dataclasses.dataclass(frozen=True)
class Transpose:
  """Axes permuted: result axis k is input axis `perm[k]` (moves a layer axis)."""

  expr: 'Expr'
  perm: tuple[int, ...]

  @property
  def shape(self):
    return tuple(self.expr.shape[p] for p in self.perm)

  @property
  def dtype(self):
    return self.expr.dtype

  def __str__(self) -> str:
    return f'transpose({self.expr}, {self.perm})'


@dataclasses.dataclass(frozen=True)
class Slice:
  """Indices `start:stop` of `axis` (one part of a fused array, e.g. q out of qkv)."""

  expr: 'Expr'
  axis: int
  start: int
  stop: int

  @property
  def shape(self):
    s = self.expr.shape
    return s[: self.axis] + (self.stop - self.start,) + s[self.axis + 1:]

  @property
  def dtype(self):
    return self.expr.dtype

  def __str__(self) -> str:
    return f'slice({self.expr}, {self.start}:{self.stop}, axis={self.axis})'


@dataclasses.dataclass(frozen=True)
class Reshape:
  """Row-major reshape (split or merge adjacent axes, e.g. flattened heads into (heads, head_dim))."""

  expr: 'Expr'
  shape: tuple[int, ...]

  @property
  def dtype(self):
    return self.expr.dtype

  def groups(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Runs of (input axes, output axes) with equal sizes: each run is one merge-then-split."""
    return reshape_groups(tuple(self.expr.shape), tuple(self.shape))

  def __str__(self) -> str:
    return f'reshape({self.expr}, {self.shape})'


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Pairs consecutive axes of `src` and `dst` into runs of equal element count (size-1 axes join a run)."""
  out, i, j = [], 0, 0
  while i < len(src) or j < len(dst):
    a, b = [i], [j]
    na = src[i] if i < len(src) else 1
    nb = dst[j] if j < len(dst) else 1
    i, j = i + 1, j + 1
    while na != nb:
      if na < nb:
        na *= src[i]
        a.append(i)
        i += 1
      else:
        nb *= dst[j]
        b.append(j)
        j += 1
    while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
      a.append(i)
      i += 1
    while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
      b.append(j)
      j += 1
    out.append((tuple(k for k in a if k < len(src)), tuple(k for k in b if k < len(dst))))
  return out


@dataclasses.dataclass(frozen=True)
class Concat:
  """Several expressions joined along `axis` (one target fused from several stored arrays)."""

  exprs: tuple['Expr', ...]
  axis: int

  @property
  def shape(self):
    s = self.exprs[0].shape
    return s[: self.axis] + (sum(e.shape[self.axis] for e in self.exprs),) + s[self.axis + 1:]

  @property
  def dtype(self):
    return joined_dtype(self.exprs)

  def __str__(self) -> str:
    return f'concat([{", ".join(map(str, self.exprs))}], axis={self.axis})'


@dataclasses.dataclass(frozen=True)
class Cast:
  expr: 'Expr'
  dtype: Any

  @property
  def shape(self):
    return self.expr.shape

  def __str__(self) -> str:
    return f'cast({self.expr}, {np.dtype(self.dtype).name})'


@dataclasses.dataclass(frozen=True)
class Const:
  """A constant array (e.g. `step = 0` of a Linen decode checkpoint)."""

  value: Any
  shape: tuple[int, ...]
  dtype: Any

  def __str__(self) -> str:
    return f'const({self.value})'


@dataclasses.dataclass(frozen=True)
class LoraMerge:
  """`base + a @ b` over the last two axes (a LoRA adapter folded into its kernel)."""

  base: 'Expr'
  a: 'Expr'
  b: 'Expr'

  @property
  def shape(self):
    return self.base.shape

  @property
  def dtype(self):
    return self.base.dtype

  def __str__(self) -> str:
    return f'merge_lora({self.base} + {self.a} @ {self.b})'


Expr = Union[Read, Take, Slice, Reshape, Stack, Concat, Transpose, Cast, Const, LoraMerge]


def promote(dtypes) -> np.dtype:
  """One dtype for values of several: theirs when they agree, else numpy's promotion of them."""
  dtypes = {np.dtype(d) for d in dtypes}
  if len(dtypes) == 1:
    return dtypes.pop()
  try:
    return np.result_type(*dtypes)
  except TypeError:  # e.g. bfloat16 with an integer type: no promotion; float64 holds both
    return np.dtype(np.float64)


def joined_dtype(exprs) -> np.dtype:
  """The dtype of parts joined (concat, stack), by `promote`. Planned targets never rely on it: `cast`
  gives every part the target dtype first."""
  return promote(e.dtype for e in exprs)


_SHAPE_ONLY = (Take, Slice, Reshape, Transpose)


def cast(expr: 'Expr', dtype: Any) -> 'Expr':
  """`expr` with values of `dtype`: the one place composed expressions get their dtype.

  Each part of a `Concat` or `Stack` (also under shape-only operations) is cast straight to `dtype`, so
  parts of different dtypes are each rounded once, never through another part's dtype.
  """
  dtype = np.dtype(dtype)
  if isinstance(expr, (Concat, Stack)):
    return dataclasses.replace(expr, exprs=tuple(cast(e, dtype) for e in expr.exprs))
  if isinstance(expr, _SHAPE_ONLY) and _joins(expr.expr):
    return dataclasses.replace(expr, expr=cast(expr.expr, dtype))
  return expr if np.dtype(expr.dtype) == dtype else Cast(expr, dtype)


def _joins(expr: 'Expr') -> bool:
  while isinstance(expr, _SHAPE_ONLY):
    expr = expr.expr
  return isinstance(expr, (Concat, Stack))


def reads(expr: Expr) -> Iterable[Read]:
  """The stored arrays an expression reads."""
  if isinstance(expr, Read):
    yield expr
  elif isinstance(expr, Const):
    return
  elif isinstance(expr, LoraMerge):
    for e in (expr.base, expr.a, expr.b):
      yield from reads(e)
  elif isinstance(expr, (Stack, Concat)):
    for e in expr.exprs:
      yield from reads(e)
  else:
    yield from reads(expr.expr)
