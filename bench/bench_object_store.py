"""Latency-bound work on `gs://`: requests and wall time through a proxy that adds a fixed delay to every
request (tests/object_store.py: fake-gcs-server behind `Proxy`), ours next to plain Orbax on the same tree in
the same run. An unscanned Linen train state of small leaves (`layers_N`, Adam moments), so requests, not bytes,
set the time.

    .venv/bin/python bench/bench_object_store.py [--layers 80] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

NAMES, SHAPE = ('w0', 'w1', 'w2'), (8, 64)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=80)
  parser.add_argument('--delay-ms', type=float, default=20.0)
  args = parser.parse_args()

  from object_store import FakeGCS

  server = FakeGCS()
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  from flax import nnx

  import orbax_nnx

  rng = np.random.default_rng(0)

  def params(scale):
    return {f'layers_{i}': {n: rng.standard_normal(SHAPE, np.float32) * scale for n in NAMES}
            for i in range(args.layers)}

  tree = {'step': np.int32(5), 'params': {'params': params(1.0)},
          'opt_state': {'count': np.int32(5), 'mu': {'params': params(0.1)}, 'nu': {'params': params(0.01)}}}
  leaves = len(jax.tree.leaves(tree))
  bucket = epath.Path(server.bucket())
  src = bucket / 'src'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(src, tree)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), tree)
  nnx_target = nnx.State({f'layers_{i}': {n: nnx.Param(jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding))
                                          for n in NAMES} for i in range(args.layers)})
  proxy = server.proxy
  proxy.delay = args.delay_ms / 1000
  count = iter(range(10**6))

  def measure(fn):
    proxy.clear()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, proxy.requests

  def plain_restore_save():
    restored = ocp.StandardCheckpointer().restore(src, abstract)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(bucket / f'plain_{next(count)}', restored)

  rows = [
      ('targeted restore', lambda: orbax_nnx.restore(src, abstract), lambda: ocp.StandardCheckpointer().restore(src, abstract)),
      ('untargeted restore', lambda: orbax_nnx.restore(src), lambda: ocp.PyTreeCheckpointer().restore(src)),
      ('params into NNX (load_params) vs Orbax targeted', lambda: orbax_nnx.load_params(src, nnx_target),
       lambda: ocp.StandardCheckpointer().restore(src, abstract)),
      ('convert vs Orbax restore+save', lambda: orbax_nnx.convert(src, bucket / f'conv_{next(count)}'),
       plain_restore_save),
  ]
  print(f'{leaves} leaves, {args.delay_ms:.0f} ms per request, fake-gcs-server behind a proxy')
  print(f'{"operation":50s} {"ours s":>8s} {"reqs":>6s} {"Orbax s":>8s} {"reqs":>6s} {"ratio":>6s}')
  for name, ours, plain in rows:
    ours()  # warm: imports, compiled functions, the client's connections
    t_ours, r_ours = measure(ours)
    t_plain, r_plain = measure(plain)
    print(f'{name:50s} {t_ours:8.2f} {r_ours:6d} {t_plain:8.2f} {r_plain:6d} {t_ours / t_plain:6.2f}')
  server.stop()


if __name__ == '__main__':
  main()
