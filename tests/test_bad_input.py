"""Bad input: each case raises a typed orbax_nnx error naming the path and problem, and writes nothing."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from helpers import assert_same_state

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.compare import compare
from orbax_nnx.inspection import inspect_checkpoint


def save(path, tree):
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(path, args=orbax_nnx.NNXSave(tree))
  return path


def good(tmp_path):
  w = nnx.Param(jnp.arange(24.0).reshape(4, 6))
  w.set_metadata(out_sharding=('layers', None))  # 4 layers stacked as nnx.vmap names them
  return save(tmp_path / 'good', {'layers': {'w': w}, 'b': nnx.Param(jnp.ones((6,)))})


def target(**shapes):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  def build(node):
    if isinstance(node, tuple):
      return nnx.Param(jax.ShapeDtypeStruct(node, jnp.float32, sharding=sharding))
    return {k: build(v) for k, v in node.items()}
  return nnx.State(build(shapes))


GOOD_TARGET = {'layers': {'w': (4, 6)}, 'b': (6,)}


def snapshot(root: pathlib.Path) -> set:
  return {str(p) for p in root.rglob('*')}


def corrupt_case(name, tmp_path):
  """Builds the damaged input for `name`; returns (path, target)."""
  path = good(tmp_path)
  data_files = [p for p in path.rglob('*') if p.is_file() and p.parent.name == 'd']
  if name == 'missing-dir':
    return tmp_path / 'nope', None
  if name == 'plain-file':
    (tmp_path / 'file').write_text('x')
    return tmp_path / 'file', None
  if name == 'empty-dir':
    (tmp_path / 'empty').mkdir()
    return tmp_path / 'empty', None
  if name == 'foreign-dir':
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'pytorch_model.bin').write_bytes(b'\0' * 64)  # a format we never read (pickle)
    (tmp_path / 'foreign' / 'config.json').write_text('{}')
    return tmp_path / 'foreign', None
  if name == 'deleted-metadata':
    (path / '_METADATA').unlink()
    return path, None
  if name == 'garbage-metadata':
    (path / '_METADATA').write_text('{not json')
    return path, None
  if name == 'truncated-data':
    for f in data_files:
      f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    return path, target(**GOOD_TARGET)
  if name == 'deleted-data':
    for f in data_files:
      f.unlink()
    return path, target(**GOOD_TARGET)
  if name == 'symlink-loop':
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    return tmp_path / 'loop', None
  raise ValueError(name)


CORRUPT = ['missing-dir', 'plain-file', 'empty-dir', 'foreign-dir', 'deleted-metadata', 'garbage-metadata',
           'truncated-data', 'deleted-data', 'symlink-loop']


@pytest.mark.parametrize('name', CORRUPT)
@pytest.mark.parametrize('api', ['restore', 'detect', 'untargeted', 'load_params', 'convert'])
def test_damaged_or_foreign_input(tmp_path, name, api):
  path, tgt = corrupt_case(name, tmp_path)
  tgt = tgt if tgt is not None else target(**GOOD_TARGET)
  before = snapshot(tmp_path)
  with pytest.raises(errors.OrbaxNNXError) as info:
    if api == 'restore':
      orbax_nnx.restore(path, tgt)
    elif api == 'untargeted':
      orbax_nnx.restore(path)
    elif api == 'detect':
      orbax_nnx.detect_layout(path)
    elif api == 'load_params':
      orbax_nnx.load_params(path, tgt)
    else:
      orbax_nnx.convert(path, tmp_path / 'out')
  assert str(path) in str(info.value) or path.name in str(info.value)
  # an Orbax item (it has _METADATA) whose stored data is damaged is corrupt; anything else is not a checkpoint
  damaged = name in ('truncated-data', 'deleted-data', 'garbage-metadata')
  expected = errors.NotACheckpointError
  if damaged:  # a stored file that is gone is also the FileNotFoundError Orbax raises
    expected = errors.MissingDataError if name == 'deleted-data' else errors.CorruptCheckpointError
  assert type(info.value) is expected, info.value
  assert snapshot(tmp_path) == before, 'nothing may be written'


def forge_shape(path: pathlib.Path, key: str, shape: list[int]) -> None:
  """Rewrites one array's declared shape inside the OCDBT store, as damage or a forger would."""
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{path}'}).result()
  name = f'{key}/.zarray'.encode()
  zarray = json.loads(kv.read(name).result().value)
  zarray['shape'] = shape
  kv.write(name, json.dumps(zarray).encode()).result()


