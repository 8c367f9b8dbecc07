"""Every feature on 8 devices x (same mesh, resharded mesh, layer axis sharded).

The source is a small train state saved sharded over a (2, 4) ('fsdp', 'tensor') mesh:
layers stacked (NNX axis 0, Linen axis 1), plus an embedding and Adam-style moments.
- same:      target on the saving mesh with the saving specs;
- resharded: target on a (4, 2) mesh with the mesh axes swapped in the specs;
- layer:     the source is saved with its layer axis sharded, and stacked targets shard
             the layer axis too (unrolled targets take each layer fully sharded).
Each case checks every value and that each array lands on the sharding the target asked for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx.conversion import convert

P = jax.sharding.PartitionSpec
L, D, F, V = 4, 16, 32, 64
AUTO = (jax.sharding.AxisType.Auto,) * 2


def mesh(shape):
  return jax.make_mesh(shape, ('fsdp', 'tensor'), axis_types=AUTO)


def values(seed=0) -> dict:
  """Canonical (NNX, stacked on axis 0) values of the model params."""
  rng = np.random.default_rng(seed)
  return {'layers/w': rng.standard_normal((L, D, F)).astype(np.float32),
          'layers/b': rng.standard_normal((L, F)).astype(np.float32),
          'embed': rng.standard_normal((V, D)).astype(np.float32)}


PARAMS, MU = values(0), values(1)


def place(x: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def source_specs(case: str, linen: bool) -> dict:
  """Saving specs on the (2, 4) mesh; 'layer' shards the layer axis on fsdp."""
  if case == 'layer':
    w, b = P('fsdp', None, 'tensor'), P('fsdp', 'tensor')
  else:
    w, b = P(None, 'fsdp', 'tensor'), P(None, 'tensor')
  if linen:  # Linen scans layers on axis 1
    w, b = P(w[1], w[0], w[2]), P(b[1], b[0])
  return {'layers/w': w, 'layers/b': b, 'embed': P('tensor', 'fsdp')}


def target_specs(case: str) -> tuple[jax.sharding.Mesh, dict]:
  """Target mesh and specs of the stacked NNX leaves (unrolled ones drop the layer entry)."""
  if case == 'same':
    return mesh((2, 4)), source_specs('same', False)
  if case == 'resharded':
    return mesh((4, 2)), {'layers/w': P(None, 'tensor', 'fsdp'), 'layers/b': P(None, 'fsdp'),
                          'embed': P('fsdp', 'tensor')}
  return mesh((4, 2)), {'layers/w': P('fsdp', None, 'tensor'), 'layers/b': P('fsdp', 'tensor'),
                        'embed': P('fsdp', 'tensor')}


def nested(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    keys = path.split('/')
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def save_source(path, case: str, linen: bool):
  """A sharded train state (params, mu, step) in the NNX or Linen layout."""
  m, specs = mesh((2, 4)), source_specs(case, linen)
  def arrays(vals):
    out = {}
    for k, v in vals.items():
      out[k] = place(np.moveaxis(v, 0, 1) if linen and k.startswith('layers') else v,
                     jax.sharding.NamedSharding(m, specs[k]))
    return out
  params, mu = arrays(PARAMS), arrays(MU)
  if linen:
    tree = {'params': {'params': nested(params)}, 'step': jnp.int32(5),
            'opt_state': [{'count': jnp.int32(5), 'mu': {'params': nested(mu)}}]}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    return path
  state = {'model': nested({k: nnx.Param(v) for k, v in params.items()}),
           'optimizer': {'step': nnx.training.optimizer.OptState(jnp.uint32(5)),
                         'opt_state': {'0': {'mu': nested({k: nnx.training.optimizer.OptVariable(v)
                                                           for k, v in mu.items()})}}}}
  with ocp.CheckpointManager(path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(5, args=ocp.args.StandardSave(nnx.State(state)))
    mngr.wait_until_finished()
  return path


def expected_leaves(case: str, unrolled: bool, dtype=np.float32) -> dict:
  """{path: (value, sharding)} of the NNX model params the target asks for."""
  m, specs = target_specs(case)
  out = {}
  for k, v in PARAMS.items():
    spec = specs[k]
    if unrolled and k.startswith('layers'):
      # 'layer': each layer fully sharded over both axes
      per_layer = P(*spec[1:]) if case != 'layer' else {'layers/w': P('fsdp', 'tensor'),
                                                         'layers/b': P(('fsdp', 'tensor'))}[k]
      for i in range(L):
        out[k.replace('layers', f'layers_{i}')] = (v[i].astype(dtype), jax.sharding.NamedSharding(m, per_layer))
    else:
      out[k] = (v.astype(dtype), jax.sharding.NamedSharding(m, spec))
  return out


def abstract(leaves: dict, cls=nnx.Param) -> nnx.State:
  return nnx.State(nested({k: cls(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
                           for k, (v, s) in leaves.items()}))


def check(out, leaves: dict) -> None:
  flat = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(out)}
  assert set(flat) >= set(leaves), (sorted(flat), sorted(leaves))
  for k, (v, s) in leaves.items():
    got = flat[k].get_value() if isinstance(flat[k], nnx.Variable) else flat[k]
    assert got.sharding.is_equivalent_to(s, got.ndim), (k, got.sharding, s)
    assert got.dtype == v.dtype, (k, got.dtype)
    np.testing.assert_array_equal(host(got), v, err_msg=k)


CASES = ['same', 'resharded', 'layer']


@pytest.mark.parametrize('case', CASES)
def test_handler_save_restore(tmp_path, case):
  src = save_source(tmp_path / 'mngr', case, linen=False)
  leaves = expected_leaves(case, unrolled=False)
  replicated = jax.sharding.NamedSharding(target_specs(case)[0], P())
  target = nnx.State({'model': abstract(leaves), 'optimizer': {
      'step': nnx.training.optimizer.OptState(jax.ShapeDtypeStruct((), jnp.uint32, sharding=replicated)),
      'opt_state': {'0': {'mu': abstract(leaves, nnx.training.optimizer.OptVariable)}}}})
  with ocp.CheckpointManager(src, handler_registry=orbax_nnx.nnx_registry) as mngr:
    out = mngr.restore(5, args=ocp.args.StandardRestore(target))
  check(out['model'], leaves)
  mu = {k: (MU[k], s) for k, (_, s) in leaves.items()}
  check(out['optimizer']['opt_state']['0']['mu'], mu)


@pytest.mark.parametrize('unrolled', [False, True], ids=['stacked', 'unrolled'])
@pytest.mark.parametrize('case', CASES)
def test_linen_restored_into_nnx(tmp_path, case, unrolled):
  src = save_source(tmp_path / 'linen', case, linen=True)
  leaves = expected_leaves(case, unrolled)
  check(orbax_nnx.restore(src, abstract(leaves), extra='ignore'), leaves)


@pytest.mark.parametrize('case', CASES)
def test_load_params_bf16(tmp_path, case):
  src = save_source(tmp_path / 'mngr', case, linen=False)
  leaves = expected_leaves(case, unrolled=True, dtype=jnp.bfloat16)
  check(orbax_nnx.load_params(src, abstract(expected_leaves(case, True)), dtype=jnp.bfloat16), leaves)


@pytest.mark.parametrize('case', CASES)
def test_convert_then_restore(tmp_path, case):
  src = save_source(tmp_path / 'linen', case, linen=True)
  convert(src, tmp_path / 'nnx', scan_layers=False)
  leaves = expected_leaves(case, unrolled=True)
  restored = orbax_nnx.restore(tmp_path / 'nnx', nnx.State({'model': abstract(leaves)}), extra='ignore')
  check(restored['model'], leaves)


@pytest.mark.parametrize('case', CASES)
def test_export_params_then_restore(tmp_path, case):
  src = save_source(tmp_path / 'mngr', case, linen=False)
  orbax_nnx.export_params(src, tmp_path / 'decode', dtype='bfloat16', scan_layers=False)
  leaves = expected_leaves(case, unrolled=True, dtype=jnp.bfloat16)
  target = abstract(leaves)
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'decode', target)  # plain Orbax reads it as is
  check(restored, leaves)
