"""The stored arrays of one source, read by region: whole chunks decoded once and kept (within a budget)
until their last announced reader, or decoded straight into the output when a region is whole chunks."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import threading
from typing import Any

import numpy as np

from orbax_nnx import errors
from orbax_nnx.io.buffers import aligned_empty, transposed
from orbax_nnx.io.regions import normalize
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources import untrusted
from orbax_nnx.sources.chunk_stream import chunk_bounds, min_stream_bytes
from orbax_nnx.sources.metadata import ItemMetadata
from orbax_nnx.sources.orbax import OrbaxOpener

DEFAULT_CACHE_BYTES = 512 * 2**20


class SourceArrays:
  """Stored arrays of one source (an Orbax item or safetensors files), read in whole chunks
  with a bounded chunk cache.

  A region read costs the whole chunks it touches (a plain Orbax save stores an
  unsharded array as one chunk), so regions are served from decoded chunks: a chunk
  only partly needed is kept (LRU, `cache_bytes`, always at least one chunk) until
  the other regions that need it (e.g. the other layers of a stacked array) are read.
  Each chunk is decoded once as long as its readers are scheduled together. Large chunks (or, under a
  small `cache_bytes`, smaller ones: `chunk_stream.min_stream_bytes`) of Orbax's codecs decode as streams.
  """

  def __init__(self, meta: ItemMetadata, cache_bytes: int = DEFAULT_CACHE_BYTES):
    self.meta = meta
    if meta.format == 'safetensors':
      from orbax_nnx.sources.safetensors import SafetensorsOpener  # local: that module imports this one
      self._open = SafetensorsOpener(meta)
    elif meta.format == 'live':
      from orbax_nnx.sources.live import LiveOpener  # local: that module imports this one
      self._open = LiveOpener(meta)
    else:
      self._open = OrbaxOpener(meta)
    self.cache_bytes = cache_bytes
    self.min_stream_bytes = min_stream_bytes(cache_bytes)  # follows the budget the source is made with
    self._stores: dict[DiskPath, Any] = {}
    self._opening: dict[DiskPath, Any] = {}  # path -> open started by `open_ahead`
    self._chunks: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
    self._loading: dict[tuple, concurrent.futures.Future] = {}
    self._cached_bytes = 0
    self._loading_bytes = 0  # chunks being prefetched
    self._expected: dict[tuple, int] = {}  # chunk -> announced partial reads still to come
    self._queue: collections.deque = collections.deque()  # chunks to decode ahead, in order
    self._pool: concurrent.futures.Executor | None = None
    self._lock = threading.Lock()
    self.bytes_read = 0

  def count_read(self, nbytes: int) -> None:
    """Counts `nbytes` (decoded) as read: stored chunks copied as they are (`chunk_copy`)."""
    with self._lock:
      self.bytes_read += nbytes

  def open_ahead(self, paths) -> None:
    """Starts opening the stored arrays at `paths` all at once (each open waits on storage latency:
    one after another, a thousand small leaves spend most of their time there)."""
    start = getattr(self._open, 'start', None)
    if start is None:
      return
    with self._lock:
      todo = [p for p in dict.fromkeys(paths) if p not in self._stores and p not in self._opening]
      for path in todo:
        self._opening[path] = start(path)

  def store(self, path: DiskPath):
    """The stored array at `path` (`.shape`, `.dtype`, `.chunk`, `.read(region, perm)`), opened once."""
    with self._lock:
      if path in self._stores:
        return self._stores[path]
      opening = self._opening.pop(path, None)
    try:
      store = self._open(path) if opening is None else self._open.finish(opening)
    except errors.OrbaxNNXError:
      raise
    except Exception as e:
      raise untrusted.damaged(self.meta.directory, f'{"/".join(path)} cannot be opened: {e}', e) from e
    if hasattr(store, 'min_stream_bytes'):
      store.min_stream_bytes = self.min_stream_bytes
    with self._lock:
      self._stores[path] = store
    return store

  @contextlib.contextmanager
  def _reading(self, path: DiskPath):
    """Errors decoding the stored array at `path` raised as a CorruptCheckpointError naming it."""
    try:
      yield
    except errors.OrbaxNNXError:
      raise
    except Exception as e:
      raise untrusted.damaged(self.meta.directory, f'{"/".join(path)}: {e}', e) from e

  def _ts_read(self, path: DiskPath, index: tuple, perm: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    store = self.store(path)
    with self._reading(path):
      out = store.read(index, perm) if dtype is None else store.read(index, perm, dtype)
    with self._lock:
      self.bytes_read += out.size * np.dtype(store.dtype).itemsize
    return out

  def chunk_parts(self, path: DiskPath, cell: tuple, bounds: tuple):
    """The decoded chunk at grid position `cell` (array region `bounds`) as (region, data) pairs in
    stored order: a streamed chunk in bands, each valid until the next is asked for, else whole."""
    store = self.store(path)
    parts = store.parts(cell) if hasattr(store, 'parts') else None
    if parts is None:
      yield bounds, self._ts_read(path, bounds)
      return
    with self._reading(path):
      yield from parts
    with self._lock:
      self.bytes_read += store.dtype.itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))

  def unit(self, path: DiskPath) -> tuple[int, ...]:
    """The part of the stored array at `path` decoded at a time for partial reads: its chunk, or a unit
    of a large streamed chunk (`OrbaxArray.unit`)."""
    store = self.store(path)
    return tuple(getattr(store, 'unit', store.chunk))

  def streamed(self, path: DiskPath) -> bool:
    """Whether the chunks at `path` decode as streams (`chunk_parts` yields bands, not whole chunks)."""
    return bool(getattr(self.store(path), 'streamed', False))

  def _cells(self, path: DiskPath, index: tuple, units: bool = True):
    """(store, region, cells touched, whether it is made of whole chunks, squeezed axes, cell shape): cells
    of the store's decode units (see `OrbaxArray.unit`) or, with `units` False, of its chunks."""
    store = self.store(path)
    shape = tuple(store.shape)
    squeeze = tuple(i for i, s in enumerate(index) if isinstance(s, (int, np.integer)))
    region = tuple(slice(s, s + 1) if isinstance(s, (int, np.integer)) else s for s in index)
    region = normalize(region, shape)
    if not shape or getattr(store, 'exact', False):  # any region reads exactly what it needs
      return store, region, [], True, squeeze, ()
    chunk = self.unit(path) if units else store.chunk
    grid = [range(r.start // c, -(-r.stop // c)) if r.stop > r.start else range(0) for r, c in zip(region, chunk)]
    cells = list(itertools.product(*grid))
    # a region made of whole chunks needs no cache: each one is decoded straight into the output
    whole = all(r.start % c == 0 and (r.stop == n or r.stop % c == 0) for r, c, n in zip(region, store.chunk, shape))
    return store, region, cells, whole, squeeze, chunk

  def units_of(self, path: DiskPath, index: tuple) -> list[tuple[DiskPath, tuple[int, ...]]]:
    """The keys of the decode units a partial read of `index` goes through (those `expect` announces), in
    grid order; none for a region of whole chunks. Announces nothing."""
    _, _, cells, whole, _, _ = self._cells(path, index)
    return [] if whole else [(path, cell) for cell in cells]

  def expect(self, path: DiskPath, index: tuple, pool: concurrent.futures.Executor | None = None) -> dict:
    """Announces a partial region read to come: its chunks are kept until their last
    announced reader has used them (then dropped at once), and decoded ahead of time on
    `pool` while cached plus loading bytes stay within `cache_bytes`. Returns the chunks the
    read goes through (key -> decoded bytes; none for a region of whole chunks).
    """
    store, _, cells, whole, _, chunk = self._cells(path, index)
    if whole:
      return {}
    shape = tuple(store.shape)
    itemsize = store.dtype.itemsize
    need = {}
    with self._lock:
      for cell in cells:
        key = (path, cell)
        bounds = chunk_bounds(cell, chunk, shape)
        need[key] = itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))
        self._expected[key] = self._expected.get(key, 0) + 1
        if self._expected[key] == 1 and key not in self._chunks and key not in self._loading:
          self._queue.append((key, bounds, need[key]))
      if pool is not None:
        self._pool = pool
    self._pump()
    return need

  def _pump(self) -> None:
    """Starts queued chunk decodes while the budget allows (always at least one)."""
    while True:
      with self._lock:
        if not self._queue or self._pool is None:
          return
        key, bounds, nbytes = self._queue[0]
        if key in self._chunks or key in self._loading or key not in self._expected:
          self._queue.popleft()
          continue
        busy = self._cached_bytes + self._loading_bytes
        if busy and busy + nbytes > self.cache_bytes:
          return
        self._queue.popleft()
        future = self._begin_load(key, nbytes)
      self._pool.submit(self._load, key, bounds, nbytes, future, True)

  def _used(self, key: tuple) -> None:
    """One announced reader of a chunk is done; the last one drops the chunk."""
    with self._lock:
      left = self._expected.get(key)
      if left is None:
        return
      if left > 1:
        self._expected[key] = left - 1
        return
      del self._expected[key]
      data = self._chunks.pop(key, None)
      if data is not None:
        self._cached_bytes -= data.nbytes
    self._pump()

  def read(self, path: DiskPath, index: tuple, perm: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    """The region `index` (slices and ints) of a stored array, axes permuted by `perm` if given, in
    `dtype` if given (converted chunk by chunk: never a full-size copy in the stored dtype)."""
    store, region, cells, whole, squeeze, chunk = self._cells(path, index)
    casts = dtype is not None and getattr(store, 'casts', False)
    if whole and perm is not None and not squeeze:  # the permuted copy happens inside the decode
      return _converted(self._ts_read(path, region, perm, dtype if casts else None), dtype)
    if whole:
      out = self._ts_read(path, region, None, dtype if casts else None)  # whole chunks: nothing to keep
    else:
      shape = tuple(store.shape)
      out = aligned_empty(tuple(r.stop - r.start for r in region), dtype if dtype is not None else store.dtype)
      for cell in cells:
        bounds = chunk_bounds(cell, chunk, shape)
        data = self._chunk(path, cell, bounds)
        lo = [max(r.start, b.start) for r, b in zip(region, bounds)]
        hi = [min(r.stop, b.stop) for r, b in zip(region, bounds)]
        out[tuple(slice(l - r.start, h - r.start) for l, h, r in zip(lo, hi, region))] = \
            data[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, bounds))]
        del data
        self._used((path, cell))
    if squeeze:
      out = out.reshape([n for i, n in enumerate(out.shape) if i not in squeeze])
    return _converted(transposed(out, perm) if perm is not None else out, dtype)

  def reads_directly(self, path: DiskPath, index: tuple) -> bool:
    """Whether `start_read_into` decodes the region `index` in the background (whole chunks, no int index):
    no thread waits on it, so many such reads go out at once and the store coalesces them."""
    store, _, _, whole, squeeze, _ = self._cells(path, index)
    return whole and not squeeze and getattr(store, 'start_read_into', None) is not None

  def start_read_into(self, path: DiskPath, index: tuple, out: np.ndarray, dtype=None) -> Any:
    """Fills `out` (a view shaped like the region) with the region `index` of a stored array, in
    `dtype` if given. A region of whole chunks is decoded straight into `out` by tensorstore in the
    background: the returned future (wait with `finish_read`). Other regions are read now (None)."""
    store, region, _, whole, squeeze, _ = self._cells(path, index)
    start = getattr(store, 'start_read_into', None)
    if not whole or squeeze or start is None:
      np.copyto(out, self.read(path, index, dtype=dtype), casting='unsafe')
      return None
    try:
      future = start(region, out, dtype)
    except Exception as e:
      raise untrusted.damaged(self.meta.directory, f'{"/".join(path)}: {e}', e) from e
    with self._lock:
      self.bytes_read += out.size * np.dtype(store.dtype).itemsize
    return path, future

  def finish_read(self, pending: Any) -> None:
    """Waits for a read `start_read_into` started (None: it was done at once)."""
    if pending is None:
      return
    path, future = pending
    try:
      future.result()
    except Exception as e:
      raise untrusted.damaged(self.meta.directory, f'{"/".join(path)}: {e}', e) from e

  def _chunk(self, path: DiskPath, cell: tuple, bounds: tuple) -> np.ndarray:
    key = (path, cell)
    while True:
      with self._lock:
        if key in self._chunks:
          self._chunks.move_to_end(key)
          return self._chunks[key]
        future = self._loading.get(key)
        owner = future is None
        if owner:
          nbytes = self._stores[path].dtype.itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))
          future = self._begin_load(key, nbytes)
      data = self._load(key, bounds, nbytes, future) if owner else future.result()
      if data is not None:  # (None: a decode ahead found nobody expecting it any more)
        return data

  def _begin_load(self, key: tuple, nbytes: int) -> concurrent.futures.Future:
    """Registers a chunk decode (under the lock): later readers wait on it, and its bytes count as busy."""
    future = self._loading[key] = concurrent.futures.Future()
    self._loading_bytes += nbytes
    return future

  def _load(self, key: tuple, bounds: tuple, nbytes: int, future: concurrent.futures.Future,
            ahead: bool = False) -> np.ndarray | None:
    """Decodes a chunk `_begin_load` registered and caches it, dropping what is no longer expected first.
    A decode `ahead` of its readers that finds none left (a unit decoded and used on the way to another)
    returns None instead."""
    try:
      store = self._stores[key[0]]
      data = self._decode_unit(store, key, ahead) if self.unit(key[0]) != tuple(store.chunk) \
          else self._ts_read(key[0], bounds)
    except BaseException as e:
      with self._lock:
        del self._loading[key]
        self._loading_bytes -= nbytes
      future.set_exception(e)
      raise
    with self._lock:
      del self._loading[key]
      self._loading_bytes -= nbytes
      if data is not None and key not in self._chunks:  # (unless decoded on the way to another unit)
        self._chunks[key] = data
        self._cached_bytes += data.nbytes
      if self._cached_bytes > self.cache_bytes:  # over budget: unannounced chunks go first, then the oldest
        for old in sorted(self._chunks, key=lambda k: k in self._expected):
          if self._cached_bytes <= self.cache_bytes or len(self._chunks) == 1:
            break
          if old != key:
            self._cached_bytes -= self._chunks.pop(old).nbytes
    future.set_result(data)
    self._pump()
    return data

  def _decode_unit(self, store, key: tuple, ahead: bool = False) -> np.ndarray | None:
    """One unit of a large streamed chunk. Its chunk's stream decodes the units before it on the way:
    those still expected are cached (another reader is about to ask; at most the chunk, what decoding
    it whole used to keep), the rest dropped (decoded again if asked for)."""
    path, cell = key

    def passed(at: tuple, data: np.ndarray) -> None:
      with self._lock:
        self.bytes_read += data.nbytes
        if (path, at) in self._expected and (path, at) not in self._chunks:
          self._chunks[(path, at)] = data
          self._cached_bytes += data.nbytes

    with self._reading(path), store.unit_lock(cell):
      with self._lock:
        if key in self._chunks:
          return self._chunks[key]
        if ahead and key not in self._expected:  # decoded and used while this waited: nothing to do
          return None
      data = store.read_unit(cell, passed)
    with self._lock:
      self.bytes_read += data.nbytes
    return data


