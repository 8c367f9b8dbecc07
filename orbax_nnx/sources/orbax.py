"""Stored arrays of an Orbax item: tensorstore opened with Orbax's own read spec, regions decoded
straight into aligned host buffers (large chunks of Orbax's own codecs as streams: `chunk_stream`)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts

from orbax_nnx.io.buffers import aligned_empty
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources import chunk_stream
from orbax_nnx.sources.metadata import ItemMetadata
from orbax_nnx.sources.zarr_headers import ReadSpecs, storage_format


class OrbaxArray:
  """One stored array of an Orbax item, opened with Orbax's own tensorstore spec."""

  def __init__(self, store):
    self.store = store
    self.shape = tuple(store.shape)
    self.dtype = store.dtype.numpy_dtype
    self.chunk = tuple(c or n for c, n in zip(store.chunk_layout.read_chunk.shape or self.shape, self.shape))
    self._streams: chunk_stream.ChunkStreams | None | bool = False  # False: not looked at yet
    self.unit_bytes = chunk_stream.UNIT_BYTES  # these two: set before the first read, if at all
    self.min_stream_bytes = chunk_stream.MIN_STREAM_BYTES  # smaller chunks: tensorstore decodes them
    self._unit: tuple[int, ...] | None = None
    self._stored: tuple | None | bool = False  # `stored_chunks`; False: not looked at yet

  @property
  def unit(self) -> tuple[int, ...]:
    """The part of a chunk decoded at a time for partial reads: a band of `unit_bytes` or so of a large
    streamed chunk (bands tile the chunk in stored order: `read_unit`), else the whole chunk."""
    if self._unit is None:
      streams = self._streams_for(None)
      if streams is None or math.prod(self.chunk) * self.dtype.itemsize < 2 * self.unit_bytes:
        self._unit = self.chunk
      else:
        self._unit = chunk_stream.band_shape(self.chunk, self.dtype.itemsize, self.unit_bytes)
    return self._unit

  @property
  def streamed(self) -> bool:
    """Whether its chunks decode as streams (large, in a codec Orbax writes)."""
    return self._streams_for(None) is not None

  def unit_lock(self, cell: tuple[int, ...]) -> threading.Lock:
    """The lock the units of the chunk holding unit `cell` are decoded under."""
    return self._streams_for(None).lock(cell, self.unit)

  def read_unit(self, cell: tuple[int, ...], passed: Callable[[tuple[int, ...], np.ndarray], None]) -> np.ndarray:
    """The unit at grid position `cell` (see `unit`), under `unit_lock(cell)`: `ChunkStreams.read_unit`."""
    return self._streams_for(None).read_unit(cell, self.unit_bytes, passed)

  def stored_chunks(self) -> tuple[Any, chunk_stream.ChunkFormat, dict] | None:
    """(kvstore, chunk format, zarr metadata) of an array whose chunks (or shards of chunks) are stored in
    a format `chunk_stream` checks: what copying them as they are needs. None otherwise."""
    if self._stored is False:
      metadata = self.store.spec().to_json().get('metadata', {})
      fmt = chunk_stream.chunk_format(metadata)
      ok = fmt is not None and fmt.chunk == self.chunk
      self._stored = (self.store.kvstore, fmt, metadata) if ok else None
    return self._stored

  casts = True  # `read(..., dtype=)` converts while decoding, chunk by chunk

  def read(self, region: tuple, perm: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    """`region` (normalized slices), decoded straight into an aligned buffer, axes permuted by `perm`,
    converted to `dtype` on the way (no full-size copy in the stored dtype)."""
    streams = self._streams_for(region)
    if streams is not None:
      shape = tuple(r.stop - r.start for r in region)
      out_dtype = self.dtype if dtype is None else np.dtype(dtype)
      if perm is None:
        out = aligned_empty(shape, out_dtype)
        self._stream(region, out, streams, dtype)
        return out
      out = aligned_empty(tuple(shape[p] for p in perm), out_dtype)
      self._stream(region, np.transpose(out, np.argsort(perm)), streams, dtype)
      return out
    view = self._view(region, dtype)
    if perm is not None:
      view = view[ts.d[tuple(perm)].transpose[tuple(range(len(perm)))]]
    out = aligned_empty(tuple(view.shape), view.dtype.numpy_dtype)
    ts.array(out, copy=False, write=True).write(view).result()
    return out

  def start_read_into(self, region: tuple, out: np.ndarray, dtype=None):
    """Starts decoding `region` straight into `out` (any strided view of its shape), converted to
    `dtype`; returns a future (tensorstore's, or one of the chunk streams' threads)."""
    streams = self._streams_for(region)
    if streams is not None:
      return chunk_stream.pool().submit(self._stream, region, out, streams, dtype)
    return ts.array(out, copy=False, write=True).write(self._view(region, dtype))

  def _view(self, region: tuple, dtype=None):
    view = self.store[region]
    if dtype is not None and np.dtype(dtype) != self.dtype:
      view = ts.cast(view, ts.dtype(np.dtype(dtype).name))
    return view

  def _streams_for(self, region: tuple | None) -> chunk_stream.ChunkStreams | None:
    """The chunk streams, when chunks are large and `region` (None: any) is made of whole ones."""
    if self._streams is False:
      fmt = None
      if math.prod(self.chunk) * self.dtype.itemsize >= self.min_stream_bytes:
        fmt = chunk_stream.chunk_format(self.store.spec().to_json().get('metadata', {}))
      self._streams = chunk_stream.ChunkStreams(self.store.kvstore, fmt) \
          if fmt is not None and fmt.chunk == self.chunk else None
    if self._streams is None or region is not None and any(
        r.start % c or (r.stop % c and r.stop != n) for r, c, n in zip(region, self.chunk, self.shape)):
      return None
    return self._streams

  def parts(self, cell: tuple[int, ...]):
    """The chunk at grid position `cell` as (region of the array, decoded data) pairs in stored order:
    bands of a streamed chunk (each valid until the next is asked for), else None (read it whole)."""
    streams = self._streams_for(None)
    if streams is None:
      return None
    return self._parts(streams, cell, chunk_stream.chunk_bounds(cell, self.chunk, self.shape))

  def _parts(self, streams: chunk_stream.ChunkStreams, cell: tuple[int, ...], bounds: tuple):
    bands = streams.parts(cell, tuple(b.stop - b.start for b in bounds))
    try:
      first = next(bands, None)
    except chunk_stream.MissingChunk:
      out = aligned_empty(tuple(b.stop - b.start for b in bounds), self.dtype)
      self._read_missing(bounds, out)
      yield bounds, out
      return
    for region, band in itertools.chain([first] if first is not None else [], bands):
      yield tuple(slice(b.start + r.start, b.start + r.stop) for b, r in zip(bounds, region)), band

  def _stream(self, region: tuple, out: np.ndarray, streams: chunk_stream.ChunkStreams, dtype=None) -> None:
    """Decodes the whole chunks of `region` into `out` (shaped like it) one stream at a time."""
    grid = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, self.chunk)]
    for cell in itertools.product(*grid):
      bounds = chunk_stream.chunk_bounds(cell, self.chunk, self.shape)
      into = out[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(bounds, region)) + (Ellipsis,)]
      try:
        streams.decode_into(cell, into)
      except chunk_stream.MissingChunk:
        self._read_missing(bounds, into, dtype)

  def _read_missing(self, bounds: tuple, out: np.ndarray, dtype=None) -> None:
    """A chunk that is not stored, read by tensorstore: it decides between fill value and its own error."""
    ts.array(out, copy=False, write=True).write(self._view(bounds, dtype)).result()


class OrbaxOpener:
  """Opens the stored arrays of one Orbax item by their tree paths, with Orbax's own read spec."""

  def __init__(self, meta: ItemMetadata):
    self.directory = meta.directory
    self.specs = getattr(meta.leaves, 'read_specs', None)  # the item's own (`read_item_metadata`)
    if self.specs is None:
      self.specs = ReadSpecs(meta.directory, *storage_format(meta.flags))

  def __call__(self, path: DiskPath) -> OrbaxArray:
    return self.finish(self.start(path))

  def start(self, path: DiskPath):
    """Starts opening the array at `path`; `finish` turns the future into an OrbaxArray."""
    return ts.open(self.specs.spec('.'.join(path)), context=self.specs.context, open=True, read=True)

  @staticmethod
  def finish(opening) -> OrbaxArray:
    return OrbaxArray(opening.result())
