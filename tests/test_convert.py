"""On-disk conversion: round trips, plain-Orbax readability, memory bound, refusals."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import linen_client as lc
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx import examples as ex
from orbax_nnx.conversion import convert
from orbax_nnx.io import budget

CFG = ex.Config(num_layers=4)


def stored(path) -> dict:
  """Every stored array by '/'-joined path (keys as strings), read with plain Orbax."""
  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(path))
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in keypath)
    out[name] = np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                           else leaf)
  return out


def file_digest(path) -> dict:
  import hashlib
  import pathlib
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(path).rglob('*') if p.is_file()}


def assert_same_files(a, b):
  sa, sb = stored(a), stored(b)
  assert sorted(sa) == sorted(sb)
  for name in sa:
    assert sa[name].dtype == sb[name].dtype, name
    np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.fixture(scope='module')
def linen_ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp('linen')
  state = lc.train(lc.make_state(CFG, maxtext=True), CFG, 2)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(root / 'ckpt', state)
  ckptr.wait_until_finished()
  return root / 'ckpt', state


@pytest.mark.parametrize('scan_layers', [None, False], ids=['keep-stacked', 'unroll'])
def test_linen_nnx_linen_roundtrip_is_bit_exact(tmp_path, linen_ckpt, scan_layers):
  src, _ = linen_ckpt
  before = file_digest(src)
  report = convert(src, tmp_path / 'nnx', scan_layers=scan_layers)
  assert report.framework == 'nnx' and report.leaves > 0
  layout = orbax_nnx.detect_layout(tmp_path / 'nnx')
  assert layout.kind == 'nnx'
  assert layout.groups[0].style == ('stacked' if scan_layers is None else 'unrolled_suffix')
  back = convert(tmp_path / 'nnx', tmp_path / 'linen')  # no flags: back to the original layout
  assert back.framework == 'linen'
  assert_same_files(src, tmp_path / 'linen')
  assert file_digest(src) == before, 'the source was modified'


def test_converted_nnx_restores_with_plain_orbax_flax_guide(tmp_path, linen_ckpt):
  src, state = linen_ckpt
  convert(src, tmp_path / 'nnx')
  def init():
    model = ex.Transformer(CFG, rngs=nnx.Rngs(0))
    return {'model': model, 'optimizer': ex.make_optimizer(model)}
  _, abstract = nnx.get_abstract_model(init, ex.make_mesh((2, 4)))
  params_only = {'model': abstract['model'].filter(nnx.Param), 'optimizer': abstract['optimizer']}
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'nnx', params_only)
  kernel = host(restored['model']['layers']['up']['kernel'])
  np.testing.assert_array_equal(kernel, np.moveaxis(np.asarray(state.params['params']['layers']['up']['kernel'].value), 1, 0))
  assert restored['optimizer']['step'].get_value().dtype == np.uint32
  mu = host(restored['optimizer']['opt_state'][1][0]['mu']['layers']['down']['kernel'])
  np.testing.assert_array_equal(
      mu, np.moveaxis(np.asarray(state.opt_state[1][0].mu['params']['layers']['down']['kernel'].value), 1, 0))


def test_nnx_to_linen_restores_into_linen_train_state(tmp_path):
  with jax.set_mesh(ex.make_mesh((1, 1))):
    model = ex.Transformer(ex.Config(num_layers=4, scan_layers=False), rngs=nnx.Rngs(0))
    opt = ex.make_optimizer(model)
  ex.train_steps(model, opt, 2)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'nnx', {'model': nnx.state(model, nnx.Param), 'optimizer': nnx.state(opt)})
  ckptr.wait_until_finished()
  target = lc.make_state(CFG, maxtext=True)
  target = target.replace(params=nn.meta.unbox(target.params),  # MaxText saves unboxed params
                          opt_state=nn.meta.unbox(target.opt_state))
  # NNX keeps no optax EmptyState entries: the Linen state as template puts them back
  convert(tmp_path / 'nnx', tmp_path / 'linen', scan_layers=True, template=target)
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'linen', target)
  assert int(restored.step) == 2
  kernel = np.asarray(restored.params['params']['layers']['up']['kernel'])
  for i in range(4):  # stacked at MaxText's axis 1
    np.testing.assert_array_equal(kernel[:, i], host(getattr(model, f'layers_{i}').up.kernel))
  tokens = lc.batch(CFG, 3)[:, :-1]
  np.testing.assert_allclose(np.asarray(restored.apply_fn(restored.params, tokens)), np.asarray(model(tokens)),
                             atol=2e-5)
  # and back: bit-exact NNX again
  convert(tmp_path / 'linen', tmp_path / 'nnx2')
  assert_same_files(tmp_path / 'nnx', tmp_path / 'nnx2')


def test_stacked_output_is_one_layer_per_chunk(tmp_path):
  rng = np.random.default_rng(0)
  layers = {f'layers_{i}': {'w': nnx.Param(jax.numpy.asarray(rng.standard_normal((512, 512), np.float32))),
                            'b': nnx.Param(jax.numpy.asarray(rng.standard_normal((512,), np.float32)))}
            for i in range(4)}
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'nnx', args=orbax_nnx.NNXSave(layers))
  convert(tmp_path / 'nnx', tmp_path / 'linen', scan_layers=True)
  meta = orbax_nnx.read_item_metadata(tmp_path / 'linen')
  w = meta.leaves[('params', 'params', 'layers', 'w')]
  assert w.shape == (512, 4, 512) and w.metadata.storage.chunk_shape == (512, 1, 512)  # 1 MiB layers
  b = meta.leaves[('params', 'params', 'layers', 'b')]
  assert b.shape == (512, 4) and b.metadata.storage.chunk_shape == (512, 4)  # 2 KiB layers: one chunk


@pytest.mark.parametrize('case', ['exists', 'not-a-checkpoint', 'same', 'inside'])
def test_refusals(tmp_path, linen_ckpt, case):
  src, _ = linen_ckpt
  if case == 'exists':
    (tmp_path / 'dst').mkdir()
    args = (src, tmp_path / 'dst')
  elif case == 'not-a-checkpoint':
    (tmp_path / 'junk').mkdir()
    args = (tmp_path / 'junk', tmp_path / 'dst')
  elif case == 'same':
    args = (src, src)
  else:
    args = (src, epath.Path(src) / 'sub')
  with pytest.raises(errors.OrbaxNNXError):
    convert(*args)
  assert not (epath.Path(src) / 'sub').exists()


def test_dst_is_checked_while_src_is_planned_and_its_error_comes_first(tmp_path, linen_ckpt):
  """DST is checked beside the planning, yet a bad DST is still what is reported when both are wrong."""
  src, _ = linen_ckpt
  (tmp_path / 'dst').mkdir()
  (tmp_path / 'dst' / 'notes.txt').write_text('keep me')
  with pytest.raises(errors.DestinationError, match='notes.txt'):
    convert(src, tmp_path / 'dst', overwrite=True, rules=[('no_such_leaf', 'x')])  # an unmatched rule too
  with pytest.raises(errors.OrbaxNNXError) as planned:  # DST fine: the planning error itself
    convert(src, tmp_path / 'new', rules=[('no_such_leaf', 'x')])
  assert not isinstance(planned.value, errors.DestinationError)
  assert (tmp_path / 'dst' / 'notes.txt').read_text() == 'keep me' and not (tmp_path / 'new').exists()


def test_overwrite_replaces_dst(tmp_path, linen_ckpt):
  src, _ = linen_ckpt
  convert(src, tmp_path / 'dst')
  convert(src, tmp_path / 'dst', scan_layers=False, overwrite=True)
  assert orbax_nnx.detect_layout(tmp_path / 'dst').groups[0].style == 'unrolled_suffix'


def _convert_measured(save_script: str, src, dst, options: str) -> dict:
  """Runs `save_script` (writes SRC), then `convert(src, dst, <options>)` in a fresh process: its peak RSS
  growth (VmHWM) and the bytes it read. glibc's mmap threshold is pinned at 1 MiB: its default moves up as
  large buffers are freed, so later ones come from a heap that fragments (measured +8 MiB, +-7 MiB run to
  run, on a 60 MiB growth), which measures the allocator, not what convert holds."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS='cpu', MALLOC_ARENA_MAX='2',
             MALLOC_MMAP_THRESHOLD_=str(2**20))
  subprocess.run([sys.executable, '-c', save_script], check=True, env=env, timeout=300, capture_output=True)
  measure = textwrap.dedent(f"""
      import json, jax.numpy as jnp
      from orbax_nnx.conversion import convert
      def hwm():
        return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
      jnp.zeros(1).block_until_ready()
      base = hwm()
      report = convert({str(src)!r}, {str(dst)!r}, {options})
      print(json.dumps({{'growth': hwm() - base, 'read': report.bytes_read}}))
  """)
  out = subprocess.run([sys.executable, '-c', measure], check=True, env=env, timeout=300, capture_output=True,
                       text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_is_bounded_by_the_buffer(tmp_path):
  """Converting N MiB with a 16 MiB memory budget (smaller than one stored chunk): peak RSS growth
  stays well under N (VmHWM in a subprocess), and each stored byte is still read once."""
  arrays, shape = 16, (512, 16, 1024)  # 16 stored arrays of 32 MiB (one chunk each): N = 512 MiB
  script = textwrap.dedent(f"""
      import numpy as np, orbax.checkpoint as ocp
      rng = np.random.default_rng(0)
      tree = {{'params': {{'layers': {{f'w{{i}}': rng.standard_normal({shape}, np.float32) for i in range({arrays})}}}},
              'step': np.int32(1)}}
      c = ocp.StandardCheckpointer(); c.save({str(tmp_path / 'src')!r}, tree); c.wait_until_finished()
  """)
  figures = _convert_measured(script, tmp_path / 'src', tmp_path / 'dst', 'scan_layers=False, memory_budget=16 * 2**20')
  size = arrays * int(np.prod(shape)) * 4
  assert figures['read'] == size + 4, 'each stored byte (arrays + int32 step) read once'
  assert figures['growth'] < 0.5 * size, (figures['growth'] / 2**20, size / 2**20)


class _LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(2)(x)


class _NNXCNN(nnx.Module):
  """The same model in NNX, attributes named as Linen auto-names its submodules."""

  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(4, 8, rngs=rngs)
    self.BatchNorm_0 = nnx.BatchNorm(8, rngs=rngs)
    self.Dense_1 = nnx.Linear(8, 2, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=3))  # NNX rng state: no place in a flax TrainState

  def __call__(self, x):
    return self.Dense_1(self.dropout(self.BatchNorm_0(self.Dense_0(x))))


