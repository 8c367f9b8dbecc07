"""Presets are rule sets: detection names the preset, `layout=` forces one, `groups=` declares layer groups,
and user rules match stored paths as `inspect` prints them."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.mapping import presets

SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def save(path, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  return path


def arange(shape, offset=0):
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + offset


def sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=SINGLE)


W = {'dense': {'kernel': arange((2, 3))}}


@pytest.mark.parametrize('tree, preset, kind', [
    ({'model': {'dense': {'kernel': {'value': arange((2, 3))}}}}, 'nnx', 'nnx'),
    ({'opt_state': {'0': {'count': np.int32(1)}}, 'step': np.int32(1)}, 'nnx-optimizer', 'nnx'),
    ({'params': {'params': W}, 'step': np.int32(1)}, 'linen-maxtext', 'linen'),
    ({'params': {'params': W}, 'nnx_aux': {'model': {'rng': {'count': np.uint32(0)}}}, 'step': np.int32(1)},
     'linen-maxtext', 'maxtext'),
    ({'params': W, 'batch_stats': {'bn': {'mean': arange((3,))}}, 'step': np.int32(1)}, 'linen-flax', 'linen'),
    ({'params': W, 'counter': {'count': np.int32(2)}}, 'linen-variables', 'linen'),
    ({'base': W}, 'params-base', 'params'),
    (W, 'params', 'params'),
], ids=lambda x: x if isinstance(x, str) else None)
def test_detection_names_its_preset(tmp_path, tree, preset, kind):
  layout = orbax_nnx.detect_layout(save(tmp_path / 'c', tree))
  assert (layout.preset, layout.kind) == (preset, kind)
  assert f'preset {preset}' in layout.summary()
  assert orbax_nnx.inspect(tmp_path / 'c')['preset'] == preset
  assert ('model', 'dense', 'kernel') in layout.canonical or preset == 'nnx-optimizer'


def test_presets_are_rules_printed_by_the_cli():
  out = subprocess.run([sys.executable, '-m', 'orbax_nnx', 'presets'], check=True, capture_output=True, text=True)
  for preset in presets.PRESETS:
    assert f'preset {preset.name}:' in out.stdout
  assert 'params/params/(.+?)(?:/value)?  ->  model/\\1   (params)' in out.stdout


def test_layout_forces_a_preset_where_detection_is_wrong(tmp_path):
  """An NNX pure dict of a model whose first submodule is called `params` reads as a Linen variables dict
  (each collection mirroring the module tree), so `head/w` and `params/w` collide: an error that says
  to pass layout=; with layout='params' it restores as the module tree it is."""
  tree = {'params': {'w': arange((2,))}, 'head': {'w': arange((2,), 10)}}
  path = save(tmp_path / 'c', tree)
  target = nnx.State({'params': {'w': nnx.Param(sds((2,)))}, 'head': {'w': nnx.Param(sds((2,)))}})
  with pytest.raises(errors.LayoutError, match=r"both map to model/w under preset 'linen-variables'.*layout=NAME"):
    orbax_nnx.detect_layout(path)
  layout = orbax_nnx.detect_layout(path, layout='params')
  assert layout.preset == 'params' and ('model', 'params', 'w') in layout.canonical
  out = orbax_nnx.restore(path, target, layout='params', rules=[('head/w', 'head/w')])
  np.testing.assert_array_equal(host(out['head']['w']), arange((2,), 10))
  params = orbax_nnx.load_params(path, target, layout='params')
  np.testing.assert_array_equal(host(params['params']['w']), arange((2,)))
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    via_handler = ckptr.restore(path, args=orbax_nnx.NNXRestore(target, layout='params', extra='ignore'))
  np.testing.assert_array_equal(host(via_handler['head']['w']), arange((2,), 10))
  with pytest.raises(errors.OptionError, match=r"layout='nope' names no preset; choose one of \[.*'linen-flax'"):
    orbax_nnx.detect_layout(path, layout='nope')
  with pytest.raises(errors.OptionError, match='names no preset'):
    orbax_nnx.NNXRestore(target, layout='nope')
  with pytest.raises(errors.LayoutError, match="layout='nnx' leaves 2 stored leaves unmapped"):
    orbax_nnx.detect_layout(path, layout='nnx')
  cli = subprocess.run([sys.executable, '-m', 'orbax_nnx', 'inspect', str(path), '--layout', 'params'],
                       capture_output=True, text=True)
  assert cli.returncode == 0 and 'preset params' in cli.stdout, cli.stderr


def test_declared_groups(tmp_path):
  """`stack_N` is no built-in layer-group name (it could be any module): not grouped unless declared."""
  tree = {f'stack_{i}': {'w': {'value': arange((3,), i)}} for i in range(4)}
  path = save(tmp_path / 'c', {'model': tree})
  assert orbax_nnx.detect_layout(path).groups == ()
  layout = orbax_nnx.detect_layout(path, groups=['stack'])
  assert [str(g) for g in layout.groups] == ['model/stack: unrolled (stack_N), 4 layers']
  stacked = nnx.State({'stack': {'w': nnx.Param(sds((4, 3)))}})
  with pytest.raises(errors.StructureMismatchError):
    orbax_nnx.restore(path, stacked)
  out = orbax_nnx.restore(path, stacked, groups=['stack'])
  np.testing.assert_array_equal(host(out['stack']['w']), np.stack([arange((3,), i) for i in range(4)]))
  report = orbax_nnx.convert(path, tmp_path / 'stacked', to='nnx', scan_layers=True, groups=['stack'])
  assert report.leaves == 1
  assert orbax_nnx.detect_layout(tmp_path / 'stacked').canonical.keys() == {('model', 'stack', 'w')}
  with pytest.raises(errors.OptionError, match='not a valid regex'):
    orbax_nnx.detect_layout(path, groups=['stack('])


def test_flat_keys_split_for_groups_and_rules_match_stored_paths(tmp_path):
  """Official Gemma checkpoints store `transformer/layer_0/...` as one key: its components are seen (the
  layer group), and a rule may name the stored path exactly as `inspect` prints it, writing target paths."""
  tree = {f'transformer/layer_{i}/mlp/linear': {'w': arange((2, 3), i)} for i in range(3)}
  path = save(tmp_path / 'c', tree)
  facts = orbax_nnx.inspect(path)
  assert facts['groups'] == ['model/transformer/layer: unrolled (layer_N), 3 layers']
  assert 'transformer/layer_1/mlp/linear/w' in [row['path'] for row in facts['leaves']]
  target = nnx.State({'layers': {str(i): {'down': {'kernel': nnx.Param(sds((3, 2)))}} for i in range(3)}})
  rules = [(r'transformer/layer_(\d+)/mlp/linear/w', {r'layers/\1/down/kernel': orbax_nnx.view.T})]
  out = orbax_nnx.restore(path, target, rules=rules)
  np.testing.assert_array_equal(host(out['layers']['2']['down']['kernel']), arange((2, 3), 2).T)
  with pytest.raises(errors.PlanError, match=r'as `orbax-nnx inspect` prints it \(e\.g\. transformer/layer_0'):
    orbax_nnx.restore(path, target, rules=rules + [('transformer/nothing', 'x')])
