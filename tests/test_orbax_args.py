"""Every Orbax argument honoured on NNX items (or refused by name), optax containers, Orbax step
naming, option validation, and an error taxonomy that tells the truth."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import assert_same_state, data_only, host

import orbax_nnx
from orbax_nnx import errors

SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def sds(shape, dtype=jnp.float32, sharding=SINGLE):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def save(path, item, args_type=ocp.args.StandardSave, **kwargs):
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(path, args=args_type(item, **kwargs))
  return path


def restore(path, args):
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    return ckptr.restore(path, args=args)


def small_state():
  return nnx.State({'emb': nnx.Param(jnp.arange(12.0).reshape(4, 3)), 'b': nnx.Param(jnp.ones(3))})


def test_standard_restore_strict_false_pads_like_orbax(tmp_path):
  path = save(tmp_path / 'c', small_state())
  grown = nnx.State({'emb': nnx.Param(sds((6, 3))), 'b': nnx.Param(sds((3,)))})
  with pytest.raises(errors.ShapeMismatchError):
    restore(path, ocp.args.StandardRestore(grown))
  out = restore(path, ocp.args.StandardRestore(grown, strict=False))
  stock = ocp.StandardCheckpointer().restore(path, {'emb': {'value': sds((6, 3))}, 'b': {'value': sds((3,))}},
                                             strict=False)
  assert isinstance(out['emb'], nnx.Param) and out['emb'].get_value().shape == (6, 3)
  np.testing.assert_array_equal(host(out['emb']), np.asarray(stock['emb']['value']))
  np.testing.assert_array_equal(host(out['emb'])[:4], np.arange(12.0).reshape(4, 3))


def test_pytree_restore_args_are_used_per_leaf(tmp_path):
  path = save(tmp_path / 'c', small_state())
  target = nnx.State({'emb': nnx.Param(sds((4, 3))), 'b': nnx.Param(sds((3,)))})
  restore_args = nnx.State({'emb': nnx.Param(ocp.ArrayRestoreArgs(sharding=SINGLE, dtype=jnp.bfloat16)),
                            'b': nnx.Param(ocp.ArrayRestoreArgs(sharding=SINGLE))})
  out = restore(path, ocp.args.PyTreeRestore(target, restore_args=restore_args))
  assert out['emb'].get_value().dtype == jnp.bfloat16 and out['b'].get_value().dtype == jnp.float32
  np.testing.assert_array_equal(host(out['emb']).astype(np.float32), np.arange(12.0).reshape(4, 3))


def test_pytree_restore_transforms_are_refused_by_name(tmp_path):
  path = save(tmp_path / 'c', small_state())
  target = nnx.State({'emb': nnx.Param(sds((4, 3))), 'b': nnx.Param(sds((3,)))})
  with pytest.raises(errors.UnsupportedArgumentError, match=r'transforms=.*rules='):
    restore(path, ocp.args.PyTreeRestore(target, transforms={r'(.*)': ocp.Transform(original_key='emb')}))


def test_orbax_older_checkpointer_calls_restore_as_pytree_restore(tmp_path):
  """`ocp.Checkpointer(handler)`'s older calls build `NNXSave(tree)` / `NNXRestore(item=..., restore_args=...,
  transforms=...)` (MaxText's `load_params_from_path`): a plain tree is saved and restored exactly as Orbax's
  PyTree handler does it, and an empty `transforms` restores only what the item names, from NNX items too."""
  tree = {'params': {'w': np.arange(6.0).reshape(2, 3)}, 'opt': {'mu': np.ones(3, np.float32)}, 'step': 3}
  for name, handler in (('ours', orbax_nnx.NNXCheckpointHandler()), ('orbax', ocp.PyTreeCheckpointHandler())):
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(tmp_path / name, tree)
  meta = json.loads((tmp_path / 'ours' / '_CHECKPOINT_METADATA').read_text())
  assert meta['item_handlers'] == ocp.PyTreeCheckpointHandler.typestr()
  item = {'params': {'w': sds((2, 3), jnp.float64)}}
  restore_args = {'params': ocp.checkpoint_utils.construct_restore_args(item['params'])}
  outs = {}
  for name, handler in (('ours', orbax_nnx.NNXCheckpointHandler()), ('orbax', ocp.PyTreeCheckpointHandler())):
    with ocp.Checkpointer(handler) as ckptr:
      outs[name] = (ckptr.restore(tmp_path / name), ckptr.restore(tmp_path / name, item=item, transforms={},
                                                                   restore_args=restore_args))
  summary = lambda tree: jax.tree.map(lambda x: (type(x).__name__, np.asarray(x).dtype.name, np.asarray(x).tolist()), tree)  # noqa: E731
  assert summary(outs['ours']) == summary(outs['orbax'])
  assert set(outs['ours'][1]) == {'params'}
  path = save(tmp_path / 'nnx', small_state())
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, item=nnx.State({'emb': nnx.Param(sds((4, 3)))}), transforms={})
  np.testing.assert_array_equal(host(out['emb']), np.arange(12.0).reshape(4, 3))
  with pytest.raises(errors.OptionError, match='rules'):
    orbax_nnx.NNXRestore(item=item, rules=[('a', 'b')])


def test_partial_restore_and_placeholders(tmp_path):
  path = save(tmp_path / 'c', small_state())
  only_emb = nnx.State({'emb': nnx.Param(sds((4, 3)))})
  with pytest.raises(errors.StructureMismatchError, match='b/value'):
    restore(path, ocp.args.PyTreeRestore(only_emb))
  out = restore(path, ocp.args.PyTreeRestore(only_emb, partial_restore=True))
  np.testing.assert_array_equal(host(out['emb']), np.arange(12.0).reshape(4, 3))
  with_placeholder = nnx.State({'emb': nnx.Param(sds((4, 3))), 'b': nnx.Param(ocp.PLACEHOLDER)})
  for args in (ocp.args.StandardRestore(with_placeholder), orbax_nnx.NNXRestore(with_placeholder)):
    out = restore(path, args)
    assert out['b'].get_value() is ocp.PLACEHOLDER
    np.testing.assert_array_equal(host(out['emb']), np.arange(12.0).reshape(4, 3))


def test_support_layout_is_honoured_or_refused(tmp_path):
  path = save(tmp_path / 'c', small_state())
  target = nnx.State({'emb': nnx.Param(sds((4, 3))), 'b': nnx.Param(sds((3,)))})
  out = restore(path, ocp.args.StandardRestore(target, support_layout=True))
  assert_same_state(out, small_state())
  with pytest.raises(errors.UnsupportedArgumentError, match='support_layout=True'):
    orbax_nnx.restore(path, {'emb': sds((4, 3)), 'x': {'b': sds((3,))}}, support_layout=True, rules=[('b', 'x/b')])


def test_save_args_and_ocdbt_file_size_reach_orbax(tmp_path):
  keys = jax.random.split(jax.random.key(0), 4)  # random: compression must not hide the file size limit
  state = nnx.State({f'w{i}': nnx.Param(jax.random.normal(keys[i], (64, 64))) for i in range(4)})
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), state)
  save_args['w0'] = nnx.Param(ocp.SaveArgs(dtype=jnp.dtype(jnp.bfloat16)))
  path = save(tmp_path / 'a', state, save_args=save_args)
  meta = orbax_nnx.read_item_metadata(path)
  assert meta.leaves[('w0', 'value')].dtype == jnp.bfloat16 and meta.leaves[('w1', 'value')].dtype == jnp.float32

  def data_sizes(p):
    return [f.stat().st_size for f in p.rglob('*') if f.is_file() and f.parent.name == 'd']
  array_bytes = 64 * 64 * 4
  default = save(tmp_path / 'b', state, ocp.args.PyTreeSave)
  small = save(tmp_path / 'c', state, ocp.args.PyTreeSave, ocdbt_target_data_file_size=4096)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:  # stock Orbax, same bytes, same option
    ckptr.save(tmp_path / 'stock', args=ocp.args.PyTreeSave(nnx.to_pure_dict(nnx.State(
        {k: {'value': v} for k, v in nnx.to_pure_dict(state).items()})), ocdbt_target_data_file_size=4096))
  # How many files OCDBT writes depends on when its writes flush; whether a file holds a whole array does not.
  whole = 0.75 * array_bytes  # one array, compressed
  assert max(data_sizes(default)) > whole
  assert max(data_sizes(small)) < whole and max(data_sizes(tmp_path / 'stock')) < whole
  assert sum(data_sizes(small)) > 4 * array_bytes * 0.9
  out = orbax_nnx.restore(small, jax.tree.map(lambda x: sds(x.shape), state))
  assert_same_state(out, state)


def test_save_args_for_paths_not_in_the_item_are_refused(tmp_path):
  with pytest.raises(errors.StructureMismatchError, match='nope'):
    save(tmp_path / 'c', small_state(), save_args={'nope': ocp.SaveArgs()})
  assert not (tmp_path / 'c').exists()


class Small(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(2, 3, rngs=rngs)
    self.b = nnx.Linear(3, 2, rngs=rngs)


def mask(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


OPTAX = {
    'masked': lambda: optax.masked(optax.adam(1e-3), mask),
    'multi_transform': lambda: optax.multi_transform(
        {'train': optax.adam(1e-3), 'freeze': optax.set_to_zero()},
        lambda params: jax.tree.map(lambda x: 'train' if x.ndim > 1 else 'freeze', params)),
    'inject_hyperparams': lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    'multi_steps': lambda: optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2),
    'chain_with_empty_state': lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
}


@pytest.mark.parametrize('name', sorted(OPTAX))
def test_optax_containers_restore_into_nnx(tmp_path, name):
  model = Small(nnx.Rngs(0))
  opt = nnx.Optimizer(model, OPTAX[name](), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  opt.update(model, grads)
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(2, args=ocp.args.Composite(optimizer=ocp.args.StandardSave(nnx.state(opt))))
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Optimizer(Small(nnx.Rngs(1)), OPTAX[name](), wrt=nnx.Param)))
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    out = mngr.restore(2, args=ocp.args.Composite(optimizer=ocp.args.StandardRestore(abstract))).optimizer
    fresh = mngr.restore(2).optimizer
  assert_same_state(out, nnx.state(opt))
  assert_same_state(fresh, data_only(nnx.state(opt)))  # no target: empty nodes have nothing stored
  live = nnx.Optimizer(Small(nnx.Rngs(7)), OPTAX[name](), wrt=nnx.Param)
  orbax_nnx.restore(tmp_path, live)
  assert_same_state(nnx.state(live), nnx.state(opt))


@pytest.mark.parametrize('options', [{'step_format_fixed_length': 8}, {'step_prefix': 'ckpt'},
                                     {'step_prefix': 'ckpt', 'step_format_fixed_length': 5}])
def test_manager_step_naming_options(tmp_path, options):
  state = small_state()
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry,
                             options=ocp.CheckpointManagerOptions(**options)) as mngr:
    for step in (3, 12):
      mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(
          jax.tree.map(lambda x: x + step, state))))
  target = jax.tree.map(lambda x: sds(x.shape), state)
  latest = orbax_nnx.restore(tmp_path, target)
  np.testing.assert_array_equal(host(latest['b']), np.full(3, 13.0))
  third = orbax_nnx.restore(tmp_path, target, step=3)
  np.testing.assert_array_equal(host(third['b']), np.full(3, 4.0))
  loaded = orbax_nnx.load_params(tmp_path, target, step=3, dtype=jnp.bfloat16)
  assert loaded['emb'].get_value().dtype == jnp.bfloat16
  report = orbax_nnx.convert(tmp_path, tmp_path.parent / f'{tmp_path.name}-out', step=12, flavour='pure')
  assert report.leaves == 2
  with pytest.raises(errors.NotACheckpointError, match='no step 5'):
    orbax_nnx.restore(tmp_path, target, step=5)
  from orbax_nnx import cli
  assert cli.main(['inspect', str(tmp_path), '--step', '3']) == 0


@pytest.mark.parametrize('call', [
    lambda p, t: orbax_nnx.NNXSave({'w': nnx.Param(jnp.ones(2))}, flavour='RAW'),
    lambda p, t: orbax_nnx.NNXRestore(t, extra='ingore'),
    lambda p, t: orbax_nnx.NNXRestore(t, missing='Keep'),
    lambda p, t: orbax_nnx.restore(p, t, extra='ingore'),
    lambda p, t: orbax_nnx.restore(p, t, step='3'),
    lambda p, t: orbax_nnx.convert(p, p.parent / 'out', to='NNX'),
    lambda p, t: orbax_nnx.convert(p, p.parent / 'out', flavour='Pure'),
    lambda p, t: orbax_nnx.convert(p, p.parent / 'out', include='param'),
    lambda p, t: orbax_nnx.export_params(p, p.parent / 'out', format='torch'),
    lambda p, t: orbax_nnx.load_params(p, t, param_scan_axis='1'),
], ids=['flavour', 'extra', 'missing', 'restore-extra', 'step', 'to', 'convert-flavour', 'include', 'export-format',
        'param_scan_axis'])
def test_unknown_option_values_are_refused(tmp_path, call):
  path = save(tmp_path / 'c', small_state())
  target = jax.tree.map(lambda x: sds(x.shape), small_state())
  with pytest.raises(errors.OptionError) as info:
    call(path, target)
  assert 'use one of' in str(info.value) or 'must be' in str(info.value) or 'use a' in str(info.value)
  assert not (tmp_path / 'out').exists()


def test_indivisible_sharding_is_a_sharding_error_not_corruption(tmp_path):
  path = save(tmp_path / 'c', small_state())
  mesh = jax.make_mesh((8,), ('x',))
  bad = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))  # 8 does not divide 3
  target = nnx.State({'emb': nnx.Param(sds((4, 3))), 'b': nnx.Param(sds((3,), sharding=bad))})
  with pytest.raises(errors.ShardingError) as info:
    orbax_nnx.restore(path, target)
  assert 'b' in str(info.value) and '(3,)' in str(info.value) and 'divide' in str(info.value)
  with pytest.raises(errors.ShardingError):  # the planned path too
    orbax_nnx.restore(path, nnx.to_pure_dict(target) | {'b': sds((3,), sharding=bad)})


def test_target_sharing_no_path_is_a_structure_error(tmp_path):
  path = save(tmp_path / 'c', small_state())
  target = nnx.State({'other': nnx.Param(jnp.zeros(3))})
  with pytest.raises(errors.StructureMismatchError, match='nothing would be restored'):
    orbax_nnx.restore(path, target, missing='keep', extra='ignore')


def test_damaged_data_is_corrupt_and_says_so(tmp_path):
  path = save(tmp_path / 'c', small_state())
  for f in path.rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:10])
  target = jax.tree.map(lambda x: sds(x.shape), small_state())
  with pytest.raises(errors.CorruptCheckpointError, match=str(path)):
    orbax_nnx.restore(path, target)


def test_error_classes_form_one_taxonomy():
  for cls in (errors.OptionError, errors.UnsupportedArgumentError, errors.RestoreError, errors.ShardingError,
              errors.CorruptCheckpointError, errors.NotACheckpointError, errors.StructureMismatchError):
    assert issubclass(cls, errors.OrbaxNNXError)
  assert not issubclass(errors.RestoreError, errors.CorruptCheckpointError)


class LinenSmall:
  """The Linen twin of `Small` (same parameter names and shapes)."""

  @staticmethod
  def init():
    from flax import linen as nn

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(2, name='b')(nn.Dense(3, name='a')(x))
    return Net().init(jax.random.key(0), jnp.ones((1, 2)))['params']


@pytest.mark.parametrize('name', sorted(OPTAX))
def test_optax_containers_restore_from_linen_train_state(tmp_path, name):
  from flax.training import train_state
  state = train_state.TrainState.create(apply_fn=None, params=LinenSmall.init(), tx=OPTAX[name]())
  for i in range(2):
    state = state.apply_gradients(grads=jax.tree.map(lambda p: jnp.full_like(p, 0.5 + i), state.params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'linen', state)
  stock = ocp.StandardCheckpointer().restore(tmp_path / 'linen')  # the stored tree, as Orbax reads it
  abstract = nnx.eval_shape(lambda: (lambda m: {'model': m, 'optimizer': nnx.Optimizer(m, OPTAX[name](),
                                                                                      wrt=nnx.Param)})(Small(nnx.Rngs(0))))
  out = orbax_nnx.restore(tmp_path / 'linen', {k: nnx.state(v) for k, v in abstract.items()})
  checked = 0
  for path, var in nnx.to_flat_state(out['optimizer']['opt_state']):
    if isinstance(var.get_value(), optax.MaskedNode):
      continue  # nothing stored: the target's own empty node comes back
    stored = stock['opt_state']
    for key in path:
      stored = stored[str(key)] if isinstance(stored, dict) else stored[int(key)]
    np.testing.assert_array_equal(host(var), np.asarray(stored), err_msg=str(path))
    checked += 1
  assert checked >= 3
  for path, var in nnx.to_flat_state(out['model']):
    np.testing.assert_array_equal(host(var), np.asarray(stock['params'][path[0]][path[1]]))
  assert int(out['optimizer']['step'].get_value()) == 2