def test_nnx_to_flax_style_train_state_with_batch_stats(tmp_path):
  """`linen_style='flax'`: params/<model> and batch_stats/<model>, as flax's TrainState + batch_stats holds them."""
  import optax
  from flax.training import train_state

  class TrainState(train_state.TrainState):
    batch_stats: dict

  model = _NNXCNN(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
  grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)  # moves batch stats, rng counts and Adam moments
  opt.update(model, grads)
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:  # our records tell BatchStat from Param
    ckptr.save(tmp_path / 'nnx', args=orbax_nnx.NNXSave({'model': nnx.state(model), 'optimizer': nnx.state(opt)}))
  variables = _LinenCNN().init(jax.random.key(0), x)
  target = TrainState.create(apply_fn=_LinenCNN().apply, params=variables['params'], tx=optax.adam(1e-2),
                             batch_stats=variables['batch_stats'])
  plan = orbax_nnx.convert(tmp_path / 'nnx', tmp_path / 'flax', to='linen', linen_style='flax', template=target)
  assert plan.leaves == len(jax.tree.leaves(target))
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'flax', target)
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.params['Dense_0']['kernel'], host(model.Dense_0.kernel))
  np.testing.assert_array_equal(restored.batch_stats['BatchNorm_0']['mean'], host(model.BatchNorm_0.mean))
  mu = restored.opt_state[0].mu['Dense_1']['bias']
  np.testing.assert_array_equal(mu, host(opt.opt_state[0].mu['Dense_1']['bias']))
  model.eval()
  logits = restored.apply_fn({'params': restored.params, 'batch_stats': restored.batch_stats}, x, train=False)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), atol=1e-6)
  with pytest.raises(errors.OptionError, match='linen_style'):
    orbax_nnx.convert(tmp_path / 'nnx', tmp_path / 'x', to='linen', linen_style='Flax')


