"""A real Linen TrainState, saved with plain Orbax, restored straight into the NNX model."""

import jax
import jax.numpy as jnp
import linen_client as lc
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx import examples as ex

CFG = ex.Config(num_layers=4)


def save_linen(root, state, step=3):
  with ocp.CheckpointManager(root) as mngr:
    mngr.save(step, args=ocp.args.Composite(items=ocp.args.StandardSave(state)))


def linen_params(state, maxtext):
  return state.params['params'] if maxtext else state.params


def unbox(tree):
  return jax.tree.map(lambda x: x, tree, is_leaf=lambda x: False)


def linen_leaf(params, *path):
  x = params
  for key in path:
    x = x[key]
  return np.asarray(getattr(x, 'value', x))


def nnx_layer_leaf(model, layer, *path):
  if model.cfg.scan_layers:
    x = model.layers
    for key in path:
      x = getattr(x, key)
    return host(x)[layer]
  x = getattr(model, f'layers_{layer}')
  for key in path:
    x = getattr(x, key)
  return host(x)


@pytest.mark.parametrize('maxtext', [False, True], ids=['params', 'params-params'])
@pytest.mark.parametrize('scan_layers', [True, False], ids=['stacked', 'unrolled'])
def test_linen_train_state_into_nnx_model(tmp_path, scan_layers, maxtext):
  state = lc.train(lc.make_state(CFG, maxtext=maxtext), CFG, 3)
  save_linen(tmp_path, state)
  ncfg = ex.Config(num_layers=4, scan_layers=scan_layers)
  with jax.set_mesh(ex.make_mesh((4, 2))):
    model = ex.Transformer(ncfg, rngs=nnx.Rngs(7, dropout=1))
    opt = ex.make_optimizer(model)
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    # rng state is absent from a Linen checkpoint: keep the model's own
    mngr.restore(3, args=ocp.args.Composite(items=orbax_nnx.NNXRestore(
        {'model': model, 'optimizer': opt}, missing='keep')))
  assert opt.step[...].dtype == jnp.uint32 and int(opt.step[...]) == 3
  params = linen_params(state, maxtext)
  for layer in range(4):  # Linen stacks Params on axis 1 (MaxText's param_scan_axis)
    np.testing.assert_array_equal(nnx_layer_leaf(model, layer, 'up', 'kernel'),
                                  linen_leaf(params, 'layers', 'up', 'kernel')[:, layer])
    np.testing.assert_array_equal(nnx_layer_leaf(model, layer, 'norm', 'scale'),
                                  linen_leaf(params, 'layers', 'norm', 'scale')[:, layer])
  adam = state.opt_state[1][0]
  mu = linen_leaf(adam.mu['params'] if maxtext else adam.mu, 'layers', 'down', 'kernel')
  nnx_mu = opt.opt_state[1][0].mu
  got_mu = host(nnx_mu['layers']['down']['kernel'])[2] if scan_layers else host(nnx_mu['layers_2']['down']['kernel'])
  np.testing.assert_array_equal(got_mu, mu[:, 2])

  tokens = lc.batch(CFG, 100)
  forward = nnx.jit(lambda m, t: m(t))  # one compiled call: eager collectives on 8 CPU devices are slow
  np.testing.assert_allclose(np.asarray(forward(model, tokens[:, :-1])),
                             np.asarray(state.apply_fn(state.params, tokens[:, :-1])), atol=2e-5)

  # one more optimizer step on both sides gives the same params
  state = lc.train(state, CFG, 1, first_seed=50)
  tokens = lc.batch(CFG, 50)

  @nnx.jit
  def train_step(model, opt, tokens):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()
    opt.update(model, nnx.grad(loss)(model))

  train_step(model, opt, tokens)
  params = linen_params(state, maxtext)
  np.testing.assert_allclose(host(model.embed.embedding), linen_leaf(params, 'embed', 'embedding'), atol=1e-5)
  np.testing.assert_allclose(nnx_layer_leaf(model, 1, 'up', 'kernel'),
                             linen_leaf(params, 'layers', 'up', 'kernel')[:, 1], atol=1e-5)


def test_linen_into_abstract_state_needs_rng_policy(tmp_path):
  state = lc.train(lc.make_state(CFG), CFG, 1)
  save_linen(tmp_path, state, step=1)
  _, abstract = nnx.get_abstract_model(lambda: ex.Transformer(CFG, rngs=nnx.Rngs(0)), ex.make_mesh((2, 4)))
  with pytest.raises(orbax_nnx.errors.StructureMismatchError) as info:
    orbax_nnx.restore(tmp_path, abstract)
  assert 'layers/dropout/rngs/key' in str(info.value)
  # params only: a target without rng state restores from the abstract model
  params = abstract.filter(nnx.Param)
  out = orbax_nnx.restore(tmp_path, params)
  kernel = out['layers']['up']['kernel'].get_value()
  assert kernel.shape == (4, 32, 64)
  assert kernel.sharding.mesh.shape == {'fsdp': 2, 'tensor': 4}
  np.testing.assert_array_equal(host(kernel), np.moveaxis(linen_leaf(state.params, 'layers', 'up', 'kernel'), 1, 0))