ENORMOUS = [2**30, 2**20]  # 4 PiB of float32; sizes still fit in int64


@pytest.mark.parametrize('api', ['untargeted', 'handler', 'convert', 'export', 'compare', 'restore', 'load_params'])
def test_enormous_declared_shape_fails_before_allocating(tmp_path, api):
  path = good(tmp_path)
  forge_shape(path, 'b.value', [2**50])  # 4 PiB of float32: no machine holds it
  other = shutil.copytree(path, tmp_path / 'copy')  # same declared shapes: compare would read values
  assert orbax_nnx.read_item_metadata(path).leaves[('b', 'value')].shape == (2**50,)
  before = snapshot(tmp_path)
  expected = errors.ShapeMismatchError if api in ('restore', 'load_params') else errors.ResourceError
  with pytest.raises(expected) as info:
    if api == 'untargeted':
      orbax_nnx.restore(path)
    elif api == 'handler':
      orbax_nnx.NNXCheckpointHandler().restore(path)
    elif api == 'convert':
      orbax_nnx.convert(path, tmp_path / 'out')
    elif api == 'export':
      orbax_nnx.export_params(path, tmp_path / 'out')
    elif api == 'compare':
      compare(path, other, values=True)
    elif api == 'restore':
      orbax_nnx.restore(path, target(**GOOD_TARGET))
    else:
      orbax_nnx.load_params(path, target(**GOOD_TARGET))
  message = str(info.value)
  assert re.search(r'\bb\b', message) and str(2**50) in message, message
  if expected is errors.ResourceError:
    assert str(path) in message and 'PiB' in message and 'Nothing was allocated' in message
  assert snapshot(tmp_path) == before, 'nothing may be written'


def test_enormous_layer_count_is_not_unrolled(tmp_path):
  path = good(tmp_path)
  forge_shape(path, 'layers.w.value', ENORMOUS)
  facts = inspect_checkpoint(path)  # metadata only: inspecting it is fine
  assert {tuple(leaf['shape']) for leaf in facts['leaves'] if leaf['path'].startswith('layers/w')} == {tuple(ENORMOUS)}
  assert compare(path, path).equal  # stored alike: compared as stored, nothing unrolled
  with pytest.raises(errors.PlanError, match='layers: (unrolling would make 1073741824 layers|the number of stacked'
                     ' layers cannot be told)'):
    orbax_nnx.convert(path, tmp_path / 'out', scan_layers=False)
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('case', ['shape', 'missing', 'extra', 'gaps', 'unequal', 'ambiguous'])
def test_wrong_targets(tmp_path, case):
  if case in ('shape', 'missing', 'extra'):
    path = good(tmp_path)
    tgt = {'shape': target(layers={'w': (4, 7)}, b=(6,)),
           'missing': target(layers={'w': (4, 6)}, b=(6,), c=(2,)),
           'extra': target(layers={'w': (4, 6)})}[case]
    expected = {'shape': errors.ShapeMismatchError, 'missing': errors.StructureMismatchError,
                'extra': errors.StructureMismatchError}[case]
    with pytest.raises(expected) as info:
      orbax_nnx.restore(path, tgt)
    assert {'shape': 'layers/w', 'missing': 'c', 'extra': 'b'}[case] in str(info.value)
    return
  if case == 'gaps':
    path = save(tmp_path / 'c', {'layers_0': {'w': nnx.Param(jnp.ones(2))}, 'layers_2': {'w': nnx.Param(jnp.ones(2))}})
    tgt, expected, words = target(layers={'w': (2, 2)}), errors.LayoutError, 'gaps'
  elif case == 'unequal':
    path = save(tmp_path / 'c', {'layers_0': {'w': nnx.Param(jnp.ones(2))}, 'layers_1': {'w': nnx.Param(jnp.ones(3))}})
    tgt, expected, words = target(layers={'w': (2, 2)}), errors.LayoutError, 'unequal'
  else:
    path = save(tmp_path / 'c', {'layers': {'w': nnx.Variable(jnp.ones((3, 3)))}})
    tgt, expected, words = target(**{f'layers_{i}': {'w': (3,)} for i in range(3)}), errors.PlanError, 'ambiguous'
  with pytest.raises(expected, match=words):
    orbax_nnx.restore(path, tgt, param_scan_axis=7)


