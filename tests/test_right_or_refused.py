"""Right or refused: each case returns the right values or a typed error, one test per behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host, save_nnx, save_plain, sds

import orbax_nnx
from orbax_nnx import errors, view
from orbax_nnx.planning.expressions import Read, Transpose


def numbers(shape, dtype=np.float32, offset=0):
  return (np.arange(int(np.prod(shape)), dtype=np.float64) + offset).reshape(shape).astype(dtype)


def param(shape, dtype=jnp.float32, names=None):
  variable = nnx.Param(sds(shape, dtype))
  if names:
    variable.set_metadata(out_sharding=names)
  return variable


# -- rules ----------------------------------------------------------------------


def test_a_rule_onto_a_stored_path_displaces_that_leaf_which_is_then_unused(tmp_path):
  path = save_plain(tmp_path / 'c', {'w': np.zeros(3, np.float32), 'ema_w': np.ones(3, np.float32)})
  target = nnx.State({'w': param((3,))})
  with pytest.raises(errors.StructureMismatchError, match=r'have no place in the target:\n    w\n'):
    orbax_nnx.restore(path, target, rules=[('ema_w', 'w')])
  the_plan = orbax_nnx.plan(path, target, rules=[('ema_w', 'w')])
  assert the_plan.unused == ['w'] and str(the_plan.entries[('w',)]) == 'ema_w'
  out = orbax_nnx.restore(path, target, rules=[('ema_w', 'w')], extra='ignore')
  np.testing.assert_array_equal(host(out['w']), np.ones(3))


def test_two_stored_leaves_sent_to_one_target_is_an_error_naming_both(tmp_path):
  path = save_plain(tmp_path / 'c', {'a': np.zeros(3, np.float32), 'b': np.ones(3, np.float32)})
  with pytest.raises(errors.PlanError, match=r'two stored leaves to model/w: a and b'):
    orbax_nnx.plan(path, nnx.State({'w': param((3,))}), rules=[('a', 'w'), ('b', 'w')])


def test_rule_templates_expand_once_per_match(tmp_path):
  path = save_plain(tmp_path / 'c', {'w': np.ones(3, np.float32)})
  the_plan = orbax_nnx.plan(path, nnx.State({'enc': {'w': param((3,))}}), rules=[('(.*)', r'enc/\1')])
  assert not the_plan.missing and str(the_plan.entries[('enc', 'w')]) == 'w'


def test_export_rule_templates_expand_once_per_match(tmp_path):
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  orbax_nnx.export_params(model, tmp_path / 'st', format='safetensors', export_rules=[('(.*)', r'model.\1')], dtype=None)
  from safetensors.numpy import load_file
  assert sorted(load_file(str(tmp_path / 'st' / 'model.safetensors'))) == ['model.bias', 'model.kernel']


# -- views ----------------------------------------------------------------------


@pytest.mark.parametrize('bad', [view.transpose(1, 2), view.swapaxes(0, 2), view.transpose(0, 0),
                                 view.concat('b', axis=2)])
def test_view_axes_out_of_range_are_errors_as_in_numpy(tmp_path, bad):
  path = save_plain(tmp_path / 'c', {'a': np.ones((2, 3), np.float32), 'b': np.ones((2, 3), np.float32)})
  with pytest.raises(errors.PlanError, match='axis|permutation'):
    orbax_nnx.plan(path, nnx.State({'w': param((3, 2))}), rules=[('a', {'w': bad})])


def test_negative_view_axes_count_from_the_end(tmp_path):
  stored = numbers((2, 3, 4))
  path = save_plain(tmp_path / 'c', {'a': stored})
  out = orbax_nnx.restore(path, nnx.State({'w': param((2, 4, 3))}), rules=[('a', {'w': view.swapaxes(-1, -2)})])
  np.testing.assert_array_equal(host(out['w']), np.swapaxes(stored, -1, -2))


def test_parts_of_a_concat_are_each_cast_straight_to_the_target_dtype(tmp_path):
  half, full = np.float16([1, 2]), np.float32([1.0001, 3.0001])
  path = save_plain(tmp_path / 'c', {'a': half, 'b': full})
  for dtype in (jnp.float32, jnp.bfloat16):
    out = orbax_nnx.restore(path, nnx.State({'w': param((4,), dtype)}), rules=[('a', {'w': view.concat('b')})],
                            extra='ignore')
    expected = np.concatenate([half.astype(dtype), full.astype(dtype)])
    np.testing.assert_array_equal(host(out['w']), expected)
    assert host(out['w']).dtype == np.dtype(dtype)


def test_unrolled_layers_of_mixed_dtypes_are_each_cast_straight_to_the_target(tmp_path):
  layers = {'layers_0': {'w': np.float16([1, 2, 3])}, 'layers_1': {'w': np.float32([1.0001, 2.0001, 3])}}
  path = save_plain(tmp_path / 'c', layers)
  out = orbax_nnx.restore(path, nnx.State({'layers': {'w': param((2, 3))}}))
  np.testing.assert_array_equal(host(out['layers']['w']), np.stack([layers['layers_0']['w'].astype(np.float32),
                                                                    layers['layers_1']['w']]))


# -- the layer axis -------------------------------------------------------------


def test_a_linen_leaf_square_in_the_layer_count_moves_like_its_group(tmp_path):
  """MaxText scans Params on axis 1: a norm scale (emb,) of 2 layers is (emb=2, L=2). The kernel's shapes
  say the NNX target stacks on axis 0, so the scale's layer l is column l of the stored array."""
  kernel, scale = numbers((4, 2, 6)), numbers((2, 2), offset=100)
  path = save_plain(tmp_path / 'c', {'params': {'params': {'layers': {'kernel': kernel, 'scale': scale}}},
                                     'step': np.int32(1)})
  target = nnx.State({'layers': {'kernel': param((2, 4, 6)), 'scale': param((2, 2))}})
  the_plan = orbax_nnx.plan(path, target)
  assert the_plan.entries[('layers', 'scale')] == Transpose(Read(('params', 'params', 'layers', 'scale'), (2, 2),
                                                                 np.dtype('float32')), (1, 0))
  assert any('model/layers/scale' in note for note in the_plan.inferred) and '# INFERRED' in str(the_plan)
  out = orbax_nnx.restore(path, target, missing='keep')
  np.testing.assert_array_equal(host(out['layers']['scale']), scale.T)
  np.testing.assert_array_equal(host(out['layers']['kernel']), np.moveaxis(kernel, 1, 0))


