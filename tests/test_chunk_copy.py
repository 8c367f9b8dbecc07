"""Arrays a conversion writes unchanged are copied chunk by chunk, as stored (`orbax_nnx.io.chunk_copy`)."""

import dataclasses
import json
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import zstandard
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import orbax_nnx
from orbax_nnx import cli, errors
from orbax_nnx.io import chunk_copy
from orbax_nnx.io.source_arrays import SourceArrays
from orbax_nnx.sources import chunk_stream


def _linen(rng, layers: int = 3) -> dict:
  params = {'embed': {'embedding': rng.standard_normal((64, 32)).astype(np.float32)},
            'tiny': {'bias': np.zeros((1,), np.float32)}}  # one element: a chunk zstd stores in RLE blocks
  for i in range(layers):
    params[f'layers_{i}'] = {'mlp': {'kernel': rng.standard_normal((32, 96)).astype(np.float32),
                                     'scale': np.arange(96, dtype=np.float16)}}
  return {'params': {'params': params}}


def _save(path, tree, **handler_options) -> epath.Path:
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler_options)) as ckptr:
    ckptr.save(epath.Path(path), args=ocp.args.PyTreeSave(tree))
  return epath.Path(path)


def _arrays(path) -> dict:
  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(path))
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join(str(getattr(k, 'key', k)) for k in keypath)] = np.asarray(leaf)
  return out


def _metadata(path, name: str, driver: str = 'zarr') -> dict:
  store = ts.open({'driver': driver, 'kvstore': {'driver': 'ocdbt', 'base': f'file://{path}', 'path': f'{name}/'}},
                  open=True).result()
  return store.spec().to_json()['metadata']


@pytest.fixture
def checked(monkeypatch) -> list:
  """The keys of the stored chunks checked (and copied) as they are."""
  seen = []
  check = chunk_stream.check_stored

  def spy(data, fmt, key):
    seen.append(key)
    return check(data, fmt, key)

  monkeypatch.setattr(chunk_stream, 'check_stored', spy)
  return seen


def _assert_renamed(src: dict, dst: dict) -> None:
  """`dst` (NNX) holds every param of `src` (Linen), bit for bit, in its dtype."""
  assert len(dst) == len(src)
  for name, value in src.items():
    out = dst[name.replace('params/params/', 'model/', 1) + '/value']
    assert out.dtype == value.dtype and out.shape == value.shape, name
    assert out.tobytes() == value.tobytes(), name


@pytest.mark.parametrize('mode', ['transactions', 'one-array-at-a-time', 'small-window'])
def test_renamed_arrays_are_copied_as_stored(tmp_path, checked, monkeypatch, mode):
  """A Linen -> NNX convert renames every array: each stored chunk is checked and copied once, none decoded;
  the copies restore bit for bit with plain Orbax, with the source's zarr metadata, and are counted as read.
  A batch's arrays are copied in tensorstore callbacks; batches of one array write without a transaction (how
  arrays larger than a batch are written), and a batch whose chunks do not fit the window at once goes a window
  of chunks at a time: both through asyncio tasks, and both checked here too."""
  paths = []

  def spying(name):
    real = getattr(chunk_copy, name)

    def spy(*args):
      paths.append(name)
      return real(*args)
    return spy
  for name in ('_open_then_copy', '_copy_chunks'):
    monkeypatch.setattr(chunk_copy, name, spying(name))
  if mode == 'one-array-at-a-time':
    monkeypatch.setattr(chunk_copy, 'BATCH_BYTES', 1)
  budget = '8KiB' if mode == 'small-window' else None
  tree = _linen(np.random.default_rng(0))
  src = _save(tmp_path / 'src', tree)
  decoded = []
  for name in ('read', 'start_read_into', 'chunk_parts'):
    monkeypatch.setattr(SourceArrays, name, lambda *a, name=name: decoded.append(name))
  report = orbax_nnx.convert(src, tmp_path / 'dst', to='nnx', memory_budget=budget)
  stored = _arrays(src)
  assert sorted(checked) == sorted(['0.0'] * 4 + ['0'] * 4)  # one chunk per array: 4 of 2 axes, 4 of 1
  assert set(paths) == {'_open_then_copy' if mode == 'transactions' else '_copy_chunks'}
  assert not decoded
  assert report.bytes_read == sum(v.nbytes for v in stored.values())
  _assert_renamed(stored, _arrays(tmp_path / 'dst'))
  assert _metadata(tmp_path / 'dst', 'model.layers_1.mlp.kernel.value') == \
      _metadata(src, 'params.params.layers_1.mlp.kernel')


