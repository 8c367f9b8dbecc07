"""Restores at 1,000+ leaves: per-leaf overhead, not bytes. An unscanned Linen train state (`layers_N`,
Adam moments) of small leaves, restored (a) by plain Orbax into its own layout, with and without a target,
(b) untargeted by `orbax_nnx.restore(path)`, and (c) converted on the way into an NNX train state with the
layers stacked. Each measurement in its own process (imports untimed); medians.

    .venv/bin/python bench/bench_leaves.py [--layers 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

NAMES, SHAPE = ('w0', 'w1', 'w2', 'w3'), (24, 256)  # 24 KiB float32 leaves


def linen_state(layers: int) -> dict:
  import numpy as np
  rng = np.random.default_rng(0)

  def params(scale):
    return {f'layers_{i}': {n: rng.standard_normal(SHAPE, np.float32) * scale for n in NAMES} for i in range(layers)}
  return {'step': np.int32(5), 'params': {'params': params(1.0)},
          'opt_state': [{'count': np.int32(5), 'mu': {'params': params(0.1)}, 'nu': {'params': params(0.01)}}, None]}


def worker(mode: str, path: str, layers: str) -> dict:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx

  layers = int(layers)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  jax.numpy.zeros(1).block_until_ready()
  if mode == 'plain':
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=single),
                          linen_state(layers))
  elif mode == 'converted':
    def stacked(kind):
      return {'layers': {n: kind(jax.ShapeDtypeStruct((layers,) + SHAPE, np.float32, sharding=single)) for n in NAMES}}
    opt = nnx.training.optimizer
    target = nnx.State({'model': stacked(nnx.Param), 'optimizer': {
        'step': opt.OptState(jax.ShapeDtypeStruct((), np.uint32, sharding=single)),
        'opt_state': {0: {'count': opt.OptState(jax.ShapeDtypeStruct((), np.int32, sharding=single)),
                          'mu': stacked(opt.OptVariable), 'nu': stacked(opt.OptVariable)}}}})
  t0, c0 = time.perf_counter(), time.process_time()
  if mode == 'plain':
    out = ocp.StandardCheckpointer().restore(path, target)
  elif mode == 'plain_untargeted':
    out = ocp.StandardCheckpointer().restore(path)
  elif mode == 'untargeted':
    out = orbax_nnx.restore(path)
  else:
    out = orbax_nnx.restore(path, target)
  jax.block_until_ready(jax.tree.leaves(out))
  return {'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0, 'leaves': len(jax.tree.leaves(out))}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=100)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--worker', nargs=3)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.worker:
    print(json.dumps(worker(*args.worker)))
    return
  root = tempfile.mkdtemp(prefix='bench_leaves_')
  try:
    path = os.path.join(root, 'linen')
    common.save_plain(path, linen_state(args.layers))
    modes = ('plain', 'plain_untargeted', 'untargeted', 'converted')
    results = {m: [] for m in modes}
    for _ in range(args.reps):
      for mode in modes:
        out = subprocess.run([sys.executable, __file__, '--worker', mode, path, str(args.layers)],
                             capture_output=True, text=True, check=False, env=common.WORKER_ENV)
        if out.returncode:
          raise RuntimeError(out.stderr[-4000:])
        results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {m: {k: statistics.median(r[k] for r in rs) for k in ('wall', 'cpu')} for m, rs in results.items()}
  leaves = results['plain'][0]['leaves']
  print(f'unscanned Linen train state: {leaves} leaves of {SHAPE} float32; {args.reps} reps, medians')
  against = {'plain': 'plain', 'plain_untargeted': 'plain_untargeted', 'untargeted': 'plain_untargeted',
             'converted': 'plain'}
  labels = {'plain': 'plain Orbax, targeted', 'plain_untargeted': 'plain Orbax, no target',
            'untargeted': 'orbax_nnx.restore(path)', 'converted': 'orbax_nnx -> NNX stacked'}
  print(f'{"mode":26} {"wall s":>7} {"cpu s":>7} {"vs":>24} {"wall x":>7}')
  for m in modes:
    base = against[m]
    print(f'{labels[m]:26} {med[m]["wall"]:7.3f} {med[m]["cpu"]:7.3f} {labels[base]:>24} '
          f'{med[m]["wall"] / med[base]["wall"]:7.3f}')


if __name__ == '__main__':
  main()