def test_flax_train_state_to_nnx_and_back_in_the_flax_style(tmp_path):
  """A standard flax TrainState (single `params`, `batch_stats`) -> NNX -> Linen `--linen-style flax`: plain
  Orbax restores the result into the same TrainState, every leaf bit-identical; the NNX side runs the model."""
  import optax
  from flax.training import train_state

  class TrainState(train_state.TrainState):
    batch_stats: dict

  x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
  variables = _LinenCNN().init(jax.random.key(0), x)
  state = TrainState.create(apply_fn=_LinenCNN().apply, params=variables['params'], tx=optax.adam(1e-2),
                            batch_stats=variables['batch_stats'])

  def loss(params):
    out, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x, mutable=['batch_stats'])
    return (out ** 2).mean(), updates

  grads, updates = jax.grad(loss, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads).replace(batch_stats=updates['batch_stats'])
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'linen', state)
  assert orbax_nnx.detect_layout(tmp_path / 'linen').preset == 'linen-flax'

  orbax_nnx.convert(tmp_path / 'linen', tmp_path / 'nnx', to='nnx')
  model = _NNXCNN(nnx.Rngs(1))
  orbax_nnx.restore(tmp_path / 'nnx', model, missing='keep', extra='ignore')  # the dropout rng is NNX-only
  model.eval()
  linen_logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(linen_logits), atol=1e-6)

  orbax_nnx.convert(tmp_path / 'nnx', tmp_path / 'back', to='linen', linen_style='flax', template=state)
  from orbax_nnx import cli  # the CLI's --template names a checkpoint of the structure (here the original)
  assert cli.main(['convert', str(tmp_path / 'nnx'), str(tmp_path / 'back_cli'), '--to', 'linen', '--linen-style',
                   'flax', '--template', str(tmp_path / 'linen'), '--quiet']) == 0
  for out in ('back', 'back_cli'):
    restored = ocp.StandardCheckpointer().restore(tmp_path / out, state)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
      assert np.asarray(got).dtype == np.asarray(want).dtype, jax.tree_util.keystr(path)