@pytest.mark.parametrize('key', ['a/b', '..', '.', ''])
def test_invalid_keys_are_refused_before_writing(tmp_path, key):
  with pytest.raises(errors.OrbaxNNXError, match='not a valid checkpoint key'):
    save(tmp_path / 'c', {key: nnx.Param(jnp.ones(2))})
  assert not (tmp_path / 'c').exists()


def test_odd_but_valid_keys_deep_nesting_zero_size_and_scalars(tmp_path):
  deep = nnx.Param(jnp.arange(3.0))
  for i in range(40):
    deep = {f'level {i}': deep}
  tree = {'schlüssel mit leerzeichen': nnx.Param(jnp.ones((2,))), 'ключ': nnx.Param(jnp.zeros((1, 3))),
          'scalar': nnx.Param(jnp.float32(2.5)), 'deep': deep}
  path = save(tmp_path / 'c', tree)
  out = orbax_nnx.NNXCheckpointHandler().restore(path)
  assert_same_state(out, nnx.State(tree))


def test_zero_size_arrays_are_refused_before_writing(tmp_path):
  with pytest.raises(errors.OrbaxNNXError, match="'empty'.*zero size"):
    save(tmp_path / 'c', {'empty': nnx.Param(jnp.zeros((0, 3))), 'w': nnx.Param(jnp.ones(2))})
  assert not (tmp_path / 'c').exists()


PERMISSION_CHILD = """
import json, sys
import orbax_nnx
from orbax_nnx import errors
path, out, api = sys.argv[1:]
try:
  if api == 'restore':
    orbax_nnx.restore(path)
  elif api == 'detect':
    orbax_nnx.detect_layout(path)
  else:
    orbax_nnx.convert(path, out)
  print(json.dumps({'error': None}))
except errors.OrbaxNNXError as e:
  print(json.dumps({'error': type(e).__name__, 'message': str(e)}))
"""


# Root ignores file modes; this launcher drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its
# capability bounding set (PR_CAPBSET_DROP = 24), then execs the child, which obeys them.
DROP_DAC_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):
  if libc.prctl(24, cap, 0, 0, 0) != 0:
    sys.exit(77)  # not allowed here (no CAP_SETPCAP): the test skips
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize('what', ['item-dir', 'data-dir'])
@pytest.mark.parametrize('api', ['restore', 'detect', 'convert'])
def test_permission_denied(tmp_path, what, api):
  path = good(tmp_path)
  locked = path if what == 'item-dir' else path / 'd'  # d: the OCDBT b-tree and array data
  os.chmod(locked, 0)
  try:
    before = snapshot(tmp_path)
    launcher = [sys.executable, '-c', DROP_DAC_AND_EXEC] if os.geteuid() == 0 else []
    child = subprocess.run(launcher + [sys.executable, '-c', PERMISSION_CHILD, str(path), str(tmp_path / 'out'), api],
                           capture_output=True, text=True, timeout=120)
  finally:
    os.chmod(locked, 0o755)
  if launcher and child.returncode == 77:
    pytest.skip('root here cannot drop CAP_DAC_OVERRIDE, so file modes cannot be tested')
  assert child.returncode == 0, child.stderr[-3000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  assert report['error'] in ('NotACheckpointError', 'CorruptCheckpointError'), report
  assert str(path) in report['message'] and 'ermission' in report['message'], report
  assert snapshot(tmp_path) == before, 'nothing may be written'


def test_no_pickle_eval_or_exec_in_the_package():
  root = pathlib.Path(orbax_nnx.__file__).parent
  for source in root.glob('*.py'):
    text = source.read_text()
    for word in ('import pickle', 'pickle.load', 'eval(', 'exec(', 'marshal.', '__import__('):
      assert word not in text, f'{source.name} uses {word}'
