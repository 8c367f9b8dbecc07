"""Param-only loading (bytes read counted) and decode-checkpoint export."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import linen_client as lc
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import host

import orbax_nnx
from orbax_nnx import examples as ex

CFG = ex.Config(num_layers=4)
DECODE = ex.Config(num_layers=4, scan_layers=False)


@pytest.fixture(scope='module')
def nnx_train_ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp('nnx')
  with jax.set_mesh(ex.make_mesh((2, 4))):
    model = ex.Transformer(CFG, rngs=nnx.Rngs(0, dropout=1))
    opt = ex.make_optimizer(model)
  ex.train_steps(model, opt, 2)
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(2, args=ocp.args.Composite(state=orbax_nnx.NNXSave({'model': model, 'optimizer': opt})))
  return root, model


def decode_model(mesh_shape=(4, 2)):
  with jax.set_mesh(ex.make_mesh(mesh_shape)):
    return ex.Transformer(DECODE, rngs=nnx.Rngs(99))


def test_load_params_bf16_unrolled_into_live_decode_model(nnx_train_ckpt):
  root, model = nnx_train_ckpt
  server = decode_model()
  out = orbax_nnx.load_params(root, server, dtype=jnp.bfloat16)  # manager root: latest step
  assert out is server
  for i in range(4):
    kernel = getattr(server, f'layers_{i}').up.kernel
    assert kernel.get_value().dtype == jnp.bfloat16
    np.testing.assert_array_equal(host(kernel), host(model.layers.up.kernel)[i].astype(jnp.bfloat16))
  # rng state is neither read nor cast
  assert jax.dtypes.issubdtype(server.layers_0.dropout.rngs.key.get_value().dtype, jax.dtypes.prng_key)
  tokens = jnp.arange(16).reshape(2, 8) % CFG.vocab
  scanned = model(tokens)
  unrolled = server(tokens)
  np.testing.assert_allclose(np.asarray(unrolled, np.float32), np.asarray(scanned), atol=0.1, rtol=0.05)


def test_load_params_fp32_unrolled_matches_scanned_output(nnx_train_ckpt):
  root, model = nnx_train_ckpt
  server = decode_model((1, 1))
  orbax_nnx.load_params(root, server)
  tokens = jnp.arange(16).reshape(2, 8) % CFG.vocab
  np.testing.assert_allclose(np.asarray(server(tokens)), np.asarray(model(tokens)), atol=1e-5)


def test_load_params_from_linen_train_state_abstract_target(tmp_path):
  state = lc.train(lc.make_state(CFG, maxtext=True), CFG, 1)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, args=ocp.args.Composite(items=ocp.args.StandardSave(state)))
  _, abstract = nnx.get_abstract_model(lambda: ex.Transformer(DECODE, rngs=nnx.Rngs(0)), ex.make_mesh((2, 4)))
  params = orbax_nnx.load_params(tmp_path, abstract, dtype=jnp.bfloat16)
  kernel = params['layers_3']['up']['kernel'].get_value()
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding.mesh.shape == {'fsdp': 2, 'tensor': 4}
  want = np.asarray(state.params['params']['layers']['up']['kernel'].value)[:, 3].astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(kernel), want)
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(params))


@pytest.mark.slow
def test_param_only_load_reads_a_third_of_an_adam_checkpoint(tmp_path):
  """Bytes read counted from /proc/self/io in a subprocess: params only, not the moments."""
  script = textwrap.dedent(f"""
      import json, numpy as np, jax, jax.numpy as jnp, orbax.checkpoint as ocp
      from flax import nnx
      import orbax_nnx
      from orbax_nnx import examples as ex
      cfg = ex.Config(vocab=256, emb=512, mlp=1024, num_layers=4)
      with jax.set_mesh(ex.make_mesh((1, 1))):
        model = ex.Transformer(cfg, rngs=nnx.Rngs(0)); opt = ex.make_optimizer(model)
      for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(opt))):
        if v.get_value().ndim:
          v.set_value(jax.random.normal(jax.random.key(i), v.get_value().shape))
      for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        v.set_value(jax.random.normal(jax.random.key(100 + i), v.get_value().shape))
      ckptr = ocp.StandardCheckpointer()
      ckptr.save({str(tmp_path / 'ckpt')!r}, {{'model': nnx.state(model), 'optimizer': nnx.state(opt)}})
      ckptr.wait_until_finished()
      param_bytes = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
      print(json.dumps({{'param_bytes': param_bytes}}))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS='cpu')
  made = subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=300, capture_output=True,
                        text=True)
  param_bytes = json.loads(made.stdout.strip().splitlines()[-1])['param_bytes']
  load = textwrap.dedent(f"""
      import json, jax, orbax_nnx
      from flax import nnx
      from orbax_nnx import examples as ex
      cfg = ex.Config(vocab=256, emb=512, mlp=1024, num_layers=4)
      _, abstract = nnx.get_abstract_model(lambda: ex.Transformer(cfg, rngs=nnx.Rngs(0)), ex.make_mesh((1, 1)))
      def rchar():
        return int([l for l in open('/proc/self/io') if l.startswith('rchar')][0].split()[1])
      r0 = rchar()
      out = orbax_nnx.load_params({str(tmp_path / 'ckpt')!r}, abstract)
      jax.block_until_ready(jax.tree.leaves(out))
      print(json.dumps({{'read': rchar() - r0}}))
  """)
  out = subprocess.run([sys.executable, '-c', load], check=True, env=env, timeout=300, capture_output=True, text=True)
  read = json.loads(out.stdout.strip().splitlines()[-1])['read']
  total = sum(p.stat().st_size for p in (tmp_path / 'ckpt').rglob('*') if p.is_file())
  assert read <= 1.10 * param_bytes, (read, param_bytes)
  assert read < 0.4 * total, (read, total)