def test_large_arrays_are_written_block_by_block(tmp_path):
  """Under a 4 MiB budget, the 8 MiB stacked array of an unrolled -> stacked convert is never held whole:
  it is written in chunks of at most 1 MiB, layer by layer, each stored byte read once; plain Orbax reads it."""
  layers = [np.random.default_rng(i).standard_normal((512, 1024)).astype(np.float32) for i in range(4)]
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'model': {f'layers_{i}': {'w': {'value': w}} for i, w in enumerate(layers)},
                                  'optimizer': {'step': {'value': np.uint32(3)}}})
  report = orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', to='linen', scan_layers=True,
                             memory_budget=4 * 2**20)
  assert report.bytes_read == sum(w.nbytes for w in layers) + 4
  info = orbax_nnx.read_item_metadata(tmp_path / 'dst').leaves[('params', 'params', 'layers', 'w')]
  chunk = info.metadata.storage.chunk_shape
  assert info.shape == (512, 4, 1024) and chunk[1] == 1 and np.prod(chunk) * 4 <= 2**20, chunk
  stacked = np.stack(layers, axis=1)
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'dst')
  np.testing.assert_array_equal(np.asarray(restored['params']['params']['layers']['w']), stacked)
  back = orbax_nnx.restore(tmp_path / 'dst', nnx.State({'layers': {'w': nnx.Param(
      jax.ShapeDtypeStruct((4, 512, 1024), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])))}}),
      extra='ignore')
  np.testing.assert_array_equal(host(back['layers']['w']), np.stack(layers))


@pytest.mark.slow
def test_convert_memory_is_flat_as_arrays_grow(tmp_path):
  """Same leaf count, 4x larger arrays (stored in 8 MiB chunks, as a sharded save chunks them), one 32 MiB
  budget: peak RSS growth of the unrolled -> stacked convert stays within 10% (+8 MiB of noise)."""
  growth = {}
  for scale in (1, 4):
    rows = 1024 * scale
    script = textwrap.dedent(f"""
        import numpy as np, jax, orbax.checkpoint as ocp
        rng = np.random.default_rng(0)
        tree = {{'params': {{'params': {{f'layers_{{i}}': {{'w': rng.standard_normal(({rows}, 2048), np.float32)}}
                                       for i in range(4)}}}}, 'step': np.int32(1)}}
        args = jax.tree.map(lambda x: ocp.SaveArgs(chunk_byte_size=8 * 2**20) if np.ndim(x) else ocp.SaveArgs(), tree)
        c = ocp.StandardCheckpointer(); c.save({str(tmp_path / f'src{scale}')!r}, tree, save_args=args)
        c.wait_until_finished()
    """)
    figures = _convert_measured(script, tmp_path / f'src{scale}', tmp_path / f'dst{scale}',
                                "to='nnx', scan_layers=True, memory_budget=32 * 2**20")
    assert figures['read'] == 4 * rows * 2048 * 4 + 4, 'each stored byte read once'
    growth[scale] = figures['growth']
  assert growth[4] <= 1.1 * growth[1] + 8 * 2**20, {k: v / 2**20 for k, v in growth.items()}