def test_a_linen_leaf_square_in_the_layer_count_unrolls_by_the_convention(tmp_path):
  scale = numbers((3, 3))
  path = save_plain(tmp_path / 'c', {'params': {'params': {'layers': {'scale': scale}}}, 'step': np.int32(1)})
  target = nnx.State({f'layers_{i}': {'scale': param((3,))} for i in range(3)})
  out = orbax_nnx.restore(path, target)
  for i in range(3):
    np.testing.assert_array_equal(host(out[f'layers_{i}']['scale']), scale[:, i])


def test_a_square_linen_group_with_nothing_to_tell_the_target_axis_is_refused(tmp_path):
  path = save_plain(tmp_path / 'c', {'params': {'params': {'layers': {'scale': numbers((2, 2))}}},
                                     'step': np.int32(1)})
  with pytest.raises(errors.PlanError, match=r'ambiguous layer axis .*model/layers/scale'):
    orbax_nnx.plan(path, nnx.State({'layers': {'scale': param((2, 2))}}))
  out = orbax_nnx.restore(path, nnx.State({'layers': {'scale': param((2, 2), names=('layers', None))}}))
  np.testing.assert_array_equal(host(out['layers']['scale']), numbers((2, 2)).T)


@pytest.mark.parametrize('saver', [save_plain, save_nnx])
def test_an_undecidable_stored_layer_axis_is_refused_not_guessed(tmp_path, saver):
  stored = numbers((2, 2, 3))
  tree = {'layers': {'w': stored if saver is save_plain else nnx.Param(jnp.asarray(stored))}}
  path = saver(tmp_path / 'c', tree)
  target = nnx.State({'layers': {'w': param((2, 3, 2), names=(None, None, 'layers'))}})
  with pytest.raises(errors.PlanError, match=r'ambiguous layer axis for the stored array: axes \[0, 1\]'):
    orbax_nnx.plan(path, target)
  out = orbax_nnx.restore(path, target, scan_axis={'model/layers/w': 1})
  np.testing.assert_array_equal(host(out['layers']['w']), np.moveaxis(stored, 1, 2))


def test_the_same_nnx_tree_restores_as_stored_when_every_axis_is_square(tmp_path):
  stored = numbers((2, 2))
  path = save_nnx(tmp_path / 'c', {'layers': {'w': nnx.Param(jnp.asarray(stored))}})
  out = orbax_nnx.restore(path, nnx.State({'layers': {'w': param((2, 2))}}))
  np.testing.assert_array_equal(host(out['layers']['w']), stored)


