"""Lazy evaluation of plan expressions, per target shard, via tensorstore region reads.

For each target array, each distinct addressable shard index is evaluated once:
the stored regions it needs are read (only those), assembled into the shard's host
buffer (casts per region), and placed on the devices that hold that shard.
"""

from __future__ import annotations

import collections
import itertools
import concurrent.futures
import functools
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from orbax_nnx import errors
from orbax_nnx.io.buffers import aligned_empty, transposed
from orbax_nnx.io.regions import evaluate, normalize, read_regions
from orbax_nnx.sources.metadata import ItemMetadata
from orbax_nnx.sources.orbax import OrbaxOpener
from orbax_nnx.nnx_tree import DiskPath, Path, path_str
from orbax_nnx.planning.expressions import Cast, Expr, Read, Take, reads
from orbax_nnx.planning.planner import Plan, TargetLeaf

Index = tuple[slice, ...]

DEFAULT_CACHE_BYTES = 512 * 2**20
SCATTER_INFLIGHT_BYTES = 256 * 2**20  # decoded chunks in flight while scattering layers (at least one)
class SourceArrays:
  """Stored arrays of one source (an Orbax item or safetensors files), read in whole chunks
  with a bounded chunk cache.

  A region read costs the whole chunks it touches (a plain Orbax save stores an
  unsharded array as one chunk), so regions are served from decoded chunks: a chunk
  only partly needed is kept (LRU, `cache_bytes`, always at least one chunk) until
  the other regions that need it (e.g. the other layers of a stacked array) are read.
  Each chunk is decoded once as long as its readers are scheduled together.
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
    self._stores: dict[DiskPath, Any] = {}
    self._chunks: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
    self._loading: dict[tuple, concurrent.futures.Future] = {}
    self._cached_bytes = 0
    self._loading_bytes = 0  # chunks being prefetched
    self._expected: dict[tuple, int] = {}  # chunk -> announced partial reads still to come
    self._queue: collections.deque = collections.deque()  # chunks to decode ahead, in order
    self._pool: concurrent.futures.Executor | None = None
    self._lock = threading.Lock()
    self.bytes_read = 0

  def store(self, path: DiskPath):
    """The stored array at `path` (`.shape`, `.dtype`, `.chunk`, `.read(region, perm)`), opened once."""
    with self._lock:
      if path in self._stores:
        return self._stores[path]
    try:
      store = self._open(path)
    except errors.OrbaxNNXError:
      raise
    except Exception as e:
      raise errors.CorruptCheckpointError(self.meta.directory, f'{"/".join(path)} cannot be opened: {e}') from e
    with self._lock:
      self._stores[path] = store
    return store

  def _ts_read(self, path: DiskPath, index: tuple, perm: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    store = self.store(path)
    try:
      out = store.read(index, perm) if dtype is None else store.read(index, perm, dtype)
    except errors.OrbaxNNXError:
      raise
    except Exception as e:
      raise errors.CorruptCheckpointError(self.meta.directory, f'{"/".join(path)}: {e}') from e
    with self._lock:
      self.bytes_read += out.size * np.dtype(store.dtype).itemsize
    return out

  def _cells(self, path: DiskPath, index: tuple):
    """(store, region, chunk cells touched, whether it is made of whole chunks, squeezed axes, chunk shape)."""
    store = self.store(path)
    shape = tuple(store.shape)
    squeeze = tuple(i for i, s in enumerate(index) if isinstance(s, (int, np.integer)))
    region = tuple(slice(s, s + 1) if isinstance(s, (int, np.integer)) else s for s in index)
    region = normalize(region, shape)
    if not shape or getattr(store, 'exact', False):  # any region reads exactly what it needs
      return store, region, [], True, squeeze, ()
    chunk = store.chunk
    grid = [range(r.start // c, -(-r.stop // c)) if r.stop > r.start else range(0) for r, c in zip(region, chunk)]
    cells = list(itertools.product(*grid))
    # a region made of whole chunks needs no cache: tensorstore decodes each one straight into the output
    whole = all(r.start % c == 0 and (r.stop == n or r.stop % c == 0) for r, c, n in zip(region, chunk, shape))
    return store, region, cells, whole, squeeze, chunk

  def expect(self, path: DiskPath, index: tuple, pool: concurrent.futures.Executor | None = None) -> None:
    """Announces a partial region read to come: its chunks are kept until their last
    announced reader has used them (then dropped at once), and decoded ahead of time on
    `pool` while cached plus loading bytes stay within `cache_bytes`.
    """
    store, _, cells, whole, _, chunk = self._cells(path, index)
    if whole:
      return
    shape = tuple(store.shape)
    itemsize = store.dtype.itemsize
    with self._lock:
      for cell in cells:
        key = (path, cell)
        self._expected[key] = self._expected.get(key, 0) + 1
        if self._expected[key] == 1 and key not in self._chunks and key not in self._loading:
          bounds = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, chunk, shape))
          nbytes = itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))
          self._queue.append((key, bounds, nbytes))
      if pool is not None:
        self._pool = pool
    self._pump()

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
        self._loading_bytes += nbytes
      future = self._pool.submit(self._chunk, key[0], key[1], bounds)
      future.add_done_callback(lambda _, n=nbytes: self._done_loading(n))

  def _done_loading(self, nbytes: int) -> None:
    with self._lock:
      self._loading_bytes -= nbytes
    self._pump()

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
        bounds = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, chunk, shape))
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

  def _chunk(self, path: DiskPath, cell: tuple, bounds: tuple) -> np.ndarray:
    key = (path, cell)
    with self._lock:
      if key in self._chunks:
        self._chunks.move_to_end(key)
        return self._chunks[key]
      future = self._loading.get(key)
      owner = future is None
      if owner:
        future = self._loading[key] = concurrent.futures.Future()
    if not owner:
      return future.result()
    try:
      data = self._ts_read(path, bounds)
    except BaseException as e:
      with self._lock:
        del self._loading[key]
      future.set_exception(e)
      raise
    with self._lock:
      del self._loading[key]
      self._chunks[key] = data
      self._cached_bytes += data.nbytes
      while self._cached_bytes > self.cache_bytes and len(self._chunks) > 1:
        _, old = self._chunks.popitem(last=False)
        self._cached_bytes -= old.nbytes
    future.set_result(data)
    return data


def _converted(out: np.ndarray, dtype) -> np.ndarray:
  """`out` in `dtype` (an aligned copy) when it is not already."""
  if dtype is None or out.dtype == np.dtype(dtype):
    return out
  cast = aligned_empty(out.shape, dtype)
  np.copyto(cast, out, casting='unsafe')
  return cast


class Pending:
  """A target array whose shard reads are in flight."""

  def __init__(self, path: Path, expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays, pool):
    self.path, self.leaf, self.sharding = path, leaf, sharding
    self.by_index: dict[tuple, list] = {}
    self.futures: dict[tuple, concurrent.futures.Future] = {}
    self.nbytes = 0
    if leaf.key_impl is not None:  # typed PRNG keys are small: read key data whole
      self.futures[()] = pool.submit(evaluate, expr, normalize((), leaf.shape), source)
      return
    for key, (norm, devices) in _shards(leaf, sharding).items():
      self.futures[key] = pool.submit(evaluate, expr, norm, source)
      self.nbytes += int(np.prod([s.stop - s.start for s in norm], dtype=np.int64)) * leaf.dtype.itemsize
      self.by_index[key] = devices

  def result(self) -> jax.Array:
    if self.leaf.key_impl is not None:
      keys = jax.random.wrap_key_data(self.futures[()].result(), impl=self.leaf.key_impl)
      return jax.device_put(keys, self.sharding)
    arrays = []
    for key, devices in self.by_index.items():
      host = self.futures[key].result()
      arrays += [jax.device_put(host, d, may_alias=True) for d in devices]
    return jax.make_array_from_single_device_arrays(self.leaf.shape, self.sharding, arrays)


def _shards(leaf: TargetLeaf, sharding) -> dict[tuple, tuple[tuple[slice, ...], list]]:
  """Distinct addressable shard regions of a target array: key -> (region, devices holding it)."""
  out: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    norm = normalize(index, leaf.shape)
    out.setdefault(tuple((s.start, s.stop) for s in norm), (norm, []))[1].append(device)
  return out


def _shard_regions(leaf: TargetLeaf, sharding) -> list[tuple[slice, ...]]:
  if leaf.key_impl is not None:
    return [normalize((), leaf.shape)]
  return [norm for norm, _ in _shards(leaf, sharding).values()]


def _layer_of(expr: Expr) -> tuple[Read, int, int] | None:
  """(stacked stored array, layer, axis) when `expr` is one layer of a stored array, maybe cast."""
  inner = expr.expr if isinstance(expr, Cast) else expr
  if isinstance(inner, Take) and isinstance(inner.expr, Read):
    return inner.expr, inner.index, inner.axis
  return None


class _Scatter:
  """The layers of one stacked stored array, read chunk by chunk.

  When a stored chunk spans several layers (scanned checkpoints are chunked by their
  shards, which keep the layer axis whole), reading layer by layer would need every
  chunk kept until its last layer is read. Here each chunk is decoded once, copied
  (and cast) into every target shard it overlaps, and dropped: memory is the outputs
  plus the few chunks in flight.
  """

  def __init__(self, source: SourceArrays, stored: Read, members: list[tuple[Path, TargetLeaf, Any, int, int]]):
    self.source, self.path = source, stored.source
    self.outputs: dict[Path, list[tuple[np.ndarray, list]]] = {}
    self.by_cell: dict[tuple, list[tuple[tuple, int, int, np.ndarray]]] = collections.defaultdict(list)
    self.chunk = None
    for path, leaf, sharding, layer, axis in members:
      self.outputs[path] = []
      for norm, devices in _shards(leaf, sharding).values():
        out = aligned_empty(tuple(r.stop - r.start for r in norm), leaf.dtype)
        self.outputs[path].append((out, devices))
        region = norm[:axis] + (slice(layer, layer + 1),) + norm[axis:]
        _, region, cells, _, _, self.chunk = source._cells(self.path, region)
        for cell in cells:
          self.by_cell[cell].append((region, axis, layer, out))

  def tasks(self):
    """(decoded bytes, job) per needed chunk: each job reads its chunk once and scatters it."""
    store = self.source.store(self.path)
    shape = tuple(store.shape)
    itemsize = store.dtype.itemsize
    for cell in sorted(self.by_cell):
      bounds = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, self.chunk, shape))
      nbytes = itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))
      yield nbytes, functools.partial(self._scatter_chunk, bounds, self.by_cell[cell])

  def _scatter_chunk(self, bounds: tuple, targets: list) -> None:
    data = self.source._ts_read(self.path, bounds)
    for region, axis, layer, out in targets:
      lo = [max(r.start, b.start) for r, b in zip(region, bounds)]
      hi = [min(r.stop, b.stop) for r, b in zip(region, bounds)]
      src = tuple(layer - b.start if k == axis else slice(l - b.start, h - b.start)
                  for k, (l, h, b) in enumerate(zip(lo, hi, bounds)))
      dst = tuple(slice(l - r.start, h - r.start) for k, (l, h, r) in enumerate(zip(lo, hi, region)) if k != axis)
      np.copyto(out[dst], data[src], casting='unsafe')

  def results(self, leaves: Mapping[Path, TargetLeaf], shardings: Mapping[Path, Any]) -> dict[Path, jax.Array]:
    out = {}
    for path, parts in self.outputs.items():
      arrays = [jax.device_put(host, d, may_alias=True) for host, devices in parts for d in devices]
      out[path] = jax.make_array_from_single_device_arrays(leaves[path].shape, shardings[path], arrays)
    return out


def _run_scatters(scatters: list[_Scatter], pool: concurrent.futures.Executor, budget_bytes: int) -> None:
  """Runs every chunk job of `scatters` with decoded bytes in flight within `budget_bytes`
  (two chunks at least, so one decodes while the other is copied out)."""
  running: collections.deque = collections.deque()
  inflight = 0
  for group in scatters:
    for nbytes, job in group.tasks():
      while len(running) >= 2 and inflight + nbytes > budget_bytes:
        done_bytes, future = running.popleft()
        future.result()
        inflight -= done_bytes
      running.append((nbytes, pool.submit(job)))
      inflight += nbytes
  for _, future in running:
    future.result()


def _scatter_groups(plan: Plan, shardings: Mapping[Path, Any], source: SourceArrays,
                    budget_bytes: int = SCATTER_INFLIGHT_BYTES) -> list[_Scatter]:
  """Target layers read from stored chunks that span several layers, grouped by stored array."""
  groups: dict[DiskPath, list] = collections.defaultdict(list)
  for path, expr in plan.entries.items():
    hit = _layer_of(expr)
    if hit is not None and plan.leaves[path].key_impl is None and plan.leaves[path].shape:
      stored, layer, axis = hit
      groups[stored.source].append((stored, (path, plan.leaves[path], shardings[path], layer, axis)))
  out = []
  for members in groups.values():
    stored, (_, _, _, _, axis) = members[0]
    store = source.store(stored.source)
    if getattr(store, 'exact', False):  # regions read exactly: each layer reads its own bytes
      continue
    chunk = store.chunk
    chunk_bytes = store.dtype.itemsize * int(np.prod(chunk, dtype=np.int64))
    # chunks too big to have two in flight within the budget go through the chunk cache instead
    # (measured: copying layers out of one huge chunk on many threads is faster)
    if len(members) > 1 and chunk[axis] > 1 and 2 * chunk_bytes <= budget_bytes:
      out.append(_Scatter(source, stored, [m for _, m in members]))
  return out


def announce(expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays, pool=None) -> None:
  """Tells `source` every region evaluating `expr` onto `sharding` will read (see `expect`).

  Announce all leaves up front, in the order they will be evaluated: a chunk is then
  dropped only after its last reader, and decoded ahead while the budget allows.
  """
  announce_regions(expr, _shard_regions(leaf, sharding), source, pool)


def announce_regions(expr: Expr, regions, source: SourceArrays, pool=None) -> None:
  """`announce` for explicit target regions (e.g. the blocks a large array is written in)."""
  for region in regions:
    for path, index in read_regions(expr, region):
      source.expect(path, index, pool)


def execute(plan: Plan, shardings: Mapping[Path, jax.sharding.Sharding], source: SourceArrays | None = None,
            max_workers: int = 8, inflight_bytes: int = 1024 * 2**20) -> dict[Path, jax.Array]:
  """Evaluates every plan entry onto its sharding; returns target path -> jax.Array.

  Shard reads run concurrently; host buffers in flight are bounded by `inflight_bytes`
  (at least one array). Leaves reading the same stored array are scheduled together
  so its chunks are decoded once while cached.
  """
  if source is None:
    # room for two of the largest stored arrays (chunks), so one decodes while the other is sliced
    largest = max((plan.source.leaves[r.source].nbytes for e in plan.entries.values() for r in reads(e)),
                  default=0)
    source = SourceArrays(plan.source.meta, cache_bytes=max(DEFAULT_CACHE_BYTES, 2 * largest + 64 * 2**20))
  scatter_bytes = min(SCATTER_INFLIGHT_BYTES, inflight_bytes)
  scatters = _scatter_groups(plan, shardings, source, scatter_bytes)
  scattered = {path for group in scatters for path in group.outputs}
  order = sorted((p for p in plan.entries if p not in scattered),
                 key=lambda p: [r.source for r in reads(plan.entries[p])][:1])
  out: dict[Path, jax.Array] = {}
  pending: collections.deque[Pending] = collections.deque()
  inflight = 0

  def finish_one():
    nonlocal inflight
    job = pending.popleft()
    try:
      out[job.path] = job.result()
    except errors.OrbaxNNXError:
      raise
    except Exception as e:
      raise errors.OrbaxNNXError(f'{path_str(job.path)}: reading {plan.entries[job.path]} failed: {e}') from e
    inflight -= job.nbytes

  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool, \
      concurrent.futures.ThreadPoolExecutor(2) as prefetch_pool:
    _run_scatters(scatters, pool, scatter_bytes)
    for group in scatters:
      out.update(group.results(plan.leaves, shardings))
    for path in order:
      announce(plan.entries[path], plan.leaves[path], shardings[path], source, prefetch_pool)
    for path in order:
      while pending and inflight >= inflight_bytes:
        finish_one()
      job = Pending(path, plan.entries[path], plan.leaves[path], shardings[path], source, pool)
      pending.append(job)
      inflight += job.nbytes
    while pending:
      finish_one()
  return out
