"""Property test over random param trees *and* layouts.

Hypothesis draws a model (non-layer leaves at random depths and names, one layer group
with random member shapes), a dtype per leaf (f32, bf16, int8, uint32), and how it is
stored: Linen (`params/params`, `step`, layers on axis 1) or NNX (raw `.../value` or pure
dict, layers on axis 0, optionally with rng state: a typed key), layers stacked or unrolled
(`layers_N`). Then:
- restoring into an NNX target, stacked or unrolled, gives bit-exact values;
- convert to the other framework (stacking, unrolling or keeping layers) and back is
  bit-exact, and every step compares equal to the source value for value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from helpers import host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orbax_nnx
from orbax_nnx.compare import compare

DTYPES = [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32]
NAMES = st.sampled_from(['kernel', 'bias', 'scale', 'embedding', 'w', 'norm', 'attn', 'mlp'])


def _array(shape, dtype, seed):
  values = np.random.default_rng(seed).integers(0, 100, size=shape)
  return jnp.asarray(values, jnp.float32).astype(dtype)


@st.composite
def models(draw):
  """(other leaves {path: array}, layer leaves {name: [array per layer]}, layer count)."""
  others = {}
  for i in range(draw(st.integers(1, 3))):
    path = tuple(draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)))
    if any(path[:len(p)] == p or p[:len(path)] == path for p in others):
      continue  # one path may not be a prefix of another
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    others[path] = _array(shape, draw(st.sampled_from(DTYPES)), seed=i)
  n = draw(st.integers(2, 4))
  layers = {}
  for j, name in enumerate(draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))):
    # members have at least one dimension (Linen stacks params on axis 1), none of size n:
    # the layer axis is then unambiguous whatever the convention
    shape = tuple(draw(st.lists(st.sampled_from([1, 5, 6]), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    layers[name] = [_array(shape, dtype, seed=100 * j + k) for k in range(n)]
  return {('top',) + p: v for p, v in others.items()}, layers, n


def _variable_type(path) -> type[nnx.Variable]:
  if path[0] == 'rngs':
    return nnx.RngKey if path[-1] == 'key' else nnx.RngCount
  return nnx.Param


def _tree(leaves: dict, wrap) -> dict:
  out: dict = {}
  for path, value in leaves.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = wrap(path, value)
  return out


def _stored_leaves(others, layers, n, stacked: bool, axis: int) -> dict:
  leaves = dict(others)
  for name, per_layer in layers.items():
    if stacked:
      leaves[('layers', name)] = jnp.stack(per_layer, axis=axis)
    else:
      for i in range(n):
        leaves[(f'layers_{i}', name)] = per_layer[i]
  return leaves


def _save(path, framework, flavour, leaves):
  if framework == 'linen':
    tree = {'params': {'params': _tree(leaves, lambda p, x: x)}, 'step': jnp.int32(7)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
  else:  # stacked layers as nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: 'layers'}) names them
    with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
      ckptr.save(path, args=orbax_nnx.NNXSave(_tree(leaves, _nnx_variable), flavour=flavour))
  return path


def _nnx_variable(path, value) -> nnx.Variable:
  variable = _variable_type(path)(value)
  if path[0] == 'layers':
    variable.set_metadata(out_sharding=('layers',) + (None,) * (value.ndim - 1))
  return variable


def _abstract(leaves) -> nnx.State:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return nnx.State(_tree(leaves, lambda p, x: _variable_type(p)(jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                      sharding=device))))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=models(), framework=st.sampled_from(['linen', 'nnx']), flavour=st.sampled_from(['raw', 'pure']),
       stored_stacked=st.booleans(), target_stacked=st.booleans(),
       convert_scan=st.sampled_from([None, True, False]), with_rng=st.booleans())
def test_random_layouts_restore_and_convert_bit_exact(tmp_path_factory, model, framework, flavour,
                                                      stored_stacked, target_stacked, convert_scan, with_rng):
  others, layers, n = model
  root = tmp_path_factory.mktemp('layout')
  if framework == 'nnx' and with_rng:  # NNX rng state: a typed key and its counter (not Params)
    others = {**others, ('rngs', 'default', 'key'): jax.random.key(n), ('rngs', 'default', 'count'): jnp.uint32(n)}
  src = _save(root / 'src', framework, flavour,
              _stored_leaves(others, layers, n, stored_stacked, axis=1 if framework == 'linen' else 0))

  # restore into an NNX model, layers stacked on axis 0 or unrolled
  expected = _stored_leaves(others, layers, n, target_stacked, axis=0)
  out = orbax_nnx.restore(src, _abstract(expected), extra='ignore')
  for path, value in expected.items():
    leaf = out[path[0]]
    for key in path[1:]:
      leaf = leaf[key]
    assert type(leaf) is _variable_type(path)
    got = leaf.get_value()
    assert got.dtype == value.dtype and got.shape == value.shape, path
    np.testing.assert_array_equal(host(got), host(value), err_msg=str(path))

  # convert to the other framework and straight back: bit-exact, equal at every step
  mid = orbax_nnx.convert(src, root / 'mid', scan_layers=convert_scan, flavour=flavour if framework == 'linen' else 'raw')
  back = orbax_nnx.convert(root / 'mid', root / 'back')
  assert (mid.framework, back.framework) == (('nnx', 'linen') if framework == 'linen' else ('linen', 'nnx'))
  for a, b in ((src, root / 'mid'), (src, root / 'back')):
    report = compare(a, b, values=True)
    assert report.equal and report.compared >= len(others) + len(layers), report.summary()  # stacked: one each
  stored = orbax_nnx.read_item_metadata(src).leaves
  returned = orbax_nnx.read_item_metadata(root / 'back').leaves
  assert {p: (i.shape, str(i.dtype)) for p, i in stored.items()} == {
      p: (i.shape, str(i.dtype)) for p, i in returned.items()}, 'converting back restores the stored layout'
