"""compare across layouts, add_entropy, inspect, and the CLI exit codes."""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx import examples as ex
from orbax_nnx.compare import compare
from orbax_nnx.testing import add_entropy

CFG = ex.Config(num_layers=4)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """An NNX train state with entropy in its moments, and its Linen conversion (unrolled)."""
  root = tmp_path_factory.mktemp('cmp')
  with jax.set_mesh(ex.make_mesh((1, 1))):
    model = ex.Transformer(CFG, rngs=nnx.Rngs(0, dropout=3))
    opt = ex.make_optimizer(model)
  ex.train_steps(model, opt, 1)
  add_entropy({'model': model, 'optimizer': opt})
  mu = host(opt.opt_state[1][0].mu['layers']['up']['kernel'])
  np.testing.assert_allclose(mu, np.cos(1000 * host(model.layers.up.kernel)), rtol=1e-5, atol=1e-5)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(root / 'nnx', {'model': nnx.state(model), 'optimizer': nnx.state(opt)})
  ckptr.wait_until_finished()
  orbax_nnx.convert(root / 'nnx', root / 'linen', scan_layers=False)
  return root, model, opt


def _tamper(root, name, fn):
  """A copy of `root/nnx` with one leaf changed by `fn(state)`."""
  tree = ocp.PyTreeCheckpointHandler().restore(root / 'nnx')
  fn(tree)
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(root / name, tree, force=True)
  return root / name


def test_conversion_compares_equal_across_layouts(pair):
  root, _, _ = pair
  report = compare(root / 'nnx', root / 'linen', values=True)
  assert report.equal, report.summary()
  assert report.compared > 50 and all(d.max_abs == 0 for d in report.values)
  names = {d.path for d in report.values}
  assert any('rngs/key' in n for n in names), 'rng keys are compared, not dropped'


def test_detects_swapped_moments(pair):
  root, _, _ = pair
  def swap(tree):
    adam = tree['optimizer']['opt_state']['1']['0']
    adam['mu'], adam['nu'] = adam['nu'], adam['mu']
  report = compare(root / 'nnx', _tamper(root, 'swapped', swap), values=True)
  assert not report.equal
  assert any('/mu/' in d.path and not d.within for d in report.values)


def test_detects_one_ulp_beyond_tolerance(pair):
  root, _, _ = pair
  def nudge(tree):
    w = np.array(tree['model']['head']['kernel']['value'])
    w.flat[7] = np.nextafter(w.flat[7], np.float32(np.inf))
    tree['model']['head']['kernel']['value'] = w
  other = _tamper(root, 'ulp', nudge)
  report = compare(root / 'nnx', other, values=True)
  assert not report.equal
  assert [d.path for d in report.values if not d.within] == ['model/head/kernel']
  assert compare(root / 'nnx', other, values=True, rtol=1e-6).equal
  assert not compare(root / 'nnx', other, values=True, memory_budget=64).equal
  with pytest.raises(errors.OptionError, match='memory_budget=0'):
    compare(root / 'nnx', other, values=True, memory_budget=0)


def test_detects_missing_layer_and_dtype_change(pair):
  root, _, _ = pair
  def drop(tree):
    del tree['model']['embed']
  report = compare(root / 'nnx', _tamper(root, 'missing', drop))
  assert 'model/embed/embedding' in report.only_a and not report.equal
  def cast(tree):
    tree['model']['head']['bias']['value'] = np.asarray(tree['model']['head']['bias']['value'], np.float16)
  report = compare(root / 'nnx', _tamper(root, 'dtype', cast))
  assert report.dtype_mismatch == [('model/head/bias', 'float32', 'float16')]


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'orbax_nnx', *map(str, args)], capture_output=True, text=True,
                        timeout=300)


def test_cli_exit_codes_and_inspect(pair):
  root, _, _ = pair
  assert _cli('compare', root / 'nnx', root / 'linen', '--values').returncode == 0
  def nudge(tree):
    tree['model']['head']['bias']['value'] = np.asarray(tree['model']['head']['bias']['value']) + 1
  assert _cli('compare', root / 'nnx', _tamper(root, 'cli_changed', nudge), '--values').returncode == 1
  assert _cli('compare', root / 'nnx', root / 'nope').returncode == 2
  assert '0 equal, 1 different, 2 usage or read error' in ' '.join(_cli('compare', '--help').stdout.split())
  out = _cli('inspect', root / 'linen', '--json')
  assert out.returncode == 0, out.stderr
  facts = json.loads(out.stdout)
  assert facts['layout'] == 'maxtext'  # NNX rng state goes to nnx_aux
  assert any('unrolled' in g for g in facts['groups'])
  assert facts['total_bytes'] == sum(leaf['bytes'] for leaf in facts['leaves'])
  assert facts['orbax_nnx']['conversion']['from_framework'] == 'nnx'


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
       dtype=st.sampled_from([np.float32, np.int8, np.uint32]), pick=st.integers(0, 10**6))
def test_compare_finds_any_single_element_change(tmp_path_factory, shapes, dtype, pick):
  root = tmp_path_factory.mktemp('prop')
  rng = np.random.default_rng(0)
  tree = {f'leaf{i}': {'value': (rng.standard_normal(s) * 50).astype(dtype)} for i, s in enumerate(shapes)}
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(root / 'a', tree)
  name = f'leaf{pick % len(shapes)}'
  changed = np.array(tree[name]['value'])
  flat = changed.reshape(-1)
  index = (pick // len(shapes)) % flat.size
  flat[index] = np.nextafter(flat[index], np.inf) if dtype == np.float32 else flat[index] + 1
  ckptr.save(root / 'b', {**tree, name: {'value': changed}})
  report = compare(root / 'a', root / 'b', values=True)
  assert not report.equal
  assert [d.path for d in report.values if not d.within] == [f'model/{name}']
  tiny = compare(root / 'a', root / 'b', values=True, memory_budget=8)  # one row per block
  assert [(d.path, d.within, d.max_abs) for d in tiny.values] == [(d.path, d.within, d.max_abs) for d in report.values]
