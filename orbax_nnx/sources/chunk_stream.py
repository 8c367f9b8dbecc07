"""Stored zarr chunks decoded as a stream: compressed bytes read window by window (kvstore byte
ranges), zstd-decoded band by band straight into the destination.

Tensorstore decodes a chunk whole and holds its stored and its decoded bytes at once: reading a
512 MiB chunk costs ~1 GiB on top of the destination, whatever the read API (measured). A stream
holds two windows, one band and zstd's state (`STREAM_BYTES`, ~6 MiB), at the same speed or faster.
A chunk read in parts is decoded a unit (a band of `UNIT_BYTES`) at a time, forward (`read_unit`).
Only the codecs Orbax writes are streamed (zarr v2: zstd or none, C order, no filters; zarr v3:
`bytes` + optional `zstd`, also inside `sharding_indexed`, whose chunk index is checked against its
crc32c as tensorstore checks it); for anything else `chunk_format` returns None and tensorstore decodes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import zstandard

from orbax_nnx.io.buffers import aligned_empty

WINDOW_BYTES, READ_AHEAD = 1 * 2**20, 1  # compressed bytes read at a time, and windows in flight (local disk)
REMOTE_WINDOW_BYTES, REMOTE_READ_AHEAD = 8 * 2**20, 4  # where each read pays a round trip (gs://, s3://)
BAND_BYTES = 2 * 2**20  # decoded bytes copied out at a time
STREAM_BYTES = READ_AHEAD * WINDOW_BYTES + BAND_BYTES + 2 * 2**20  # one stream's buffers (local storage)
UNIT_BYTES = 32 * 2**20  # a large chunk read in parts is decoded (and cached) this much at a time
MAX_CURSORS = 8  # chunk streams of one array kept open between parts
MAX_SHARD_INDEXES = 64  # shard chunk indexes of one array kept (16 bytes per chunk)
MIN_STREAM_BYTES = 16 * 2**20  # smaller chunks: tensorstore (decode buffers too small to matter)
_MISSING = 2**64 - 1  # a shard index entry for a chunk never written


def min_stream_bytes(cache_bytes: int | None = None) -> int:
  """Chunks of this many bytes or more decode as streams: `MIN_STREAM_BYTES`, or less when the decoded
  chunks a reader may keep (`cache_bytes`, half a memory budget) are few: tensorstore's decode holds a
  chunk's stored and decoded bytes at once, which must not outgrow a quarter of them."""
  if cache_bytes is None:
    return MIN_STREAM_BYTES
  return min(MIN_STREAM_BYTES, max(STREAM_BYTES, cache_bytes // 4))


class MissingChunk(Exception):
  """The chunk is not stored (tensorstore decides what that means: fill value or error)."""


@dataclasses.dataclass(frozen=True)
class ChunkFormat:
  """How one zarr array stores a chunk: enough to find and decode its bytes."""
  dtype: np.dtype  # stored element type, with its byte order
  chunk: tuple[int, ...]  # the read chunk (inside a shard for sharded zarr v3)
  compressed: bool  # zstd, else raw bytes
  key: Callable[[tuple[int, ...]], str]  # the stored key of a chunk (of its shard when sharded)
  shard: tuple[int, ...] | None = None  # chunks per shard along each axis (sharded zarr v3)
  index_at_end: bool = True
  index_checksum: bool = True

  @property
  def nbytes(self) -> int:
    return math.prod(self.chunk) * self.dtype.itemsize

  @property
  def stored(self) -> tuple[int, ...]:
    """The shape one stored value covers: a chunk, or a shard of chunks (sharded zarr v3)."""
    return self.chunk if self.shard is None else tuple(c * n for c, n in zip(self.chunk, self.shard))

  @property
  def stored_nbytes(self) -> int:
    """The decoded size of one stored value (`stored`)."""
    return math.prod(self.stored) * self.dtype.itemsize

  @property
  def index_bytes(self) -> int:
    """The size of a shard's chunk index (16 bytes per chunk, and its crc32c)."""
    return 16 * math.prod(self.shard or ()) + (4 if self.index_checksum else 0)


def chunk_format(metadata: dict[str, Any]) -> ChunkFormat | None:
  """The chunk format of a zarr array from its metadata (the `.zarray` / `zarr.json` JSON), or None
  when it is not one this module streams."""
  try:
    if metadata.get('zarr_format') == 2:
      return _zarr2(metadata)
    if metadata.get('zarr_format') == 3:
      return _zarr3(metadata)
  except (KeyError, TypeError, ValueError, AttributeError):
    return None
  return None


def _zarr2(meta: dict) -> ChunkFormat | None:
  compressor = meta.get('compressor')
  if meta.get('filters') or meta.get('order', 'C') != 'C' or not isinstance(meta['dtype'], str):
    return None
  if compressor is not None and compressor.get('id') != 'zstd':
    return None
  dtype = _dtype(meta['dtype'])
  chunk = tuple(int(c) for c in meta['chunks'])
  sep = meta.get('dimension_separator', '.')
  key = (lambda cell: sep.join(str(i) for i in cell) or '0')
  return ChunkFormat(dtype, chunk, compressor is not None, key)


def _zarr3(meta: dict) -> ChunkFormat | None:
  if meta['chunk_grid'].get('name') != 'regular':
    return None
  outer = tuple(int(c) for c in meta['chunk_grid']['configuration']['chunk_shape'])
  encoding = meta.get('chunk_key_encoding') or {'name': 'default'}
  if encoding['name'] == 'default':
    sep = encoding.get('configuration', {}).get('separator', '/')
    key = (lambda cell: sep.join(('c',) + tuple(str(i) for i in cell)))
  elif encoding['name'] == 'v2':
    sep = encoding.get('configuration', {}).get('separator', '.')
    key = (lambda cell: sep.join(str(i) for i in cell) or '0')
  else:
    return None
  codecs = meta.get('codecs') or []
  if len(codecs) == 1 and codecs[0].get('name') == 'sharding_indexed':
    conf = codecs[0]['configuration']
    inner = tuple(int(c) for c in conf['chunk_shape'])
    if len(inner) != len(outer) or any(o % i for o, i in zip(outer, inner)):
      return None
    index = [c.get('name') for c in conf.get('index_codecs', [])]
    if index not in (['bytes'], ['bytes', 'crc32c']) or _endian(conf['index_codecs'][0]) != 'little':
      return None
    inner_codecs = _plain_codecs(conf.get('codecs') or [])
    if inner_codecs is None:
      return None
    endian, compressed = inner_codecs
    return ChunkFormat(_dtype(meta['data_type'], endian), inner, compressed, key,
                       shard=tuple(o // i for o, i in zip(outer, inner)),
                       index_at_end=conf.get('index_location', 'end') == 'end',
                       index_checksum=index[-1] == 'crc32c')
  inner_codecs = _plain_codecs(codecs)
  if inner_codecs is None:
    return None
  endian, compressed = inner_codecs
  return ChunkFormat(_dtype(meta['data_type'], endian), outer, compressed, key)


def _plain_codecs(codecs: list) -> tuple[str, bool] | None:
  """(byte order, zstd?) of a zarr v3 codec chain `bytes` [+ `zstd`], else None."""
  names = [c.get('name') for c in codecs]
  if names not in (['bytes'], ['bytes', 'zstd']):
    return None
  return _endian(codecs[0]), len(names) == 2


def _endian(codec: dict) -> str:
  return (codec.get('configuration') or {}).get('endian', 'little')


def _dtype(name: str, endian: str = 'little') -> np.dtype:
  if name[:1] in '<>|=':  # zarr v2 typestr
    return np.dtype(name)
  dtype = np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
  if dtype.itemsize > 1 and endian != sys.byteorder:
    if dtype.kind == 'V':  # an ml_dtypes type stored in the other byte order: leave it to tensorstore
      raise ValueError(name)
    dtype = dtype.newbyteorder('<' if endian == 'little' else '>')
  return dtype


class ChunkStreams:
  """Decodes the chunks of one stored zarr array as streams, through its kvstore."""

  def __init__(self, kvstore: Any, fmt: ChunkFormat):
    self.kvstore, self.fmt = kvstore, fmt
    spec = kvstore.spec().to_json()
    self.local = spec.get('base', spec).get('driver') in ('file', 'memory')  # (OCDBT's base, or the store)
    self._cursors: collections.OrderedDict[tuple, ChunkCursor] = collections.OrderedDict()  # streams left open
    self._locks: dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)
    self._indexes: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()  # shard key -> index
    self._lock = threading.Lock()

  def window(self, key: str, start: int, stop: int | None) -> _Window:
    """A read-ahead view of one stored value's bytes [start, stop): small windows from local storage,
    larger ones where each request pays a round trip (gs://, s3://)."""
    if self.local:
      return _Window(self.kvstore, key, start, stop, WINDOW_BYTES, READ_AHEAD)
    return _Window(self.kvstore, key, start, stop, REMOTE_WINDOW_BYTES, REMOTE_READ_AHEAD)

  def open(self, cell: tuple[int, ...]) -> tuple[str, _Window, Any]:
    """(stored key, its byte window, the decoded stream) of the chunk at grid position `cell`."""
    key, start, stop = self._locate(cell)
    source = self.window(key, start, stop)
    if not self.fmt.compressed:
      return key, source, source
    return key, source, zstandard.ZstdDecompressor().stream_reader(source, read_size=source.window, closefd=False)

  def lock(self, cell: tuple[int, ...], unit: tuple[int, ...]) -> threading.Lock:
    """The lock the units (of shape `unit`) of the chunk holding unit `cell` are decoded under."""
    with self._lock:
      return self._locks[self._chunk_of(cell, unit)]

  def _chunk_of(self, cell: tuple[int, ...], unit: tuple[int, ...]) -> tuple[int, ...]:
    """The grid position of the chunk holding the unit (of shape `unit`) at `cell`."""
    return tuple(c * u // k for c, u, k in zip(cell, unit, self.fmt.chunk))

  def read_unit(self, cell: tuple[int, ...], unit_bytes: int,
                passed: Callable[[tuple[int, ...], np.ndarray], None]) -> np.ndarray:
    """The unit (band of `unit_bytes`, see `band_shape`) at grid position `cell` over the array. Its
    chunk's stream decodes the units before it first, if it has not yet: each goes to `passed(unit cell,
    data)`. A unit asked for again after the stream went past it restarts the stream from the chunk's
    start. Call under `lock`: a chunk's stream goes one way, one unit at a time."""
    fmt = self.fmt
    unit = band_shape(fmt.chunk, fmt.dtype.itemsize, unit_bytes)
    chunk_cell = self._chunk_of(cell, unit)
    per_chunk = tuple(k // u for k, u in zip(fmt.chunk, unit))
    first = tuple(c * p for c, p in zip(chunk_cell, per_chunk))
    n = int(np.ravel_multi_index(tuple(c - f for c, f in zip(cell, first)), per_chunk)) if cell else 0
    with self._lock:
      cursor = self._cursors.pop(chunk_cell, None)
    if cursor is None or cursor.next > n:
      if cursor is not None:
        cursor.close()
      cursor = ChunkCursor(self, chunk_cell, unit_bytes)
    try:
      while True:
        at = tuple(f + int(i) for f, i in zip(first, np.unravel_index(cursor.next, per_chunk))) if cell else ()
        data = cursor.read()
        if at == cell:
          return data
        passed(at, data)
    finally:
      if cursor.next < cursor.count:
        with self._lock:
          self._cursors[chunk_cell] = cursor
          while len(self._cursors) > MAX_CURSORS:
            self._cursors.popitem(last=False)[1].close()

  def decode_into(self, cell: tuple[int, ...], out: np.ndarray) -> None:
    """Decodes the chunk at grid position `cell` into `out` (shaped like the chunk clipped at the
    array's end, any strides, any dtype: converted band by band). Raises MissingChunk."""
    for region, band in self._parts(cell, out.shape, out):
      if band is not None:
        np.copyto(out[region + (Ellipsis,)], band, casting='unsafe')

  def parts(self, cell: tuple[int, ...], shape: tuple[int, ...]) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """The chunk at grid position `cell`, `shape` being the chunk clipped at the array's end, decoded
    band by band in stored order: (region within the chunk, decoded band) pairs. A band is valid
    until the next one is asked for. Raises MissingChunk."""
    return self._parts(cell, shape, None)

  def _parts(self, cell: tuple[int, ...], shape: tuple[int, ...], into: np.ndarray | None):
    """`parts`; a band that fills a C-contiguous part of `into` in the stored dtype is decoded
    straight into it (and yielded as None)."""
    fmt = self.fmt
    key, _, reader = self.open(cell)
    whole = band_shape(fmt.chunk, fmt.dtype.itemsize, BAND_BYTES)  # every band's shape: they tile the chunk
    buffer = None
    with reader:
      for index in bands(fmt.chunk, fmt.dtype.itemsize, BAND_BYTES):  # a chunk at the array's end is stored whole
        region = _clip(index, shape)
        if region is not None and into is not None:
          target = into[region + (Ellipsis,)]
          if target.shape == whole and target.dtype == fmt.dtype and target.flags.c_contiguous:
            _fill(reader, memoryview(target.reshape(-1).view(np.uint8)), key)  # straight into the destination
            yield region, None
            continue
        if buffer is None:
          buffer = np.empty(whole, fmt.dtype)
        _fill(reader, memoryview(buffer.reshape(-1).view(np.uint8)), key)
        if region is not None:
          yield region, buffer[tuple(slice(0, r.stop - r.start) for r in region)]
      if fmt.compressed and reader.read(1):
        raise ValueError(f'chunk {key} decodes to more than {fmt.nbytes} bytes')

  def _locate(self, cell: tuple[int, ...]) -> tuple[str, int, int | None]:
    """(stored key, first byte, end byte or None for the value's end) of a chunk."""
    fmt = self.fmt
    if fmt.shard is None:
      return fmt.key(cell), 0, None
    shard = tuple(c // n for c, n in zip(cell, fmt.shard))
    key = fmt.key(shard)
    position = int(np.ravel_multi_index(tuple(c % n for c, n in zip(cell, fmt.shard)), fmt.shard)) if cell else 0
    offset, nbytes = self._shard_index(key)[position].tolist()
    if offset == _MISSING and nbytes == _MISSING:
      raise MissingChunk(key)
    return key, offset, offset + nbytes

  def _shard_index(self, key: str) -> np.ndarray:
    """The (offset, size) pairs of the chunks in the shard stored at `key`, its checksum verified (read
    once per shard: the last few are kept)."""
    with self._lock:
      index = self._indexes.get(key)
    if index is not None:
      return index
    fmt = self.fmt
    window = slice(-fmt.index_bytes, None) if fmt.index_at_end else slice(0, fmt.index_bytes)
    try:
      result = self.kvstore.read(key, byte_range=window).result()
    except ValueError as e:  # shorter than an index: not a shard tensorstore wrote
      raise MissingChunk(key) from e
    if result.state != 'value':
      raise MissingChunk(key)
    index = shard_index(bytes(result.value), fmt, key)
    with self._lock:
      self._indexes[key] = index
      while len(self._indexes) > MAX_SHARD_INDEXES:
        self._indexes.popitem(last=False)
    return index


def shard_index(data: bytes, fmt: ChunkFormat, key: str) -> np.ndarray:
  """The (offset, size) pairs of a shard's chunks (C order) from its stored index `data`, checked against
  its crc32c. Raises ValueError when the checksum fails."""
  if fmt.index_checksum and crc32c(data[:-4]) != int.from_bytes(data[-4:], 'little'):
    raise ValueError(f'shard {key}: its chunk index fails its crc32c checksum (the shard is damaged)')
  count = math.prod(fmt.shard)
  return np.frombuffer(data, '<u8', count=2 * count).reshape(count, 2)


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
    table.append(n)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), zarr v3's `crc32c` codec: checks shard indexes (a few bytes per chunk)."""
  crc, table = 0xFFFFFFFF, _CRC32C
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def chunk_bounds(cell: tuple[int, ...], chunk: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The region of the chunk at grid position `cell` (clipped at the array's end)."""
  return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, chunk, shape))


def bands(chunk: tuple[int, ...], itemsize: int, band_bytes: int) -> Iterator[tuple]:
  """Index tuples (ints, then one slice) that cover an array of shape `chunk` in C order, each at most
  `band_bytes` (or one element): consecutive runs of the stored byte stream, all of `band_shape`."""
  k, rows = _split(chunk, itemsize, band_bytes)
  if k == 0:
    yield ()
    return
  for lead in np.ndindex(*chunk[:k - 1]):
    for r in range(0, chunk[k - 1], rows):
      yield tuple(int(i) for i in lead) + (slice(r, r + rows),)


def band_shape(chunk: tuple[int, ...], itemsize: int, band_bytes: int) -> tuple[int, ...]:
  """The shape of the bands `bands` cuts a chunk into: they tile it, in C order."""
  k, rows = _split(chunk, itemsize, band_bytes)
  return chunk if k == 0 else (1,) * (k - 1) + (rows,) + tuple(chunk[k:])


def _split(chunk: tuple[int, ...], itemsize: int, band_bytes: int) -> tuple[int, int]:
  """(k, rows): bands keep axes k.. whole and take `rows` (a divisor) of axis k-1; k 0: one band."""
  band_bytes = max(band_bytes, itemsize)
  k = next(k for k in range(len(chunk) + 1) if math.prod(chunk[k:]) * itemsize <= band_bytes)
  if k == 0:
    return 0, 0
  limit = min(chunk[k - 1], max(1, band_bytes // (math.prod(chunk[k:]) * itemsize)))
  return k, next(d for d in range(limit, 0, -1) if chunk[k - 1] % d == 0)


def _clip(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
  """`index` (from `bands`) as full-rank slices within an array of `shape` (the chunk clipped at
  the array's end), or None if the band lies outside it."""
  out = []
  for i, n in enumerate(shape):
    s = index[i] if i < len(index) else slice(0, n)
    start, stop = (s, s + 1) if isinstance(s, int) else (s.start, min(s.stop, n))
    if start >= min(stop, n):
      return None
    out.append(slice(start, min(stop, n)))
  return tuple(out)


_SCRATCH = threading.local()
_BLOCK_MAX = 128 * 1024  # zstd's largest block (decoded)


def check_stored(data: bytes, fmt: ChunkFormat, key: str) -> None:
  """Checks that the stored value `data` at `key` is what the format stores there: a whole chunk, or (sharded
  zarr v3) a shard whose chunk index passes its crc32c and points only at whole chunks inside the shard.

  A chunk is raw bytes of its size, or one zstd frame, nothing after it, whose blocks are all there and
  decode to its size. A zstd frame that declares its size (tensorstore's do) is checked by its structure:
  the header, then each block's header and length. That finds what truncation, concatenation or a foreign
  value does, without decoding; damage inside a compressed block is found when the chunk is decoded, as it
  would have been in the source. Other frames are decoded through a small scratch buffer. Raises ValueError."""
  if fmt.shard is None:
    _check_chunk(memoryview(data), fmt, key)
    return
  view, size = memoryview(data), fmt.index_bytes
  if len(view) < size:
    raise ValueError(f'shard {key} is {len(view)} bytes, shorter than its chunk index ({size} bytes)')
  index = shard_index(bytes(view[-size:] if fmt.index_at_end else view[:size]), fmt, key)
  start, stop = (0, len(view) - size) if fmt.index_at_end else (size, len(view))
  for n, (offset, nbytes) in enumerate(index.tolist()):
    if offset == _MISSING and nbytes == _MISSING:  # never written: the fill value, as in the source
      continue
    if offset < start or offset + nbytes > stop:
      raise ValueError(f'shard {key}: its index places chunk {n} at bytes {offset}..{offset + nbytes}, outside '
                       f'the shard\'s data ({start}..{stop})')
    _check_chunk(view[offset:offset + nbytes], fmt, f'{key} (chunk {n} of the shard)')


def _check_chunk(data: memoryview, fmt: ChunkFormat, key: str) -> None:
  """`check_stored` of one chunk's stored bytes."""
  if not fmt.compressed:
    if len(data) != fmt.nbytes:
      raise ValueError(f'chunk {key} holds {len(data)} bytes, not {fmt.nbytes}')
    return
  try:
    size = zstandard.frame_content_size(data)
  except zstandard.ZstdError as e:
    raise ValueError(f'chunk {key} is not a zstd frame ({e})') from e
  if size >= 0:
    _check_frame(data, size, fmt.nbytes, key)
    return
  scratch = getattr(_SCRATCH, 'buffer', None)
  if scratch is None:
    scratch = _SCRATCH.buffer = memoryview(bytearray(BAND_BYTES))
  done = 0
  with zstandard.ZstdDecompressor().stream_reader(data, read_size=len(data) or 1, closefd=False) as reader:
    while done < fmt.nbytes:
      n = reader.readinto(scratch[:min(len(scratch), fmt.nbytes - done)])
      if not n:
        raise ValueError(f'chunk {key} ends after {done} of {fmt.nbytes} bytes')
      done += n
    if reader.read(1):
      raise ValueError(f'chunk {key} decodes to more than {fmt.nbytes} bytes')


def _check_frame(data: memoryview, size: int, nbytes: int, key: str) -> None:
  """The structure of one zstd frame that declares `size` decoded bytes (RFC 8878, section 3.1.1)."""
  if size != nbytes:
    raise ValueError(f'chunk {key} declares {size} decoded bytes, not {nbytes}')
  params = zstandard.get_frame_parameters(data)
  at = zstandard.frame_header_size(data)
  known, compressed = 0, 0  # decoded bytes of raw and RLE blocks; compressed blocks (each at most _BLOCK_MAX)
  while True:
    if at + 3 > len(data):
      raise ValueError(f'chunk {key} ends inside a block header, at byte {at} of {len(data)}')
    header = int.from_bytes(data[at:at + 3], 'little')
    last, kind, length = header & 1, (header >> 1) & 3, header >> 3
    if kind == 3 or length > _BLOCK_MAX:
      raise ValueError(f'chunk {key} has an invalid zstd block at byte {at}')
    at += 3 + (1 if kind == 1 else length)
    if at > len(data):
      raise ValueError(f'chunk {key} ends inside a block, {len(data)} of at least {at} bytes')
    if kind == 2:
      compressed += 1
    else:
      known += length
    if last:
      break
  end = at + (4 if params.has_checksum else 0)
  if end != len(data):
    raise ValueError(f'chunk {key} is {len(data)} bytes, its zstd frame {end}')
  if known > size or known + compressed * _BLOCK_MAX < size:
    raise ValueError(f'chunk {key}: its blocks cannot decode to the {size} bytes its frame declares')


def _fill(reader: Any, view: memoryview, key: str) -> None:
  """Reads exactly `len(view)` decoded bytes into `view`."""
  done = 0
  while done < len(view):
    n = reader.readinto(view[done:])
    if not n:
      raise ValueError(f'chunk {key} ends after {done} of {len(view)} bytes')
    done += n


class ChunkCursor:
  """One chunk's stream, decoded forward band by band (bands of `band_shape`, in stored order)."""

  def __init__(self, streams: ChunkStreams, cell: tuple[int, ...], band_bytes: int):
    fmt = self.fmt = streams.fmt
    self.shape = band_shape(fmt.chunk, fmt.dtype.itemsize, band_bytes)
    self.count = math.prod(c // b for c, b in zip(fmt.chunk, self.shape))
    self.key, self._source, self._reader = streams.open(cell)
    self.next = 0  # the band the stream is at

  def read(self) -> np.ndarray:
    """The next band, decoded into a new array (native byte order): a host buffer of `io.buffers`, so that
    inside an operation a dropped band's mapping serves the next one (a fresh array for each 32 MiB unit of a
    2.8 GiB scanned convert had the kernel zero every decoded byte: 10% of its CPU)."""
    out = aligned_empty(self.shape, self.fmt.dtype)
    _fill(self._reader, memoryview(out.reshape(-1).view(np.uint8)), self.key)
    self.next += 1
    if self.next == self.count:
      self.close()
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder('='))

  def close(self) -> None:
    if self._reader is not self._source:
      self._reader.close()


class _Window:
  """A file-like view of bytes [start, stop) of one stored value (stop None: to the value's end), read
  `window` bytes at a time with the next `depth - 1` windows' reads in flight."""

  def __init__(self, kvstore: Any, key: str, start: int, stop: int | None, window: int, depth: int):
    self.kvstore, self.key, self.stop, self.window = kvstore, key, stop, window
    self._offset = start  # where the next request starts
    self._requests: collections.deque = collections.deque()
    for _ in range(depth):
      self._request()
    self._pending = b''

  def _request(self) -> None:
    end = self._offset + self.window if self.stop is None else min(self._offset + self.window, self.stop)
    if end > self._offset:
      self._requests.append((self._offset, self.kvstore.read(self.key, byte_range=slice(self._offset, end))))
      self._offset = end

  def _take(self) -> bytes:
    if not self._requests:
      return b''
    offset, future = self._requests.popleft()
    try:
      result = future.result()
    except ValueError as e:  # the value ends inside this window (its size is not known ahead)
      if self.stop is not None or 'OUT_OF_RANGE' not in str(e):
        raise
      result = self.kvstore.read(self.key, byte_range=slice(offset, None)).result()
      self.stop = offset + len(result.value)
      self._requests.clear()  # (all past the end)
    if result.state != 'value':
      raise MissingChunk(self.key)
    self._request()
    return result.value

  def read(self, n: int = -1) -> bytes:
    if not self._pending:
      self._pending = self._take()
    data, self._pending = self._pending[:n] if n >= 0 else self._pending, (self._pending[n:] if n >= 0 else b'')
    return data

  def readinto(self, view: memoryview) -> int:
    data = self.read(len(view))
    view[:len(data)] = data
    return len(data)

  def __enter__(self) -> _Window:
    return self

  def __exit__(self, *exc) -> None:
    return None


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def pool() -> concurrent.futures.ThreadPoolExecutor:
  """The threads that run chunk streams started in the background (zstd and reads release the GIL)."""
  global _POOL  # pylint: disable=global-statement
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2),
                                                  thread_name_prefix='orbax_nnx_stream')
  return _POOL