def test_an_explicit_axis_that_does_not_fit_is_an_error(tmp_path):
  path = save_plain(tmp_path / 'c', {'params': {'params': {'layers': {'w': numbers((4, 2, 6))}}}, 'step': np.int32(1)})
  target = nnx.State({'layers_0': {'w': param((4, 6))}, 'layers_1': {'w': param((4, 6))}})
  with pytest.raises(errors.PlanError, match='scan_axis says axis 0'):
    orbax_nnx.plan(path, target, scan_axis={'model/layers/w': 0})
  with pytest.raises(errors.PlanError, match='out of range'):
    orbax_nnx.plan(path, target, scan_axis={'model/layers/w': 3})
  assert not orbax_nnx.plan(path, target, scan_axis={'model/layers/w': -2}).missing


def test_bfloat16_parts_join_float32(tmp_path):
  path = save_plain(tmp_path / 'c', {'a': np.ones(2, ml_dtypes.bfloat16), 'b': np.float32([1.0001, 2])})
  out = orbax_nnx.restore(path, nnx.State({'w': param((4,))}), rules=[('a', {'w': view.concat('b')})],
                          extra='ignore')
  np.testing.assert_array_equal(host(out['w']), np.float32([1, 1, 1.0001, 2]))


# -- exports --------------------------------------------------------------------


class _OneLayer(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(2, 3, rngs=rngs)


def test_a_single_submodule_named_like_a_group_exports_whole(tmp_path):
  from safetensors.numpy import load_file
  model = _OneLayer(nnx.Rngs(0))
  orbax_nnx.export_params(model, tmp_path / 'st', format='safetensors', export_rules=[('(.*)', r'\1')], dtype=None)
  tensors = load_file(str(tmp_path / 'st' / 'model.safetensors'))
  assert sorted(tensors) == ['layer/bias', 'layer/kernel']
  np.testing.assert_array_equal(tensors['layer/kernel'], np.asarray(model.layer.kernel.get_value()))


def test_a_stacked_group_exports_per_layer_on_its_named_axis(tmp_path):
  from safetensors.numpy import load_file
  stacked = numbers((3, 2, 4))  # (emb, L, mlp): the layer axis is 1, as out_sharding says
  kernel = nnx.Param(jnp.asarray(stacked))
  kernel.set_metadata(out_sharding=(None, 'layers', None))
  state = nnx.State({'layers': {'kernel': kernel}})
  orbax_nnx.export_params(state, tmp_path / 'st', format='safetensors', dtype=None,
                          export_rules=[(r'layers/(\d+)/kernel', r'l.\1.w')])
  tensors = load_file(str(tmp_path / 'st' / 'model.safetensors'))
  assert sorted(tensors) == ['l.0.w', 'l.1.w']
  np.testing.assert_array_equal(tensors['l.1.w'], stacked[:, 1])


# -- compare --------------------------------------------------------------------


@pytest.mark.parametrize('a, b, equal', [
    (np.float32([np.inf, -np.inf, np.nan]), np.float32([np.inf, -np.inf, np.nan]), True),
    (np.float32([np.inf]), np.float32([-np.inf]), False),
    (np.int64([2**60]), np.int64([2**60 + 1]), False),
    (np.int64([2**60, -2**63]), np.int64([2**60, -2**63]), True),
    (np.float32([0.0]), np.float32([-0.0]), True),
])
def test_compare_decides_equality_in_the_stored_dtype(tmp_path, a, b, equal):
  pa, pb = save_plain(tmp_path / 'a', {'w': a}), save_plain(tmp_path / 'b', {'w': b})
  assert orbax_nnx.compare(pa, pb, values=True).equal is equal


def test_a_structure_only_compare_says_values_were_not_compared(tmp_path):
  pa = save_plain(tmp_path / 'a', {'w': np.float32([1])})
  pb = save_plain(tmp_path / 'b', {'w': np.float32([2])})
  report = orbax_nnx.compare(pa, pb)
  assert report.equal and 'values were not compared' in report.summary()
  assert not orbax_nnx.compare(pa, pb, values=True).equal


# -- targets and paths ----------------------------------------------------------


class _HFStyle(nnx.Module):
  def __init__(self, rngs):
    self.model = nnx.Linear(2, 3, rngs=rngs)
    self.lm_head = nnx.Linear(3, 2, rngs=rngs)


def test_a_model_with_a_submodule_called_model_is_a_model_not_a_train_state(tmp_path):
  model = _HFStyle(nnx.Rngs(0))
  path = save_nnx(tmp_path / 'c', model)
  target = nnx.eval_shape(lambda: _HFStyle(nnx.Rngs(1)))
  the_plan = orbax_nnx.plan(path, nnx.state(target))
  assert not the_plan.missing and not the_plan.unused
  assert orbax_nnx.detect_layout(path).preset == 'params'
  out = orbax_nnx.restore(path, target)
  np.testing.assert_array_equal(np.asarray(out.lm_head.kernel.get_value()), np.asarray(model.lm_head.kernel.get_value()))


def test_step_and_item_on_an_item_directory_are_honoured_or_refused(tmp_path):
  with ocp.CheckpointManager(tmp_path / 'run', handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(5, args=ocp.args.Composite(model=orbax_nnx.NNXSave({'w': nnx.Param(jnp.ones(2))})))
  item = tmp_path / 'run' / '5' / 'model'
  assert orbax_nnx.resolve_item(item, step=5, item='model') == item
  with pytest.raises(errors.OptionError, match='step=4 cannot be honoured'):
    orbax_nnx.restore(item, step=4)
  with pytest.raises(errors.OptionError, match="item='opt' names another item"):
    orbax_nnx.restore(item, item='opt')


def test_a_folder_holding_one_unrelated_item_is_not_a_step_directory(tmp_path):
  save_plain(tmp_path / 'data' / 'thing', {'w': np.float32([1])})
  with pytest.raises(errors.NotACheckpointError):
    orbax_nnx.restore(tmp_path / 'data')
  assert orbax_nnx.resolve_item(tmp_path / 'data' / 'thing') == tmp_path / 'data' / 'thing'


def test_relative_paths_work_everywhere(tmp_path, monkeypatch):
  save_nnx(tmp_path / 'ckpt', {'w': nnx.Param(jnp.arange(3.0))})
  monkeypatch.chdir(tmp_path)
  np.testing.assert_array_equal(host(orbax_nnx.restore('ckpt')['w']), np.arange(3.0))
  assert orbax_nnx.inspect('ckpt')['path'] == str(tmp_path / 'ckpt')
  orbax_nnx.convert('ckpt', 'out', to='linen')
  assert orbax_nnx.compare('ckpt', 'out', values=True).equal
  import os
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'orbax_nnx', 'convert', 'out', 'back'], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['back', 'ckpt', 'out']  # no tmp dir left


def test_typed_prng_keys_keep_their_impl_through_convert_and_export(tmp_path):
  model = nnx.Dict(dense=nnx.Linear(2, 2, rngs=nnx.Rngs(0)), drop=nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=3)))
  path = save_nnx(tmp_path / 'c', {'model': nnx.state(model)})
  orbax_nnx.convert(path, tmp_path / 'linen', to='linen')
  with ocp.StandardCheckpointer() as ckptr:
    key = ckptr.restore(tmp_path / 'linen')['nnx_aux']['model']['drop']['rngs']['key']
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(model.drop.rngs.key.get_value()))
  orbax_nnx.convert(tmp_path / 'linen', tmp_path / 'back')
  with ocp.StandardCheckpointer() as ckptr:
    back = ckptr.restore(tmp_path / 'back')['model']['drop']['rngs']['key']['value']
  assert jax.dtypes.issubdtype(back.dtype, jax.dtypes.prng_key)