def test_plan_is_printable_and_reads_no_arrays(tmp_path):
  state = lc.make_state(CFG)
  save_linen(tmp_path, state, step=0)
  _, abstract = nnx.get_abstract_model(lambda: ex.Transformer(ex.Config(num_layers=4, scan_layers=False),
                                                                 rngs=nnx.Rngs(0)), ex.make_mesh((2, 4)))
  the_plan = orbax_nnx.plan(tmp_path, abstract.filter(nnx.Param))
  text = str(the_plan)
  assert 'layers_3/up/kernel  <-  take(params/layers/up/kernel/value, 3, axis=1)' in text
  assert not the_plan.missing
  assert the_plan.source.kind == 'linen'


def test_maxtext_nnx_aux_layout_restores_rng_state(tmp_path):
  state = lc.train(lc.make_state(CFG, maxtext=True), CFG, 2)
  with jax.set_mesh(ex.make_mesh((2, 4))):
    donor = ex.Transformer(CFG, rngs=nnx.Rngs(0, dropout=11))
  rng = nnx.state(donor, nnx.RngState)
  tree = {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'nnx_aux': {'model': nnx.to_pure_dict(rng)}}
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(2, args=ocp.args.Composite(items=ocp.args.StandardSave(tree)))
  layout = orbax_nnx.detect_layout(tmp_path / '2' / 'items')
  assert layout.kind == 'maxtext'

  def init():
    model = ex.Transformer(CFG, rngs=nnx.Rngs(5))
    return {'model': model, 'optimizer': ex.make_optimizer(model)}
  with jax.set_mesh(ex.make_mesh((4, 2))):
    abstract = {k: nnx.state(v) for k, v in nnx.eval_shape(init).items()}
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    out = mngr.restore(2, args=ocp.args.Composite(items=ocp.args.StandardRestore(abstract)))['items']
  key = out['model']['layers']['dropout']['rngs']['key']
  assert isinstance(key, nnx.RngKey) and jax.dtypes.issubdtype(key.get_value().dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(host(key), host(donor.layers.dropout.rngs.key))
  assert int(out['optimizer']['step'].get_value()) == 2
  np.testing.assert_array_equal(host(out['model']['layers']['up']['kernel']),
                                np.moveaxis(linen_leaf(state.params['params'], 'layers', 'up', 'kernel'), 1, 0))


def test_linen_variables_dict_with_a_custom_collection(tmp_path):
  """The Flax bridge guide's counter: a Linen variables dict {'params', 'counter'} restores into the NNX
  model whose custom Variable sits where the collection's tree puts it."""
  import flax.linen as nn

  class LinenCounter(nn.Module):
    @nn.compact
    def __call__(self, x):
      count = self.variable('counter', 'count', lambda: jnp.zeros((), jnp.int32))
      count.value += 1
      return nn.Dense(3)(x)

  class Count(nnx.Variable):
    pass

  class NNXCounter(nnx.Module):
    def __init__(self, rngs):
      self.count = Count(jnp.zeros((), jnp.int32))
      self.Dense_0 = nnx.Linear(2, 3, rngs=rngs)

  variables = LinenCounter().init(jax.random.key(0), jnp.ones((1, 2)))
  _, variables = LinenCounter().apply(variables, jnp.ones((1, 2)), mutable=['counter'])
  variables = {'params': LinenCounter().init(jax.random.key(0), jnp.ones((1, 2)))['params'], **variables}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'v', variables)
  layout = orbax_nnx.detect_layout(tmp_path / 'v')
  assert layout.kind == 'linen' and ('counter',) in layout.aux_roots
  model = NNXCounter(nnx.Rngs(5))
  orbax_nnx.restore(tmp_path / 'v', model)
  assert int(model.count.get_value()) == int(variables['counter']['count']) == 2
  np.testing.assert_array_equal(np.asarray(model.Dense_0.kernel.get_value()),
                                np.asarray(variables['params']['Dense_0']['kernel']))
  params = orbax_nnx.load_params(tmp_path / 'v', nnx.state(nnx.eval_shape(lambda: NNXCounter(nnx.Rngs(0)))))
  assert sorted('/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)) == ['Dense_0/bias', 'Dense_0/kernel']
