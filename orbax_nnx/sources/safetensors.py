"""Hugging Face safetensors as a source: metadata from the headers alone, regions read by byte range.

A checkpoint is a `.safetensors` file, a directory holding one or more, or a directory with
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Each file is an
8-byte little-endian header length, a JSON header (`name -> {dtype, shape, data_offsets}`,
plus `__metadata__`) and the raw row-major bytes. Leaves are keyed by tensor name as stored
(`('model.layers.0.mlp.up_proj.weight',)`).

Why not Orbax's `SafetensorsLayout` or `safetensors.safe_open`: the first loads whole named
arrays onto a sharding with no hook for renames, views or stacking; the second reads through
mmap, whose touched pages count against the process and are not bounded by our memory
budget. Both are used in the tests as the reference for what the files hold.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import threading
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from orbax_nnx import errors
from orbax_nnx.io.buffers import aligned_empty, transposed
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources import untrusted
from orbax_nnx.sources.metadata import ItemMetadata, LeafInfo

INDEX_FILE = 'model.safetensors.index.json'
SUFFIX = '.safetensors'
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
MIN_RUN_BYTES = 512  # column cuts read row by row unless runs are shorter and a quarter of the row or less

DTYPES: dict[str, np.dtype] = {
    'BOOL': np.dtype(np.bool_), 'U8': np.dtype(np.uint8), 'I8': np.dtype(np.int8),
    'U16': np.dtype(np.uint16), 'I16': np.dtype(np.int16), 'U32': np.dtype(np.uint32),
    'I32': np.dtype(np.int32), 'U64': np.dtype(np.uint64), 'I64': np.dtype(np.int64),
    'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F32': np.dtype(np.float32),
    'F64': np.dtype(np.float64), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorLocation:
  """Where one tensor's bytes lie: absolute byte offsets in its file."""

  file: epath.Path
  start: int
  stop: int


def is_safetensors(path: epath.Path) -> bool:
  """Whether `path` is a safetensors file, or a directory of them (and not an Orbax checkpoint)."""
  if path.name.endswith(SUFFIX):
    return path.is_file()
  if not path.is_dir() or (path / '_METADATA').exists() or (path / '_CHECKPOINT_METADATA').exists():
    return False
  return (path / INDEX_FILE).exists() or any(path.glob(f'*{SUFFIX}'))


def _files(path: epath.Path) -> tuple[list[epath.Path], dict[str, str] | None, dict]:
  """The files to read, the index's weight_map (if any) and the index's metadata."""
  if path.is_file():
    untrusted.check_regular(path)
    return [path], None, {}
  index_path = path / INDEX_FILE
  if not index_path.exists():
    files = sorted(path.glob(f'*{SUFFIX}'))
    _check_numbered_shards(path, files)
    return files, None, {}
  index = untrusted.field(untrusted.read_json(index_path), dict, index_path, INDEX_FILE)
  weight_map = untrusted.field(index.get('weight_map'), dict, index_path, f'{INDEX_FILE} "weight_map"')
  metadata = untrusted.field(index.get('metadata') or {}, dict, index_path, f'{INDEX_FILE} "metadata"')
  files = {name: untrusted.member(path, name, what=f'{INDEX_FILE} (tensor {tensor[:100]!r})')
           for tensor, name in weight_map.items()}  # every name checked before any file is looked at
  absent = sorted(name for name, file in files.items() if not file.exists())
  if absent:
    lost = sorted(k for k, v in weight_map.items() if v in absent)
    raise errors.CorruptCheckpointError(
        path, f'{INDEX_FILE} names shard files that are not there: {absent} (holding {len(lost)} tensors, e.g.'
        f' {lost[:3]}); download the missing files')
  return [files[name] for name in sorted(files)], weight_map, metadata


_NUMBERED = re.compile(r'(.*)-(\d+)-of-(\d+)' + re.escape(SUFFIX))