def test_the_same_tree_moves_its_layer_axis_only_when_both_sides_name_it_differently(tmp_path):
  stored = numbers((2, 2))
  variable = nnx.Param(jnp.asarray(stored))
  variable.set_metadata(out_sharding=('layers', None))
  path = save_nnx(tmp_path / 'c', {'layers': {'w': variable}})
  out = orbax_nnx.restore(path, nnx.State({'layers': {'w': param((2, 2), names=(None, 'layers'))}}))
  np.testing.assert_array_equal(host(out['layers']['w']), stored.T)
  out = orbax_nnx.restore(path, nnx.State({'layers': {'w': param((2, 2), names=('layers', None))}}))
  np.testing.assert_array_equal(host(out['layers']['w']), stored)


# -- Linen output style ---------------------------------------------------------


class _Norm(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(2, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)


def _norm_checkpoint(tmp_path):
  model = _Norm(nnx.Rngs(0))
  model.bn.mean.set_value(jnp.arange(3.0) + 1)
  return model, save_nnx(tmp_path / 'nnx', {'model': nnx.state(model)})


def test_a_flax_train_state_template_decides_the_linen_style(tmp_path):
  model, path = _norm_checkpoint(tmp_path)
  template = {'params': {'dense': {'kernel': np.zeros((2, 3), np.float32), 'bias': np.zeros(3, np.float32)},
                         'bn': {'scale': np.zeros(3, np.float32), 'bias': np.zeros(3, np.float32)}},
              'batch_stats': {'bn': {'mean': np.zeros(3, np.float32), 'var': np.zeros(3, np.float32)}}}
  orbax_nnx.convert(path, tmp_path / 'linen', to='linen', template=template)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / 'linen', template)
  np.testing.assert_array_equal(restored['batch_stats']['bn']['mean'], np.arange(3.0) + 1)
  np.testing.assert_array_equal(restored['params']['dense']['kernel'], np.asarray(model.dense.kernel.get_value()))


