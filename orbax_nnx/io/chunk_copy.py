"""Target arrays that are stored arrays unchanged, written by copying their stored chunks.

A renamed leaf (Linen `params/params/.../kernel` -> NNX `.../kernel/value`, an unscanned layer, a param
exported in its stored dtype) has the same shape, dtype and values as a stored array. When the zarr
metadata Orbax's own write spec gives the target (chunked as the source is) equals the source's, each
stored value (a chunk, or a zarr v3 shard of chunks) is valid in the target as it is: it is read once,
checked (`chunk_stream.check_stored`: a damaged value is refused by name) and written under the same key.
Nothing is decoded or re-encoded, which is most of what a decode-and-rewrite costs. A conversion writes
the zarr version its source is stored in (`conversion.output_options`), so both kinds are copied.

Arrays whose formats differ (another compression, a user's chunk size, several chunks per shard) go
through the normal read and write instead (`select` leaves them out). What is recorded (Orbax's array
metadata, `_sharding`, `_METADATA`) is what a normal write records."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from orbax_nnx import compat
from orbax_nnx.io import orbax_writes
from orbax_nnx.planning.expressions import Read
from orbax_nnx.sources import chunk_stream, untrusted

BATCH_BYTES = 16 * 2**20  # arrays copied in one atomic transaction (one larger array goes alone, chunk by chunk)
# batches at once: one is read while the other commits (their arrays are recorded once, at the end of the save:
# `orbax_writes.Records`)
BATCHES_IN_FLIGHT = 2


@dataclasses.dataclass
class ChunkCopy:
  """One target array written by copying the chunks of the stored array it equals."""
  index: int  # its position in the handler's call
  value: Any  # the LazyArray
  info: compat.ParamInfo
  spec: Any  # Orbax's write spec, chunked as the source
  kvstore: Any  # the source array's kvstore (its chunk keys relative to it)
  fmt: chunk_stream.ChunkFormat

  def cells(self) -> Iterator[tuple[int, ...]]:
    """The grid positions of the stored values (chunks, or shards) this process copies (value k of the grid,
    in C order, by process k mod the process count: every value written once), one at a time."""
    grid = [range(-(-n // c)) for n, c in zip(self.value.shape, self.fmt.stored)]
    count, index = jax.process_count(), jax.process_index()
    return (cell for k, cell in enumerate(itertools.product(*grid)) if k % count == index)


def stored_source(value: Any, limit_bytes: int) -> tuple[Any, chunk_stream.ChunkFormat, dict] | None:
  """(kvstore, chunk format, metadata) of the stored array `value` (a LazyArray) is, unchanged, when its
  chunks are stored in a format `chunk_stream` checks, each stored value (chunk or shard) of at most
  `limit_bytes` decoded; else None.
  Opens the stored array (blocking)."""
  expr = value.expr
  if (type(expr) is not Read or not value.direct or tuple(expr.shape) != tuple(value.shape)
      or np.dtype(expr.dtype) != np.dtype(value.dtype)):
    return None
  stored = getattr(value.session.source.store(expr.source), 'stored_chunks', None)
  found = stored() if stored is not None else None
  if found is None or found[1].stored_nbytes > limit_bytes:
    return None
  return found


class _Formats:
  """Zarr metadata as tensorstore completes it when it creates an array (defaults filled in), from the
  partial metadata of a write spec: created once per distinct spec, in memory."""

  def __init__(self):
    self._done: dict[str, dict] = {}

  async def complete(self, spec_json: dict) -> dict:
    spec = {k: v for k, v in spec_json.items() if k in ('driver', 'dtype', 'metadata')}
    key = json.dumps(spec, sort_keys=True)
    if key not in self._done:
      store = await ts.open({**spec, 'kvstore': {'driver': 'memory'}}, create=True, context=ts.Context())
      self._done[key] = store.spec().to_json()['metadata']
    return self._done[key]


async def select(values: Sequence[Any], infos: Sequence[compat.ParamInfo], args: Sequence[compat.SaveArgs],
                 indices: Sequence[int], options: dict, limit_bytes: int) -> dict[int, ChunkCopy]:
  """The arrays among `indices` written by copying stored chunks: a stored array unchanged (`stored_source`)
  whose target, chunked as the source, gets the source's zarr metadata from Orbax's write spec.

  Args:
    values: the handler's LazyArrays.
    infos: their ParamInfos.
    args: their SaveArgs (a chunk size of the user's, a dtype, is honoured: then the formats differ).
    indices: the candidates.
    options: `compat.array_handler_options` of the handler.
    limit_bytes: the largest chunk (decoded bytes) copied: a copy holds a chunk's stored bytes.

  Returns:
    index -> ChunkCopy, for the arrays copied.
  """
  found = await asyncio.to_thread(lambda: {i: stored_source(values[i], limit_bytes) for i in indices})
  formats = _Formats()
  out = {}
  for i, hit in found.items():
    if hit is None:
      continue
    kvstore, fmt, metadata = hit
    await compat.resolved_parent_dir(infos[i])
    local = tuple(min(c, n) for c, n in zip(fmt.stored, values[i].shape))
    spec = orbax_writes.write_spec(values[i], infos[i], args[i], options, local)
    if await formats.complete(spec.json) == metadata:
      out[i] = ChunkCopy(i, values[i], infos[i], spec, kvstore, fmt)
  return out


async def copy(copies: Sequence[ChunkCopy], options: dict, window_bytes: int,
               done: Callable[[int], None]) -> None:
  """Writes `copies`: small arrays together in atomic transactions of up to `BATCH_BYTES`, a larger one
  alone, chunk by chunk. `BATCHES_IN_FLIGHT` batches run at once (one commits while the next is read), within
  `window_bytes` of stored chunks read, checked or being written (at least one chunk). Calls `done(index)` once an array is
  written (and added to `options['records']`).

  Raises:
    CorruptCheckpointError / MissingDataError: a stored chunk cannot be read or does not decode to a whole
      chunk; it names the array.
  """
  running: collections.deque = collections.deque()  # (bytes held, task)
  inflight = 0
  try:
    for batch in _batches(copies):
      held = min(sum(c.value.nbytes for c in batch), window_bytes)
      while running and (inflight + held > window_bytes or len(running) >= BATCHES_IN_FLIGHT):
        nbytes, task = running.popleft()
        await task
        inflight -= nbytes
      running.append((held, asyncio.ensure_future(_copy_batch(batch, options, window_bytes, done))))
      inflight += held
    while running:
      await running.popleft()[1]
  finally:
    for _, task in running:  # an error: the batches still running are cancelled (their transactions aborted)
      task.cancel()


async def _copy_batch(batch: list[ChunkCopy], options: dict, window_bytes: int,
                      done: Callable[[int], None]) -> None:
  ocdbt = batch[0].info.is_ocdbt_checkpoint
  transaction = ts.Transaction(atomic=True) if ocdbt and sum(c.value.nbytes for c in batch) <= BATCH_BYTES \
      else None
  cells = {c.index: list(c.cells()) for c in batch}

  async def write() -> None:
    if transaction is not None and sum(c.fmt.stored_nbytes * len(cells[c.index]) for c in batch) <= window_bytes:
      # small arrays whose chunks fit the window at once: opened and copied in tensorstore callbacks (one
      # event-loop wakeup for the batch, not several per array: `orbax_writes.Countdown`)
      copied = orbax_writes.Countdown(asyncio.get_running_loop(), len(batch))
      for c in batch:
        _open_then_copy(orbax_writes.start_open(c.spec, c.info, options, transaction), c, cells[c.index], copied)
      await copied.future
      return
    stores = await asyncio.gather(*(orbax_writes.open_array(c.spec, c.info, options, transaction) for c in batch))
    await _copy_chunks([(c, store, cells[c.index]) for c, store in zip(batch, stores)], window_bytes)

  await orbax_writes.in_transaction(transaction, write())
  options['records'].add([c.value for c in batch], [c.info for c in batch], [c.spec for c in batch])
  for c in batch:
    done(c.index)


def _open_then_copy(opening: ts.Future, c: ChunkCopy, cells: list[tuple[int, ...]],
                    countdown: orbax_writes.Countdown) -> None:
  """Copies the stored values `cells` of `c` into the array `opening` opens, in callbacks; one step of
  `countdown` when all are written (a damaged value fails it with the error `_stored_value` names)."""
  def opened(future: ts.Future) -> None:
    try:
      target = future.result().kvstore
      countdown.split(len(cells))  # (none: another process copies every value of it)
      for cell in cells:  # (a read that cannot even start fails the batch: nothing may be left waiting)
        key = c.fmt.key(cell)
        c.kvstore.read(key).add_done_callback(functools.partial(got, target, cell, key))
    except BaseException as e:  # (raised in a tensorstore thread: handed to the awaiting task)
      countdown.fail(e)

  def got(target: ts.KvStore, cell: tuple[int, ...], key: str, future: ts.Future) -> None:
    try:
      data = _stored_value(c, key, future.result())
    except Exception as e:
      countdown.fail(_damaged(c, key, e))
      return
    if data is None:
      countdown.step()
      return
    try:
      target.write(key, data).add_done_callback(functools.partial(written, cell))
    except BaseException as e:
      countdown.fail(e)

  def written(cell: tuple[int, ...], future: ts.Future) -> None:
    error = future.exception()
    if error is not None:
      countdown.fail(error)
      return
    _count_read(c, cell)
    countdown.step()

  opening.add_done_callback(opened)


def _stored_value(c: ChunkCopy, key: str, result: Any) -> bytes | None:
  """The value a read of `key` found, checked (`chunk_stream.check_stored`: a frame's structure, no decode);
  None where nothing is stored (then nothing is stored in the target either: same metadata, same fill)."""
  if result.state != 'value':
    return None
  chunk_stream.check_stored(result.value, c.fmt, key)
  return result.value


def _damaged(c: ChunkCopy, key: str, error: Exception) -> Exception:
  """The typed error for a stored value of `c` that cannot be read or checked: it names the array and chunk,
  and `error` is its cause (also where it is handed to a waiting task rather than raised)."""
  out = untrusted.damaged(c.value.session.source.meta.directory,
                          f'{"/".join(c.value.expr.source)} (chunk {key}): {error}', error)
  out.__cause__ = error
  return out


def _count_read(c: ChunkCopy, cell: tuple[int, ...]) -> None:
  bounds = chunk_stream.chunk_bounds(cell, c.fmt.stored, c.value.shape)
  c.value.session.source.count_read(math.prod(b.stop - b.start for b in bounds) * c.fmt.dtype.itemsize)


def _batches(copies: Sequence[ChunkCopy]) -> list[list[ChunkCopy]]:
  batches: list[list[ChunkCopy]] = []
  size = BATCH_BYTES
  for c in copies:
    if size + c.value.nbytes > BATCH_BYTES:
      batches.append([])
      size = 0
    batches[-1].append(c)
    size += c.value.nbytes
  return batches


async def _copy_chunks(items: list[tuple[ChunkCopy, ts.TensorStore, list[tuple[int, ...]]]],
                       window_bytes: int) -> None:
  """Copies the stored values of `items` (a copy, its opened target, the cells this process copies), a window
  of them at a time."""
  running: collections.deque = collections.deque()  # (bytes, task)
  inflight = 0

  async def one(c: ChunkCopy, target: ts.KvStore, cell: tuple[int, ...]) -> None:
    key = c.fmt.key(cell)
    try:
      data = _stored_value(c, key, await c.kvstore.read(key))
    except Exception as e:
      raise _damaged(c, key, e) from e
    if data is None:
      return
    await target.write(key, data)
    _count_read(c, cell)

  try:
    for c, store, cells in items:
      target = store.kvstore
      for cell in cells:
        nbytes = c.fmt.stored_nbytes
        while running and inflight + nbytes > window_bytes:
          size, task = running.popleft()
          await task
          inflight -= size
        running.append((nbytes, asyncio.ensure_future(one(c, target, cell))))
        inflight += nbytes
    while running:
      await running.popleft()[1]
  finally:
    for _, task in running:  # an error: the copies still running are not waited for
      task.cancel()
