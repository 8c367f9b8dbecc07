"""Rules with views: an official-format (flat-key) Gemma-style checkpoint restored into an NNX model
by rules alone, gate and up split out of one stored array, in both gating layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orbax_nnx
from orbax_nnx import errors, view

V, D, F, LAYERS = 32, 8, 16, 2


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.gate = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.mlp = MLP(rngs)


class Gemma(nnx.Module):
  """A Gemma-shaped NNX model (embedding, gated MLP blocks, tied read-out)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.layers:
      x = x + block.mlp(x)
    return self.embed.attend(x)


def official_checkpoint(model: Gemma, transposed: bool) -> dict:
  """The flat `'/'`-joined layout of official Gemma checkpoints; gating as (2, D, F) or (2, F, D)."""
  params = {'transformer/embedder': {'input_embedding': np.asarray(model.embed.embedding.get_value())}}
  for i, block in enumerate(model.layers):
    gate, up = (np.asarray(block.mlp.gate.kernel.get_value()), np.asarray(block.mlp.up.kernel.get_value()))
    gating = np.stack([gate.T, up.T]) if transposed else np.stack([gate, up])
    params[f'transformer/layer_{i}/mlp/gating_einsum'] = {'w': gating}
    params[f'transformer/layer_{i}/mlp/linear'] = {'w': np.asarray(block.mlp.down.kernel.get_value())}
  return params


def gemma_rules(transposed: bool):
  """What a user writes: renames, and one stored array split into two targets."""
  pick = (lambda i: view[i].T) if transposed else (lambda i: view[i])
  return [
      (r'model/transformer/embedder/input_embedding', r'model/embed/embedding'),
      (r'model/transformer/layer_(\d+)/mlp/gating_einsum/w', {
          r'model/layers/\1/mlp/gate/kernel': pick(0),
          r'model/layers/\1/mlp/up/kernel': pick(1)}),
      (r'model/transformer/layer_(\d+)/mlp/linear/w', r'model/layers/\1/mlp/down/kernel'),
  ]


def test_gemma_rules_on_stored_paths_as_inspect_prints_them(tmp_path):
  """The README's form: patterns name the stored paths, replacements the target tree's paths."""
  reference = Gemma(nnx.Rngs(0))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'gemma', official_checkpoint(reference, transposed=True))
  rules = [
      (r'transformer/embedder/input_embedding', r'embed/embedding'),
      (r'transformer/layer_(\d+)/mlp/gating_einsum/w', {
          r'layers/\1/mlp/gate/kernel': view[0].T,
          r'layers/\1/mlp/up/kernel': view[1].T}),
      (r'transformer/layer_(\d+)/mlp/linear/w', r'layers/\1/mlp/down/kernel'),
  ]
  stored = {row['path'] for row in orbax_nnx.inspect(tmp_path / 'gemma')['leaves']}
  assert 'transformer/layer_1/mlp/gating_einsum/w' in stored
  out = orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(), rules=rules)
  for (path, got), (_, want) in zip(nnx.to_flat_state(out), nnx.to_flat_state(nnx.state(reference))):
    np.testing.assert_array_equal(host(got), host(want), err_msg=str(path))


def abstract_gemma(mesh=None):
  if mesh is None:
    return nnx.state(nnx.eval_shape(lambda: Gemma(nnx.Rngs(1))))
  _, state = nnx.get_abstract_model(lambda: Gemma(nnx.Rngs(1)), mesh)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'x'))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


@pytest.mark.parametrize('transposed', [False, True], ids=['DF', 'FD'])
def test_official_gemma_layout_by_rules_only(tmp_path, transposed):
  reference = Gemma(nnx.Rngs(0))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'gemma', official_checkpoint(reference, transposed))
  rules = gemma_rules(transposed)
  text = str(orbax_nnx.plan(tmp_path / 'gemma', abstract_gemma(), rules=rules))
  assert 'take' in text and ('transpose' in text) == transposed, text
  out = orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(), rules=rules)
  for (path, got), (_, want) in zip(nnx.to_flat_state(out), nnx.to_flat_state(nnx.state(reference))):
    assert type(got) is type(want)
    np.testing.assert_array_equal(host(got), host(want), err_msg=str(path))
  model = nnx.merge(nnx.graphdef(reference), out)
  tokens = jnp.arange(6)[None] % V
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(reference(tokens)))

  mesh = jax.make_mesh((8,), ('x',))  # kernels and embedding split 8 ways on their second axis
  sharded = orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(mesh), rules=rules)
  gate = sharded['layers'][1]['mlp']['gate']['kernel'].get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'x') and len(gate.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(gate), host(reference.layers[1].mlp.gate.kernel))

  bf16 = orbax_nnx.load_params(tmp_path / 'gemma', abstract_gemma(mesh), dtype=jnp.bfloat16, rules=rules)
  up = bf16['layers'][0]['mlp']['up']['kernel'].get_value()
  assert up.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(up), host(reference.layers[0].mlp.up.kernel).astype(jnp.bfloat16))


