"""Stored arrays of an Orbax item: tensorstore opened with Orbax's own read spec, regions decoded
straight into aligned host buffers."""

from __future__ import annotations

import json

import numpy as np
import tensorstore as ts

from orbax_nnx import compat
from orbax_nnx.io.buffers import aligned_empty
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources.metadata import ItemMetadata


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


class OrbaxOpener:
  """Opens the stored arrays of one Orbax item by their tree paths, with Orbax's own read spec."""

  def __init__(self, meta: ItemMetadata):
    flags = json.loads((meta.directory / '_METADATA').read_text())
    self.directory = meta.directory
    self.use_ocdbt = bool(flags.get('use_ocdbt', True))
    self.use_zarr3 = bool(flags.get('use_zarr3', False))
    self.context = compat.get_ts_context(use_ocdbt=self.use_ocdbt)

  def __call__(self, path: DiskPath) -> OrbaxArray:
    info = compat.ParamInfo(name='.'.join(path), parent_dir=self.directory,
                            is_ocdbt_checkpoint=self.use_ocdbt, use_zarr3=self.use_zarr3,
                            ts_context=self.context)
    spec = compat.build_array_read_spec(info, use_ocdbt=self.use_ocdbt)
    return OrbaxArray(ts.open(spec.json, context=self.context, open=True, read=True).result())
