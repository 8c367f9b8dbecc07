"""Evaluating plan expressions over one region: which stored regions each expression reads, and
how their values are assembled (takes, slices, reshapes, concatenations, stacks, casts, LoRA merges)."""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

import numpy as np

from orbax_nnx.io.buffers import aligned_empty, transposed
from orbax_nnx.planning.expressions import (
  Cast,
  Concat,
  Const,
  Expr,
  LoraMerge,
  Read,
  Reshape,
  Slice,
  Stack,
  Take,
  Transpose,
)

if TYPE_CHECKING:
  from orbax_nnx.io.source_arrays import SourceArrays

Index = tuple[slice, ...]


def row_blocks(shape: tuple[int, ...], itemsize: int, block_bytes: int) -> list[Index]:
  """Whole-array index split along axis 0 into blocks of at most `block_bytes` (at least one row each;
  a scalar is one block, an array with no rows none)."""
  if not shape:
    return [()]
  row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
  step = max(1, block_bytes // row)
  rest = tuple(slice(0, n) for n in shape[1:])
  return [(slice(i, min(i + step, shape[0])),) + rest for i in range(0, shape[0], step)]


def normalize(index: Index, shape: tuple[int, ...]) -> tuple[slice, ...]:
  out = []
  for s, n in zip(index, shape):
    start, stop, _ = s.indices(n)
    out.append(slice(start, stop))
  return tuple(out) + tuple(slice(0, n) for n in shape[len(index):])


def region_key(region: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
  """A normalized region as a hashable key: `((start, stop), ...)`."""
  return tuple((s.start, s.stop) for s in region)


def evaluate(expr: Expr, index: tuple[slice, ...], source: SourceArrays) -> np.ndarray:
  """The values of `expr` in the region `index` (normalized slices)."""
  if isinstance(expr, Read):
    return source.read(expr.source, index)
  if isinstance(expr, Const):
    out = aligned_empty(tuple(s.stop - s.start for s in index), expr.dtype)
    out.fill(expr.value)
    return out
  if isinstance(expr, LoraMerge):
    a_index, b_index = _lora_regions(expr, index)
    base = evaluate(expr.base, index, source).astype(np.float32)
    delta = np.matmul(evaluate(expr.a, a_index, source).astype(np.float32),
                      evaluate(expr.b, b_index, source).astype(np.float32))
    return (base + delta).astype(expr.dtype)
  if isinstance(expr, Cast):
    if isinstance(expr.expr, Read):  # converted while decoding, chunk by chunk
      return source.read(expr.expr.source, index, dtype=expr.dtype)
    inner = expr.expr
    if isinstance(inner, Transpose) and isinstance(inner.expr, Read):
      src_index = [slice(None)] * len(inner.perm)
      for k, p in enumerate(inner.perm):
        src_index[p] = index[k]
      return source.read(inner.expr.source, tuple(src_index), perm=inner.perm, dtype=expr.dtype)
    value = evaluate(expr.expr, index, source)
    out = aligned_empty(value.shape, expr.dtype)
    np.copyto(out, value, casting='unsafe')
    return out
  if isinstance(expr, Take):
    inner = index[: expr.axis] + (expr.index,) + index[expr.axis:]
    return _read_take(expr, inner, source)
  if isinstance(expr, Slice):
    return evaluate(expr.expr, _slice_region(expr, index), source)
  if isinstance(expr, Reshape):
    return _reshape(expr, index, source)
  if isinstance(expr, Concat):
    out = aligned_empty(tuple(s.stop - s.start for s in index), expr.dtype)
    for part, region, placed in _concat_parts(expr, index):
      out[placed] = evaluate(part, region, source)
    return out
  if isinstance(expr, Transpose):
    src_index = [slice(None)] * len(expr.perm)
    for k, p in enumerate(expr.perm):
      src_index[p] = index[k]
    if isinstance(expr.expr, Read):  # the stored array's reader permutes while decoding
      return source.read(expr.expr.source, tuple(src_index), perm=expr.perm)
    return transposed(evaluate(expr.expr, tuple(src_index), source), expr.perm)
  if isinstance(expr, Stack):
    return _stack(expr, index, source)
  raise TypeError(f'unknown expression {expr!r}')


def start(expr: Expr, index: tuple[slice, ...], source: SourceArrays) -> concurrent.futures.Future | None:
  """Starts evaluating `expr` over `index` (normalized slices) without a thread, when it is one stored read
  (cast or not) that decodes in the background: a future of the values. Many such reads go out at once, so an
  object store coalesces them (a thread per read would issue them a few at a time). None when it must be
  evaluated (`evaluate`) instead."""
  read = expr.expr if isinstance(expr, Cast) else expr
  if not isinstance(read, Read) or not source.reads_directly(read.source, index):
    return None
  dtype = expr.dtype if isinstance(expr, Cast) else None
  out = aligned_empty(tuple(s.stop - s.start for s in index), dtype if dtype is not None else read.dtype)
  pending = source.start_read_into(read.source, index, out, dtype=dtype)
  future: concurrent.futures.Future = concurrent.futures.Future()

  def finished(_) -> None:
    try:
      source.finish_read(pending)
    except BaseException as e:  # pylint: disable=broad-except  (handed to whoever waits)
      future.set_exception(e)
    else:
      future.set_result(out)

  if pending is None:
    future.set_result(out)
  else:
    pending[1].add_done_callback(finished)
  return future


def _stack(expr: Stack, index: tuple, source: SourceArrays) -> np.ndarray:
  """Layers decoded straight into their slot of the output, all stored reads in flight at once."""
  layer = index[expr.axis]
  rest = index[: expr.axis] + index[expr.axis + 1:]
  out = aligned_empty(tuple(s.stop - s.start for s in index), expr.dtype)
  pending = []
  try:
    for j, i in enumerate(range(layer.start, layer.stop)):
      part, slot = expr.exprs[i], out[(slice(None),) * expr.axis + (j, ...)]  # a view, even 0-d
      read = part.expr if isinstance(part, Cast) else part
      if isinstance(read, Read):
        pending.append(source.start_read_into(read.source, rest, slot, dtype=expr.dtype))
      else:
        np.copyto(slot, evaluate(part, rest, source), casting='unsafe')
  except BaseException:
    for started in pending:  # nothing may still be writing into `out` once this returns
      try:
        source.finish_read(started)
      except Exception:  # pylint: disable=broad-except  (the first error is the one reported)
        pass
    raise
  for started in pending:
    source.finish_read(started)
  return out


def _lora_regions(expr, index: tuple) -> tuple[tuple, tuple]:
  """Regions of `a` (rows of the kernel region, all ranks) and `b` (all ranks, its columns)."""
  rank = expr.a.shape[-1]
  return index[:-1] + (slice(0, rank),), index[:-2] + (slice(0, rank), index[-1])


def read_regions(expr: Expr, index: tuple):
  """The (stored path, region) pairs evaluating `expr` over `index` reads."""
  if isinstance(expr, Read):
    yield expr.source, index
  elif isinstance(expr, Const):
    return
  elif isinstance(expr, LoraMerge):
    a_index, b_index = _lora_regions(expr, index)
    yield from read_regions(expr.base, index)
    yield from read_regions(expr.a, a_index)
    yield from read_regions(expr.b, b_index)
  elif isinstance(expr, Cast):
    yield from read_regions(expr.expr, index)
  elif isinstance(expr, Take):  # a Read takes the integer index; anything else reads the one-layer slab
    at = expr.index if isinstance(expr.expr, Read) else slice(expr.index, expr.index + 1)
    yield from read_regions(expr.expr, index[: expr.axis] + (at,) + index[expr.axis:])
  elif isinstance(expr, Slice):
    yield from read_regions(expr.expr, _slice_region(expr, index))
  elif isinstance(expr, Reshape):
    if all(expr.expr.shape) and all(expr.shape):
      yield from read_regions(expr.expr, _reshape_region(expr, index)[0])
  elif isinstance(expr, Concat):
    for part, region, _ in _concat_parts(expr, index):
      yield from read_regions(part, region)
  elif isinstance(expr, Transpose):
    src_index = [slice(None)] * len(expr.perm)
    for k, p in enumerate(expr.perm):
      src_index[p] = index[k]
    yield from read_regions(expr.expr, tuple(src_index))
  elif isinstance(expr, Stack):
    layer = index[expr.axis]
    rest = index[: expr.axis] + index[expr.axis + 1:]
    for i in range(layer.start, layer.stop):
      yield from read_regions(expr.exprs[i], rest)


def _concat_parts(expr: Concat, index: tuple):
  """(part, its region, where it lands in the output) for each part `index` overlaps."""
  axis, want, start = expr.axis, index[expr.axis], 0
  for part in expr.exprs:
    stop = start + part.shape[axis]
    lo, hi = max(want.start, start), min(want.stop, stop)
    if lo < hi:
      region = index[:axis] + (slice(lo - start, hi - start),) + index[axis + 1:]
      placed = (slice(None),) * axis + (slice(lo - want.start, hi - want.start),)
      yield part, region, placed
    start = stop


def _slice_region(expr: Slice, index: tuple) -> tuple:
  """The input region of a `Slice` for output region `index`: its axis shifted by the start."""
  r = index[expr.axis]
  return index[: expr.axis] + (slice(r.start + expr.start, r.stop + expr.start),) + index[expr.axis + 1:]


def _reshape_region(expr: Reshape, index: tuple) -> tuple[tuple, list[tuple[int, int, int]]]:
  """The input region covering output region `index`, and per axis run (flat size, offset, length).

  Within each run of axes (`Reshape.groups`), the output region's leading-axis rows are a
  contiguous flat range; the input rows covering it are read whole on the inner axes.
  """
  src, dst = tuple(expr.expr.shape), tuple(expr.shape)
  region: list = [None] * len(src)
  cuts = []
  for a, b in expr.groups():
    lo, hi = 0, 1
    if b:
      inner = int(np.prod([dst[k] for k in b[1:]], dtype=np.int64))
      lo, hi = index[b[0]].start * inner, index[b[0]].stop * inner
    if not a:
      cuts.append((1, 0, 1))
      continue
    inner = int(np.prod([src[k] for k in a[1:]], dtype=np.int64))
    r0, r1 = lo // inner, -(-hi // inner)
    region[a[0]] = slice(r0, r1)
    for k in a[1:]:
      region[k] = slice(0, src[k])
    cuts.append(((r1 - r0) * inner, lo - r0 * inner, hi - lo))
  return tuple(region), cuts


def _reshape(expr: Reshape, index: tuple, source: SourceArrays) -> np.ndarray:
  out_shape = tuple(s.stop - s.start for s in index)
  if not all(expr.expr.shape) or not all(expr.shape):
    return aligned_empty(out_shape, expr.dtype)
  region, cuts = _reshape_region(expr, index)
  data = evaluate(expr.expr, region, source)
  flat = data.reshape([n for n, _, _ in cuts])[tuple(slice(o, o + m) for _, o, m in cuts)]
  shape, inner = [], []
  for a, b in expr.groups():
    for j, k in enumerate(b):
      shape.append(index[k].stop - index[k].start if j == 0 else expr.shape[k])
      inner.append(slice(None) if j == 0 else index[k])
  return flat.reshape(shape)[tuple(inner)]


def _read_take(expr: Take, index: tuple, source: SourceArrays) -> np.ndarray:
  """Reads a layer: an integer index into the stacked expression drops that axis."""
  inner = expr.expr
  if isinstance(inner, Read):
    return source.read(inner.source, index)
  # general case: read the one-layer slab, then drop the axis
  axis = expr.axis
  slab_index = index[:axis] + (slice(expr.index, expr.index + 1),) + index[axis + 1:]
  return np.take(evaluate(inner, slab_index, source), 0, axis=axis)
