"""Save/restore of an NNX train state: orbax_nnx's handler vs plain StandardCheckpointer.

Same arrays, same run, several repetitions, each measurement in its own process
(so peak RSS is per measurement). Prints medians of wall and CPU seconds, the
ratio ours/plain, and peak RSS.

    .venv/bin/python bench/bench_handler.py [--mib 1024] [--reps 3]
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


def build_state(mib: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from orbax_nnx import examples as ex

  # params are a third of the bytes; Adam mu/nu the rest.
  emb, mlp = 1024, 4096
  per_layer = 2 * emb * mlp * 4
  layers = max(1, int(mib * 2**20 / 3 / per_layer))
  cfg = ex.Config(vocab=256, emb=emb, mlp=mlp, num_layers=layers)
  with jax.set_mesh(ex.make_mesh((1, 1))):
    model = ex.Transformer(cfg, rngs=nnx.Rngs(0))
    opt = ex.make_optimizer(model)
  key = jax.random.key(1)
  flat = nnx.to_flat_state(nnx.state(opt))
  for i, (_, var) in enumerate(flat):  # random moments: zeros would compress to nothing
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jnp.floating) and value.ndim:
      var.set_value(jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))
  return model, opt


def worker(op: str, impl: str, directory: str, mib: int) -> dict:
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx

  model, opt = build_state(mib)
  state = {'model': nnx.state(model), 'optimizer': nnx.state(opt)}
  nbytes = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.State(state)))
  path = os.path.join(directory, impl)
  if op == 'restore':
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    del model, opt, state
  ckptr = ocp.AsyncCheckpointer(orbax_nnx.NNXCheckpointHandler() if impl == 'ours'
                                else ocp.StandardCheckpointHandler())
  rss0 = common.vmhwm_mib() * 1024
  t0, c0 = time.perf_counter(), time.process_time()
  if op == 'save':
    args = orbax_nnx.NNXSave(state) if impl == 'ours' else ocp.args.StandardSave(state)
    ckptr.save(path, args=args, force=True)
    ckptr.wait_until_finished()
  else:
    args = orbax_nnx.NNXRestore(abstract) if impl == 'ours' else ocp.args.StandardRestore(abstract)
    out = ckptr.restore(path, args=args)
    jax.block_until_ready(out)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  rss = common.vmhwm_mib() * 1024
  return {'wall': wall, 'cpu': cpu, 'peak_rss_mib': rss / 1024, 'rss_before_mib': rss0 / 1024,
          'state_mib': nbytes / 2**20}


def run(op, impl, directory, mib):
  out = subprocess.run([sys.executable, __file__, '--worker', op, impl, directory, str(mib)],
                       capture_output=True, text=True, check=False, env=common.WORKER_ENV)
  if out.returncode:
    raise RuntimeError(out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mib', type=int, default=1024)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--worker', nargs=4, metavar=('OP', 'IMPL', 'DIR', 'MIB'))
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.worker:
    op, impl, directory, mib = args.worker
    print(json.dumps(worker(op, impl, directory, int(mib))))
    return
  directory = tempfile.mkdtemp(prefix='bench_handler_')
  results = {(op, impl): [] for op in ('save', 'restore') for impl in ('ours', 'plain')}
  try:
    for _ in range(args.reps):
      for op in ('save', 'restore'):
        for impl in ('ours', 'plain'):
          results[(op, impl)].append(run(op, impl, directory, args.mib))
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  size = results[('save', 'ours')][0]['state_mib']
  print(f'NNX train state: {size:.0f} MiB (params + Adam mu/nu), {args.reps} reps, medians')
  print(f'{"":8} {"impl":6} {"wall s":>8} {"cpu s":>8} {"peak RSS MiB":>13}')
  for op in ('save', 'restore'):
    med = {impl: {k: statistics.median(r[k] for r in results[(op, impl)]) for k in ('wall', 'cpu', 'peak_rss_mib')}
           for impl in ('ours', 'plain')}
    for impl in ('ours', 'plain'):
      m = med[impl]
      print(f'{op:8} {impl:6} {m["wall"]:8.2f} {m["cpu"]:8.2f} {m["peak_rss_mib"]:13.0f}')
    print(f'{op:8} ratio  {med["ours"]["wall"] / med["plain"]["wall"]:8.3f} '
          f'{med["ours"]["cpu"] / med["plain"]["cpu"]:8.3f} '
          f'{med["ours"]["peak_rss_mib"] / med["plain"]["peak_rss_mib"]:13.3f}')


if __name__ == '__main__':
  main()