def test_blocks_wait_rather_than_decode_a_chunk_twice(tmp_path):
  """Stacking single-chunk layers, each larger than the chunk cache a 4 MiB budget leaves, into an array
  written in many blocks, with blocks evaluated and written concurrently: a block needing the next layer's
  chunk waits for the blocks still reading the current one, so every stored byte is decoded exactly once,
  run after run. (Without that rule, 96 MiB chunks were decoded 1.1-2x in bench_matrix.)"""
  layers = [np.random.default_rng(i).standard_normal((1024, 1024)).astype(np.float32) for i in range(6)]
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'model': {f'layers_{i}': {'w': {'value': w}} for i, w in enumerate(layers)},
                                  'optimizer': {'step': {'value': np.uint32(3)}}})
  for run in range(3):
    report = orbax_nnx.convert(tmp_path / 'src', tmp_path / f'dst{run}', to='linen', scan_layers=True,
                               memory_budget=4 * 2**20)
    assert report.bytes_read == sum(w.nbytes for w in layers) + 4, run
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'dst2')
  stacked = restored['params']['params']['layers']['w']
  np.testing.assert_array_equal(np.moveaxis(stacked, stacked.shape.index(6), 0), np.stack(layers))


def test_default_room_for_every_target_of_a_shared_chunk(tmp_path, monkeypatch):
  """Without a budget, the writer has room for all the layers one stored chunk feeds (so that chunk is
  dropped and the next decoded while they are written); arrays read whole keep the default. Values are
  exact and every stored byte is read once."""
  from orbax_nnx import conversion

  monkeypatch.setattr(budget, 'default_in_flight', lambda read_bytes: 2**20)
  seen = []
  original = conversion._default_buffer_bytes
  monkeypatch.setattr(conversion, '_default_buffer_bytes', lambda *a: seen.append(original(*a)) or seen[-1])
  rng = np.random.default_rng(0)
  stacked = {'up': rng.standard_normal((64, 4, 1024)).astype(np.float32),  # each one chunk spanning its layers
             'down': rng.standard_normal((1024, 4, 96)).astype(np.float32)}  # 1.5 MiB: the largest
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'params': {'params': {'layers': stacked}}, 'step': np.int32(2)})
  report = orbax_nnx.convert(tmp_path / 'src', tmp_path / 'nnx', scan_layers=False, param_scan_axis=1)
  assert seen[-1] == stacked['down'].nbytes + 2 * conversion.MAX_BATCH_BYTES  # the largest chunk + two batches
  assert report.bytes_read == sum(x.nbytes for x in stacked.values()) + 4
  out = orbax_nnx.restore(tmp_path / 'nnx')
  for i in range(4):
    np.testing.assert_array_equal(host(out['model'][f'layers_{i}']['up']), stacked['up'][:, i])
    np.testing.assert_array_equal(host(out['model'][f'layers_{i}']['down']), stacked['down'][:, i])
  orbax_nnx.convert(tmp_path / 'nnx', tmp_path / 'back', to='linen', scan_layers=True)
  assert seen[-1] == 2**20  # each stored layer is read whole: nothing shared


