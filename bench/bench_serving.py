"""Param-only bf16 load from a training checkpoint (params + Adam): orbax-nnx `load_params`
vs a full plain-Orbax restore and vs Orbax's own `PyTreeRestore(partial_restore=True)` of
the params. Same checkpoint, same run, each in its own process.

    .venv/bin/python bench/bench_serving.py [--params-mib 1024] [--reps 2]   (BENCH_MEMORY_BUDGET_MIB=N: load_params(memory_budget=))
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def _abstract_params(layers: int, dtype):
  """The unrolled NNX decode model's Params, single device."""
  import jax
  from flax import nnx

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def p(shape):
    return nnx.Param(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))

  tree = {'embed': {'embedding': p((common.VOCAB, common.EMB))}}
  for i in range(layers):
    tree[f'layers_{i}'] = {'up': {'kernel': p((common.EMB, common.MLP))}, 'down': {'kernel': p((common.MLP, common.EMB))},
                           'norm': {'scale': p((common.EMB,))}}
  return nnx.State(tree)


def worker(mode: str, path: str, layers: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath

  layers = int(layers)
  base, r0 = common.vmhwm_mib(), common.rchar()
  t0, c0 = time.perf_counter(), time.process_time()
  if mode == 'ours':
    import orbax_nnx
    budget = int(os.environ.get('BENCH_MEMORY_BUDGET_MIB', '0')) * 2**20 or None
    out = orbax_nnx.load_params(path, _abstract_params(layers, jnp.bfloat16), memory_budget=budget)
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = {'step': np.int32(0), 'params': {'params': common.linen_params(layers, _Zeros(), 1.0)}}
    if mode == 'plain_full':
      shapes['opt_state'] = [None, [{'count': np.int32(0), 'mu': {'params': common.linen_params(layers, _Zeros(), 1.0)},
                                     'nu': {'params': common.linen_params(layers, _Zeros(), 1.0)}}, None, None]]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    out = ocp.PyTreeCheckpointHandler().restore(epath.Path(path), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=(mode == 'orbax_partial')))
  jax.block_until_ready(jax.tree.leaves(out))
  wall, cpu, read = time.perf_counter() - t0, time.process_time() - c0, common.rchar() - r0
  loaded = sum(x.nbytes for x in jax.tree.leaves(out))
  return {'wall': wall, 'cpu': cpu, 'read_mib': read / 2**20, 'loaded_mib': loaded / 2**20,
          'peak_rss_mib': common.vmhwm_mib(), 'growth_mib': common.vmhwm_mib() - base}


class _Zeros:
  """Stands in for a numpy Generator: shapes only, no data touched."""

  def standard_normal(self, shape, dtype):
    import numpy as np
    return np.broadcast_to(np.zeros((), dtype), shape)


def main():
  args = common.parse_or_work(worker, reps=2)
  if args is None:
    return
  modes = ('plain_full', 'orbax_partial', 'ours')
  results = {m: [] for m in modes}
  with common.source_checkpoint(args, 'bench_serving_') as (_, path, layers):
    for _ in range(args.reps):
      for mode in modes:
        results[mode].append(common.run_worker(__file__, mode, path, layers))
  med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
  print(f'training checkpoint: {layers} scanned layers, params + Adam; {args.reps} reps, medians')
  print(common.describe_source(args))
  print(f'{"mode":16} {"wall s":>7} {"cpu s":>7} {"x full":>7} {"x partial":>9} {"loaded MiB":>10} '
        f'{"read MiB":>9} {"growth/loaded":>13}')
  for m in modes:
    r = med[m]
    print(f'{m:16} {r["wall"]:7.2f} {r["cpu"]:7.2f} {r["wall"] / med["plain_full"]["wall"]:7.3f} '
          f'{r["wall"] / med["orbax_partial"]["wall"]:9.3f} {r["loaded_mib"]:10.0f} {r["read_mib"]:9.0f} '
          f'{r["growth_mib"] / r["loaded_mib"]:13.2f}')
  print('(ours loads bf16: loaded MiB is half the fp32 param bytes it reads)')


if __name__ == '__main__':
  main()