def _check_numbered_shards(path: epath.Path, files: list[epath.Path]) -> None:
  """Without an index, shards numbered `-K-of-N` must all be there: a missing one (a download or an export
  that did not finish: the index is written last) is refused, not read as a smaller model."""
  sets: dict[tuple[str, int, int], set[int]] = collections.defaultdict(set)  # (prefix, N, digits) -> K seen
  for file in files:
    match = _NUMBERED.fullmatch(file.name)
    if match:
      sets[match[1], int(match[3]), len(match[3])].add(int(match[2]))
  for (prefix, n, digits), have in sorted(sets.items()):
    present = sum(1 <= k <= n for k in have)  # N comes from a file name: never enumerated
    if present < n:
      first = [k for k in range(1, min(n, len(have) + 3) + 1) if k not in have][:3]
      shown = [f'{prefix}-{k:0{digits}d}-of-{n:0{digits}d}{SUFFIX}' for k in first]
      raise errors.CorruptCheckpointError(
          path, f'it holds {present} of the {n} numbered shards of {prefix!r} and no {INDEX_FILE}'
          f' (missing: {shown}{" ..." if n - present > 3 else ""}): an unfinished download or export; fetch'
          ' the missing files and the index')


def read_header(file: epath.Path) -> tuple[dict[str, Any], int, int]:
  """(header, data start, file size) of one safetensors file; raises on a malformed header."""
  untrusted.check_regular(file)
  with untrusted.os_errors(file):
    with file.open('rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise errors.CorruptCheckpointError(file, 'it is shorter than a safetensors header (truncated?)')
      size = int.from_bytes(head, 'little')
      if size > MAX_HEADER_BYTES:
        raise errors.CorruptCheckpointError(file, f'its first 8 bytes are not a safetensors header length (over'
                                            f' {MAX_HEADER_BYTES} bytes): not a safetensors file')
      raw = f.read(size)
    file_size = file.stat().length
  if len(raw) < size:
    raise errors.CorruptCheckpointError(file, f'its header is cut short ({len(raw)} of {size} bytes; truncated?)')
  header = untrusted.field(untrusted.parse_json(raw, file, what='its header'), dict, file, 'its header')
  return header, 8 + size, file_size


def _entry(file: epath.Path, name: str, entry: Any, data_start: int, file_size: int) -> LeafInfo:
  what = f'header entry {name[:200]!r}'
  entry = untrusted.field(entry, dict, file, what)
  dtype_name = untrusted.field(entry.get('dtype'), str, file, f'{what} "dtype"')
  shape = untrusted.shape_of(entry.get('shape'), file, what)
  offsets = untrusted.field(entry.get('data_offsets'), list, file, f'{what} "data_offsets"')
  if len(offsets) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets):
    raise errors.CorruptCheckpointError(file, f'{what} "data_offsets" should be two integers')
  start, stop = offsets
  if dtype_name not in DTYPES:
    raise errors.LayoutError(f'{file}: tensor {name[:200]!r} has dtype {dtype_name[:20]}, which numpy cannot hold'
                             f' (supported: {sorted(DTYPES)}).')
  dtype = DTYPES[dtype_name]
  nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a lying shape cannot wrap around to match
  if not 0 <= start <= stop or stop - start != nbytes:
    raise errors.CorruptCheckpointError(
        file, f'{what} says bytes [{start}, {stop}) for a {dtype_name} {list(shape)} tensor'
        f' of {nbytes} bytes: the header lies about its offsets')
  if data_start + stop > file_size:
    raise errors.CorruptCheckpointError(
        file, f'tensor {name[:200]!r} ends at byte {data_start + stop} but the file has {file_size} bytes (truncated)')
  return LeafInfo(shape, dtype, TensorLocation(file, data_start + start, data_start + stop))


def read_metadata(path: epath.PathLike) -> ItemMetadata:
  """Names, shapes, dtypes and byte offsets of every tensor, from the headers alone."""
  path = epath.Path(path)
  files, weight_map, index_meta = _files(path)
  if not files:
    raise errors.NotACheckpointError(path, f'it holds no {SUFFIX} files')
  leaves: dict[DiskPath, LeafInfo] = {}
  where: dict[str, epath.Path] = {}
  file_meta: dict[str, Any] = {}
  for file in files:
    header, data_start, file_size = read_header(file)
    file_meta[file.name] = untrusted.field(header.pop('__metadata__', None) or {}, dict, file, '"__metadata__"')
    spans = []
    for name, entry in header.items():
      if name in where:
        raise errors.CorruptCheckpointError(path, f'tensor {name!r} is stored twice: in {where[name].name} and {file.name}')
      info = _entry(file, name, entry, data_start, file_size)
      spans.append((info.metadata.start, info.metadata.stop, name))
      where[name] = file
      leaves[(name,)] = info
    spans.sort()
    for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
      if start < stop:
        raise errors.CorruptCheckpointError(file, f'tensors {a!r} and {b!r} overlap: the header lies about offsets')
  if weight_map is not None:
    lost = sorted(n for n, f in weight_map.items() if where.get(n) is None or where[n].name != f)
    if lost:
      raise errors.CorruptCheckpointError(
          path, f'{INDEX_FILE} maps {len(lost)} tensors to files whose headers lack them, e.g. {lost[:3]}')
  custom = {'safetensors': {'files': file_meta, 'index_metadata': index_meta}}
  return ItemMetadata(path, leaves, custom, False, 'safetensors')


