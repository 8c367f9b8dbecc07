"""Layout detection and plans on synthetic trees: groups, axes, renames, errors, round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import assert_same_state, host, save_nnx, save_plain, sds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.planning.expressions import Cast, Read, Stack, Take, Transpose


def arange(shape, dtype=jnp.float32, offset=0):
  return (jnp.arange(int(np.prod(shape)), dtype=jnp.float32) + offset).reshape(shape).astype(dtype)


def abstract(tree):
  """Nested dict of (Variable class, shape[, dtype]) -> abstract nnx.State."""
  def build(node):
    if isinstance(node, tuple):
      cls, shape, *dtype = node
      return cls(sds(shape, *dtype))
    return {k: build(v) for k, v in node.items()}
  return nnx.State(build(tree))


# -- detection ------------------------------------------------------------------


def test_detects_maxtext_nnx_aux_and_groups(tmp_path):
  tree = {
      'step': jnp.int32(7),
      'params': {'params': {'decoder': {
          'dense_layers_0': {'w': arange((4, 6))}, 'dense_layers_1': {'w': arange((4, 6))},
          'moe_layers_0': {'w': arange((4, 6))}, 'moe_layers_1': {'w': arange((4, 6))},
          'moe_layers_2': {'w': arange((4, 6))},
          'layers_remainder': {'w': arange((4, 6))}}}},
      'opt_state': {'count': jnp.int32(7)},
      'nnx_aux': {'model': {'decoder': {'rngs': {'count': jnp.uint32(3)}}}},
  }
  layout = orbax_nnx.detect_layout(save_plain(tmp_path / 'c', tree))
  assert layout.kind == 'maxtext'
  assert layout.params_root == ('params', 'params') and layout.aux_roots == (('nnx_aux', 'model'),)
  assert ('model', 'decoder', 'rngs', 'count') in layout.canonical
  assert ('optimizer', 'step') in layout.canonical
  groups = {'/'.join(g.path): (g.style, g.length) for g in layout.groups}
  assert groups['model/decoder/dense_layers'] == ('unrolled_suffix', 2)
  assert groups['model/decoder/moe_layers'] == ('unrolled_suffix', 3)
  assert not any('remainder' in g for g in groups)


def test_linen_batch_stats_restore_into_nnx_batchnorm(tmp_path):
  tree = {'step': jnp.int32(1), 'params': {'bn': {'scale': arange((3,)), 'bias': arange((3,), offset=1)}},
          'batch_stats': {'bn': {'mean': arange((3,), offset=2), 'var': arange((3,), offset=3)}},
          'opt_state': {'count': jnp.int32(1)}}
  layout = orbax_nnx.detect_layout(save_plain(tmp_path / 'c', tree))
  assert layout.aux_roots == (('batch_stats',),)
  model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  out = orbax_nnx.restore(tmp_path / 'c', nnx.State({'bn': nnx.state(model)}))
  np.testing.assert_array_equal(host(out['bn']['mean']), arange((3,), offset=2))
  assert isinstance(out['bn']['var'], nnx.BatchStat)


@pytest.mark.parametrize('base', [False, True])
def test_detects_param_only_checkpoints(tmp_path, base):
  params = {'layers': {'0': {'w': {'value': arange((2, 3))}}, '1': {'w': {'value': arange((2, 3))}}}}
  layout = orbax_nnx.detect_layout(save_plain(tmp_path / 'c', {'base': params} if base else params))
  assert layout.kind == 'params' and layout.flavour == 'raw'
  assert layout.params_root == (('base',) if base else ())
  assert [(g.style, g.length) for g in layout.groups] == [('unrolled_index', 2)]


def test_not_a_checkpoint_for_detect(tmp_path):
  with pytest.raises(errors.NotACheckpointError):
    orbax_nnx.detect_layout(tmp_path)


# -- stacking and unrolling -------------------------------------------------------


def test_dense_and_moe_groups_stack_with_indices_restarting(tmp_path):
  src = {'decoder': {**{f'dense_layers_{i}': {'w': nnx.Param(arange((4, 6), offset=100 * i))} for i in range(2)},
                     **{f'moe_layers_{i}': {'w': nnx.Param(arange((4, 6), offset=-100 * i))} for i in range(3)},
                     'layers_remainder': {'w': nnx.Param(arange((5,)))}}}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({'decoder': {'dense_layers': {'w': (nnx.Param, (2, 4, 6))},
                                 'moe_layers': {'w': (nnx.Param, (4, 3, 6))},
                                 'layers_remainder': {'w': (nnx.Param, (5,))}}})
  the_plan = orbax_nnx.plan(path, target)
  assert isinstance(the_plan.entries[('decoder', 'dense_layers', 'w')], Stack)
  out = orbax_nnx.restore(path, target)
  np.testing.assert_array_equal(host(out['decoder']['dense_layers']['w'])[1], arange((4, 6), offset=100))
  np.testing.assert_array_equal(host(out['decoder']['moe_layers']['w'])[:, 2], arange((4, 6), offset=-200))
  np.testing.assert_array_equal(host(out['decoder']['layers_remainder']['w']), arange((5,)))


def test_rng_state_at_axis_0_beside_params_at_1(tmp_path):
  # shapes that leave the axis ambiguous. From an NNX source no convention decides (nnx.vmap stacks on
  # 0, MaxText NNX Params on 1): it is an error until scan_axis says, per path
  src = {'layers': {'w': nnx.Param(arange((4, 4, 8))), 'count': nnx.RngCount(arange((4, 4), jnp.uint32))}}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({f'layers_{i}': {'w': (nnx.Param, (4, 8)), 'count': (nnx.RngCount, (4,), jnp.uint32)}
                     for i in range(4)})
  with pytest.raises(errors.PlanError, match='ambiguous layer axis'):
    orbax_nnx.plan(path, target)
  axes = {'model/layers/w': 1, 'model/layers/count': 0}
  the_plan = orbax_nnx.plan(path, target, scan_axis=axes)
  assert the_plan.entries[('layers_2', 'w')] == Take(Read(('layers', 'w', 'value'), (4, 4, 8), np.dtype('float32')), 2, 1)
  assert the_plan.entries[('layers_2', 'count')].axis == 0
  out = orbax_nnx.restore(path, target, scan_axis=axes)
  np.testing.assert_array_equal(host(out['layers_2']['w']), np.asarray(arange((4, 4, 8)))[:, 2])
  np.testing.assert_array_equal(host(out['layers_2']['count']), np.asarray(arange((4, 4), jnp.uint32))[2])


def test_ambiguous_axis_is_an_error_naming_the_path(tmp_path):
  src = {'layers': {'w': nnx.Variable(arange((3, 3)))}}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({f'layers_{i}': {'w': (nnx.Param, (3,))} for i in range(3)})
  with pytest.raises(errors.PlanError, match=r'layers_0/w: ambiguous layer axis .*scan_axis'):
    orbax_nnx.plan(path, target, param_scan_axis=5)
  the_plan = orbax_nnx.plan(path, target, scan_axis={'model/layers/w': 1})
  assert the_plan.entries[('layers_0', 'w')].axis == 1


def test_unrolled_gaps_are_an_error(tmp_path):
  src = {'layers_0': {'w': nnx.Param(arange((2,)))}, 'layers_2': {'w': nnx.Param(arange((2,)))}}
  path = save_nnx(tmp_path / 'c', src)
  with pytest.raises(errors.LayoutError, match='gaps'):
    orbax_nnx.plan(path, abstract({'layers': {'w': (nnx.Param, (2, 2))}}))


def test_unequal_layer_shapes_are_an_error(tmp_path):
  src = {'layers_0': {'w': nnx.Param(arange((2,)))}, 'layers_1': {'w': nnx.Param(arange((3,)))}}
  path = save_nnx(tmp_path / 'c', src)
  with pytest.raises(errors.LayoutError, match='unequal shapes'):
    orbax_nnx.plan(path, abstract({'layers': {'w': (nnx.Param, (2, 2))}}))


def test_moved_axis_and_cast(tmp_path):
  src = {'layers': {'w': nnx.Param(arange((5, 3, 7)))}, 'step': nnx.Variable(jnp.int32(9))}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({'layers': {'w': (nnx.Param, (3, 5, 7), jnp.bfloat16)}, 'step': (nnx.Variable, (), jnp.uint32)})
  the_plan = orbax_nnx.plan(path, target)
  assert isinstance(the_plan.entries[('layers', 'w')], Cast)
  assert isinstance(the_plan.entries[('layers', 'w')].expr, Transpose)
  out = orbax_nnx.restore(path, target)
  want = np.moveaxis(np.asarray(arange((5, 3, 7))), 1, 0).astype(jnp.bfloat16)
  np.testing.assert_array_equal(host(out['layers']['w']), want)
  assert out['step'].get_value().dtype == jnp.uint32 and int(out['step'].get_value()) == 9


def test_rename_rules_seed_a_reference_model(tmp_path):
  src = {'model': {'w': nnx.Param(arange((2, 2)))}}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({'reference_model': {'w': (nnx.Param, (2, 2))}})
  out = orbax_nnx.restore(path, target, rules=[('model/(.*)', r'reference_model/\1')])
  np.testing.assert_array_equal(host(out['reference_model']['w']), arange((2, 2)))


def test_nested_list_style_groups(tmp_path):
  src = {'blocks': {str(i): {'w': nnx.Param(arange((3, 2), offset=i))} for i in range(4)}}
  path = save_nnx(tmp_path / 'c', src)
  target = abstract({'blocks': {'w': (nnx.Param, (4, 3, 2))}})
  out = orbax_nnx.restore(path, target)
  np.testing.assert_array_equal(host(out['blocks']['w'])[2], arange((3, 2), offset=2))


# -- sharded targets ----------------------------------------------------------------


def test_sharded_unroll_reads_only_needed_regions(tmp_path):
  x = arange((8, 16, 4))
  path = save_nnx(tmp_path / 'c', {'layers': {'w': nnx.Param(x)}})
  mesh = jax.make_mesh((4, 2), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a', 'b'))
  target = nnx.State({f'layers_{i}': {'w': nnx.Param(jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding))}
                      for i in range(8)})
  out = orbax_nnx.restore(path, target)
  for i in range(8):
    w = out[f'layers_{i}']['w'].get_value()
    assert w.sharding == sharding
    np.testing.assert_array_equal(np.asarray(w), np.asarray(x)[i])


def test_layer_axis_sharded_target(tmp_path):
  layers = {f'layers_{i}': {'w': nnx.Param(arange((6, 4), offset=10 * i))} for i in range(8)}
  path = save_nnx(tmp_path / 'c', layers)
  mesh = jax.make_mesh((8,), ('layers',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('layers'))
  target = nnx.State({'layers': {'w': nnx.Param(jax.ShapeDtypeStruct((8, 6, 4), jnp.float32, sharding=sharding))}})
  out = orbax_nnx.restore(path, target)
  w = out['layers']['w'].get_value()
  assert w.sharding == sharding
  for i in range(8):
    np.testing.assert_array_equal(np.asarray(w)[i], arange((6, 4), offset=10 * i))


# -- round trips ----------------------------------------------------------------------


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    n=st.integers(1, 4),
    member=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    axis_frac=st.floats(0, 1),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32]),
)
def test_stack_unroll_roundtrip_is_identity(tmp_path_factory, n, member, axis_frac, dtype):
  axis = min(int(axis_frac * (len(member) + 1)), len(member))
  stacked_shape = tuple(member[:axis]) + (n,) + tuple(member[axis:])
  x = arange(stacked_shape, dtype)
  root = tmp_path_factory.mktemp('rt')
  src = save_nnx(root / 'stacked', {'layers': {'w': nnx.Param(x)}})
  unrolled_target = abstract({f'layers_{i}': {'w': (nnx.Param, tuple(member), dtype)} for i in range(n)})
  unrolled = orbax_nnx.restore(src, unrolled_target, scan_axis=axis)
  for i in range(n):
    np.testing.assert_array_equal(host(unrolled[f'layers_{i}']['w']), np.take(np.asarray(x), i, axis=axis))
  back_path = save_nnx(root / 'unrolled', unrolled)
  back = orbax_nnx.restore(back_path, abstract({'layers': {'w': (nnx.Param, stacked_shape, dtype)}}), scan_axis=axis)
  assert_same_state(back, nnx.State({'layers': {'w': nnx.Param(x)}}))


@pytest.mark.parametrize('streamed', [False, True], ids=['decoded-whole', 'streamed-in-bands'])
@pytest.mark.parametrize('budget', [None, 1], ids=['default', 'budget-under-one-chunk'])
def test_layers_scattered_from_chunks_that_span_them_read_each_chunk_once(tmp_path, monkeypatch, budget, streamed):
  """Chunks keep the layer axis whole (as sharded saves do): each is decoded once and scattered, also when
  the budget is smaller than one chunk (then one chunk is in flight at a time), and band by band when
  chunks decode as streams."""
  from orbax_nnx.io.reader import _scatter_groups, execute
  from orbax_nnx.io.source_arrays import SourceArrays
  from orbax_nnx.planning.planner import build, target_leaves
  from orbax_nnx.sources import chunk_stream

  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0 if streamed else 2**40)
  monkeypatch.setattr(chunk_stream, 'BAND_BYTES', 8 * 32 * 4)  # a band: one row of every layer

  x = np.asarray(arange((6, 8, 32)))  # layers on axis 1, Linen style
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', {'params': {'params': {'layers': {'w': x}}}},
             save_args={'params': {'params': {'layers': {'w': ocp.SaveArgs(chunk_byte_size=6 * 8 * 8 * 4)}}}})
  ckptr.wait_until_finished()
  meta = orbax_nnx.read_item_metadata(tmp_path / 'c')
  assert meta.leaves[('params', 'params', 'layers', 'w')].metadata.storage.chunk_shape[1] == 8  # spans layers
  mesh = jax.make_mesh((4, 2), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('b', 'a'))
  target = nnx.State({f'layers_{i}': {'w': nnx.Param(jax.ShapeDtypeStruct((6, 32), jnp.bfloat16, sharding=sharding))}
                      for i in range(8)})
  layout = orbax_nnx.detect_layout(tmp_path / 'c')
  the_plan = build(layout, target_leaves(target, ()))
  shardings = {p: sharding for p in the_plan.entries}
  source = SourceArrays(meta) if budget is None else SourceArrays(meta, cache_bytes=budget)
  assert len(_scatter_groups(the_plan, shardings, source)) == 1
  assert source.streamed(('params', 'params', 'layers', 'w')) == streamed
  out = execute(the_plan, shardings, source) if budget is None else execute(the_plan, shardings, source,
                                                                            inflight_bytes=budget)
  assert source.bytes_read == x.nbytes  # every chunk read once
  for i in range(8):
    w = out[(f'layers_{i}', 'w')]
    assert w.sharding == sharding and w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(w, np.float32), x[:, i].astype(jnp.bfloat16).astype(np.float32))


def test_memory_budget_bounds_the_chunk_cache_and_stays_exact(tmp_path, monkeypatch):
  """A stacked array stored as one chunk, unrolled under a budget smaller than that chunk: the cache
  keeps one chunk at most (it is decoded again per layer), the values stay exact."""
  from orbax_nnx.io import reader

  x = arange((8, 64, 32))
  path = save_nnx(tmp_path / 'c', {'layers': {'w': nnx.Param(x)}})
  target = abstract({f'layers_{i}': {'w': (nnx.Param, (64, 32))} for i in range(8)})
  made = []
  original = reader.SourceArrays.__init__

  def recording(self, meta, cache_bytes=reader.DEFAULT_CACHE_BYTES):
    made.append(cache_bytes)
    original(self, meta, cache_bytes)

  monkeypatch.setattr(reader.SourceArrays, '__init__', recording)
  out = orbax_nnx.restore(path, target, scan_axis=0, memory_budget=16 * 1024)
  assert made == [8 * 1024]
  for i in range(8):
    np.testing.assert_array_equal(host(out[f'layers_{i}']['w']), np.asarray(x)[i])
  loaded = orbax_nnx.load_params(path, target, scan_axis=0, memory_budget=16 * 1024)
  np.testing.assert_array_equal(host(loaded['layers_3']['w']), np.asarray(x)[3])
  with pytest.raises(errors.OptionError, match='memory_budget'):
    orbax_nnx.restore(path, target, memory_budget=0)


def test_reads_in_flight_wait_rather_than_decode_a_chunk_twice(tmp_path, monkeypatch):
  """Each array is one stored chunk, read by 8 target shards. With a cache holding one chunk, the next
  array's reads wait for the last shard of the one before (held back here) rather than evict a chunk
  that shard still needs."""
  import time

  from orbax_nnx.io import reader
  from orbax_nnx.planning.planner import build, target_leaves

  xs = {f'w{i}': np.asarray(arange((64, 256), offset=i)) for i in range(3)}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', xs)
  ckptr.wait_until_finished()
  original = reader.evaluate

  def late_last_shard(expr, region, source):
    if region[0].start == 56:  # the last shard of each array starts after the others are done
      time.sleep(0.1)
    return original(expr, region, source)

  monkeypatch.setattr(reader, 'evaluate', late_last_shard)
  mesh = jax.make_mesh((8,), ('a',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a'))
  target = nnx.State({k: nnx.Param(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)) for k, v in xs.items()})
  meta = orbax_nnx.read_item_metadata(tmp_path / 'c')
  the_plan = build(orbax_nnx.detect_layout(tmp_path / 'c'), target_leaves(target, ()))
  source = reader.SourceArrays(meta, cache_bytes=xs['w0'].nbytes * 5 // 4)
  out = reader.execute(the_plan, {p: sharding for p in the_plan.entries}, source, inflight_bytes=4 * xs['w0'].nbytes)
  assert source.bytes_read == sum(x.nbytes for x in xs.values())  # every chunk decoded once
  for k, x in xs.items():
    np.testing.assert_array_equal(np.asarray(out[(k,)]), x)
