"""Chunks decoded as streams equal tensorstore's own decode, in every format Orbax writes, and cost
a window and a band instead of the stored plus the decoded chunk."""

import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from orbax_nnx.io.source_arrays import SourceArrays
from orbax_nnx.sources import chunk_stream
from orbax_nnx.sources import metadata as metadata_lib
from orbax_nnx.sources.orbax import OrbaxOpener


@pytest.fixture
def tiny_streams(monkeypatch):
  """Every chunk streamed, in bands and windows far smaller than a chunk."""
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0)
  monkeypatch.setattr(chunk_stream, 'BAND_BYTES', 200)
  monkeypatch.setattr(chunk_stream, 'WINDOW_BYTES', 97)


def test_bands_cover_a_chunk_in_stored_order():
  for shape, itemsize, band in [((6, 5, 4), 4, 50), ((6, 5, 4), 4, 10**6), ((7,), 2, 4), ((3, 1, 9), 1, 1), ((), 4, 1)]:
    seen = np.zeros(shape, np.int64)
    order = []
    for index in chunk_stream.bands(shape, itemsize, band):
      seen[index] += 1
      order.extend(np.arange(int(np.prod(shape))).reshape(shape)[index].reshape(-1).tolist())
      assert np.asarray(seen[index]).size * itemsize <= max(band, itemsize)
    assert (seen == 1).all() and order == list(range(int(np.prod(shape))))


