"""`make demo`: train a small NNX transformer, checkpoint it, restore it elsewhere.

1. builds a stacked-layer (`nnx.vmap`) transformer and an `nnx.Optimizer` on a
   (2, 4) mesh of 8 simulated CPU devices, trains a few steps;
2. saves model + optimizer through `ocp.CheckpointManager(..., handler_registry=orbax_nnx.nnx_registry)`
   with the unchanged `StandardSave` call;
3. in a fresh Python process, restores onto a (4, 2) mesh, checks every array
   bit-exactly against the saved values, and runs a forward pass;
4. also restores with no args at all (Variable types from our metadata).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

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

  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx
  from orbax_nnx import examples as ex

  cfg = ex.Config()
  mesh = ex.make_mesh((2, 4))
  with __import__('jax').set_mesh(mesh):
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
  with open(os.path.join(root, 'expected.json'), 'w') as f:
    json.dump({'model': _checksums(nnx.state(model)), 'optimizer': _checksums(nnx.state(optimizer))}, f)


def restore_elsewhere(root: str) -> None:
  import json

  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx
  from orbax_nnx import examples as ex

  with open(os.path.join(root, 'expected.json')) as f:
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--stage', choices=['all', 'save', 'restore'], default='all')
  parser.add_argument('--dir', default=None, help='checkpoint root (default: a temp dir)')
  args = parser.parse_args(argv)
  _setup_env()
  root = args.dir or tempfile.mkdtemp(prefix='orbax_nnx_demo_')
  if args.stage == 'save':
    return train_and_save(root)
  if args.stage == 'restore':
    return restore_elsewhere(root)
  for stage in ('save', 'restore'):
    subprocess.run([sys.executable, '-m', 'orbax_nnx.demo', '--stage', stage, '--dir', root], check=True)
  print(f'[done] checkpoints under {root}')


if __name__ == '__main__':
  main()
