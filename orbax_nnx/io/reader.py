"""Lazy evaluation of plan expressions, per target shard, via tensorstore region reads.

For each target array, each distinct addressable shard index is evaluated once:
the stored regions it needs are read (only those), assembled into the shard's host
buffer (casts per region), and placed on the devices that hold that shard.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from orbax_nnx import errors
from orbax_nnx.io.buffers import aligned_empty
from orbax_nnx.io.regions import evaluate, normalize, read_regions, region_key, start
from orbax_nnx.io.source_arrays import DEFAULT_CACHE_BYTES, ChunkLedger, SourceArrays, chunk_bounds
from orbax_nnx.nnx_tree import DiskPath, Path, path_str
from orbax_nnx.planning.expressions import Cast, Expr, Read, Take, reads
from orbax_nnx.planning.planner import Plan, TargetLeaf
from orbax_nnx.sources import chunk_stream

Index = tuple[slice, ...]

SCATTER_INFLIGHT_BYTES = 256 * 2**20  # decoded chunks in flight while scattering layers (at least one);
# chunks larger than this are sliced through the chunk cache instead, unless they decode as streams
SLAB_BYTES = 8 * 2**20  # a target array read in slabs of whole stored rows, shared by its shards, this much at a time


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
    shards = _shards(leaf, sharding)
    for key, (norm, devices) in shards.items():
      self.nbytes += int(np.prod([s.stop - s.start for s in norm], dtype=np.int64)) * leaf.dtype.itemsize
      self.by_index[key] = devices
    axis = slab_axis(expr, leaf, [norm for norm, _ in shards.values()], source)
    if axis is not None:  # the shards share slabs of whole stored rows: one job reads each row once for all
      self.futures[_SLABS] = pool.submit(read_by_slabs, expr, leaf, {k: n for k, (n, _) in shards.items()}, axis,
                                         source)
      self.nbytes += SLAB_BYTES
      return
    for key, (norm, _) in shards.items():
      self.futures[key] = start(expr, norm, source) or pool.submit(evaluate, expr, norm, source)

  def done(self) -> bool:
    return all(future.done() for future in self.futures.values())

  async def wait(self) -> None:
    """Waits for every shard read without blocking the event loop (a read already done costs no wakeup)."""
    for future in self.futures.values():
      if not future.done():
        await asyncio.wrap_future(future)

  def result(self) -> jax.Array:
    return results([self])[0]

  def hosts(self) -> dict[tuple, np.ndarray]:
    """Every distinct addressable shard on host (`region_key` -> data), once the reads are done."""
    slabbed = self.futures[_SLABS].result() if _SLABS in self.futures else None
    return {key: slabbed[key] if slabbed is not None else self.futures[key].result() for key in self.by_index}

  def pieces(self) -> list[tuple[np.ndarray, jax.Device]]:
    """(host shard, device) for every addressable device, once the reads are done."""
    hosts = self.hosts()
    return [(hosts[key], device) for key, devices in self.by_index.items() for device in devices]


def results(jobs: Sequence[Pending]) -> list[jax.Array]:
  """The arrays of finished reads, their shards placed by one batched `device_put` (one call per shard cost
  0.13-0.18 s for 1,085 small arrays, one call for all 0.05 s)."""
  pieces = [None if job.leaf.key_impl is not None else job.pieces() for job in jobs]
  flat = [piece for each in pieces if each is not None for piece in each]
  placed = iter(jax.device_put([host for host, _ in flat], [device for _, device in flat], may_alias=True)
                if flat else ())
  out = []
  for job, each in zip(jobs, pieces):
    if each is None:  # typed PRNG keys: their key data, wrapped
      keys = jax.random.wrap_key_data(job.futures[()].result(), impl=job.leaf.key_impl)
      out.append(jax.device_put(keys, job.sharding))
    else:
      out.append(jax.make_array_from_single_device_arrays(job.leaf.shape, job.sharding,
                                                          [next(placed) for _ in each]))
  return out


_SLABS = 'slabs'  # the one future of a target array read by `read_by_slabs`


def slab_axis(expr: Expr, leaf: TargetLeaf, regions: list[Index], source: SourceArrays) -> int | None:
  """The target axis to read `expr` along in slabs shared by its shard `regions`, or None to read per shard.

  Shards that cut a stored tensor's rows into column pieces read each row piece apart (one small read per row
  per shard: tens of thousands of reads for one embedding on a 2x4 mesh). When the regions tile one box, full on
  every axis but one, and a slab along that axis reads whole stored rows (a transposed or reshaped tensor
  included), the box is read slab by slab instead: each stored row once, in one read per slab, its pieces copied
  into every shard. Only for stores that read regions exactly (safetensors); chunked stores decode whole chunks.
  """
  if leaf.key_impl is not None or len(regions) < 2 or not leaf.shape:
    return None
  stored = reads(expr)
  if not stored or not all(getattr(source.store(r.source), 'exact', False) for r in stored):
    return None
  if all(_whole_rows(expr, region, source) for region in regions):
    return None  # each shard already reads whole rows, one read each
  box = _box(regions)
  volume = lambda index: int(np.prod([s.stop - s.start for s in index], dtype=np.int64))  # noqa: E731
  if sum(volume(r) for r in regions) != volume(box):
    return None  # the distinct shard regions do not tile one box (only some of a process's shards, say)
  whole = _read_volume(expr, box)
  for axis in range(len(leaf.shape)):
    if all((box[k].start, box[k].stop) == (0, n) for k, n in enumerate(leaf.shape) if k != axis):
      slab = box[:axis] + (slice(box[axis].start, box[axis].start + 1),) + box[axis + 1:]
      # whole rows, and slabs that together read the box's stored bytes once (a slab on an inner axis of a
      # reshape reads the rows of every outer index: each slab would read them all again)
      if _whole_rows(expr, slab, source) and _read_volume(expr, slab) * (box[axis].stop - box[axis].start) == whole:
        return axis
  return None


def _read_volume(expr: Expr, region: Index) -> int:
  """Stored elements evaluating `expr` over `region` reads."""
  return sum(int(np.prod([s.stop - s.start for s in index if isinstance(s, slice)], dtype=np.int64))
             for _, index in read_regions(expr, region))


def _box(regions: list[Index]) -> Index:
  """The smallest region holding every one of `regions`."""
  return tuple(slice(min(r[k].start for r in regions), max(r[k].stop for r in regions)) for k in range(len(regions[0])))


def _whole_rows(expr: Expr, region: Index, source: SourceArrays) -> bool:
  """Whether evaluating `expr` over `region` reads only whole stored rows (full on every axis but the first)."""
  for path, index in read_regions(expr, region):
    shape = source.store(path).shape
    if not all(isinstance(s, slice) and (s.start, s.stop) == (0, n) for s, n in zip(index[1:], shape[1:])):
      return False
  return True


def read_by_slabs(expr: Expr, leaf: TargetLeaf, regions: dict[tuple, Index], axis: int,
                  source: SourceArrays) -> dict[tuple, np.ndarray]:
  """Every shard region of a target array (key -> region), evaluated slab by slab along `axis` (`slab_axis`):
  at most `SLAB_BYTES` of the target at a time, each slab copied into the shards it overlaps."""
  outs = {key: aligned_empty(tuple(s.stop - s.start for s in region), leaf.dtype) for key, region in regions.items()}
  box = _box(list(regions.values()))
  per_unit = leaf.dtype.itemsize * int(np.prod([s.stop - s.start for k, s in enumerate(box) if k != axis],
                                               dtype=np.int64))
  step = max(1, SLAB_BYTES // max(1, per_unit))
  for lo in range(box[axis].start, box[axis].stop, step):
    hi = min(lo + step, box[axis].stop)
    data = evaluate(expr, box[:axis] + (slice(lo, hi),) + box[axis + 1:], source)
    for key, region in regions.items():
      a, b = max(region[axis].start, lo), min(region[axis].stop, hi)
      if a >= b:
        continue
      src = tuple(slice(a - lo, b - lo) if k == axis else slice(r.start - x.start, r.stop - x.start)
                  for k, (r, x) in enumerate(zip(region, box)))
      dst = (slice(None),) * axis + (slice(a - region[axis].start, b - region[axis].start),)
      np.copyto(outs[key][dst], data[src], casting='unsafe')
  return outs


def reads_directly(expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays) -> bool:
  """Whether every shard of a target array is one stored read decoded straight into its buffer (`regions.start`):
  no thread, and no chunk kept for other readers."""
  read = expr.expr if isinstance(expr, Cast) else expr
  return (isinstance(read, Read) and leaf.key_impl is None and
          all(source.reads_directly(read.source, norm) for norm, _ in _shards(leaf, sharding).values()))


def _shards(leaf: TargetLeaf, sharding) -> dict[tuple, tuple[tuple[slice, ...], list]]:
  """Distinct addressable shard regions of a target array: key -> (region, devices holding it)."""
  out: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    norm = normalize(index, leaf.shape)
    out.setdefault(region_key(norm), (norm, []))[1].append(device)
  return out


def _shard_regions(leaf: TargetLeaf, sharding) -> list[tuple[slice, ...]]:
  if leaf.key_impl is not None:
    return [normalize((), leaf.shape)]
  return [norm for norm, _ in _shards(leaf, sharding).values()]


def layer_of(expr: Expr) -> tuple[Read, int, int] | None:
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
        _, region, cells, _, _, self.chunk = source._cells(self.path, region, units=False)
        for cell in cells:
          self.by_cell[cell].append((region, axis, layer, out))

  def tasks(self):
    """(decoded bytes held, job) per needed chunk: each job reads its chunk once and scatters it
    (a streamed chunk band by band: it holds a stream's buffers, not the chunk)."""
    store = self.source.store(self.path)
    shape = tuple(store.shape)
    itemsize = store.dtype.itemsize
    streamed = self.source.streamed(self.path)
    for cell in sorted(self.by_cell):
      bounds = chunk_bounds(cell, self.chunk, shape)
      nbytes = chunk_stream.STREAM_BYTES if streamed else \
          itemsize * int(np.prod([b.stop - b.start for b in bounds], dtype=np.int64))
      yield nbytes, functools.partial(self._scatter_chunk, cell, bounds, self.by_cell[cell])

  def _scatter_chunk(self, cell: tuple, bounds: tuple, targets: list) -> None:
    for part, data in self.source.chunk_parts(self.path, cell, bounds):
      for region, axis, layer, out in targets:
        lo = [max(r.start, b.start) for r, b in zip(region, part)]
        hi = [min(r.stop, b.stop) for r, b in zip(region, part)]
        if any(l >= h for l, h in zip(lo, hi)):
          continue
        src = tuple(layer - b.start if k == axis else slice(l - b.start, h - b.start)
                    for k, (l, h, b) in enumerate(zip(lo, hi, part)))
        dst = tuple(slice(l - r.start, h - r.start) for k, (l, h, r) in enumerate(zip(lo, hi, region)) if k != axis)
        np.copyto(out[dst], data[src], casting='unsafe')

  def results(self, leaves: Mapping[Path, TargetLeaf], shardings: Mapping[Path, Any]) -> dict[Path, jax.Array]:
    out = {}
    for path, parts in self.outputs.items():
      arrays = [jax.device_put(host, d, may_alias=True) for host, devices in parts for d in devices]
      out[path] = jax.make_array_from_single_device_arrays(leaves[path].shape, shardings[path], arrays)
    return out


def _run_scatters(scatters: list[_Scatter], pool: concurrent.futures.Executor, budget_bytes: int) -> None:
  """Runs every chunk job of `scatters` with decoded bytes in flight within `budget_bytes` (at least one
  chunk: the one being decoded), one job per core (decoding is CPU-bound: more only holds more)."""
  running: collections.deque = collections.deque()
  inflight = 0
  cores = os.cpu_count() or 2
  for group in scatters:
    for nbytes, job in group.tasks():
      while running and (inflight + nbytes > budget_bytes or len(running) >= cores):
        done_bytes, future = running.popleft()
        future.result()
        inflight -= done_bytes
      running.append((nbytes, pool.submit(job)))
      inflight += nbytes
  for _, future in running:
    future.result()


def _scatter_groups(plan: Plan, shardings: Mapping[Path, Any], source: SourceArrays) -> list[_Scatter]:
  """Target layers read from stored chunks that span several layers, grouped by stored array."""
  groups: dict[DiskPath, list] = collections.defaultdict(list)
  for path, expr in plan.entries.items():
    hit = layer_of(expr)
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
    # huge chunks tensorstore decodes go through the chunk cache instead (measured: copying layers out of one
    # huge chunk on many threads is faster); others, and streamed ones, are decoded once each and scattered
    if len(members) > 1 and chunk[axis] > 1 and (chunk_bytes <= SCATTER_INFLIGHT_BYTES or
                                                  source.streamed(stored.source)):
      out.append(_Scatter(source, stored, [m for _, m in members]))
  return out


def announce(expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays, pool=None) -> dict:
  """Tells `source` every region evaluating `expr` onto `sharding` will read (see `expect`); returns
  the decoded chunks those reads go through (key -> bytes), for a `ChunkLedger`.

  Announce all leaves up front, in the order they will be evaluated: a chunk is then
  dropped only after its last reader, and decoded ahead while the budget allows.
  """
  need: dict = {}
  for chunks in announce_regions(expr, _shard_regions(leaf, sharding), source, pool):
    need.update(chunks)
  return need


def announce_regions(expr: Expr, regions, source: SourceArrays, pool=None) -> list[dict]:
  """`announce` for explicit target regions (e.g. the blocks a large array is written in): the chunks
  each region goes through."""
  out = []
  for region in regions:
    need: dict = {}
    for path, index in read_regions(expr, region):
      need.update(source.expect(path, index, pool))
    out.append(need)
  return out


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
  source.open_ahead(r.source for e in plan.entries.values() for r in reads(e))
  scatter_bytes = min(SCATTER_INFLIGHT_BYTES, inflight_bytes)
  scatters = _scatter_groups(plan, shardings, source)
  scattered = {path for group in scatters for path in group.outputs}
  order = sorted((p for p in plan.entries if p not in scattered),
                 key=lambda p: [r.source for r in reads(plan.entries[p])][:1])
  out: dict[Path, jax.Array] = {}
  pending: collections.deque[Pending] = collections.deque()
  inflight = 0
  ledger = ChunkLedger(source.cache_bytes)  # reads needing chunks the cache cannot hold too wait

  def finish_one():
    nonlocal inflight
    job = pending.popleft()
    ledger.release(job.path)
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
    needs = {path: announce(plan.entries[path], plan.leaves[path], shardings[path], source, prefetch_pool)
             for path in order}
    for path in order:
      while pending and (inflight >= inflight_bytes or
                         not ledger.room_for(needs[path], ((job.path, job.done) for job in pending))):
        finish_one()
      ledger.hold(path, needs[path])
      job = Pending(path, plan.entries[path], plan.leaves[path], shardings[path], source, pool)
      pending.append(job)
      inflight += job.nbytes
    while pending:
      finish_one()
  return out