class ChunkLedger:
  """The decoded chunks that the reads in flight go through. A read needing chunks that the cache
  cannot hold alongside them waits for the reads before it: otherwise a chunk still needed would be
  dropped and decoded again. A read holds its chunks from `hold` until `release` (once it is done)."""

  def __init__(self, cache_bytes: int):
    self.cache_bytes = cache_bytes
    self._held: dict[Any, dict] = {}  # read -> the chunks it goes through
    self._readers: collections.Counter = collections.Counter()
    self._held_bytes = 0

  def fits(self, need: dict) -> bool:
    new = sum(n for key, n in need.items() if key not in self._readers)
    return not new or self._held_bytes + new <= self.cache_bytes

  def room_for(self, need: dict, reads) -> bool:
    """`fits`, after releasing the `reads` ((read, done?) pairs) that are done."""
    if self.fits(need):
      return True
    for read, done in reads:
      if read in self._held and done():
        self.release(read)
    return self.fits(need)

  def hold(self, read: Any, need: dict) -> None:
    self._held[read] = need
    for key, nbytes in need.items():
      if not self._readers[key]:
        self._held_bytes += nbytes
      self._readers[key] += 1

  def release(self, read: Any) -> None:
    """Drops what `read` holds (nothing if it was released already)."""
    for key, nbytes in self._held.pop(read, {}).items():
      self._readers[key] -= 1
      if not self._readers[key]:
        del self._readers[key]
        self._held_bytes -= nbytes


def _converted(out: np.ndarray, dtype) -> np.ndarray:
  """`out` in `dtype` (an aligned copy) when it is not already."""
  if dtype is None or out.dtype == np.dtype(dtype):
    return out
  cast = aligned_empty(out.shape, dtype)
  np.copyto(cast, out, casting='unsafe')
  return cast
