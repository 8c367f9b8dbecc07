"""Streaming writes: Orbax saves a tree of lazy arrays, materializing one array at a time.

`LazyArray` is a plain leaf (not a pytree node, no `__array__`) holding a plan
expression. `LazyArrayHandler`, an Orbax `ArrayHandler` used only through a local
type-handler registry, reads each lazy leaf's shards onto host just before it is written,
writes them into the tensorstore spec Orbax's own handler would (`orbax_writes`) and drops
them once written; large arrays are written block by block the same way: peak memory is a
bounded window, not the checkpoint, nor the largest array. `_METADATA` records `jax.Array`,
so plain Orbax reads the result as it reads a saved `jax.Array`. Leans on Orbax's
serialization internals: pinned to orbax-checkpoint 0.12.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from orbax_nnx import compat
from orbax_nnx.io import chunk_copy, durability, orbax_writes
from orbax_nnx.io.reader import Pending, announce, announce_regions, layer_of, reads_directly, results
from orbax_nnx.io.regions import evaluate, read_regions
from orbax_nnx.io.sharding_file import ShardingFile
from orbax_nnx.io.source_arrays import ChunkLedger, SourceArrays
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.planning.expressions import Cast, Expr, Read, Transpose, reads
from orbax_nnx.planning.planner import TargetLeaf


class LazyArray:
  """A target array not read yet: `expr` evaluated onto `sharding` when written."""

  def __init__(self, expr: Expr, leaf: TargetLeaf, sharding: jax.sharding.Sharding, session: 'WriteSession'):
    self.expr, self.leaf, self.sharding, self.session = expr, leaf, sharding, session
    self.size = math.prod(leaf.shape)  # (asked for many times per array while the writer's window moves)
    self.nbytes = self.size * leaf.dtype.itemsize
    # written from host into Orbax's write spec (`orbax_writes`); typed PRNG keys (`dtype` is their key data's)
    # go through Orbax's serialize, which records their impl
    self.direct = leaf.key_impl is None and orbax_writes.writes_directly(self)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.leaf.shape

  @property
  def dtype(self):
    return self.leaf.dtype

  @property
  def ndim(self) -> int:
    return len(self.leaf.shape)

  def start(self) -> Pending:
    """Its reads, in flight (started by `WriteSession.prime` if it was primed)."""
    primed = self.session.primed.pop(id(self), None)
    if primed is not None:
      return primed
    return Pending(self.leaf.path, self.expr, self.leaf, self.sharding, self.session.source, self.session.pool)

  def announce(self) -> dict:
    """Announces this array's reads (see `reader.announce`); returns the chunks they go through."""
    return announce(self.expr, self.leaf, self.sharding, self.session.source, self.session.prefetch_pool)

  def __repr__(self) -> str:
    return f'LazyArray({self.expr}, shape={self.shape}, dtype={self.dtype})'