def test_a_written_tree_that_differs_from_the_template_is_an_error(tmp_path):
  _, path = _norm_checkpoint(tmp_path)
  template = {'params': {'dense': {'kernel': np.zeros((2, 3), np.float32)}}}
  with pytest.raises(errors.StructureMismatchError, match='params/dense/bias'):
    orbax_nnx.convert(path, tmp_path / 'linen', to='linen', template=template)
  assert not (tmp_path / 'linen').exists()


def test_maxtext_style_puts_batch_stats_where_linen_reads_them(tmp_path):
  model, path = _norm_checkpoint(tmp_path)
  orbax_nnx.convert(path, tmp_path / 'linen', to='linen', linen_style='maxtext')
  stored = {'/'.join(p) for p in orbax_nnx.read_item_metadata(tmp_path / 'linen').leaves}
  assert {'params/batch_stats/bn/mean', 'params/params/bn/scale'} <= stored
  assert not any(p.startswith('nnx_aux') for p in stored)
  target = nnx.state(nnx.eval_shape(lambda: _Norm(nnx.Rngs(1))))
  out = orbax_nnx.restore(tmp_path / 'linen', target)
  np.testing.assert_array_equal(host(out['bn']['mean']), np.arange(3.0) + 1)


def test_a_forced_layout_that_leaves_stored_leaves_unmapped_is_refused(tmp_path):
  path = save_plain(tmp_path / 'flax', {'params': {'dense': {'kernel': np.ones((2, 3), np.float32)}},
                                        'opt_state': {'count': np.int32(1)}, 'step': np.int32(1)})
  assert orbax_nnx.detect_layout(path).preset == 'linen-flax'
  with pytest.raises(errors.LayoutError, match="layout='linen-maxtext' leaves 1 stored leaves unmapped"):
    orbax_nnx.convert(path, tmp_path / 'out', layout='linen-maxtext')
  assert not (tmp_path / 'out').exists()


def test_detect_layout_takes_manager_roots_and_step_directories(tmp_path):
  with ocp.CheckpointManager(tmp_path / 'run', handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(2, args=ocp.args.Composite(model=orbax_nnx.NNXSave({'w': nnx.Param(jnp.ones(2))})))
  for path in (tmp_path / 'run', tmp_path / 'run' / '2'):
    assert orbax_nnx.detect_layout(path).preset == 'params'
  assert orbax_nnx.detect_layout(tmp_path / 'run', step=2, item='model').preset == 'params'


def test_missing_keep_on_an_abstract_target_does_not_recommend_itself(tmp_path):
  path = save_plain(tmp_path / 'c', {'a': np.ones(2, np.float32)})
  with pytest.raises(errors.StructureMismatchError) as info:
    orbax_nnx.restore(path, nnx.State({'a': param((2,)), 'b': param((2,))}), missing='keep')
  assert 'abstract' in str(info.value) and "relax the policy: missing='keep'" not in str(info.value)


def test_orbax_older_call_forms_are_honoured(tmp_path):
  from etils import epath
  handler = orbax_nnx.NNXCheckpointHandler()
  tree = {'a': np.arange(4, dtype=np.float32), 'b': {'c': np.int32(3)}}
  handler.save(epath.Path(tmp_path / 'plain'), tree)
  handler.finalize(epath.Path(tmp_path / 'plain'))
  out = handler.restore(epath.Path(tmp_path / 'plain'), item=tree)
  np.testing.assert_array_equal(out['a'], tree['a'])
  handler.save(epath.Path(tmp_path / 'nnx'), {'w': nnx.Param(jnp.ones(2))})
  handler.finalize(epath.Path(tmp_path / 'nnx'))
  assert isinstance(handler.restore(epath.Path(tmp_path / 'nnx'))['w'], nnx.Param)
  with pytest.raises(errors.OptionError, match='not both'):
    handler.save(epath.Path(tmp_path / 'x'), tree, args=ocp.args.PyTreeSave(tree))