def test_chunks_of_a_sharded_save_are_copied_in_its_chunking(tmp_path, checked):
  """A save from 8 devices stores a chunk per shard; the copy keeps that chunking (one writer per chunk), and
  the target is still one array to plain Orbax."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'model'))
  sharding = NamedSharding(mesh, PartitionSpec('data', 'model'))
  value = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
  src = _save(tmp_path / 'src', {'params': {'params': {'dense': {'kernel': jax.device_put(value, sharding)}}}})
  orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
  assert sorted(checked) == sorted(f'{i}.{j}' for i in range(4) for j in range(2))
  meta = _metadata(tmp_path / 'dst', 'model.dense.kernel.value')
  assert meta['chunks'] == [16, 16] and meta == _metadata(src, 'params.params.dense.kernel')
  np.testing.assert_array_equal(_arrays(tmp_path / 'dst')['model/dense/kernel/value'], value)


def test_a_zarr3_source_is_copied_shard_by_shard_and_stays_zarr3(tmp_path, checked, capsys):
  """A zarr v3 source (MaxText's default: one zstd chunk per `sharding_indexed` shard) converts to zarr v3:
  each shard is checked (index crc32c, inner frame) and copied, the metadata is the source's, and `plan`
  says which format the output gets."""
  tree = _linen(np.random.default_rng(2), layers=1)
  src = _save(tmp_path / 'src', tree, use_zarr3=True)
  assert cli.main(['plan', str(src)]) == 0
  assert '# output: Orbax OCDBT, zarr v3 (the zarr version of the source' in capsys.readouterr().out
  orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
  assert sorted(checked) == sorted(['c/0/0', 'c/0/0', 'c/0', 'c/0'])
  _assert_renamed(_arrays(src), _arrays(tmp_path / 'dst'))
  assert _metadata(tmp_path / 'dst', 'model.layers_0.mlp.kernel.value', 'zarr3') == \
      _metadata(src, 'params.params.layers_0.mlp.kernel', 'zarr3')
  assert json.loads((tmp_path / 'dst' / '_METADATA').read_text())['use_zarr3'] is True


def test_a_source_in_another_format_is_decoded_and_rewritten(tmp_path, checked, capsys):
  """An uncompressed source is not what the output's write spec describes (Orbax compresses): its arrays go
  through the normal read and write, bit for bit."""
  tree = _linen(np.random.default_rng(2), layers=1)
  src = _save(tmp_path / 'src', tree, use_compression=False)
  assert cli.main(['plan', str(src)]) == 0
  assert '# output: Orbax OCDBT, zarr v2' in capsys.readouterr().out
  orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
  assert not checked
  _assert_renamed(_arrays(src), _arrays(tmp_path / 'dst'))


def test_a_damaged_chunk_is_refused_by_name_and_nothing_is_left(tmp_path):
  """A chunk cut short is refused as a read would refuse it, naming the array; the save is not finalized."""
  src = _save(tmp_path / 'src', _linen(np.random.default_rng(3), layers=2))
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{src}'}).result()
  key = b'params.params.layers_1.mlp.kernel/0.0'
  kv.write(key, kv.read(key).result().value[:-100]).result()
  with pytest.raises(errors.CorruptCheckpointError, match='layers_1/mlp/kernel') as info:
    orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
  assert str(src) in str(info.value)
  assert info.value.__cause__ is not None  # what the check found, kept as the cause
  assert not (tmp_path / 'dst').exists()


def test_a_read_that_cannot_start_fails_the_batch_instead_of_leaving_it_waiting(tmp_path, monkeypatch):
  """An error raised while a copy's reads are being started (in a tensorstore callback, where nobody would see
  it) fails the convert with that error; nothing is left waiting and nothing is finalized."""
  src = _save(tmp_path / 'src', _linen(np.random.default_rng(5), layers=2))
  real = chunk_copy._open_then_copy

  def no_key(cell):
    raise RuntimeError('no read for you')

  def open_then_copy(opening, c, cells, countdown):  # the stored keys fail only inside the callback
    return real(opening, dataclasses.replace(c, fmt=dataclasses.replace(c.fmt, key=no_key)), cells, countdown)
  monkeypatch.setattr(chunk_copy, '_open_then_copy', open_then_copy)
  outcome = []

  def run():  # (a daemon thread: were the batch left waiting, the test fails instead of hanging the suite)
    try:
      orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
      outcome.append(None)
    except Exception as e:
      outcome.append(e)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout=120)
  assert outcome, 'the convert was left waiting on a copy whose reads never started'
  assert isinstance(outcome[0], RuntimeError) and 'no read for you' in str(outcome[0]), outcome
  assert not (tmp_path / 'dst').exists()


@pytest.mark.parametrize('damage', ['cut', 'cut-in-a-header', 'appended', 'two-frames', 'wrong-size', 'garbage',
                                    'empty'])
def test_check_stored_refuses_what_is_not_one_whole_frame(damage):
  fmt = chunk_stream.ChunkFormat(np.dtype('<f4'), (300, 200), True, lambda cell: '0.0')
  data = np.random.default_rng(4).standard_normal((300, 200)).astype(np.float32).tobytes()
  frame = zstandard.ZstdCompressor(level=1).compress(data)
  chunk_stream.check_stored(frame, fmt, '0.0')  # whole: fine
  chunk_stream.check_stored(zstandard.ZstdCompressor(write_checksum=True).compress(data), fmt, '0.0')
  chunk_stream.check_stored(zstandard.ZstdCompressor(write_content_size=False).compress(data), fmt, '0.0')
  chunk_stream.check_stored(data, chunk_stream.ChunkFormat(np.dtype('<f4'), (300, 200), False, str), '0.0')
  bad = {'cut': frame[:-7], 'cut-in-a-header': frame[:zstandard.frame_header_size(frame) + 2],
         'appended': frame + b'\0', 'two-frames': frame + frame,
         'wrong-size': zstandard.ZstdCompressor(level=1).compress(data[:-4]),
         'garbage': b'\x28\xb5\x2f\xfd' + b'\xff' * 64, 'empty': b''}[damage]
  with pytest.raises(ValueError, match='chunk 0.0'):
    chunk_stream.check_stored(bad, fmt, '0.0')
  with pytest.raises(ValueError, match='chunk 0.0 holds'):
    chunk_stream.check_stored(data[:-4], chunk_stream.ChunkFormat(np.dtype('<f4'), (300, 200), False, str), '0.0')


def _shard(frames: list[bytes | None], checksum: bool = True) -> bytes:
  """A zarr v3 shard as tensorstore writes it: the chunks, then their (offset, size) index and its crc32c."""
  data, index = b'', []
  for frame in frames:
    index += [2**64 - 1] * 2 if frame is None else [len(data), len(frame)]
    data += frame or b''
  table = np.array(index, '<u8').tobytes()
  return data + table + (chunk_stream.crc32c(table).to_bytes(4, 'little') if checksum else b'')


@pytest.mark.parametrize('damage', ['bad-crc', 'outside', 'cut', 'shorter-than-the-index', 'bad-frame'])
def test_check_stored_refuses_a_damaged_shard(damage):
  """A shard is refused when its index fails its crc32c or points outside the shard's data, or a chunk it
  points at is not a whole frame; chunks never written (all ones in the index) are fine."""
  fmt = chunk_stream.ChunkFormat(np.dtype('<f4'), (30, 20), True, lambda cell: 'c/0/0', shard=(1, 2))
  data = np.random.default_rng(5).standard_normal((30, 20)).astype(np.float32).tobytes()
  frame = zstandard.ZstdCompressor(level=3).compress(data)
  good = _shard([frame, frame])
  chunk_stream.check_stored(good, fmt, 'c/0/0')
  chunk_stream.check_stored(_shard([None, frame]), fmt, 'c/0/0')
  chunk_stream.check_stored(_shard([None, None]), fmt, 'c/0/0')
  table = np.frombuffer(good[-36:-4], '<u8').copy()
  table[3] += 1  # the second chunk one byte longer: past the data
  outside = good[:-36] + table.tobytes() + chunk_stream.crc32c(table.tobytes()).to_bytes(4, 'little')
  bad = {'bad-crc': good[:-1] + bytes([good[-1] ^ 1]), 'outside': outside, 'cut': good[:10] + good[-36:][:-2],
         'shorter-than-the-index': good[-20:], 'bad-frame': _shard([frame, frame[:-5]])}[damage]
  with pytest.raises(ValueError, match='shard c/0/0|chunk c/0/0 \\(chunk 1 of the shard\\)'):
    chunk_stream.check_stored(bad, fmt, 'c/0/0')


def test_a_damaged_zarr3_shard_is_refused_by_name_and_nothing_is_left(tmp_path):
  src = _save(tmp_path / 'src', _linen(np.random.default_rng(6), layers=2), use_zarr3=True)
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{src}'}).result()
  key = b'params.params.layers_1.mlp.kernel/c/0/0'
  value = kv.read(key).result().value
  kv.write(key, value[:8] + bytes([value[8] ^ 0xFF]) + value[9:-1] + bytes([value[-1] ^ 1])).result()
  with pytest.raises(errors.CorruptCheckpointError, match='layers_1/mlp/kernel.*crc32c'):
    orbax_nnx.convert(src, tmp_path / 'dst', to='nnx')
  assert not (tmp_path / 'dst').exists()
