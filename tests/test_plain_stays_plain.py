"""Plain stays plain: through `nnx_registry`, a tree with no NNX object in it is saved and restored
exactly as Orbax's stock handlers do it (types, dtypes, values, on-disk handler typestr), checked
differentially against plain Orbax on random trees."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orbax_nnx
from orbax_nnx import compat

NUMPY_DTYPES = [np.int64, np.float64, np.int8, np.uint32, np.float16, np.bool_, ml_dtypes.bfloat16, np.int32]
JAX_DTYPES = [jnp.float32, jnp.int32, jnp.bfloat16, jnp.uint8]
KEYS = st.sampled_from(['value', 'a', 'kernel', 'step', 'mu', 'b_2', 'x'])


@st.composite
def leaves(draw):
  kind = draw(st.sampled_from(['numpy', 'jax', 'scalar', 'npscalar', 'str', 'big']))
  shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  if kind == 'numpy':
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    return (np.arange(int(np.prod(shape))) % 7 + 1).astype(dtype).reshape(shape)
  if kind == 'jax':
    dtype = draw(st.sampled_from(JAX_DTYPES))
    return (jnp.arange(int(np.prod(shape))) % 5).astype(dtype).reshape(shape)
  if kind == 'scalar':
    return draw(st.sampled_from([3, 2.5, True, -7]))
  if kind == 'npscalar':
    return draw(st.sampled_from([np.float64(1.5), np.int64(3_000_000_000), np.float32(0.25)]))
  if kind == 'str':
    return draw(st.sampled_from(['hello', 'ünïcode']))
  return np.array([3_000_000_000, -2**40], np.int64)  # narrowed to int32 if made a jax array


def trees():
  return st.recursive(
      leaves(),
      lambda children: st.one_of(st.dictionaries(KEYS, children, min_size=1, max_size=3),
                                 st.lists(children, min_size=1, max_size=2)),
      max_leaves=6,
  ).filter(lambda t: isinstance(t, (dict, list)))


def same(actual, expected, where='') -> None:
  """Exactly the same: container types, leaf types, dtypes, shapes and values."""
  assert type(actual) is type(expected), (where, type(actual), type(expected))
  if isinstance(expected, dict):
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected), (where, list(actual), list(expected))
    for k in expected:
      same(actual[k], expected[k], f'{where}/{k}')
  elif isinstance(expected, (list, tuple)):
    assert len(actual) == len(expected), where
    for i, (a, e) in enumerate(zip(actual, expected)):
      same(a, e, f'{where}/{i}')
  elif isinstance(expected, (np.ndarray, jax.Array, np.generic)):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (where, actual, expected)
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=where)
  else:
    assert actual == expected, (where, actual, expected)


def refused(path, handler, tree, save_kind):
  """What a synchronous save raises (None if it saves); a refused async save would leave Orbax threads."""
  args = ocp.args.StandardSave(tree) if save_kind == 'standard' else ocp.args.PyTreeSave(tree)
  with ocp.Checkpointer(handler) as ckptr:
    try:
      ckptr.save(path, args=args)
    except Exception as e:  # compared with what stock Orbax raises
      return e
  return None


def save_with(root, registry, tree, save_kind):
  args = ocp.args.StandardSave(tree) if save_kind == 'standard' else ocp.args.PyTreeSave(tree)
  options = {} if registry is None else {'handler_registry': registry}
  with ocp.CheckpointManager(root, **options) as mngr:
    mngr.save(0, args=ocp.args.Composite(item=args))


def restore_with(root, registry, tree, restore_kind):
  options = {} if registry is None else {'handler_registry': registry}
  with ocp.CheckpointManager(root, **options) as mngr:
    if restore_kind == 'none':
      return mngr.restore(0).item
    args = {'standard': lambda: ocp.args.StandardRestore(),
            'pytree': lambda: ocp.args.PyTreeRestore(),
            'standard-item': lambda: ocp.args.StandardRestore(tree),
            'pytree-item': lambda: ocp.args.PyTreeRestore(tree)}[restore_kind]()
    return mngr.restore(0, args=ocp.args.Composite(item=args)).item


SAVED, REFUSED = [], []


@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tree=trees(), save_kind=st.sampled_from(['standard', 'pytree']))
def test_plain_trees_are_exactly_orbax(tmp_path_factory, tree, save_kind):
  ours_dir = tmp_path_factory.mktemp('ours')
  stock_dir = tmp_path_factory.mktemp('stock')
  stock_handler = ocp.StandardCheckpointHandler() if save_kind == 'standard' else ocp.PyTreeCheckpointHandler()
  stock_error = refused(ours_dir / 'probe-stock', stock_handler, tree, save_kind)
  ours_error = refused(ours_dir / 'probe-ours', orbax_nnx.NNXCheckpointHandler(), tree, save_kind)
  if stock_error is not None or ours_error is not None:  # e.g. StandardSave refuses str leaves: so do we
    assert type(ours_error) is type(stock_error) and str(ours_error) == str(stock_error), (ours_error, stock_error)
    REFUSED.append(save_kind)
    return
  SAVED.append(save_kind)
  save_with(stock_dir, None, tree, save_kind)
  save_with(ours_dir, orbax_nnx.nnx_registry, tree, save_kind)
  on_disk = lambda d: json.loads((d / '0' / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  assert on_disk(ours_dir) == on_disk(stock_dir)  # the stock handler's typestr, not ours
  kinds = ['none', 'standard-item', 'pytree-item'] + (['standard'] if save_kind == 'standard' else ['pytree'])
  for kind in kinds:
    expected = outcome(restore_with, stock_dir, None, tree, kind)
    for where, root, registry in (('ours', ours_dir, orbax_nnx.nnx_registry), ('plain reads ours', ours_dir, None),
                                  ('ours reads plain', stock_dir, orbax_nnx.nnx_registry)):
      actual = outcome(restore_with, root, registry, tree, kind)
      if isinstance(expected, BaseException):  # stock Orbax refuses this restore: so do we, the same way
        assert type(actual) is type(expected) and str(actual) == str(expected), (where, kind, actual, expected)
      else:
        same(actual, expected, f'{where}:{kind}')


def outcome(fn, *args):
  try:
    return fn(*args)
  except Exception as e:  # compared with what stock Orbax raises
    return e


def test_the_differential_test_saved_both_ways():
  # hypothesis above must mostly draw trees Orbax accepts, or it would test nothing
  assert SAVED.count('standard') >= 2 and SAVED.count('pytree') >= 2, (SAVED, REFUSED)


def test_int64_is_not_narrowed_and_value_keys_stay_keys(tmp_path):
  tree = {'pos': np.array([3_000_000_000], np.int64), 'value': {'value': np.float64(1.5)}}
  save_with(tmp_path, orbax_nnx.nnx_registry, tree, 'standard')
  out = restore_with(tmp_path, orbax_nnx.nnx_registry, tree, 'none')
  assert type(out) is dict and type(out['value']) is dict
  assert out['pos'].dtype == np.int64 and int(out['pos'][0]) == 3_000_000_000
  assert out['value']['value'] == 1.5


FRESH_PLAIN_ORBAX = """
import json, sys
import numpy as np, orbax.checkpoint as ocp
assert 'orbax_nnx' not in sys.modules
with ocp.CheckpointManager(sys.argv[1]) as mngr:
  out = mngr.restore(0)
