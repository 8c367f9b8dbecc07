"""Hostile checkpoints (downloaded from a hub, forged or damaged): every case is a typed error naming the file,
nothing outside the checkpoint folder is read, and no input crashes or hangs the process."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from safetensors.numpy import save_file

import orbax_nnx
from orbax_nnx import errors

INDEX = 'model.safetensors.index.json'


def _state():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return nnx.State({'w': nnx.Param(jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=sharding))})


RULES = [(r'a\.weight', 'w')]


def _shard(folder: pathlib.Path, name='model-00001-of-00001.safetensors') -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  save_file({'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3)}, str(folder / name))
  return folder


def _index(folder: pathlib.Path, weight_map, metadata=None) -> pathlib.Path:
  (folder / INDEX).write_text(json.dumps({'metadata': metadata if metadata is not None else {},
                                          'weight_map': weight_map}))
  return folder


def _header(folder: pathlib.Path, header) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  (folder / 'model.safetensors').write_bytes(struct.pack('<Q', len(raw)) + raw + b'\0' * 64)
  return folder


def _entry(dtype='F32', shape=(1,), offsets=(0, 4)):
  return {'a.weight': {'dtype': dtype, 'shape': shape, 'data_offsets': offsets}}


def _outside_shard(tmp_path: pathlib.Path) -> pathlib.Path:
  outside = _shard(tmp_path / 'outside', 'model.safetensors') / 'model.safetensors'
  return outside


def _spy_opens(monkeypatch) -> list:
  """Every file the safetensors source opens (by path), so a test can show what was never touched."""
  from orbax_nnx.sources import untrusted
  opened = []
  real = untrusted.check_regular
  monkeypatch.setattr(untrusted, 'check_regular', lambda f: (opened.append(os.path.realpath(f)), real(f))[1])
  return opened


SAFETENSORS_CASES = {
    'index-dot': lambda d: _index(_shard(d), {'a.weight': '.'}),
    'index-integer': lambda d: _index(_shard(d), {'a.weight': 5}),
    'index-null': lambda d: _index(_shard(d), {'a.weight': None}),
    'index-dev-stdin': lambda d: _index(_shard(d), {'a.weight': '/dev/stdin'}),
    'index-metadata-string': lambda d: _index(_shard(d), {'a.weight': 'model-00001-of-00001.safetensors'}, 'x'),
    'index-weight-map-list': lambda d: _index(_shard(d), ['model-00001-of-00001.safetensors']),
    'index-nested': lambda d: (_shard(d), (d / INDEX).write_text('[' * 100_000), d)[-1],
    'header-nested': lambda d: _header(d, b'[' * 100_000),
    'header-nested-in-object': lambda d: _header(d, b'{"a": ' + b'[' * 100_000),
    'header-dtype-list': lambda d: _header(d, _entry(dtype=['F32'])),
    'header-shape-overflow': lambda d: _header(d, _entry(shape=[2**64, 1])),
    'header-shape-negative': lambda d: _header(d, _entry(dtype='U8', shape=[-2, -3], offsets=[0, 6])),
    'header-shape-wraps-int64': lambda d: _header(d, _entry(dtype='U8', shape=[2**62 + 1, 4], offsets=[0, 4])),
    'header-shape-bool': lambda d: _header(d, _entry(shape=[True])),
    'header-offsets-floats': lambda d: _header(d, _entry(offsets=[0.0, 4.0])),
    'header-metadata-list': lambda d: _header(d, {**_entry(), '__metadata__': ['x']}),
    'header-entry-string': lambda d: _header(d, {'a.weight': 'F32'}),
    'dangling-symlink': lambda d: (d.mkdir(), (d / 'model.safetensors').symlink_to(d.parent / 'missing-blob'), d)[-1],
    'symlink-loop': lambda d: (d.mkdir(), (d / 'model.safetensors').symlink_to(d / 'model.safetensors'), d)[-1],
    'directory-named-safetensors': lambda d: ((d / 'model.safetensors').mkdir(parents=True), d)[-1],
    'fifo-shard': lambda d: (_index(d, {'a.weight': 'x.safetensors'}) if d.mkdir() is None else d,
                             os.mkfifo(d / 'x.safetensors'), d)[-1],
}


@pytest.mark.parametrize('case', sorted(SAFETENSORS_CASES))
@pytest.mark.parametrize('op', ['inspect', 'restore'])
def test_malformed_safetensors_is_a_typed_error_naming_the_file(tmp_path, case, op):
  folder = SAFETENSORS_CASES[case](tmp_path / 'ckpt')
  with pytest.raises(errors.OrbaxNNXError) as info:
    if op == 'inspect':
      orbax_nnx.inspect(folder)
    else:
      orbax_nnx.restore(folder, _state(), rules=RULES)
  assert isinstance(info.value, (errors.CorruptCheckpointError, errors.NotACheckpointError)), info.value
  assert str(folder) in str(info.value), info.value


@pytest.mark.parametrize('name', ['../outside/model.safetensors', 'ABSOLUTE', 'sub/../../outside/model.safetensors'])
def test_index_names_outside_the_folder_are_refused_before_any_open(tmp_path, monkeypatch, name):
  outside = _outside_shard(tmp_path)
  folder = _index(_shard(tmp_path / 'ckpt'), {'a.weight': str(outside) if name == 'ABSOLUTE' else name})
  opened = _spy_opens(monkeypatch)
  with pytest.raises(errors.CorruptCheckpointError, match='only plain file names inside the checkpoint folder'):
    orbax_nnx.restore(folder, _state(), rules=RULES)
  assert opened == [os.path.realpath(folder / INDEX)], opened  # the index only: no shard, inside or outside


def test_a_foreign_file_is_refused_without_quoting_its_bytes(tmp_path):
  folder = tmp_path / 'ckpt'
  folder.mkdir()
  secret = b'SECRET!!' + b'x' * 100
  (folder / 'model.safetensors').write_bytes(secret)
  with pytest.raises(errors.CorruptCheckpointError) as info:
    orbax_nnx.inspect(folder)
  assert str(int.from_bytes(secret[:8], 'little')) not in str(info.value) and 'SECRET' not in str(info.value)


def test_a_symlinked_hugging_face_cache_is_followed(tmp_path):
  """snapshots/<rev>/model-*.safetensors -> ../../blobs/<sha>: the layout `huggingface_hub` downloads into."""
  blobs = _shard(tmp_path / 'hub' / 'blobs', 'abc123')
  snapshot = tmp_path / 'hub' / 'snapshots' / 'rev'
  snapshot.mkdir(parents=True)
  (snapshot / 'model-00001-of-00001.safetensors').symlink_to('../../blobs/abc123')
  _index(snapshot, {'a.weight': 'model-00001-of-00001.safetensors'})
  restored = orbax_nnx.restore(snapshot, _state(), rules=RULES)
  np.testing.assert_array_equal(np.asarray(restored['w'].get_value()), np.arange(6, dtype=np.float32).reshape(2, 3))
  assert blobs.exists()


# -- Orbax items --------------------------------------------------------------

def _item(path: pathlib.Path) -> pathlib.Path:
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(path, args=orbax_nnx.NNXSave({'w': nnx.Param(jnp.ones((2, 3)))}))
  return path


def _edit_metadata(item: pathlib.Path, edit) -> pathlib.Path:
  data = json.loads((item / '_METADATA').read_text())
  edit(data)
  (item / '_METADATA').write_text(json.dumps(data))
  return item


def _ours(key, value):
  return lambda data: data['custom_metadata']['orbax_nnx'].__setitem__(key, value)


ORBAX_CASES = {
    'records-empty-record': lambda d: _edit_metadata(d, _ours('variables', [{}])),
    'records-not-a-list': lambda d: _edit_metadata(d, _ours('variables', 5)),
    'records-path-not-a-list': lambda d: _edit_metadata(d, _ours('variables', [{'path': 5, 'type': 'x'}])),
    'scan-axes-list': lambda d: _edit_metadata(d, _ours('scan_axes', [1])),
    'scan-axes-strings': lambda d: _edit_metadata(d, _ours('scan_axes', {'w': 'one'})),
    'sharding-list': lambda d: ((d / '_sharding').write_text('[]'), d)[-1],
    'sharding-directory': lambda d: ((d / '_sharding').unlink(), (d / '_sharding').mkdir(), d)[-1],
    'sharding-nested': lambda d: ((d / '_sharding').write_text('[' * 100_000), d)[-1],
    'metadata-nested': lambda d: ((d / '_METADATA').write_text('[' * 100_000), d)[-1],
    'metadata-directory': lambda d: ((d / '_METADATA').unlink(), (d / '_METADATA').mkdir(), d)[-1],
}


@pytest.mark.parametrize('case', sorted(ORBAX_CASES))
@pytest.mark.parametrize('op', ['inspect', 'restore'])
def test_malformed_orbax_metadata_is_a_typed_error_naming_the_file(tmp_path, case, op):
  item = ORBAX_CASES[case](_item(tmp_path / 'item'))
  with pytest.raises(errors.CorruptCheckpointError) as info:
    orbax_nnx.inspect(item) if op == 'inspect' else orbax_nnx.restore(item)
  assert str(item) in str(info.value), info.value


def test_untargeted_restore_of_a_forged_plain_item_is_refused_not_aborted(tmp_path):
  """A plain Orbax item (no orbax_nnx records) whose `.zarray` declares 2**50 x 4 float32: every untargeted
  path checks the declared shapes before Orbax allocates (a crash here would kill the test process)."""
  path = tmp_path / 'plain'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'a': np.ones((4, 4), np.float32)})
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{path}'}).result()
  zarray = json.loads(kv.read(b'a/.zarray').result().value)
  kv.write(b'a/.zarray', json.dumps({**zarray, 'shape': [2**50, 4]}).encode()).result()
  handler = orbax_nnx.NNXCheckpointHandler()
  for restore in (lambda: orbax_nnx.restore(path), lambda: handler.restore(path),
                  lambda: handler.restore(path, ocp.args.StandardRestore()),
                  lambda: handler.restore(path, ocp.args.PyTreeRestore())):
    with pytest.raises(errors.ResourceError, match=r'a, shape \(1125899906842624, 4\)'):
      restore()


def _skip_deserialize(data):
  for entry in data['tree_metadata'].values():
    entry['value_metadata']['skip_deserialize'] = True


@pytest.mark.parametrize('kind', ['nnx', 'plain'])
def test_a_leaf_forged_to_hold_no_value_is_refused_by_an_untargeted_restore(tmp_path, kind):
  """`skip_deserialize` forged on an array leaf (plain Orbax raises a bare ValueError here): typed, naming it."""
  if kind == 'nnx':
    item = _item(tmp_path / 'item')
  else:
    item = tmp_path / 'item'
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(item, {'w': np.ones((2, 3), np.float32)})
  _edit_metadata(item, _skip_deserialize)
  handler = orbax_nnx.NNXCheckpointHandler()
  for restore in (lambda: orbax_nnx.restore(item), lambda: handler.restore(item)):
    with pytest.raises(errors.CorruptCheckpointError, match=r"stored leaf 'w(/value)?' is marked as holding no"):
      restore()


def test_keys_that_orbax_would_store_under_one_name_are_refused(tmp_path):
  state = nnx.State({'a.b': nnx.Param(jnp.zeros(2)), 'a': {'b': nnx.Param(jnp.ones(2))}})
  with pytest.raises(errors.OrbaxNNXError, match=r"'a\.b' and 'a/b': Orbax stores both as 'a\.b\.value'"):
    with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
      ckptr.save(tmp_path / 'x', args=orbax_nnx.NNXSave(state))
  assert not (tmp_path / 'x').exists()


def test_cli_prints_one_line_and_exits_2_on_a_hostile_checkpoint(tmp_path):
  folder = SAFETENSORS_CASES['header-nested'](tmp_path / 'ckpt')
  out = subprocess.run([sys.executable, '-m', 'orbax_nnx', 'inspect', str(folder)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 2, out.stderr
  assert 'Traceback' not in out.stderr and 'nested too deeply' in out.stderr


def test_mutated_metadata_never_escapes_as_a_raw_exception():
  """Hypothesis mutations of real headers, indexes, `_METADATA`, `_sharding` and `.zarray` (tests/hostile_worker.py)
  in a subprocess, where an abort or a hang would show. HOSTILE_EXAMPLES raises the examples per strategy."""
  worker = pathlib.Path(__file__).with_name('hostile_worker.py')
  # (Orbax's read coroutines left behind by a failed gather warn when collected: ignored, so that a failure's
  # report, not their warnings, is what the tail below shows)
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', '--tb=short',
                        '-W', 'ignore::pytest.PytestUnraisableExceptionWarning', str(worker)],
                       capture_output=True, text=True, timeout=600, cwd=worker.parent,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  report = out.stdout[out.stdout.find('____'):] if '____' in out.stdout else out.stdout  # (from the failure)
  assert out.returncode == 0, report[:6000] + out.stderr[-2000:]