@pytest.mark.parametrize('fmt', ['nnx', 'linen'])
def test_export_params_decode_checkpoint(tmp_path, nnx_train_ckpt, fmt):
  root, model = nnx_train_ckpt
  report = orbax_nnx.export_params(root, tmp_path / 'decode', format=fmt, scan_layers=False)
  assert report.leaves > 0
  meta = orbax_nnx.read_item_metadata(tmp_path / 'decode')
  names = ['/'.join(p) for p in meta.leaves]
  assert not any('opt_state' in n or 'rngs' in n for n in names)
  if fmt == 'nnx':
    assert ('layers_2', 'up', 'kernel', 'value') in meta.leaves
    # loads with plain Orbax into the decode model's Params
    _, abstract = nnx.get_abstract_model(lambda: ex.Transformer(DECODE, rngs=nnx.Rngs(0)), ex.make_mesh((2, 4)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                          abstract.filter(nnx.Param))
    plain = ocp.StandardCheckpointer().restore(tmp_path / 'decode', target)
    np.testing.assert_array_equal(host(plain['layers_2']['up']['kernel']),
                                  host(model.layers.up.kernel)[2].astype(jnp.bfloat16))
  else:
    assert ('step',) in meta.leaves and meta.leaves[('step',)].dtype == np.int32
    layout = orbax_nnx.detect_layout(tmp_path / 'decode')
    assert layout.kind == 'linen' and layout.params_root == ('params', 'params')
  # and with load_params, into a live decode model
  server = decode_model()
  orbax_nnx.load_params(tmp_path / 'decode', server, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(host(server.layers_1.down.kernel), host(model.layers.down.kernel)[1].astype(jnp.bfloat16))


class LoraModel(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.LoRALinear(8, 6, lora_rank=2, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.proj(x))


def _lora_ckpt(tmp_path):
  model = LoraModel(nnx.Rngs(0))
  # give the adapters non-zero values (lora_b starts at zero)
  model.proj.lora.lora_b.set_value(jax.random.normal(jax.random.key(1), (2, 6)))
  with ocp.CheckpointManager(tmp_path / 'train', handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model)))
  return model


def test_export_lora_adapters_only(tmp_path):
  model = _lora_ckpt(tmp_path)
  orbax_nnx.export_params(tmp_path / 'train', tmp_path / 'adapters', filter='LoRAParam', dtype=None)
  meta = orbax_nnx.read_item_metadata(tmp_path / 'adapters')
  assert sorted(meta.leaves) == [('proj', 'lora', 'lora_a', 'value'), ('proj', 'lora', 'lora_b', 'value')]
  target = nnx.state(nnx.eval_shape(lambda: LoraModel(nnx.Rngs(0))), nnx.LoRAParam)
  out = orbax_nnx.load_params(tmp_path / 'adapters', target, filter=nnx.LoRAParam)
  np.testing.assert_array_equal(host(out['proj']['lora']['lora_b']), host(model.proj.lora.lora_b))


def test_merge_lora_folds_adapters_into_kernels(tmp_path):
  model = _lora_ckpt(tmp_path)
  orbax_nnx.export_params(tmp_path / 'train', tmp_path / 'merged', merge_lora=True, dtype=None)
  meta = orbax_nnx.read_item_metadata(tmp_path / 'merged')
  assert not any('lora' in p for p in meta.leaves)
  served = MergedModel(nnx.Rngs(5))  # plain Linear layers: no adapters at serving time
  orbax_nnx.load_params(tmp_path / 'merged', served)
  want = host(model.proj.kernel) + host(model.proj.lora.lora_a) @ host(model.proj.lora.lora_b)
  np.testing.assert_allclose(host(served.proj.kernel), want, rtol=1e-6, atol=1e-6)
  x = jax.random.normal(jax.random.key(3), (4, 8))
  np.testing.assert_allclose(np.asarray(served(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


class MergedModel(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(8, 6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.proj(x))