print(json.dumps({k: {n: [str(v.dtype), np.asarray(v).tolist()] for n, v in item.items()} for k, item in out.items()}))
"""


def test_plain_orbax_without_orbax_nnx_restores_plain_items_with_no_args(tmp_path):
  tree = {'pos': np.array([3_000_000_000], np.int64), 'w': np.ones((2, 2), np.float32)}
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(0, args=ocp.args.Composite(a=ocp.args.StandardSave(tree), b=ocp.args.PyTreeSave(tree)))
  child = subprocess.run([sys.executable, '-c', FRESH_PLAIN_ORBAX, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
  assert child.returncode == 0, child.stderr[-3000:]
  out = json.loads(child.stdout.strip().splitlines()[-1])
  for item in ('a', 'b'):
    assert out[item] == {'pos': ['int64', [3_000_000_000]], 'w': ['float32', [[1.0, 1.0], [1.0, 1.0]]]}


def test_no_false_could_not_be_restored_warnings(tmp_path, caplog):
  from flax import nnx
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(0, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.State({'w': nnx.Param(jnp.ones(2))})),
                                         plain=ocp.args.StandardSave({'x': np.ones(2)})))
  caplog.set_level('WARNING')
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    out = mngr.restore(0)
  assert isinstance(out.model['w'], nnx.Param) and type(out.plain['x']) is np.ndarray
  assert not [r for r in caplog.records if 'could not be restored' in r.getMessage()]
  # without our registry the warning is Orbax's own business: we leave it alone
  caplog.clear()
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.restore(0)
  assert [r for r in caplog.records if 'could not be restored' in r.getMessage()]


SCRIPT_TYPESTRS = textwrap.dedent("""
    import json, sys
    print(json.dumps(json.loads(open(sys.argv[1]).read())['item_handlers']))