@pytest.mark.parametrize('stored', ['4-MiB-chunks', 'one-chunk-streamed'])
def test_layers_of_chunks_that_span_them_are_written_in_lockstep(tmp_path, monkeypatch, stored):
  """A stacked array stored in chunks that span its layers and split its rows (a sharded save), or as one
  chunk decoded as a stream in 4 MiB units: the unrolled layers are written source chunk (unit) by chunk
  (every layer's rows of one chunk, then the next chunk), so the cache holds two chunks, not the whole
  array, and each stored byte is still read once; each written chunk lies inside one source chunk,
  values are exact and plain Orbax reads them."""
  from orbax_nnx import conversion
  from orbax_nnx.sources import chunk_stream

  monkeypatch.setattr(budget, 'default_in_flight', lambda read_bytes: 2**20)
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0 if stored == 'one-chunk-streamed' else 2**40)
  monkeypatch.setattr(chunk_stream, 'UNIT_BYTES', 4 * 2**20)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((2048, 4, 512)).astype(np.float32)  # 16 MiB; chunks of 512 rows x 4 layers: 4 MiB
  args = ocp.SaveArgs(chunk_byte_size=4 * 2**20) if stored == '4-MiB-chunks' else ocp.SaveArgs()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'params': {'params': {'layers': {'w': w}}}, 'step': np.int32(2)},
               save_args={'params': {'params': {'layers': {'w': args}}}, 'step': ocp.SaveArgs()})
  meta = orbax_nnx.read_item_metadata(tmp_path / 'src')
  assert meta.leaves[('params', 'params', 'layers', 'w')].metadata.storage.chunk_shape == \
      ((512, 4, 512) if stored == '4-MiB-chunks' else w.shape)
  made = []
  original = conversion.WriteSession.__init__

  def recording(self, source, buffer_bytes, **kwargs):
    made.append((source, kwargs.get('lockstep')))
    original(self, source, buffer_bytes, **kwargs)

  monkeypatch.setattr(conversion.WriteSession, '__init__', recording)
  report = orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', scan_layers=False, param_scan_axis=1)
  (source, lockstep), = made
  assert lockstep == {('params', 'params', 'layers', 'w')}
  assert source.cache_bytes == 2 * 4 * 2**20  # two 4 MiB chunks (units) of the 16 MiB array
  assert source.store(('params', 'params', 'layers', 'w')).unit == (512, 4, 512)
  assert report.bytes_read == w.nbytes + 4
  out = orbax_nnx.restore(tmp_path / 'dst')
  plain = ocp.StandardCheckpointer().restore(tmp_path / 'dst')
  written = orbax_nnx.read_item_metadata(tmp_path / 'dst')
  for i in range(4):
    np.testing.assert_array_equal(host(out['model'][f'layers_{i}']['w']), w[:, i])
    np.testing.assert_array_equal(np.asarray(plain['model'][f'layers_{i}']['w']['value']), w[:, i])
    chunk = written.leaves[('model', f'layers_{i}', 'w', 'value')].metadata.storage.chunk_shape
    assert 512 % chunk[0] == 0 and chunk[1] == 512, chunk  # inside one source chunk


