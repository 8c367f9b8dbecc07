"""No silent reinterpretation: layer groups only under layer-group names, no axis moves outside
stacked groups, and policies on every restore-like call."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.mapping.groups import DEFAULT_GROUPS

SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def sds(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=SINGLE)


def save(path, tree):
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(path, args=orbax_nnx.NNXSave(tree))
  return path


@pytest.mark.parametrize('name, expected', [
    ('layers', True), ('layer', True), ('blocks', True), ('h', True), ('moe_layers', True),
    ('dense_layers', True), ('encoder_blocks', True), ('Dense', False), ('Conv', False), ('MLP', False),
    ('layers_remainder', False), ('heads', False)])
def test_group_names(name, expected):
  assert DEFAULT_GROUPS.is_group(name) is expected


def test_permuted_target_shape_is_an_error_not_a_transpose(tmp_path):
  w = jnp.arange(6.0).reshape(2, 3)
  path = save(tmp_path / 'c', {'dense': {'kernel': nnx.Param(w)}})
  target = nnx.State({'dense': {'kernel': nnx.Param(sds((3, 2)))}})
  with pytest.raises(errors.ShapeMismatchError) as info:
    orbax_nnx.restore(path, target)
  assert info.value.stored == (2, 3) and info.value.requested == (3, 2)
  with pytest.raises(errors.ShapeMismatchError):  # the planned path too (other flavour)
    orbax_nnx.restore(path, {'dense': {'kernel': sds((3, 2))}})


def test_auto_named_linen_modules_are_never_layers(tmp_path):
  linen = {'step': np.int32(1), 'params': {'Dense_0': {'kernel': np.ones((4, 4), np.float32)},
                                           'Dense_1': {'kernel': np.full((4, 4), 2.0, np.float32)}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'linen', linen)
  layout = orbax_nnx.detect_layout(tmp_path / 'linen')
  assert layout.groups == ()
  report = orbax_nnx.convert(tmp_path / 'linen', tmp_path / 'nnx', scan_layers=True)
  meta = orbax_nnx.read_item_metadata(tmp_path / 'nnx')
  kernels = sorted('/'.join(p) for p in meta.leaves if 'kernel' in p)
  assert kernels == ['model/Dense_0/kernel/value', 'model/Dense_1/kernel/value'], kernels
  assert report.leaves == 3
  target = nnx.State({'Dense_0': {'kernel': nnx.Param(sds((4, 4)))}, 'Dense_1': {'kernel': nnx.Param(sds((4, 4)))}})
  out = orbax_nnx.load_params(tmp_path / 'linen', target)
  np.testing.assert_array_equal(host(out['Dense_1']['kernel']), np.full((4, 4), 2.0))


def test_real_layer_groups_still_stack_and_unroll(tmp_path):
  tree = {f'layers_{i}': {'w': nnx.Param(jnp.full((2, 3), float(i)))} for i in range(3)}
  path = save(tmp_path / 'c', tree)
  out = orbax_nnx.restore(path, nnx.State({'layers': {'w': nnx.Param(sds((3, 2, 3)))}}))
  np.testing.assert_array_equal(host(out['layers']['w'])[:, 0, 0], [0.0, 1.0, 2.0])


def test_load_params_takes_missing_and_extra_policies(tmp_path):
  path = save(tmp_path / 'c', {'a': nnx.Param(jnp.ones(2)), 'b': nnx.Param(jnp.ones(3))})
  target = nnx.State({'a': nnx.Param(jnp.zeros(2)), 'c': nnx.Param(jnp.zeros(4))})
  with pytest.raises(errors.StructureMismatchError, match='c'):
    orbax_nnx.load_params(path, target)
  out = orbax_nnx.load_params(path, target, missing='keep')
  np.testing.assert_array_equal(host(out['a']), np.ones(2))
  np.testing.assert_array_equal(host(out['c']), np.zeros(4))
  with pytest.raises(errors.StructureMismatchError, match='b'):
    orbax_nnx.load_params(path, nnx.State({'a': nnx.Param(sds((2,)))}), extra='error')
  with pytest.raises(errors.OptionError):
    orbax_nnx.load_params(path, target, missing='maybe')


def test_a_rule_that_matches_nothing_is_reported(tmp_path):
  path = save(tmp_path / 'c', {'a': nnx.Param(jnp.ones(2))})
  target = nnx.State({'b': nnx.Param(sds((2,)))})
  out = orbax_nnx.restore(path, target, rules=[('model/a', 'model/b')])
  np.testing.assert_array_equal(host(out['b']), np.ones(2))
  with pytest.raises(errors.PlanError, match=r"match no stored path.*model/a"):
    orbax_nnx.restore(path, target, rules=[('model/a', 'model/b'), ('model/nope/(.*)', r'model/b/\1')])
  with pytest.raises(errors.OptionError, match='not a regular expression'):
    orbax_nnx.restore(path, target, rules=[('a(', 'b')])


def test_plan_shows_what_convert_does(tmp_path, capsys):
  from orbax_nnx import cli
  w = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (emb, layers, mlp): MaxText axis 1
  linen = {'step': np.int32(1), 'params': {'params': {'layers': {'w': w}, 'emb': np.ones(2, np.float32)}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'linen', linen)
  orbax_nnx.convert(tmp_path / 'linen', tmp_path / 'nnx', scan_layers=False)
  capsys.readouterr()
  assert cli.main(['plan', str(tmp_path / 'nnx')]) == 0  # no flags: back to Linen, re-stacked
  planned = sorted(line.rsplit('=> ', 1)[1] for line in capsys.readouterr().out.splitlines()
                   if '  <-  ' in line and not line.startswith('#'))
  orbax_nnx.convert(tmp_path / 'nnx', tmp_path / 'back')
  written = sorted('/'.join(p) for p in orbax_nnx.read_item_metadata(tmp_path / 'back').leaves)
  assert planned == written and 'params/params/layers/w' in written, (planned, written)


def test_undecided_layer_axis_of_a_foreign_nnx_checkpoint_is_an_error(tmp_path):
  """4 stacked layers of (4, 8): axis 0 (nnx.vmap) and 1 (MaxText NNX) both fit, and plain Orbax recorded
  nothing: convert and restore refuse to pick, and say what to pass."""
  w = np.arange(4 * 4 * 8, dtype=np.float32).reshape(4, 4, 8)
  with ocp.StandardCheckpointer() as ckptr:  # a foreign NNX checkpoint: no orbax_nnx records
    ckptr.save(tmp_path / 'c', nnx.state(nnx.Dict(layers=nnx.Dict(w=nnx.Param(jnp.asarray(w))))))
  with pytest.raises(errors.PlanError, match=r'layer axis.*scan_axis'):
    orbax_nnx.convert(tmp_path / 'c', tmp_path / 'linen', to='linen', scan_layers=False)
  assert not (tmp_path / 'linen').exists()
  target = {f'layers_{i}': {'w': nnx.Param(sds((4, 8)))} for i in range(4)}
  with pytest.raises(errors.PlanError, match='ambiguous layer axis'):
    orbax_nnx.restore(tmp_path / 'c', nnx.State(target))
  out = orbax_nnx.restore(tmp_path / 'c', nnx.State(target), scan_axis=1)
  np.testing.assert_array_equal(host(out['layers_2']['w']), w[:, 2])
  report = orbax_nnx.convert(tmp_path / 'c', tmp_path / 'linen', to='linen', scan_layers=False, scan_axis=0)
  assert report.leaves == 4
