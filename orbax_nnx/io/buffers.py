"""Host buffers: 64-byte aligned (so `jax.device_put` aliases them) and tiled transposes into them."""

from __future__ import annotations

import numpy as np

_ALIGN = 64  # jax.device_put aliases host buffers aligned like this instead of copying them


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialized C-order array whose data is 64-byte aligned (zero-copy device_put on CPU)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
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
