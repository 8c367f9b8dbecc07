"""Stored arrays of an Orbax item: tensorstore opened with Orbax's own read spec, regions decoded
straight into aligned host buffers."""

from __future__ import annotations

import json

import numpy as np
import tensorstore as ts

from orbax_nnx.io.buffers import aligned_empty
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources.metadata import ItemMetadata
from orbax_nnx.sources.zarr_headers import ReadSpecs


class OrbaxArray:
  """One stored array of an Orbax item, opened with Orbax's own tensorstore spec."""

  def __init__(self, store):
    self.store = store
    self.shape = tuple(store.shape)
    self.dtype = store.dtype.numpy_dtype
    self.chunk = tuple(c or n for c, n in zip(store.chunk_layout.read_chunk.shape or self.shape, self.shape))

  casts = True  # `read(..., dtype=)` converts while decoding, chunk by chunk

  def read(self, region: tuple, perm: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    """`region` (normalized slices), decoded straight into an aligned buffer, axes permuted by `perm`,
    converted to `dtype` on the way (no full-size copy in the stored dtype)."""
    view = self.store[region]
    if perm is not None:
      view = view[ts.d[tuple(perm)].transpose[tuple(range(len(perm)))]]
    if dtype is not None and np.dtype(dtype) != self.dtype:
      view = ts.cast(view, ts.dtype(np.dtype(dtype).name))
    out = aligned_empty(tuple(view.shape), view.dtype.numpy_dtype)
    ts.array(out, copy=False, write=True).write(view).result()
    return out

  def start_read_into(self, region: tuple, out: np.ndarray, dtype=None):
    """Starts decoding `region` straight into `out` (any strided view of its shape), converted to
    `dtype`; returns tensorstore's future (tensorstore's own threads do the work)."""
    view = self.store[region]
    if dtype is not None and np.dtype(dtype) != self.dtype:
      view = ts.cast(view, ts.dtype(np.dtype(dtype).name))
    return ts.array(out, copy=False, write=True).write(view)


class OrbaxOpener:
  """Opens the stored arrays of one Orbax item by their tree paths, with Orbax's own read spec."""

  def __init__(self, meta: ItemMetadata):
    flags = json.loads((meta.directory / '_METADATA').read_text())
    self.directory = meta.directory
    self.specs = ReadSpecs(meta.directory, bool(flags.get('use_ocdbt', True)), bool(flags.get('use_zarr3', False)))

  def __call__(self, path: DiskPath) -> OrbaxArray:
    return self.finish(self.start(path))

  def start(self, path: DiskPath):
    """Starts opening the array at `path`; `finish` turns the future into an OrbaxArray."""
    return ts.open(self.specs.spec('.'.join(path)), context=self.specs.context, open=True, read=True)

  @staticmethod
  def finish(opening) -> OrbaxArray:
    return OrbaxArray(opening.result())