def test_view_errors_name_the_problem(tmp_path):
  reference = Gemma(nnx.Rngs(0))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'gemma', official_checkpoint(reference, transposed=False))
  rules = gemma_rules(transposed=False)
  wrong = [rules[0], (rules[1][0], {k: v.T for k, v in rules[1][1].items()}), rules[2]]
  with pytest.raises(errors.ShapeMismatchError, match=r'after view\[0\]\.T'):
    orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(), rules=wrong)
  with pytest.raises(errors.PlanError, match='indexes 5'):
    orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(),
                      rules=[rules[0], (rules[1][0], {r'model/layers/\1/mlp/gate/kernel': view[5]}), rules[2]])
  with pytest.raises(errors.OptionError, match='integers and slices'):
    view[...]
  with pytest.raises(errors.OptionError, match='no step'):
    view[::2]
  with pytest.raises(errors.OptionError, match='must come first'):
    view[:, 0]
  with pytest.raises(errors.OptionError, match='one may be -1'):
    view.reshape(-1, -1)
  with pytest.raises(errors.PlanError, match=r'cannot reshape \(2, 8, 16\)'):
    orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(),
                      rules=[rules[0], (rules[1][0], {r'model/layers/\1/mlp/gate/kernel': view.reshape(5, -1)}),
                             rules[2]])
  with pytest.raises(errors.OptionError, match='orbax_nnx.view'):
    orbax_nnx.restore(tmp_path / 'gemma', abstract_gemma(), rules=[('a', {'b': 'c'})])
  assert str(view[1].T.astype('bfloat16')) == 'view[1].T.astype(bfloat16)'
  assert str(view[:, 2:4].reshape(2, -1)) == 'view[:, 2:4].reshape(2, -1)'


@st.composite
def view_chains(draw):
  """A stored shape and a chain of view operations valid for it, with the numpy reference."""
  shape = tuple(draw(st.lists(st.integers(2, 4), min_size=2, max_size=4)))
  v, ref = view, lambda x: x
  rank, now = len(shape), list(shape)
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(['take', 'T', 'transpose', 'swapaxes', 'astype', 'slice', 'reshape']))
    if kind == 'take' and rank > 1:
      i = draw(st.integers(-now[0], now[0] - 1))
      v, ref, rank = v[i], (lambda r, i: lambda x: r(x)[i])(ref, i), rank - 1
      now = now[1:]
    elif kind == 'slice':
      axis = draw(st.integers(0, rank - 1))
      start = draw(st.integers(0, now[axis] - 1))
      stop = draw(st.integers(start + 1, now[axis]))
      key = (slice(None),) * axis + (slice(start, stop),)
      v, ref = v[key], (lambda r, k: lambda x: r(x)[k])(ref, key)
      now[axis] = stop - start
    elif kind == 'reshape':
      if rank > 1 and draw(st.booleans()):  # merge two adjacent axes
        a = draw(st.integers(0, rank - 2))
        new = now[:a] + [now[a] * now[a + 1]] + now[a + 2:]
      else:  # split an axis into (factor, rest), or add a unit axis
        a = draw(st.integers(0, rank - 1))
        f = next((f for f in (2, 3) if now[a] % f == 0 and now[a] > f), None)
        new = now[:a] + ([f, now[a] // f] if f else [now[a], 1]) + now[a + 1:]
      v, ref = v.reshape(tuple(new)), (lambda r, n: lambda x: r(x).reshape(n))(ref, tuple(new))
      now, rank = new, len(new)
    if kind == 'T':
      v, ref = v.T, (lambda r: lambda x: r(x).T)(ref)
      now = now[::-1]
    elif kind == 'transpose':
      perm = tuple(draw(st.permutations(range(rank))))
      v, ref = v.transpose(perm), (lambda r, p: lambda x: np.transpose(r(x), p))(ref, perm)
      now = [now[p] for p in perm]
    elif kind == 'swapaxes':
      a, b = draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1))
      v, ref = v.swapaxes(a, b), (lambda r, a, b: lambda x: np.swapaxes(r(x), a, b))(ref, a, b)
      now[a], now[b] = now[b], now[a]
    elif kind == 'astype':
      v, ref = v.astype('bfloat16'), (lambda r: lambda x: r(x).astype(jnp.bfloat16))(ref)
  return shape, v, ref, draw(st.integers(0, 7))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=view_chains())
def test_views_match_numpy(tmp_path_factory, case):
  """Each chain, on one device and sharded over 2 devices on an even axis (regions, not whole arrays)."""
  shape, v, ref, pick = case
  stored = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
  want = ref(stored)
  path = tmp_path_factory.mktemp('v') / 'c'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'src': stored})
  even = [a for a, n in enumerate(want.shape) if n % 2 == 0]
  if even:
    mesh = jax.make_mesh((2,), ('x',), devices=jax.devices()[:2])
    spec = [None] * want.ndim
    spec[even[pick % len(even)]] = 'x'
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {'dst': jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)}
  out = orbax_nnx.restore(path, target, rules=[('model/src', {'model/dst': v})])
  got = np.asarray(out['dst'])
  assert got.dtype == want.dtype and got.shape == want.shape, (str(v), got.shape, want.shape)
  np.testing.assert_array_equal(got, want, err_msg=str(v))


def test_a_view_on_a_sharded_target_reads_only_its_chunks(tmp_path):
  """`view[1]` of a stored (2, 64, 32) array onto a target sharded 8 ways: only the chunks under index 1 are
  read (counted in bytes), each once, and each shard holds its rows."""
  from orbax_nnx.io.reader import execute
  from orbax_nnx.io.source_arrays import SourceArrays

  w = np.arange(2 * 64 * 32, dtype=np.float32).reshape(2, 64, 32)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'c', {'gating': w}, save_args={'gating': ocp.SaveArgs(chunk_byte_size=16 * 32 * 4, shard_axes=(0,))})
  meta = orbax_nnx.read_item_metadata(tmp_path / 'c')
  assert meta.leaves[('gating',)].metadata.storage.chunk_shape[0] == 1
  mesh = jax.make_mesh((8,), ('x',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x', None))
  target = nnx.State({'up': nnx.Param(jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sharding))})
  plan = orbax_nnx.plan(tmp_path / 'c', target, rules=[('gating', {'up': view[1]})])
  source = SourceArrays(meta)
  out = execute(plan, {('up',): sharding}, source=source)[('up',)]
  assert source.bytes_read == w.nbytes // 2
  assert len(out.addressable_shards) == 8 and out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out), w[1])
