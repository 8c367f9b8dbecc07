"""`make demo`: train a small NNX transformer, checkpoint it, restore it elsewhere.

1. builds a stacked-layer (`nnx.vmap`) transformer and an `nnx.Optimizer` on a
   (2, 4) mesh of 8 simulated CPU devices, trains a few steps;
2. saves model + optimizer through `ocp.CheckpointManager(..., handler_registry=orbax_nnx.nnx_registry)`
   with the unchanged `StandardSave` call;
3. in a fresh Python process, restores onto a (4, 2) mesh, checks every array
   bit-exactly against the saved values, and runs a forward pass;
4. also restores with no args at all (Variable types from our metadata);
5. trains the Linen twin of the model (nn.scan, params stacked on axis 1, a flax
   TrainState with clip + adamw), saves it with plain Orbax, and restores it straight into
   the NNX model (stacked, axis moved to 0) and into an unrolled one, checking outputs;
6. converts the Linen checkpoint to NNX on disk and back (bit-exact), and compares them;
7. serves: loads only the Params in bf16 into a differently meshed, unrolled decode model
   and runs a forward pass; exports a bf16 decode checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from etils import epath

_DEVICES = '--xla_force_host_platform_device_count=8'


def _setup_env() -> None:
  if _DEVICES not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _DEVICES).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _checksums(state) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  out = {}
  for path, v in nnx.to_flat_state(state):
    x = v.get_value()
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out['/'.join(map(str, path))] = (type(v).__name__, str(x.dtype), np.asarray(x).tobytes().hex()[:32],
                                     float(np.asarray(x, np.float64).sum()))
  return out


def train_and_save(root: str) -> None:
  import json

  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx
  from orbax_nnx import examples as ex

  cfg = ex.Config()
  mesh = ex.make_mesh((2, 4))
  with jax.set_mesh(mesh):
    model = ex.Transformer(cfg, rngs=nnx.Rngs(0, dropout=1))
    optimizer = ex.make_optimizer(model)
  loss = ex.train_steps(model, optimizer, 5)
  print(f'[train] {cfg.num_layers} stacked layers on mesh (fsdp=2, tensor=4); 5 steps, loss {loss:.4f}')
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(5, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
    ))
  kernel = model.layers.up.kernel.get_value()
  print(f'[save]  step 5 -> {root}  (layers/up/kernel {kernel.shape}, sharding {kernel.sharding.spec})')
  with (epath.Path(root) / 'expected.json').open('w') as f:
    json.dump({'model': _checksums(nnx.state(model)), 'optimizer': _checksums(nnx.state(optimizer))}, f)


def restore_elsewhere(root: str) -> None:
  import json

  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx
  from orbax_nnx import examples as ex

  with (epath.Path(root) / 'expected.json').open() as f:
    expected = json.load(f)
  cfg = ex.Config()
  mesh = ex.make_mesh((4, 2))

  def init():
    model = ex.Transformer(cfg, rngs=nnx.Rngs(42))
    return model, ex.make_optimizer(model)

  with jax.set_mesh(mesh):
    abstract_model, abstract_opt = nnx.eval_shape(init)  # AbstractMesh shardings: concretized for you
  graphdef, model_state = nnx.split(abstract_model)
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model_state),
        optimizer=ocp.args.StandardRestore(nnx.state(abstract_opt)),
    ))
  got = {'model': _checksums(restored.model), 'optimizer': _checksums(restored.optimizer)}
  got = json.loads(json.dumps(got))
  assert got == expected, 'restored arrays differ from the saved ones'
  kernel = restored.model['layers']['up']['kernel'].get_value()
  n = sum(len(v) for v in got.values())
  print(f'[restore] fresh process, step {step} onto mesh (fsdp=4, tensor=2): {n} arrays bit-exact;'
        f' layers/up/kernel sharding {kernel.sharding.spec} over {kernel.sharding.mesh.shape}')
  model = nnx.merge(graphdef, restored.model)
  logits = model(jnp.arange(16).reshape(2, 8) % cfg.vocab)
  print(f'[forward] logits {logits.shape}, mean {float(logits.mean()):+.5f}')
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    untargeted = mngr.restore(step)
  kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(untargeted.optimizer)}
                 | {type(v).__name__ for _, v in nnx.to_flat_state(untargeted.model)})
  print(f'[restore] no args, no target: Variable types from our metadata: {", ".join(kinds)}')


def linen_and_serving(root: str) -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from flax import nnx
  from flax.training import train_state

  import orbax_nnx
  from orbax_nnx import examples as ex

  cfg = ex.Config()

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.Dense(cfg.mlp, name='up')(nn.LayerNorm(name='norm')(x))
      return x + nn.Dense(cfg.emb, name='down')(jax.nn.gelu(h)), None

  class LinenTransformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(cfg.vocab, cfg.emb, name='embed')(tokens)
      x, _ = nn.scan(Block, variable_axes={'params': 1}, split_rngs={'params': True},
                     length=cfg.num_layers)(name='layers')(x, None)
      return nn.Dense(cfg.vocab, name='head')(nn.LayerNorm(name='final_norm')(x))

  linen = LinenTransformer()
  variables = linen.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  state = train_state.TrainState.create(apply_fn=linen.apply, params=variables,
                                        tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)))
  tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, cfg.vocab)

  @jax.jit
  def step(state):
    def loss(p):
      logits = state.apply_fn(p, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(3):
    state = step(state)
  linen_dir = epath.Path(root) / 'linen'
  with ocp.CheckpointManager(linen_dir) as mngr:
    mngr.save(3, args=ocp.args.Composite(items=ocp.args.StandardSave(state)))
  print(f'[linen] trained 3 steps, saved a MaxText-style TrainState (params/params, Adam) -> {linen_dir}')
  print(f'[layout] {orbax_nnx.detect_layout(linen_dir / "3" / "items").summary()}')

  want = state.apply_fn(state.params, tokens[:, :-1])
  for scan_layers in (True, False):
    ncfg = ex.Config(scan_layers=scan_layers)
    with jax.set_mesh(ex.make_mesh((4, 2))):
      model = ex.Transformer(ncfg, rngs=nnx.Rngs(0))
      optimizer = ex.make_optimizer(model)
    with ocp.CheckpointManager(linen_dir, handler_registry=orbax_nnx.nnx_registry) as mngr:
      mngr.restore(3, args=ocp.args.Composite(items=orbax_nnx.NNXRestore(
          {'model': model, 'optimizer': optimizer}, missing='keep')))  # Linen has no NNX rng state
    err = float(jnp.abs(model(tokens[:, :-1]) - want).max())
    kind = 'stacked (axis 1 -> 0)' if scan_layers else 'unrolled (layers_0..3)'
    print(f'[linen->nnx] restored into the NNX model, {kind}: step {int(optimizer.step[...])},'
          f' max |logits - linen| = {err:.2e}')

  nnx_dir, back_dir = epath.Path(root) / 'converted_nnx', epath.Path(root) / 'converted_back'
  print(f'[convert] {orbax_nnx.convert(linen_dir, nnx_dir, scan_layers=False).summary()}')
  print(f'[convert] {orbax_nnx.convert(nnx_dir, back_dir).summary()}')
  from orbax_nnx.compare import compare
  report = compare(linen_dir / '3' / 'items', back_dir, values=True)
  print(f'[compare] linen vs converted-and-back: {report.compared} leaves,'
        f' {"bit-exact" if report.equal and all(d.max_abs == 0 for d in report.values) else "DIFFERENT"}')

  with jax.set_mesh(ex.make_mesh((2, 4))):
    server = ex.Transformer(ex.Config(scan_layers=False), rngs=nnx.Rngs(7))
  orbax_nnx.load_params(linen_dir, server, dtype=jnp.bfloat16)
  kernel = server.layers_2.up.kernel.get_value()
  logits = server(tokens[:, :-1])
  err = float(jnp.abs(logits.astype(jnp.float32) - want).max())
  print(f'[serve] Params only, bf16, mesh (fsdp=2, tensor=4), unrolled: layers_2/up/kernel {kernel.dtype}'
        f' {kernel.sharding.spec}; max |logits - fp32 linen| = {err:.3f}')
  decode_dir = epath.Path(root) / 'decode_bf16'
  print(f'[export] {orbax_nnx.export_params(linen_dir, decode_dir, scan_layers=False).summary()}')
  del np


def hf_and_v1(root: str) -> None:
  """Orbax v1 round trip of an NNX Llama, then Hugging Face safetensors out and back in (scanned)."""
  import dataclasses
  import json

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from orbax.checkpoint.experimental import v1

  import orbax_nnx
  from orbax_nnx import llama

  cfg = llama.LlamaConfig(vocab=128, emb=64, mlp=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab)
  want = model(tokens)
  v1_dir = epath.Path(root) / 'v1_llama'
  v1.save_checkpointables(v1_dir, {'model': model})
  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(1)))
  loaded = v1.load_checkpointables(v1_dir, {'model': nnx.state(abstract)})['model']
  print(f'[v1] ocp.v1.save_checkpointables/load_checkpointables: {type(loaded["embed"]["embedding"]).__name__}'
        f' kept, handler {json.loads((v1_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]["model"]}')
  hf_dir = epath.Path(root) / 'hf_llama'
  report = orbax_nnx.export_params(v1_dir / 'model', hf_dir, format='safetensors', target=abstract,
                                   export_rules=llama.hf_export_rules(cfg), dtype=None, max_shard_size=512 * 1024)
  print(f'[hf] exported to Hugging Face safetensors ({report.bytes_written} B):'
        f' {sorted(p.name for p in hf_dir.iterdir())}')
  scanned = dataclasses.replace(cfg, scan_layers=True)
  back = orbax_nnx.restore(hf_dir, nnx.eval_shape(lambda: llama.Llama(scanned, rngs=nnx.Rngs(3))),
                           rules=llama.hf_rules(scanned), scan_axis=llama.SCAN_AXIS)
  err = float(jnp.abs(back(tokens) - want).max())
  print(f'[hf] loaded back by rules into the scanned model (layers stacked on the way):'
        f' max |logits - original| = {err:.2e}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--stage', choices=['all', 'save', 'restore', 'linen', 'hf'], default='all')
  parser.add_argument('--dir', default=None, help='checkpoint root (default: a temp dir)')
  args = parser.parse_args(argv)
  _setup_env()
  root = args.dir or tempfile.mkdtemp(prefix='orbax_nnx_demo_')
  if args.stage == 'save':
    return train_and_save(root)
  if args.stage == 'restore':
    return restore_elsewhere(root)
  if args.stage == 'linen':
    return linen_and_serving(root)
  if args.stage == 'hf':
    return hf_and_v1(root)
  for stage in ('save', 'restore', 'linen', 'hf'):
    subprocess.run([sys.executable, '-m', 'orbax_nnx.demo', '--stage', stage, '--dir', root], check=True)
  print(f'[done] checkpoints under {root}')


if __name__ == '__main__':
  main()
