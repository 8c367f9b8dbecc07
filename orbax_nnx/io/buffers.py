"""Host buffers: 64-byte aligned (so `jax.device_put` aliases them) and tiled transposes into them."""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import threading
import weakref
from collections.abc import Iterator

import numpy as np

_ALIGN = 64  # jax.device_put aliases host buffers aligned like this instead of copying them
# Buffers of this size or more are mapped from the OS and unmapped when dropped. From malloc, the freed ones
# stayed resident: glibc raises its mmap threshold (up to 32 MiB) after each large free, and later buffers
# then come from per-thread arenas that keep freed memory. Measured on a 336 MiB bf16 safetensors load (8
# reader threads): peak RSS growth 1.13x -> 1.05-1.07x the loaded bytes at the same speed; on a 2x4 mesh 1.20x
# -> 1.05x, 0.35-0.47 s -> 0.61 s (its 8 MiB row slabs are now faulted in afresh; at 16 MiB: 1.15x, 0.36 s).
MAPPED_BYTES = 1 << 20


class _Recycler:
  """Dropped mappings, kept while an operation runs and handed out again for buffers of the same size.

  A fresh mapping costs a page fault per 4 KiB page on first touch: a 2.8 GiB scanned conversion moved 6 GiB
  through 4 MiB buffers, 1.7 M faults and 11-12 s of system time in a 15.5 s run; with its mappings reused,
  0.14-0.19 M faults, 5-7 s and 11.4-13.4 s, at the same peak RSS. A buffer's mapping comes back here only
  when the last object holding its data is gone (a finalizer on the buffer object that exports it to numpy;
  a consumer that keeps the data, as tensorstore and `jax.device_put` do, keeps a reference), so no live
  array ever shares a reused mapping.

  The bound: mapped bytes live (handed out, not yet dropped) plus kept never exceed the most bytes live at once
  since the outermost block began (`take`), so keeping never raises the peak above what the same buffers would
  hold without it, and mappings of one size are let go for another only when that bound requires it, the
  smallest first. There is no other cap: a fixed one (32 MiB) let a 2.8 GiB scanned convert keep its 4 MiB
  blocks but not its 32 MiB stream units, 62 of whose 96 mappings were then fresh, each faulted in and zeroed
  (with the bound alone: 10 fresh; system time 7.4 s against 8.6 s, wall 13.5 s against 14.6 s, medians of 3,
  peak RSS 645 against 651 MiB).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._free: dict[int, list[mmap.mmap]] = {}
    self._bytes = 0  # kept
    self._live = 0  # handed out and not dropped yet (every mapping, inside a block or not)
    self._peak = 0  # the most bytes live at once since the outermost block began
    self._depth = 0  # operations running: mappings are kept only while one is

  @contextlib.contextmanager
  def active(self) -> Iterator[None]:
    with self._lock:
      self._depth += 1
      if self._depth == 1:
        self._peak = self._live
    try:
      yield
    finally:
      with self._lock:
        self._depth -= 1
        if self._depth == 0:  # the kept mappings' last references: each is unmapped as it goes
          self._free, self._bytes = {}, 0

  def take(self, nbytes: int) -> ctypes.Array:
    """A buffer of `nbytes` over a kept mapping of that size, else a fresh one. Before a fresh one is mapped,
    kept mappings (of other sizes) are let go until live plus kept bytes, the new one counted, are within the
    most live at once so far, or, when the new one makes a new peak, until none is kept."""
    released = []
    with self._lock:
      kept = self._free.get(nbytes)
      mapping = kept.pop() if kept else None
      if mapping is not None:
        self._bytes -= nbytes
      else:
        bound = max(self._peak, self._live + nbytes)
        for size in sorted(self._free):  # the smallest first: no more memory let go than the bound needs
          others = self._free[size]
          while others and self._live + self._bytes + nbytes > bound:
            released.append(others.pop())
            self._bytes -= len(released[-1])
      self._live += nbytes
      self._peak = max(self._peak, self._live)
    if mapping is None:
      released.clear()  # their last references: unmapped before the new one is
      mapping = mmap.mmap(-1, nbytes)
    # the exporter of every array over this buffer: Python frees it only once no array, view or buffer
    # export derived from it is left (a memoryview would not do: one made from it outlives it)
    exporter = (ctypes.c_char * nbytes).from_buffer(mapping)
    weakref.finalize(exporter, self._give, mapping)
    return exporter

  def _give(self, mapping: mmap.mmap) -> None:
    # runs as the exporter dies, before it releases the mapping: a mapping not kept is unmapped after this
    # returns, when its last reference (the finalizer's) goes, not closed here (it is still exported)
    with self._lock:
      self._live -= len(mapping)
      if self._depth > 0:  # (within the bound: live plus kept bytes are unchanged)
        self._free.setdefault(len(mapping), []).append(mapping)
        self._bytes += len(mapping)


_recycler = _Recycler()


def recycling() -> contextlib.AbstractContextManager[None]:
  """While the block runs (nested and concurrent blocks share it), dropped buffers of `MAPPED_BYTES` or more
  are kept and reused for the next buffer of the same size (a buffer of another size first lets go what would
  otherwise take live plus kept bytes above the most live at once so far); all are unmapped when the last block
  ends."""
  return _recycler.active()


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialized C-order array whose data is 64-byte aligned (zero-copy device_put on CPU); from 1 MiB
  (`MAPPED_BYTES`) its own page-aligned mapping, returned to the OS when dropped (or, inside `recycling`,
  reused for a later buffer of its size: its contents are then the last user's)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  if nbytes >= MAPPED_BYTES:
    return np.frombuffer(_recycler.take(nbytes), np.uint8).view(dtype).reshape(shape)
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  offset = -raw.ctypes.data % _ALIGN
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


_TILE = (512, 16)  # output tile (rows, columns) copied per step: source and destination stay in cache and TLB


def transposed(src: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
  """`np.transpose(src, perm)` as a new aligned C-order array, copied tile by tile over the output's
  last two axes (measured 3-6x faster than numpy's element-strided copy on large 2-byte arrays)."""
  view = np.transpose(src, perm)
  out = aligned_empty(view.shape, src.dtype)
  if not perm or perm[-1] == src.ndim - 1 or out.size == 0:  # rows stay contiguous: a plain copy is fast
    np.copyto(out, view)
    return out
  for i in range(0, out.shape[-2], _TILE[0]):  # the last axis moved, so there are at least two
    for j in range(0, out.shape[-1], _TILE[1]):
      out[..., i:i + _TILE[0], j:j + _TILE[1]] = view[..., i:i + _TILE[0], j:j + _TILE[1]]
  return out
