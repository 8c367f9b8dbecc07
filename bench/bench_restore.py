"""Restore-time conversion: a scanned Linen train state (Params at axis 1, Adam moments)
restored into (a) an unrolled NNX train state and (b) a stacked one with the layer axis
moved to 0, vs a plain Orbax restore of the same checkpoint in its own layout. Same run;
each measurement in its own process. Prints wall and CPU seconds, ratios, peak RSS and
bytes read (rchar from /proc/self/io) against the bytes restored.

    .venv/bin/python bench/bench_restore.py [--params-mib 1024] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

EMB, MLP = 1024, 4096


def _vmhwm_mib() -> float:
  """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith('VmHWM')).split()[1]) / 1024


def _layers(params_mib: int) -> int:
  return max(2, int(params_mib * 2**20 / (2 * EMB * MLP * 4)))


def linen_tree(layers: int, seed: int = 0):
  """A MaxText-style Linen train state: params/params, Adam mu/nu under opt_state, int32 step."""
  import numpy as np

  rng = np.random.default_rng(seed)

  def params(scale):
    return {'embed': {'embedding': (rng.standard_normal((256, EMB), np.float32) * scale)},
            'layers': {'up': {'kernel': rng.standard_normal((EMB, layers, MLP), np.float32) * scale},
                       'down': {'kernel': rng.standard_normal((MLP, layers, EMB), np.float32) * scale},
                       'norm': {'scale': rng.standard_normal((EMB, layers), np.float32) * scale}}}

  return {'step': np.int32(10), 'params': {'params': params(1.0)},
          'opt_state': {'1': {'0': {'count': np.int32(10), 'mu': {'params': params(0.1)},
                                    'nu': {'params': params(0.01)}}}}}


def _target(mode: str, layers: int):
  """Abstract NNX train state (unrolled / stacked at axis 0) or the plain Linen-layout target."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def sds(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

  if mode == 'plain':
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _shape_tree(layers))

  def model(var):
    if mode == 'unrolled':
      blocks = {f'layers_{i}': {'up': {'kernel': var(sds((EMB, MLP)))}, 'down': {'kernel': var(sds((MLP, EMB)))},
                                'norm': {'scale': var(sds((EMB,)))}} for i in range(layers)}
    else:
      blocks = {'layers': {'up': {'kernel': var(sds((layers, EMB, MLP)))},
                           'down': {'kernel': var(sds((layers, MLP, EMB)))},
                           'norm': {'scale': var(sds((layers, EMB)))}}}
    return {'embed': {'embedding': var(sds((256, EMB)))}, **blocks}

  opt_var = nnx.training.optimizer.OptVariable
  return nnx.State({
      'model': model(nnx.Param),
      'optimizer': {'step': nnx.training.optimizer.OptState(jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding)),
                    'opt_state': {1: {0: {'count': nnx.training.optimizer.OptArray(
                        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)),
                        'mu': model(opt_var), 'nu': model(opt_var)}}}},
  })


def _shape_tree(layers):
  import numpy as np

  def params():
    return {'embed': {'embedding': np.empty((256, EMB), np.float32)},
            'layers': {'up': {'kernel': np.empty((EMB, layers, MLP), np.float32)},
                       'down': {'kernel': np.empty((MLP, layers, EMB), np.float32)},
                       'norm': {'scale': np.empty((EMB, layers), np.float32)}}}
  return {'step': np.empty((), np.int32), 'params': {'params': params()},
          'opt_state': {'1': {'0': {'count': np.empty((), np.int32), 'mu': {'params': params()},
                                    'nu': {'params': params()}}}}}


def _rchar() -> int:
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


def worker(mode: str, path: str, layers: int) -> dict:
  import jax
  import orbax.checkpoint as ocp

  import orbax_nnx

  target = _target(mode, layers)
  base = _vmhwm_mib()
  r0, t0, c0 = _rchar(), time.perf_counter(), time.process_time()
  if mode == 'plain':
    out = ocp.StandardCheckpointer().restore(path, target)
  else:
    out = orbax_nnx.restore(path, target)
  jax.block_until_ready(jax.tree.leaves(out))
  wall, cpu, read = time.perf_counter() - t0, time.process_time() - c0, _rchar() - r0
  restored = sum(x.nbytes for x in jax.tree.leaves(out))
  return {'wall': wall, 'cpu': cpu, 'peak_rss_mib': _vmhwm_mib(),
          'restored_mib': restored / 2**20, 'read_mib': read / 2**20, 'base_rss_mib': base}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--params-mib', type=int, default=1024)
  parser.add_argument('--reps', type=int, default=2)
  parser.add_argument('--worker', nargs=3)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.worker:
    mode, path, layers = args.worker
    print(json.dumps(worker(mode, path, int(layers))))
    return
  import orbax.checkpoint as ocp

  layers = _layers(args.params_mib)
  root = tempfile.mkdtemp(prefix='bench_restore_')
  path = os.path.join(root, 'linen')
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, linen_tree(layers))
    ckptr.wait_until_finished()
    modes = ('plain', 'unrolled', 'stacked')
    results = {m: [] for m in modes}
    for _ in range(args.reps):
      for mode in modes:
        out = subprocess.run([sys.executable, __file__, '--worker', mode, path, str(layers)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
          raise RuntimeError(out.stderr[-4000:])
        results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
  size = med['plain']['restored_mib']
  print(f'Linen train state, {layers} scanned layers (axis 1), {size:.0f} MiB restored; {args.reps} reps, medians')
  print(f'{"mode":10} {"wall s":>8} {"cpu s":>8} {"wall x":>7} {"cpu x":>7} {"RSS MiB":>8} {"RSS/rest":>8}'
        f' {"growth/rest":>11} {"read/rest":>9}')
  for m in ('plain', 'unrolled', 'stacked'):
    r = med[m]
    print(f'{m:10} {r["wall"]:8.2f} {r["cpu"]:8.2f} {r["wall"] / med["plain"]["wall"]:7.3f} '
          f'{r["cpu"] / med["plain"]["cpu"]:7.3f} {r["peak_rss_mib"]:8.0f} '
          f'{r["peak_rss_mib"] / r["restored_mib"]:8.2f} '
          f'{(r["peak_rss_mib"] - r["base_rss_mib"]) / r["restored_mib"]:11.2f} {r["read_mib"] / r["restored_mib"]:9.3f}')


if __name__ == '__main__':
  main()