class SafetensorsArray:
  """One stored tensor: any region is read exactly, as byte ranges (one per row when columns are
  cut), straight into an aligned buffer. Nothing is compressed or chunked, so nothing is cached:
  `exact` tells the reader so (each target shard reads just its own bytes)."""

  exact = True

  def __init__(self, info: LeafInfo, reader: '_FileReader'):
    self.shape, self.dtype = tuple(info.shape), np.dtype(info.dtype)
    self.location = info.metadata
    self.reader = reader
    self.chunk = self.shape

  def read(self, region: tuple, perm: tuple[int, ...] | None = None) -> np.ndarray:
    """`region` (normalized slices) of the tensor, axes permuted by `perm` if given."""
    file, base = self.location.file, self.location.start
    if not self.shape:
      out = aligned_empty((), self.dtype)
      self.reader.read_into(file, base, out)
      return out
    rows, rest = region[0], region[1:]
    strides = [self.dtype.itemsize * int(np.prod(self.shape[k + 1:], dtype=np.int64)) for k in range(len(self.shape))]
    full = [(r.start, r.stop) == (0, n) for r, n in zip(rest, self.shape[1:])]
    run = (rest[0].stop - rest[0].start) * strides[1] if rest else 0
    out = aligned_empty(tuple(r.stop - r.start for r in region), self.dtype)
    if not out.size:
      pass
    elif all(full):  # whole rows: one range
      self.reader.read_into(file, base + rows.start * strides[0], out)
    elif all(full[1:]) and (run >= MIN_RUN_BYTES or run * 4 >= strides[0]):  # columns cut: one run per row
      for i in range(rows.stop - rows.start):
        self.reader.read_into(file, base + (rows.start + i) * strides[0] + rest[0].start * strides[1], out[i])
    else:  # tiny runs, or a cut on a later axis: read the covering rows, then slice
      covering = aligned_empty((rows.stop - rows.start,) + self.shape[1:], self.dtype)
      self.reader.read_into(file, base + rows.start * strides[0], covering)
      np.copyto(out, covering[(slice(None),) + tuple(rest)])
    if perm is not None:
      out = transposed(out, perm)
    return out


class _FileReader:
  """Positional reads into caller buffers; local files keep one descriptor (`os.preadv`, thread-safe)."""

  def __init__(self):
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()

  def read_into(self, file: epath.Path, offset: int, out: np.ndarray) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    name = os.fspath(file) if untrusted.is_local(file) else None
    if name is None:  # object storage: one ranged read
      with file.open('rb') as f:
        f.seek(offset)
        data = f.read(len(view))
      if len(data) != len(view):
        raise errors.CorruptCheckpointError(file, f'{len(view)} bytes at {offset} could not be read (truncated?)')
      view[:] = data
      return
    with self._lock:
      fd = self._fds.get(name)
      if fd is None:
        fd = self._fds[name] = os.open(name, os.O_RDONLY)
    done = 0
    while done < len(view):
      got = os.preadv(fd, [view[done:]], offset + done)
      if got <= 0:
        raise errors.CorruptCheckpointError(file, f'{len(view)} bytes at {offset} could not be read (truncated?)')
      done += got

  def __del__(self, close=os.close):  # `close` bound now: module globals may be gone at interpreter exit
    for fd in self._fds.values():
      try:
        close(fd)
      except OSError:
        pass


class SafetensorsOpener:
  """Opens the tensors of one safetensors source for `reader.SourceArrays`."""

  def __init__(self, meta: ItemMetadata):
    self.meta = meta
    self.reader = _FileReader()

  def __call__(self, path: DiskPath) -> SafetensorsArray:
    return SafetensorsArray(self.meta.leaves[path], self.reader)
