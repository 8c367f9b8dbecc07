"""Latency-bound work on `gs://`: requests and wall time through a proxy that adds a fixed delay to every
request (tests/object_store.py: fake-gcs-server behind `Proxy`, run in a process of its own so that its
threads do not share the GIL with what is timed), ours next to plain Orbax on the same tree in
the same run. An unscanned Linen train state of small leaves (`layers_N`, Adam moments: 9 leaves a layer), so
requests, not bytes, set the time. Each (leaves, delay) pair is one table.

    .venv/bin/python bench/bench_object_store.py [--layers 111 1111] [--delay-ms 20 100] [--only convert ...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

NAMES, SHAPE = ('w0', 'w1', 'w2'), (8, 64)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, nargs='+', default=[111])
  parser.add_argument('--delay-ms', type=float, nargs='+', default=[20.0])
  parser.add_argument('--only', nargs='*', default=None, help='row names to run (first word: targeted, ...)')
  args = parser.parse_args()

  from object_store import FakeGCS

  server = FakeGCS(proxy_process=True)  # the proxy's threads must not share the GIL with what is timed
  try:
    for layers in args.layers:
      for delay in args.delay_ms:
        _table(server, layers, delay, args.only)
  finally:
    server.stop()


def _table(server, layers: int, delay_ms: float, only) -> None:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  from flax import nnx

  import orbax_nnx

  rng = np.random.default_rng(0)

  def params(scale):
    return {f'layers_{i}': {n: rng.standard_normal(SHAPE, np.float32) * scale for n in NAMES}
            for i in range(layers)}

  tree = {'step': np.int32(5), 'params': {'params': params(1.0)},
          'opt_state': {'count': np.int32(5), 'mu': {'params': params(0.1)}, 'nu': {'params': params(0.01)}}}
  leaves = len(jax.tree.leaves(tree))
  bucket = epath.Path(server.bucket())
  src = bucket / 'src'
  proxy = server.proxy
  proxy.delay = 0
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(src, tree)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), tree)
  param_abstract = {'params': abstract['params']}
  nnx_target = nnx.State({f'layers_{i}': {n: nnx.Param(jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding))
                                          for n in NAMES} for i in range(layers)})
  proxy.delay = delay_ms / 1000
  count = itertools.count()

  def measure(fn):
    proxy.clear()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, proxy.requests

  def plain_restore_save():
    restored = ocp.StandardCheckpointer().restore(src, abstract)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(bucket / f'plain_{next(count)}', restored)

  def plain_params_export():  # what a user would write without us: restore the params, cast, save them alone
    restored = ocp.PyTreeCheckpointer().restore(src, args=ocp.args.PyTreeRestore(
        item=param_abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(param_abstract),
        partial_restore=True))
    cast = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), restored)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(bucket / f'plain_params_{next(count)}', cast)

  rows = [
      ('targeted restore', lambda: orbax_nnx.restore(src, abstract),
       lambda: ocp.StandardCheckpointer().restore(src, abstract)),
      ('untargeted restore (Orbax: PyTreeCheckpointer)', lambda: orbax_nnx.restore(src),
       lambda: ocp.PyTreeCheckpointer().restore(src)),
      ('load_params bf16 vs Orbax targeted', lambda: orbax_nnx.load_params(src, nnx_target, dtype='bfloat16'),
       lambda: ocp.StandardCheckpointer().restore(src, abstract)),
      ('convert vs Orbax restore+save', lambda: orbax_nnx.convert(src, bucket / f'conv_{next(count)}'),
       plain_restore_save),
      ('export_params bf16 vs Orbax restore+cast+save',
       lambda: orbax_nnx.export_params(src, bucket / f'export_{next(count)}'), plain_params_export),
  ]
  print(f'\n{leaves} leaves, {delay_ms:.0f} ms per request, fake-gcs-server behind a proxy')
  print(f'{"operation":50s} {"ours s":>8s} {"reqs":>6s} {"Orbax s":>8s} {"reqs":>6s} {"ratio":>6s}')
  for name, ours, plain in rows:
    if only and name.split()[0] not in only:
      continue
    proxy.delay = 0
    ours()  # warm: imports, compiled functions, the client's connections
    plain()
    proxy.delay = delay_ms / 1000
    t_ours, r_ours = measure(ours)
    t_plain, r_plain = measure(plain)
    print(f'{name:50s} {t_ours:8.2f} {r_ours:6d} {t_plain:8.2f} {r_plain:6d} {t_ours / t_plain:6.2f}', flush=True)


if __name__ == '__main__':
  main()