def test_blocks_of_an_array_moved_off_its_layer_axis_read_each_unit_together(tmp_path, monkeypatch):
  """A stacked array stored as one chunk decoded in 4 MiB units of rows, its layer axis moved (scanned Linen ->
  NNX stacked), written block by block: each written chunk lies inside one unit, the blocks reading one unit
  are evaluated one after another (every layer's rows of that unit), not layer by layer through every unit,
  so the cache holds two units, not the array; values are exact and each stored byte is read once."""
  from orbax_nnx import conversion
  from orbax_nnx.io import writer
  from orbax_nnx.sources import chunk_stream

  monkeypatch.setattr(budget, 'default_in_flight', lambda read_bytes: 2**20)
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0)
  monkeypatch.setattr(chunk_stream, 'UNIT_BYTES', 4 * 2**20)
  w = np.random.default_rng(0).standard_normal((2048, 4, 512)).astype(np.float32)  # 16 MiB, 4 units of 512 rows
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'params': {'params': {'layers': {'w': w}}}, 'step': np.int32(2)})
  evaluated, sources = [], []
  evaluate = writer._evaluate_block
  monkeypatch.setattr(writer, '_evaluate_block', lambda expr, block, *a: (
      evaluated.append(block), evaluate(expr, block, *a))[1])
  session = conversion.WriteSession.__init__
  monkeypatch.setattr(conversion.WriteSession, '__init__', lambda self, source, *a, **k: (
      sources.append(source), session(self, source, *a, **k))[1])
  report = orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', param_scan_axis=1)
  assert sources[0].store(('params', 'params', 'layers', 'w')).unit == (512, 4, 512)
  assert sources[0].cache_bytes == 2 * 4 * 2**20  # two units of the 16 MiB array
  chunk = orbax_nnx.read_item_metadata(tmp_path / 'dst').leaves[
      ('model', 'layers', 'w', 'value')].metadata.storage.chunk_shape
  assert chunk[0] == 1 and 512 % chunk[1] == 0, chunk  # one layer, inside one unit's rows
  units = [(b[1].start // 512, -(-b[1].stop // 512)) for b in evaluated]  # the rows each block reads, in units
  assert len(evaluated) >= 16 and all(hi - lo == 1 for lo, hi in units), evaluated
  assert [u for u, _ in units] == sorted(u for u, _ in units)  # unit by unit
  assert {b[0].start for b in evaluated[:len(evaluated) // 4]} == set(range(4))  # every layer of the first unit
  assert report.bytes_read == w.nbytes + 4
  np.testing.assert_array_equal(host(orbax_nnx.restore(tmp_path / 'dst')['model']['layers']['w']),
                                np.moveaxis(w, 1, 0))


def test_block_writes_overlap_within_the_bytes_ahead(tmp_path, monkeypatch):
  """A large array's blocks, here 1 MiB inside 4 MiB stored units (`test_blocks_of_an_array_moved_off...`), are
  written several at once (each alone would be its own OCDBT commit): half the blocks its bytes ahead hold are
  writing while the rest are evaluated, and the blocks evaluated and not yet written never exceed those bytes;
  values are exact. (Each write is held back until four have started, or for 2 s: one write at a time, as
  before, would leave at most two running.)"""
  import asyncio

  from orbax_nnx.io import orbax_writes, writer
  from orbax_nnx.sources import chunk_stream

  monkeypatch.setattr(budget, 'default_in_flight', lambda read_bytes: 32 * 2**20)  # write blocks of 2 MiB
  monkeypatch.setattr(chunk_stream, 'MIN_STREAM_BYTES', 0)
  monkeypatch.setattr(chunk_stream, 'UNIT_BYTES', 4 * 2**20)
  w = np.random.default_rng(1).standard_normal((6144, 4, 512)).astype(np.float32)  # 48 MiB: written in blocks
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'params': {'params': {'layers': {'w': w}}}, 'step': np.int32(2)})
  lock, held = threading.Lock(), []  # bytes evaluated and not yet written
  seen = {'started': 0, 'running': 0, 'most running': 0, 'most held': 0, 'blocks': 0}

  async def held_back(write, nbytes):
    await write
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while seen['started'] < 4 and loop.time() < deadline:
      await asyncio.sleep(0.005)
    with lock:
      held.remove(nbytes)
      seen['running'] -= 1

  class Region:
    def __init__(self, region):
      self.region = region

    def write(self, data, **kwargs):
      with lock:
        seen['started'] += 1
        seen['running'] += 1
        seen['most running'] = max(seen['most running'], seen['running'])
      return asyncio.ensure_future(held_back(self.region.write(data, **kwargs), data.nbytes))

  class Store:
    def __init__(self, store):
      self.store = store

    def __getitem__(self, index):
      return Region(self.store[index])

  open_array, evaluate = orbax_writes.open_array, writer._evaluate_block

  async def spied_open(*args, **kwargs):
    return Store(await open_array(*args, **kwargs))

  def spied_evaluate(*args):
    out = evaluate(*args)
    with lock:
      held.append(out.nbytes)
      seen['most held'] = max(seen['most held'], sum(held))
      seen['blocks'] += 1
    return out

  monkeypatch.setattr(orbax_writes, 'open_array', spied_open)
  monkeypatch.setattr(writer, '_evaluate_block', spied_evaluate)
  orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', param_scan_axis=1)
  ahead, block = writer.BLOCKS_AHEAD * 2 * 2**20, 2**20  # BLOCKS_AHEAD write blocks (32 MiB / 16)
  assert writer.writes_in_flight(ahead, block) == 4
  assert seen['blocks'] == w.nbytes // block, seen
  assert 4 <= seen['most running'] <= 4 + 1, seen  # (+ the one started before the oldest is awaited)
  assert seen['most held'] <= ahead, seen
  np.testing.assert_array_equal(host(orbax_nnx.restore(tmp_path / 'dst')['model']['layers']['w']),
                                np.moveaxis(w, 1, 0))


def test_first_reads_start_before_the_save_within_half_the_buffer(tmp_path, monkeypatch):
  """Small arrays' reads are primed before Orbax's save setup (round trips on an object store), in write order,
  within half of the bytes in flight (half the memory budget); the output is still bit-exact. (The arrays are
  cast: arrays stored unchanged are copied chunk by chunk, not read: `chunk_copy`.)"""
  from orbax_nnx.io import writer

  tree = {'params': {'params': {f'layers_{i}': {'w': np.full((16, 16), i, np.float32)} for i in range(40)}}}
  src = tmp_path / 'src'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(src, tree)
  seen = []
  prime = writer.WriteSession.prime

  def spy(self, values):
    prime(self, values)
    seen.append((self.primed_bytes, len(self.primed), self.buffer_bytes))

  monkeypatch.setattr(writer.WriteSession, 'prime', spy)
  buffer_bytes = 10 * 16 * 16 * 4 + 100  # room for 5 primed arrays
  convert(src, tmp_path / 'dst', memory_budget=2 * buffer_bytes, dtype='bfloat16')
  [(primed_bytes, count, budget)] = seen
  assert budget == buffer_bytes and count == 10 and primed_bytes == 10 * 512  # 512 bytes each in bfloat16
  back = orbax_nnx.restore(tmp_path / 'dst')
  for i in range(40):
    w = host(back['model'][f'layers_{i}']['w'])
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(w.astype(np.float32), np.full((16, 16), i, np.float32))


def test_the_default_in_flight_is_sized_from_what_is_read_and_reported(tmp_path, monkeypatch, capsys):
  """Without a memory_budget, arrays in flight are 1/96 of what is read, within 64-256 MiB (32-256 MiB for a load),
  and at most an eighth of the memory available; the report and `plan` say what was chosen."""
  monkeypatch.setattr(budget, 'available_bytes', lambda: 64 * 2**30)
  assert budget.default_in_flight(190 * 2**20) == 64 * 2**20
  assert budget.default_in_flight(3 * 2**30) == 64 * 2**20
  assert budget.default_in_flight(12 * 2**30) == 128 * 2**20
  assert budget.default_in_flight(100 * 2**30) == 256 * 2**20
  assert budget.default_in_flight(190 * 2**20, writes=False) == 32 * 2**20  # a load's floor
  assert budget.default_in_flight(12 * 2**30, writes=False) == 128 * 2**20
  monkeypatch.setattr(budget, 'available_bytes', lambda: 80 * 2**20)
  assert budget.default_in_flight(3 * 2**30) == 10 * 2**20
  monkeypatch.undo()
  tree = {'params': {'params': {f'layers_{i}': {'w': np.full((64, 64), i, np.float32)} for i in range(3)}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', tree)
  report = convert(tmp_path / 'src', tmp_path / 'dst')
  assert report.in_flight_bytes == budget.default_in_flight(3 * 64 * 64 * 4) and report.cache_bytes > 0
  assert 'MiB in flight' in report.summary()
  assert convert(tmp_path / 'src', tmp_path / 'dst2', memory_budget='8MiB').in_flight_bytes == 4 * 2**20
  from orbax_nnx import cli
  assert cli.main(['plan', str(tmp_path / 'src')]) == 0
  assert '# memory: default: 64 MiB of arrays in flight' in capsys.readouterr().out


def test_progress_is_told_the_planned_totals_once_then_each_array(tmp_path, linen_ckpt, capsys):
  calls = []

  class Progress:
    def planned(self, leaves, nbytes):
      calls.append(('planned', leaves, nbytes))

    def __call__(self, array):
      calls.append(('array', array.nbytes))

  src, _ = linen_ckpt
  report = convert(src, tmp_path / 'nnx', to='nnx', scan_layers=False, progress=Progress())
  (kind, leaves, nbytes), *arrays = calls
  assert kind == 'planned' and all(c[0] == 'array' for c in arrays)
  assert leaves == report.leaves == len(arrays) and nbytes == sum(c[1] for c in arrays) == report.bytes_written
  from orbax_nnx import cli  # the command line's progress lines carry the same totals (one plan, not two)
  assert cli.main(['convert', str(src), str(tmp_path / 'cli'), '--to', 'nnx', '--no-scan-layers']) == 0
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last == f'progress: {leaves}/{leaves} leaves, {nbytes / 2**20:.0f}/{nbytes / 2**20:.0f} MiB', last