def _zarr(tmp_path, driver, codecs_or_compressor, chunk, dtype='float32', shape=(10, 7, 6)):
  """A tensorstore-written zarr array whose chunks do not divide its shape (clipped edge chunks)."""
  if driver == 'zarr':
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(tmp_path / 'z2')},
            'metadata': {'shape': list(shape), 'chunks': list(chunk), 'dtype': np.dtype(dtype).str,
                         'compressor': codecs_or_compressor}}
  else:
    spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': str(tmp_path / 'z3')},
            'metadata': {'shape': list(shape), 'data_type': np.dtype(dtype).name, 'codecs': codecs_or_compressor,
                         'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(chunk)}}}}
  store = ts.open(spec, create=True, delete_existing=True).result()
  data = (np.arange(np.prod(shape)) * 0.37).astype(dtype).reshape(shape)
  store.write(data).result()
  return ts.open({k: v for k, v in spec.items() if k != 'metadata'}, open=True, read=True).result(), data


ZSTD3 = [{'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'zstd', 'configuration': {'level': 3}}]
FORMATS = {
    'zarr2 zstd': ('zarr', {'id': 'zstd', 'level': 1}, (4, 3, 6)),
    'zarr2 raw': ('zarr', None, (4, 3, 6)),
    'zarr3 zstd': ('zarr3', ZSTD3, (4, 3, 6)),
    'zarr3 sharded': ('zarr3', [{'name': 'sharding_indexed', 'configuration': {
        'chunk_shape': [2, 3, 3], 'codecs': ZSTD3,
        'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'crc32c'}]}}], (4, 6, 6)),
}


@pytest.mark.parametrize('name', FORMATS)
def test_every_chunk_decodes_as_tensorstore_does(tmp_path, tiny_streams, name):
  driver, codec, chunk = FORMATS[name]
  store, data = _zarr(tmp_path, driver, codec, chunk)
  fmt = chunk_stream.chunk_format(store.spec().to_json()['metadata'])
  assert fmt is not None
  read_chunk = tuple(store.chunk_layout.read_chunk.shape)
  assert fmt.chunk == read_chunk
  streams = chunk_stream.ChunkStreams(store.kvstore, fmt)
  grid = [range(-(-n // c)) for n, c in zip(data.shape, read_chunk)]
  for cell in itertools.product(*grid):
    bounds = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, read_chunk, data.shape))
    out = np.full(data[bounds].shape, -1, np.float32)
    streams.decode_into(cell, out)
    np.testing.assert_array_equal(out, data[bounds], err_msg=str(cell))
    # converted band by band into a strided destination, as tensorstore's cast does
    wide = np.zeros((data[bounds].shape[0], 2) + data[bounds].shape[1:], ml_dtypes.bfloat16)
    streams.decode_into(cell, wide[:, 1])
    want = np.asarray(ts.cast(store[bounds], ts.bfloat16).read().result())
    assert (wide[:, 1].view(np.uint16) == want.view(np.uint16)).all() and not wide[:, 0].any()


def test_codecs_it_does_not_know_are_left_to_tensorstore(tmp_path):
  store, _ = _zarr(tmp_path, 'zarr', {'id': 'blosc', 'cname': 'lz4', 'clevel': 5, 'shuffle': 1}, (4, 3, 6))
  assert chunk_stream.chunk_format(store.spec().to_json()['metadata']) is None
  transposed = [{'name': 'transpose', 'configuration': {'order': [2, 1, 0]}}] + ZSTD3
  store, _ = _zarr(tmp_path, 'zarr3', transposed, (4, 3, 6))
  assert chunk_stream.chunk_format(store.spec().to_json()['metadata']) is None


def test_a_damaged_chunk_is_an_error_not_wrong_numbers(tmp_path, tiny_streams):
  store, data = _zarr(tmp_path, 'zarr', {'id': 'zstd', 'level': 1}, (10, 7, 6))
  stored = store.kvstore['0.0.0']
  store.kvstore['0.0.0'] = stored[:len(stored) // 2]  # truncated
  fmt = chunk_stream.chunk_format(store.spec().to_json()['metadata'])
  with pytest.raises(Exception, match='ends after|zstd|decompress'):
    chunk_stream.ChunkStreams(store.kvstore, fmt).decode_into((0, 0, 0), np.empty(data.shape, np.float32))


def test_a_damaged_shard_index_is_an_error_not_wrong_numbers(tmp_path, tiny_streams):
  """Raw (uncompressed) chunks in a shard: an index pointing elsewhere would decode someone else's bytes,
  so its crc32c is checked, as tensorstore checks it."""
  assert chunk_stream.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  raw = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  codecs = [{'name': 'sharding_indexed', 'configuration': {
      'chunk_shape': [2, 3, 3], 'codecs': raw,
      'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'crc32c'}]}}]
  store, data = _zarr(tmp_path, 'zarr3', codecs, (4, 6, 6))
  fmt = chunk_stream.chunk_format(store.spec().to_json()['metadata'])
  out = np.empty((2, 3, 3), np.float32)
  chunk_stream.ChunkStreams(store.kvstore, fmt).decode_into((1, 0, 0), out)
  np.testing.assert_array_equal(out, data[2:4, :3, :3])
  stored = bytearray(store.kvstore['c/0/0/0'])
  index = len(stored) - 4 - 16 * 8  # 2 x 2 x 2 chunks per shard; chunk (1, 0, 0) is the 5th
  stored[index + 16 * 4:index + 16 * 4 + 8] = stored[index:index + 8]  # points at chunk (0, 0, 0)'s bytes
  store.kvstore['c/0/0/0'] = bytes(stored)
  with pytest.raises(ValueError, match='crc32c'):
    chunk_stream.ChunkStreams(store.kvstore, fmt).decode_into((1, 0, 0), out)


@pytest.mark.parametrize('zarr3', [False, True])
def test_orbax_arrays_read_the_same_streamed(tmp_path, monkeypatch, zarr3):
  tree = {'w': jnp.asarray((np.arange(48 * 8 * 20) % 251).reshape(48, 8, 20) * 0.5, jnp.float32),
          'b': jnp.arange(12, dtype=jnp.int32), 's': jnp.asarray(2.5, jnp.float32)}
  handler = ocp.PyTreeCheckpointHandler(use_zarr3=zarr3)
  save_args = {'w': ocp.SaveArgs(chunk_byte_size=4 * 8 * 20 * 12), 'b': ocp.SaveArgs(), 's': ocp.SaveArgs()}
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(tmp_path / 'c', args=ocp.args.PyTreeSave(tree, save_args=save_args))
  meta = metadata_lib.read_item_metadata(epath.Path(tmp_path / 'c'))

  def reads():
    arrays = SourceArrays(meta)
    w = arrays.store(('w',))
    whole = (slice(0, 48), slice(0, 8), slice(0, 20))
    strided = np.zeros((48, 2, 8, 20), ml_dtypes.bfloat16)
    arrays.finish_read(arrays.start_read_into(('w',), whole, strided[:, 0], dtype=ml_dtypes.bfloat16))
    return (w.chunk, arrays.read(('w',), whole), arrays.read(('w',), whole, perm=(2, 0, 1)),
            arrays.read(('w',), (slice(12, 24), 3, slice(0, 20))), strided.view(np.uint16), arrays.read(('b',), (slice(0, 12),)), arrays.read(('s',), ()))

  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 2**40)
  by_tensorstore = reads()
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0)
  monkeypatch.setattr(chunk_stream, 'BAND_BYTES', 1000)
  calls = []
  decode = chunk_stream.ChunkStreams.decode_into
  monkeypatch.setattr(chunk_stream.ChunkStreams, 'decode_into', lambda self, *a: calls.append(a[0]) or decode(self, *a))
  streamed = reads()
  chunks = 48 * 8 * 20 // int(np.prod(by_tensorstore[0]))
  assert chunks > 1 and len(set(calls)) == chunks + 2  # every chunk of w, b's and s's
  for a, b in zip(by_tensorstore, streamed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(streamed[1], np.asarray(tree['w']))


def test_a_small_memory_budget_streams_smaller_chunks(tmp_path):
  """Below 16 MiB, chunks decode through tensorstore (2x the chunk for a moment), unless the chunks a
  reader may keep are few: with 16 MiB of them (a 32 MiB budget), an 8 MiB chunk streams."""
  data = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB, one chunk
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'c', {'w': data})
  meta = metadata_lib.read_item_metadata(epath.Path(tmp_path / 'c'))
  assert chunk_stream.min_stream_bytes() == chunk_stream.MIN_STREAM_BYTES
  assert not SourceArrays(meta).streamed(('w',))
  tight = SourceArrays(meta, cache_bytes=16 * 2**20)
  assert tight.streamed(('w',))
  np.testing.assert_array_equal(tight.read(('w',), (slice(0, 2048), slice(0, 1024))), data)
  assert chunk_stream.min_stream_bytes(2 * 2**20) == chunk_stream.STREAM_BYTES  # never below one stream's cost


def test_a_large_chunk_streams_within_a_fraction_of_its_size(tmp_path, monkeypatch):
  """tensorstore holds the stored and the decoded chunk (2x); a stream holds a window and a band."""
  data = np.random.default_rng(0).standard_normal((64, 1024, 256)).astype(np.float32)  # 64 MiB, one chunk
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'c', {'w': data})
  store = OrbaxOpener(metadata_lib.read_item_metadata(epath.Path(tmp_path / 'c')))(('w',))
  assert store._streams_for((slice(0, 64), slice(0, 1024), slice(0, 256))) is not None
  used = []
  original = chunk_stream._fill

  def fill(reader, view, key):
    used.append(len(view))
    return original(reader, view, key)

  monkeypatch.setattr(chunk_stream, '_fill', fill)
  out = store.read((slice(0, 64), slice(0, 1024), slice(0, 256)), dtype=jnp.bfloat16)
  assert max(used) <= chunk_stream.BAND_BYTES and len(used) == 64 * 2**20 // chunk_stream.BAND_BYTES
  assert (out.view(np.uint16) == data.astype(jnp.bfloat16).view(np.uint16)).all()


def test_units_of_a_chunk_decode_in_stored_order_and_restart_only_when_asked_again(tmp_path, monkeypatch):
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0)
  monkeypatch.setattr(chunk_stream, 'UNIT_BYTES', 4096)
  w = np.arange(64 * 4 * 32, dtype=np.float32).reshape(64, 4, 32)  # one 32 KiB chunk
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'c', {'w': w})
  meta = metadata_lib.read_item_metadata(epath.Path(tmp_path / 'c'))
  store = OrbaxOpener(meta)(('w',))
  assert store.chunk == w.shape and store.unit == (8, 4, 32)  # bands of 8 rows tile the chunk
  passed = []
  keep = lambda cell, data: passed.append((cell, data.copy()))
  np.testing.assert_array_equal(store.read_unit((2, 0, 0), keep), w[16:24])
  assert [c for c, _ in passed] == [(0, 0, 0), (1, 0, 0)]  # decoded on the way, handed over
  np.testing.assert_array_equal(passed[1][1], w[8:16])
  np.testing.assert_array_equal(store.read_unit((3, 0, 0), keep), w[24:32])
  assert len(passed) == 2  # the stream went on from where it was
  np.testing.assert_array_equal(store.read_unit((1, 0, 0), keep), w[8:16])
  assert [c for c, _ in passed[2:]] == [(0, 0, 0)]  # asked again: restarted from the chunk's start

  # through the chunk cache: every layer of the stacked array read once from units, each decoded once
  arrays = SourceArrays(meta, cache_bytes=2 * 4096)
  for i in range(4):
    arrays.expect(('w',), (slice(0, 64), i, slice(0, 32)))
  layers = [arrays.read(('w',), (slice(0, 64), i, slice(0, 32))) for i in range(4)]
  for i in range(4):
    np.testing.assert_array_equal(layers[i], w[:, i])
  assert w.nbytes < arrays.bytes_read <= 4 * w.nbytes  # layer-major under a 2-unit cache: units decoded again
  arrays = SourceArrays(meta, cache_bytes=2 * w.nbytes)
  for i in range(4):
    arrays.expect(('w',), (slice(0, 64), i, slice(0, 32)))
  layers = [arrays.read(('w',), (slice(0, 64), i, slice(0, 32))) for i in range(4)]
  assert arrays.bytes_read == w.nbytes and all((layers[i] == w[:, i]).all() for i in range(4))

  # a unit decoded on the way to a later one serves its own reader; a decode ahead that finds it used is skipped
  arrays = SourceArrays(meta, cache_bytes=w.nbytes)
  rows = [(slice(8 * i, 8 * i + 8), slice(0, 4), slice(0, 32)) for i in range(8)]
  for region in rows:
    arrays.expect(('w',), region)
  np.testing.assert_array_equal(arrays.read(('w',), rows[1]), w[8:16])
  np.testing.assert_array_equal(arrays.read(('w',), rows[0]), w[:8])
  assert arrays.bytes_read == 2 * w.nbytes // 8  # unit 0 decoded once, on the way to unit 1
  assert arrays._decode_unit(arrays.store(('w',)), (('w',), (0, 0, 0)), ahead=True) is None
  assert arrays.bytes_read == 2 * w.nbytes // 8