class WriteSession:
  """Shared state of one streaming write: the source, the read pool, progress counters."""

  def __init__(self, source: SourceArrays, buffer_bytes: int, max_workers: int = 8, progress=None,
               lockstep: frozenset = frozenset()):
    self.source = source
    self.buffer_bytes = buffer_bytes
    self.lockstep = lockstep  # stored arrays whose layer targets are written together (see `lockstep_align`)
    # arrays of three quarters of the budget or more are written block by block, in chunks of a sixteenth (1-32
    # MiB). Measured on 2.8 GiB train states, 64 MiB in flight: 16 MiB arrays written whole rather than in 4 MiB
    # blocks took an unscanned convert 14.1-15.5 s -> 11.6-11.8 s and unrolling 11.7 s -> 10.7-11.0 s, peak RSS
    # 0.18 -> 0.21x the checkpoint; blocks of an eighth (8 MiB) cost a stacked convert +10% peak RSS, no faster
    self.write_block_bytes = min(max(buffer_bytes // 16, MIN_WRITE_BLOCK_BYTES), WRITE_BLOCK_BYTES)
    self.blocked_min_bytes = max(buffer_bytes * 3 // 4, 2 * self.write_block_bytes)
    self.node_cache_bytes = node_cache_bytes(buffer_bytes)
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers)
    self.prefetch_pool = concurrent.futures.ThreadPoolExecutor(2)  # chunk decodes ahead of use
    self.progress = progress
    self.leaves_written = 0
    self.bytes_written = 0
    self.primed: dict[int, Pending] = {}  # id(LazyArray) -> its reads, started before the save (`prime`)
    self.primed_bytes = 0  # their bytes, held until the writer takes them (counted against `buffer_bytes`)

  def prime(self, values: Sequence['LazyArray']) -> None:
    """Starts the reads of the first small arrays in write order before Orbax's save begins, so they overlap its
    setup (a few round trips on an object store) instead of following it. Only reads that decode straight into
    their buffers (no chunk kept for other readers), within half of `buffer_bytes`; the writer counts these
    bytes as in flight from its start, so the budget holds."""
    room = self.buffer_bytes // 2
    for value in sorted(values, key=write_order):
      if chunk_copy.stored_source(value, self.blocked_min_bytes) is not None:  # copied, if formats agree
        continue
      if _is_blocked(value) or value.nbytes > room or not reads_directly(
          value.expr, value.leaf, value.sharding, self.source):
        break
      self.primed[id(value)] = value.start()
      self.primed_bytes += value.nbytes
      room -= value.nbytes

  def close(self) -> None:
    self.pool.shutdown(wait=True)
    self.prefetch_pool.shutdown(wait=True)


class _BatchedShardingsArrayHandler(compat.ArrayHandler):
  """Orbax's `ArrayHandler`, its `_sharding` entries written through the save's `ShardingFile` (one write
  per serialize call) instead of one tensorstore per array."""

  def __init__(self, sharding_file: ShardingFile, **kwargs: Any):
    super().__init__(enable_write_sharding_file=False, **kwargs)
    self.sharding_file = sharding_file

  async def serialize(self, values, infos, args=None):
    futures = await super().serialize(values, infos, args)
    await self.sharding_file.write(values, infos)
    return futures


class LazyArrayHandler(_BatchedShardingsArrayHandler):
  """Writes LazyArrays as `jax.Array`s, a bounded window at a time: reads run ahead of the writer and
  ready arrays are written in batches, each batch's writes concurrent (from host, `orbax_writes`). Arrays of
  three quarters of the session's budget or more are written block by block instead (`_BlockedWrite`), so
  the writer never holds one whole: memory stays flat as arrays grow."""

  async def serialize(self, values: Sequence[LazyArray], infos: Sequence[compat.ParamInfo],
                      args: Sequence[compat.SaveArgs] | None = None):
    args = list(args or [compat.SaveArgs()] * len(values))
    # every write of the save synced once, at its end, and holding few stale B-tree nodes
    deferred = durability.Deferred(infos, {'cache_pool#ocdbt': {
        'total_bytes_limit': values[0].session.node_cache_bytes if values else 0}})
    infos = deferred.infos
    base = super()  # (its serialize records the shardings of each batch)
    # leaves reading the same stored arrays go together, so each stored chunk is decoded once
    order = sorted(range(len(values)), key=lambda i: write_order(values[i]))
    options = compat.array_handler_options(self)
    together: dict[DiskPath, list[int]] = collections.defaultdict(list)  # layer targets written in lockstep
    aligns = {}
    for i in order:
      value = values[i]
      hit = lockstep_align(value.expr, value.leaf, value.sharding, value.session.source)
      if hit is not None and hit[0] in value.session.lockstep:
        together[hit[0]].append(i)
        aligns[i] = hit[1]
      else:
        aligns[i] = unit_aligned(value)
    groups = {i: members for members in together.values() for i in members}
    options['sharding_file'] = self.sharding_file
    options['records'] = orbax_writes.Records()  # recorded once, when every array is written
    options['write_specs'] = orbax_writes.WriteSpecs()  # built once per distinct array format
    options['deferred'] = deferred
    blocked = {i: _BlockedWrite(values[i], infos[i], args[i], options, align=aligns.get(i))
               for i in order if _is_blocked(values[i]) or i in groups}

    async def write_all():
      if not values:
        return
      session = values[0].session
      # stored arrays written unchanged whose chunks can be copied as they are: no read, no encode
      copies = await chunk_copy.select(values, infos, args, [i for i in order if i not in groups], options,
                                       session.blocked_min_bytes)
      todo = [i for i in order if i not in copies]
      needs = {}  # chunks each array's reads go through
      for i in todo:  # every region in evaluation order, so each stored chunk is dropped after its last reader
        if i in blocked:
          blocked[i].announce()
        else:
          needs[i] = values[i].announce()
      ledger = ChunkLedger(session.source.cache_bytes)
      window: collections.deque = collections.deque()  # (index, pending read), in write order
      batch: list[tuple[int, Pending]] = []  # read, waiting to be written together
      writing: collections.deque = collections.deque()  # (bytes, batch, task): batches being written
      # bytes held: reads in flight (those primed before the save from the start), the batch, and the batches
      # being written
      inflight, batch_bytes = session.primed_bytes, 0
      for i in itertools.chain(blocked, copies):  # written block by block or copied: early reads are not used
        if session.primed.pop(id(values[i]), None) is not None:
          inflight -= values[i].nbytes
      position = 0

      def done(j: int) -> None:
        if j not in blocked:  # (a blocked array's blocks are counted as they are written)
          deferred.wrote(values[j].nbytes)
        session.leaves_written += 1
        session.bytes_written += values[j].nbytes
        if session.progress is not None:
          session.progress(values[j])

      async def write(items: list[tuple[int, Pending]]) -> None:
        # a batch's arrays are written at once (per-array latency paid once): straight from their host shards
        # into Orbax's write spec (`orbax_writes`), or through Orbax's serialize (PRNG keys, empty arrays)
        direct, rest = [], []
        for j, read in items:
          (direct if values[j].direct else rest).append((j, read))
        if direct:
          await orbax_writes.write_whole([values[j] for j, _ in direct], [read.hosts() for _, read in direct],
                                         [infos[j] for j, _ in direct], [args[j] for j, _ in direct], options)
        if rest:
          arrays = results([read for _, read in rest])
          futures = await base.serialize(arrays, [infos[j] for j, _ in rest], [args[j] for j, _ in rest])
          del arrays
          await asyncio.to_thread(lambda: [f.result() for f in futures])

      async def flush(left_running: int = WRITES_IN_FLIGHT):
        """Starts writing the batch; waits until at most `left_running` batch writes are still running
        (a batch is encoded while the next one is read)."""
        nonlocal inflight, batch_bytes
        if batch:
          writing.append((batch_bytes, list(batch), asyncio.ensure_future(write(list(batch)))))
          batch.clear()
          batch_bytes = 0
        while len(writing) > left_running:
          nbytes, items, task = writing.popleft()
          await task
          for j, _ in items:
            done(j)
          inflight -= nbytes

      try:
        await chunk_copy.copy([copies[i] for i in order if i in copies], options, session.buffer_bytes, done)
        for k, i in enumerate(todo):
          if i in blocked:  # read-ahead stopped here, so everything before it is in the batch
            position = k + 1
            members = groups.get(i, [i])
            if i != members[0]:  # written with the first of its group
              continue
            await flush(left_running=0)
            await write_blocked([blocked[j] for j in members],
                                min(session.buffer_bytes, BLOCKS_AHEAD * session.write_block_bytes))
            for j in members:
              done(j)
            continue
          # keep reads running ahead of the writer, up to the byte budget (which the batches count against);
          # a blocked array stops the read-ahead: its blocks are read while it is written
          while position < len(todo) and todo[position] not in blocked and (not window or (
              inflight + values[todo[position]].nbytes <= session.buffer_bytes and
              ledger.room_for(needs[todo[position]], ((j, read.done) for j, read in window)))):
            ledger.hold(todo[position], needs[todo[position]])
            if id(values[todo[position]]) not in session.primed:  # (primed: counted from the start)
              inflight += values[todo[position]].nbytes
            window.append((todo[position], values[todo[position]].start()))
            position += 1
          index, pending = window.popleft()
          assert index == i
          await pending.wait()  # the batches being written go on meanwhile
          batch.append((i, pending))
          ledger.release(i)
          batch_bytes += values[i].nbytes
          del pending
          stalled = position < len(todo) and (todo[position] in blocked or not ledger.fits(needs[todo[position]])
                                             or inflight + values[todo[position]].nbytes > session.buffer_bytes)
          if len(batch) >= MAX_BATCH or (stalled and not window) or batch_bytes >= MAX_BATCH_BYTES:
            await flush()
        await flush(left_running=0)
        await options['records'].flush(options)
        await deferred.sync()
      finally:
        deferred.close()
        for *_, task in writing:  # an error: the writes still running are not waited for
          task.cancel()

    return [compat.CommitFuture(write_all(), name='orbax_nnx_stream')]


def write_order(value: LazyArray) -> list:
  """The key arrays are read and written in: those reading the same stored array go together."""
  return [r.source for r in reads(value.expr)][:1]


def _is_blocked(value: LazyArray) -> bool:
  return value.nbytes >= value.session.blocked_min_bytes and bool(value.shape) and value.direct


class _BlockedWrite:
  """One large array written region by region into the tensorstore Orbax's own write spec describes.

  Its chunks are at most the session's `write_block_bytes`, so each block (whole chunks) is encoded and
  written as soon as it is evaluated; blocks are evaluated ahead on the read pool within the session's
  budget, a stacked array's layer axis outermost. This process writes the shards whose lowest-numbered
  holder is one of its devices (one writer per shard). `align` (see `lockstep_align`) makes every chunk,
  and block, lie inside one stored source chunk.
  """

  def __init__(self, value: LazyArray, info: compat.ParamInfo, arg: compat.SaveArgs, options: dict,
               align: tuple[int, ...] | None = None):
    self.value, self.info, self.options = value, info, options
    shape = value.shape
    local = tuple(value.sharding.shard_shape(shape))
    limit = value.session.write_block_bytes
    if align is not None:  # Orbax chunks divide the shape a process writes: one source chunk's worth at most
      local = tuple(min(n, a) for n, a in zip(local, align))
    if not arg.shard_axes and value.leaf.layer_axis is not None:  # a stacked array: split by layer first
      arg = dataclasses.replace(arg, shard_axes=(value.leaf.layer_axis,))
    arg = dataclasses.replace(arg, chunk_byte_size=min(arg.chunk_byte_size or limit, limit))
    self.spec = orbax_writes.write_spec(value, info, arg, options, local)
    chunk = tuple(self.spec.metadata.chunk_shape)
    merge_bytes = limit if align is None else 0  # aligned blocks are single chunks: never across source chunks
    blocks = [b for region in orbax_writes.own_regions(shape, value.sharding)
              for b in _chunk_blocks(region, chunk, value.dtype.itemsize, merge_bytes, tuple(arg.shard_axes))]
    # in the order of the stored units they read (stable: as cut where that is the same), so the blocks reading
    # one unit come together and it is dropped after them, instead of every layer of an array moved off its
    # stored layer axis going through every unit, the whole chunk held
    source = value.session.source
    self.blocks = sorted(blocks, key=lambda b: sorted(
        unit for path, index in read_regions(value.expr, b) for unit in source.units_of(path, index)))
    self.needs: list[dict] = []  # chunks each block's reads go through

  def announce(self) -> None:
    session = self.value.session
    self.needs = announce_regions(self.value.expr, self.blocks, session.source, session.prefetch_pool)

async def write_blocked(writes: list[_BlockedWrite], ahead_bytes: int) -> None:
  """Writes the blocks of `writes`, evaluated ahead within `ahead_bytes` (at least one block). Several
  writes (layer targets of one stored array, `lockstep_align`) go source chunk by source chunk: every
  block one stored chunk feeds, in every array, then the next chunk, so each is decoded once and dropped."""
  session = writes[0].value.session
  deferred = writes[0].options['deferred']
  stores = []
  for w in writes:
    await compat.resolved_parent_dir(w.info)  # (its directory exists before its array is created in it)
    stores.append(await orbax_writes.open_array(w.spec, w.info, w.options))
  items = [(k, p) for k, w in enumerate(writes) for p in range(len(w.blocks))]
  if len(writes) > 1:
    items.sort(key=lambda kp: (sorted(writes[kp[0]].needs[kp[1]]), kp[0]))
  loop = asyncio.get_running_loop()
  pending: collections.deque = collections.deque()  # blocks being evaluated, in order
  writing: collections.deque = collections.deque()  # (bytes, tensorstore write) being encoded and written
  inflight = position = 0  # bytes held by both
  ledger = ChunkLedger(session.source.cache_bytes)  # a block reading chunks the cache cannot hold too waits

  def nbytes(item) -> int:
    return _nbytes(writes[item[0]].blocks[item[1]], writes[item[0]].value.dtype)

  block = max(map(nbytes, items), default=1)
  if len(writes) > 1:  # lockstep blocks are small (a source chunk split over the layers): more of them at once,
    # within fewer bytes ahead (measured at 2 MiB blocks: 128 -> 32 MiB ahead, peak RSS -250 MiB)
    ahead_bytes = min(ahead_bytes, LOCKSTEP_BLOCKS_AHEAD * block)
  in_flight = writes_in_flight(ahead_bytes, block, lockstep=len(writes) > 1)

  try:
    for _ in items:
      while position < len(items) and (not pending or (
          inflight + nbytes(items[position]) <= ahead_bytes and
          ledger.room_for(writes[items[position][0]].needs[items[position][1]],
                          ((at, future.done) for _, future, at in pending)))):
        k, p = items[position]
        ledger.hold(position, writes[k].needs[p])
        value = writes[k].value
        future = session.pool.submit(_evaluate_block, value.expr, writes[k].blocks[p], value.dtype, session.source)
        pending.append((nbytes(items[position]), asyncio.wrap_future(future, loop=loop), position))
        inflight += pending[-1][0]
        position += 1
      size, future, at = pending.popleft()
      data = await future
      ledger.release(at)
      k, p = items[at]
      # a block's write runs while the next block is awaited and its write started (encodes overlap)
      writing.append((size, stores[k][writes[k].blocks[p]].write(data, can_reference_source_data_indefinitely=True)))
      del data
      while len(writing) > in_flight:
        done_bytes, write = writing.popleft()
        await write
        deferred.wrote(done_bytes)
        inflight -= done_bytes
    while writing:
      done_bytes, write = writing.popleft()
      await write
      deferred.wrote(done_bytes)
  finally:
    for _, future, _ in pending:  # an error: nothing may still be reading into a block
      future.cancel()
  writes[0].options['records'].add([w.value for w in writes], [w.info for w in writes], [w.spec for w in writes])


def writes_in_flight(ahead_bytes: int, block_bytes: int, lockstep: bool = False) -> int:
  """Block writes left running while the next block is awaited. A write is an OCDBT commit of its own unless
  others are running, which it then joins: one at a time, a 2.8 GiB scanned convert (2 MiB blocks inside its
  stored units, 16 MiB ahead) made a commit per block, each rewriting the B-tree nodes above it. So half the
  blocks `ahead_bytes` holds are writing while the other half are evaluated, at least `WRITES_IN_FLIGHT`
  (in-process, medians of 3 alternating: 10.3 s, 11.0 s of user CPU, against 13.2 s, 12.0 s one at a time;
  with twice the bytes ahead, 10.2 s, but +60 MiB peak RSS at 4 MiB blocks under a 128 MiB budget). Lockstep
  writes (`lockstep_align`) keep `LOCKSTEP_BLOCKS_AHEAD` / 2 running: half the blocks they may hold ahead, or
  all the blocks a smaller `ahead_bytes` holds."""
  if lockstep:
    return LOCKSTEP_BLOCKS_AHEAD // 2
  return max(WRITES_IN_FLIGHT, ahead_bytes // max(block_bytes, 1) // 2)


def lockstep_align(expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays) -> tuple[DiskPath, tuple] | None:
  """(stored array, block shape) when `expr` is one layer of a stored array whose chunks span several
  layers and split its other axes (a sharded save of a scanned array): written in blocks of (a divisor of)
  the source chunk without its layer axis, the layers of one chunk can be written together and the chunk
  dropped, instead of every layer reading every chunk. None when the target's shards do not align with
  those blocks, or blocks would be under 1 MiB."""
  hit = layer_of(expr)
  if hit is None or leaf.key_impl is not None or not leaf.shape:
    return None
  stored, _, axis = hit
  store = source.store(stored.source)
  if getattr(store, 'exact', False):
    return None
  chunk, shape = source.unit(stored.source), tuple(store.shape)  # what is decoded at a time
  align = chunk[:axis] + chunk[axis + 1:]
  rest = shape[:axis] + shape[axis + 1:]
  if chunk[axis] < 2 or align == rest or math.prod(align) * leaf.dtype.itemsize < MIN_WRITE_BLOCK_BYTES:
    return None
  if not _shards_align(leaf.shape, sharding, align):
    return None
  return stored.source, align


def unit_aligned(value: LazyArray) -> tuple[int, ...] | None:
  """The block shape of `value` when it is written block by block, each block inside one decode unit of what
  it reads (`unit_align`); else None."""
  return unit_align(value.expr, value.leaf, value.sharding, value.session.source) if _is_blocked(value) else None


def unit_align(expr: Expr, leaf: TargetLeaf, sharding, source: SourceArrays) -> tuple[int, ...] | None:
  """The block shape that keeps each block of `expr`, a stored array maybe with its axes permuted (a layer axis
  moved) and cast, inside one unit the stored array is decoded in (`SourceArrays.unit`: a chunk, or a unit of a
  streamed chunk): with its blocks in unit order (`_BlockedWrite`), each unit is then read by its blocks one
  after another and dropped. None when a unit spans the target, the target's shards do not align with the
  blocks, or blocks would be under 1 MiB."""
  inner = expr.expr if isinstance(expr, Cast) else expr
  if isinstance(inner, Transpose) and isinstance(inner.expr, Read):
    stored, perm = inner.expr, inner.perm
  elif isinstance(inner, Read):
    stored, perm = inner, tuple(range(len(inner.shape)))
  else:
    return None
  if leaf.key_impl is not None or not leaf.shape or getattr(source.store(stored.source), 'exact', False):
    return None
  unit = source.unit(stored.source)
  align = tuple(unit[p] for p in perm)
  if align == tuple(leaf.shape) or math.prod(align) * leaf.dtype.itemsize < MIN_WRITE_BLOCK_BYTES:
    return None
  return align if _shards_align(leaf.shape, sharding, align) else None


def _shards_align(shape: tuple[int, ...], sharding, align: tuple[int, ...]) -> bool:
  """Whether the shards of `shape` placed with `sharding` tile evenly and nest with blocks of `align` (each
  holds whole blocks, or each block whole shards)."""
  shard = tuple(sharding.shard_shape(shape))
  return not any(n % s or (s % a and a % s) for n, s, a in zip(shape, shard, align))


def _evaluate_block(expr: Expr, block: tuple[slice, ...], dtype, source: SourceArrays) -> np.ndarray:
  return np.ascontiguousarray(evaluate(expr, block, source), dtype=dtype)


def _nbytes(block: tuple[slice, ...], dtype) -> int:
  return int(np.prod([s.stop - s.start for s in block], dtype=np.int64)) * np.dtype(dtype).itemsize


def _chunk_blocks(region: tuple[slice, ...], chunk: tuple[int, ...], itemsize: int, block_bytes: int,
                  outer: Sequence[int] = ()) -> list[tuple[slice, ...]]:
  """`region` cut into blocks of whole chunks, axes `outer` (a stacked array's layer axis) outermost, so the
  blocks reading one stored layer come together; chunks merge up to `block_bytes` when only one axis splits."""
  rank = len(region)
  extents = [s.stop - s.start for s in region]
  split = [a for a in range(rank) if chunk[a] < extents[a]]
  if not split:
    return [region]
  chunk_bytes = int(np.prod([min(c, n) for c, n in zip(chunk, extents)], dtype=np.int64)) * itemsize
  merge = max(1, block_bytes // max(chunk_bytes, 1)) if len(split) == 1 else 1
  steps = [chunk[a] * merge if a in split else extents[a] for a in range(rank)]
  axes = [a for a in outer if a < rank] + [a for a in range(rank) if a not in outer]
  blocks = []
  for corner in itertools.product(*(range(region[a].start, region[a].stop, steps[a]) for a in axes)):
    lo = dict(zip(axes, corner))
    blocks.append(tuple(slice(lo[a], min(lo[a] + steps[a], region[a].stop)) for a in range(rank)))
  return blocks


class _OneWriteAtATime(compat.ArrayMetadataStore):
  """Orbax's array metadata store, its read-modify-write of the per-process file made one at a time:
  batches of arrays are written concurrently, each from its own thread and event loop."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._lock = threading.Lock()

  async def write(self, *args, **kwargs) -> None:
    await asyncio.to_thread(self._lock.acquire)  # waits off the event loop
    try:
      await super().write(*args, **kwargs)
    finally:
      self._lock.release()


def streaming_pytree_handler(**options: Any) -> ocp.PyTreeCheckpointHandler:
  """A PyTreeCheckpointHandler that also writes LazyArray leaves (local registry only)."""
  store, shardings = _OneWriteAtATime(), ShardingFile()
  registry = compat.create_type_handler_registry(
      *[(ty, h) for ty, h in compat.default_type_handlers() if ty is not jax.Array],
      (jax.Array, _BatchedShardingsArrayHandler(shardings, array_metadata_store=store)),
      (LazyArray, LazyArrayHandler(shardings, array_metadata_store=store)),
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, **options)


MIN_LAYER_CHUNK_BYTES = 1 << 20  # Orbax warns below this chunk size
MAX_BATCH = 4096  # arrays written in one batch (bytes bound it first: MAX_BATCH_BYTES). On an object store
# each batch is ocdbt commits plus a rewrite of Orbax's array_metadatas: 256 measured 5.1-5.7 s
# against 4.3 s for one call on a 722-leaf convert at 20 ms per request; locally the same either way
WRITE_BLOCK_BYTES = 32 * 2**20  # chunks (and write blocks) of arrays written block by block: at most this,
MIN_WRITE_BLOCK_BYTES = 1 << 20  # and at least this (Orbax warns below 1 MiB)
LOCKSTEP_BLOCKS_AHEAD = 16  # blocks evaluated or being written at once in lockstep writes (half of them writing)
BLOCKS_AHEAD = 4  # write blocks' worth of bytes evaluated or being written at once (reads overlap writes; more
# bytes buy nothing: `writes_in_flight`)
WRITES_IN_FLIGHT = 1  # batch writes left running while the next batch is read; at least this many block writes
# bytes in one batch: many small arrays share a call (per-array write latency paid once, measured 6x on
# 1,000 leaves); large ones go alone (batched, concurrent writes measured +35% peak RSS)
MAX_BATCH_BYTES = 16 * 2**20
MIN_NODE_CACHE_BYTES = 1 << 20  # the written checkpoint's B-tree node cache: at least this (`node_cache_bytes`)


def node_cache_bytes(buffer_bytes: int) -> int:
  """The written checkpoint's OCDBT B-tree node cache (tensorstore's `cache_pool#ocdbt`): a sixteenth of the
  bytes in flight, `MIN_NODE_CACHE_BYTES` at least and Orbax's own (100 MB: `compat.orbax_node_cache_bytes`) at
  most.

  Every commit writes new versions of the nodes it changes, and the cache keeps the old ones until its limit:
  under Orbax's 100 MB, a convert's peak RSS grew with the commits it made, so with the size of its arrays
  (written block by block), outside the memory budget. Measured with defaults (a 4 MiB cache), 2.8 GiB -> NNX:
  peak RSS 394 -> 341 MiB scanned, 451 -> 345 MiB unrolled, at the same speed; 4 arrays of 96 MiB stacked under
  a 32 MiB budget (1 MiB): 259 -> 240 MiB (at 24 MiB: 227-229 MiB either way). A commit needs little more than
  the newest nodes: 1,083 arrays unrolled, and blocked writes to `gs://` through a 20 ms proxy, took the same
  time and requests at 1 MiB as at 100 MB (with no cache at all: +6% requests). Only a database of ~100,000
  keys committed faster with more (tensorstore alone: 27 ms a commit at 4 MiB, 17 ms at 100 MB)."""
  return min(max(buffer_bytes // 16, MIN_NODE_CACHE_BYTES), compat.orbax_node_cache_bytes())


def layer_chunk_args(leaf: TargetLeaf, axis: int | None) -> ocp.SaveArgs | None:
  """SaveArgs storing a stacked array one layer per chunk along `axis` (layers of 1 MiB or more)."""
  if axis is None or not leaf.shape:
    return None
  layer_bytes = leaf.dtype.itemsize * int(np.prod(leaf.shape, dtype=np.int64)) // max(leaf.shape[axis], 1)
  if layer_bytes < MIN_LAYER_CHUNK_BYTES:  # small layers: Orbax's default chunking is as good and quieter
    return None
  return ocp.SaveArgs(chunk_byte_size=max(layer_bytes, 1), shard_axes=(axis,))