""")


def test_nnx_items_record_our_typestr_plain_items_the_stock_one(tmp_path):
  from flax import nnx
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(0, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.State({'w': nnx.Param(jnp.ones(2))})),
        ours=orbax_nnx.NNXSave({'w': nnx.Param(jnp.ones(2))}),
        plain=ocp.args.StandardSave({'x': np.ones(2)}),
        tree=ocp.args.PyTreeSave({'x': np.ones(2)})))
  handlers = json.loads((tmp_path / '0' / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  assert handlers == {'model': 'orbax_nnx.NNXCheckpointHandler', 'ours': 'orbax_nnx.NNXCheckpointHandler',
                      'plain': ocp.StandardCheckpointHandler.typestr(),
                      'tree': ocp.PyTreeCheckpointHandler.typestr()}
  assert orbax_nnx.NNXCheckpointHandler.typestr() == 'orbax_nnx.NNXCheckpointHandler'


def test_pytree_handler_options_are_honoured_and_unknown_ones_named(tmp_path):
  """The handler drops in for `ocp.PyTreeCheckpointHandler` too: its own options (zarr3, a local TypeHandler
  registry, compression) reach the PyTree handler every save and restore goes through."""
  registry = copy.deepcopy(compat.global_type_handler_registry())
  tree = {'a': np.arange(6, dtype=np.int32).reshape(2, 3), 'b': {'c': jnp.ones(4, jnp.bfloat16)}}
  for name, cls in (('ours', orbax_nnx.NNXCheckpointHandler), ('orbax', ocp.PyTreeCheckpointHandler)):
    handler = cls(use_ocdbt=False, use_zarr3=True, use_compression=False, type_handler_registry=registry)
    handler.save(epath.Path(tmp_path / name), args=ocp.args.PyTreeSave(tree))
    handler.finalize(epath.Path(tmp_path / name))
    assert (tmp_path / name / 'a' / 'zarr.json').exists()  # zarr3, not zarr2's .zarray
    codecs = json.loads((tmp_path / name / 'a' / 'zarr.json').read_text())['codecs']
    assert not any(c['name'] in ('zstd', 'gzip', 'blosc') for c in codecs), codecs
  ours = orbax_nnx.NNXCheckpointHandler(use_zarr3=True).restore(tmp_path / 'ours')
  stock = ocp.PyTreeCheckpointHandler(use_zarr3=True).restore(tmp_path / 'orbax')
  assert jax.tree.map(lambda x: (type(x), x.dtype, np.asarray(x).tolist()), ours) == jax.tree.map(
      lambda x: (type(x), x.dtype, np.asarray(x).tolist()), stock)
  with pytest.raises(TypeError, match='use_zar3'):
    orbax_nnx.NNXCheckpointHandler(use_zar3=True)


def test_older_orbax_items_without_metadata_restore_as_orbax_restores_them(tmp_path):
  """An item in Orbax's older format (no `_METADATA`, the tree in the aggregate msgpack file) is plain: restored
  by Orbax's own handler, untouched."""
  from flax import serialization
  tree = {'a': 1, 'b': 2.5, 'c': {'d': np.arange(3)}}
  (tmp_path / 'checkpoint').write_bytes(serialization.msgpack_serialize(tree))
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=type(x)), tree)
  stock = ocp.PyTreeCheckpointHandler().restore(tmp_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  ours = orbax_nnx.NNXCheckpointHandler().restore(tmp_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  assert jax.tree.map(lambda x: (type(x), np.asarray(x).tolist()), ours) == jax.tree.map(
      lambda x: (type(x), np.asarray(x).tolist()), stock)
  assert ours['a'] == 1 and np.asarray(ours['c']['d']).tolist() == [0, 1, 2]


@pytest.mark.parametrize('use_ocdbt', [False, True])
def test_a_lost_file_is_corrupt_and_file_not_found(tmp_path, use_ocdbt):
  """A stored file that is gone: `CorruptCheckpointError` naming the item, and also a `FileNotFoundError`, as
  Orbax's own restore raises for a lost `.zarray`, so code written against Orbax keeps catching it."""
  tree = {'a': np.arange(8.0), 'b': np.ones(3, np.int32)}
  handler = orbax_nnx.NNXCheckpointHandler(use_ocdbt=use_ocdbt)
  handler.save(tmp_path / 'item', args=ocp.args.PyTreeSave(tree))
  handler.finalize(tmp_path / 'item')
  lost = sorted((tmp_path / 'item' / 'd').glob('*')) if use_ocdbt else [tmp_path / 'item' / 'a' / '.zarray']
  assert lost
  for file in lost:
    file.unlink()
  if not use_ocdbt:
    with pytest.raises(FileNotFoundError):
      ocp.PyTreeCheckpointHandler(use_ocdbt=False).restore(tmp_path / 'item')
  with pytest.raises(orbax_nnx.errors.CorruptCheckpointError, match='item') as raised:
    orbax_nnx.NNXCheckpointHandler(use_ocdbt=use_ocdbt).restore(tmp_path / 'item')
  assert isinstance(raised.value, FileNotFoundError)


@pytest.mark.parametrize('lost', ['_sharding', 'array_metadatas', '_CHECKPOINT_METADATA', 'manifest.ocdbt', 'd'])
def test_items_missing_a_file_restore_or_fail_as_orbax_does(tmp_path, lost):
  """Orbax's own compatibility cases: an item that lost a file Orbax can do without restores as Orbax's handler
  restores it (the same types); one that lost its data fails where Orbax fails, with a typed error that is
  still the exception family Orbax raises."""
  import shutil
  tree = {'a': jnp.arange(8, dtype=jnp.int32), 'b': {'c': np.ones(3, np.float32)}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'item', tree)
  gone = tmp_path / 'item' / lost
  shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
  outcomes = []
  for handler in (ocp.StandardCheckpointHandler(), orbax_nnx.NNXCheckpointHandler()):
    try:
      out = handler.restore(epath.Path(tmp_path / 'item'))
      outcomes.append(jax.tree.map(lambda x: (type(x).__name__, np.asarray(x).tolist()), out))
    except Exception as e:  # noqa: BLE001  (compared below)
      outcomes.append(e)
  stock, ours = outcomes
  if not isinstance(stock, Exception):
    assert ours == stock
  else:
    assert isinstance(ours, orbax_nnx.errors.OrbaxNNXError), ours
    assert isinstance(ours, type(stock)), (stock, ours)
    assert 'item' in str(ours)
