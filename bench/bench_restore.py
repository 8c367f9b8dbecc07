"""Restore-time conversion: a scanned Linen train state (Params at axis 1, Adam moments)
restored into (a) an unrolled NNX train state and (b) a stacked one with the layer axis
moved to 0, vs a plain Orbax restore of the same checkpoint in its own layout. Same run;
each measurement in its own process. Prints wall and CPU seconds, ratios, peak RSS and
bytes read (rchar from /proc/self/io) against the bytes restored.

    .venv/bin/python bench/bench_restore.py [--params-mib 1024] [--reps 2]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

EMB, MLP, VOCAB = common.EMB, common.MLP, common.VOCAB


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
    return {'embed': {'embedding': var(sds((VOCAB, EMB)))}, **blocks}

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

  class _Empty:
    def standard_normal(self, shape, dtype):
      return np.broadcast_to(np.zeros((), dtype), shape)

  params = lambda: common.linen_params(layers, _Empty(), 1.0)  # noqa: E731
  return {'step': np.empty((), np.int32), 'params': {'params': params()},
          'opt_state': [None, [{'count': np.empty((), np.int32), 'mu': {'params': params()},
                                'nu': {'params': params()}}, None, None]]}


def worker(mode: str, path: str, layers) -> dict:
  import jax
  import orbax.checkpoint as ocp

  import orbax_nnx

  layers = int(layers)
  target = _target(mode, layers)
  base = common.vmhwm_mib()
  r0, t0, c0 = common.rchar(), time.perf_counter(), time.process_time()
  if mode == 'plain':
    out = ocp.StandardCheckpointer().restore(path, target)
  else:
    out = orbax_nnx.restore(path, target)
  jax.block_until_ready(jax.tree.leaves(out))
  wall, cpu, read = time.perf_counter() - t0, time.process_time() - c0, common.rchar() - r0
  restored = sum(x.nbytes for x in jax.tree.leaves(out))
  return {'wall': wall, 'cpu': cpu, 'peak_rss_mib': common.vmhwm_mib(),
          'restored_mib': restored / 2**20, 'read_mib': read / 2**20, 'base_rss_mib': base}


def main():
  args = common.parse_or_work(worker, reps=2)
  if args is None:
    return
  modes = ('plain', 'unrolled', 'stacked')
  results = {m: [] for m in modes}
  with common.source_checkpoint(args, 'bench_restore_') as (_, path, layers):
    for _ in range(args.reps):
      for mode in modes:
        results[mode].append(common.run_worker(__file__, mode, path, layers))
  med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
  size = med['plain']['restored_mib']
  print(f'Linen train state, {layers} scanned layers (axis 1), {size:.0f} MiB restored; {args.reps} reps, medians')
  print(common.describe_source(args))
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
