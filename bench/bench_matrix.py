"""Convert at real shapes: a matrix of leaf count x array size x source chunking, plus a memory-scaling pair.

Each row converts an unscanned Linen state (`params/params/layers_N/...`, `step`) to NNX with the layers
stacked, three ways, each in its own process on the same source in the same run:

- ours: `orbax_nnx.convert(src, dst, scan_layers=True)` (streaming, lazily per region);
- in-memory: what the MaxText converter does (restore everything, `np.stack` with numpy, save);
- plain: Orbax restore + save of the same tree, unchanged (the cost of moving the bytes at all).

    .venv/bin/python bench/bench_matrix.py [--quick] [--reps 3] [--memory-budget-mib N] [--only LABEL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

# (label, layers, leaves per layer, KiB per array, source chunk cap in MiB or None)
MATRIX = [
    ('few big arrays, one chunk each', 4, 2, 96 * 1024, None),
    ('few big arrays, 16 MiB chunks', 4, 2, 96 * 1024, 16),
    ('1,000 small leaves', 250, 4, 24, None),
    ('memory scaling 1x', 4, 2, 24 * 1024, 16),
    ('memory scaling 4x', 4, 2, 96 * 1024, 16),
]
QUICK = [(label, layers, leaves, kib // 4 if kib > 1024 else kib, chunk and max(chunk // 4, 1))
         for label, layers, leaves, kib, chunk in MATRIX]


def source_tree(layers: int, leaves: int, kib: int) -> dict:
  import numpy as np
  rng = np.random.default_rng(0)
  cols = 256
  rows = max(1, kib * 1024 // (cols * 4))
  params = {f'layers_{i}': {f'w{j}': rng.standard_normal((rows, cols), np.float32) for j in range(leaves)}
            for i in range(layers)}
  return {'params': {'params': params}, 'step': np.int32(7)}


def in_memory(src: str, dst: str) -> None:
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath

  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(src))
  params = tree['params']['params']
  n = len(params)
  names = sorted(params['layers_0'])
  stacked = {name: np.stack([np.asarray(params[f'layers_{i}'][name]) for i in range(n)], axis=1) for name in names}
  del tree, params
  common.save_plain(dst, {'model': {'layers': {k: {'value': v} for k, v in stacked.items()}},
                          'optimizer': {'step': {'value': np.uint32(7)}}})


def plain(src: str, dst: str) -> None:
  import orbax.checkpoint as ocp
  from etils import epath

  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(src))
  common.save_plain(dst, tree)


def worker(mode: str, src: str, dst: str, budget_mib: str) -> dict:
  import orbax.checkpoint  # noqa: F401 pylint: disable=unused-import  (imports are not timed)
  if mode == 'ours':
    import orbax_nnx
  t0, c0 = time.perf_counter(), time.process_time()
  if mode == 'ours':
    options = {'memory_budget': int(budget_mib) * 2**20} if int(budget_mib) else {}
    orbax_nnx.convert(src, dst, to='nnx', scan_layers=True, **options)
  elif mode == 'in_memory':
    in_memory(src, dst)
  else:
    plain(src, dst)
  return {'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0, 'peak_rss_mib': common.vmhwm_mib()}


def run(mode: str, src: str, dst: str, budget_mib: int) -> dict:
  import subprocess
  common.warm_page_cache(src)
  out = subprocess.run([sys.executable, __file__, '--worker', mode, src, dst, str(budget_mib)],
                       capture_output=True, text=True, check=False, env=common.WORKER_ENV)
  if out.returncode:
    raise RuntimeError(out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='arrays 4x smaller')
  parser.add_argument('--memory-budget-mib', type=int, default=128, help='memory_budget for ours (0: the default)')
  parser.add_argument('--reps', type=int, default=3, help='runs per mode (medians)')
  parser.add_argument('--only', default='', help='run the cases whose label contains this')
  parser.add_argument('--worker', nargs=4)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('MALLOC_ARENA_MAX', '2')
  if args.worker:
    print(json.dumps(worker(*args.worker)))
    return
  print(f'{"case":34} {"leaves":>6} {"MiB":>6} {"mode":10} {"wall s":>7} {"cpu s":>7} {"RSS MiB":>8} {"RSS/ckpt":>8}'
        f' {"vs mem":>7} {"vs plain":>8}')
  peaks = {}
  for label, layers, leaves, kib, chunk in (QUICK if args.quick else MATRIX):
    if args.only not in label:
      continue
    root = tempfile.mkdtemp(prefix='bench_matrix_')
    try:
      src = os.path.join(root, 'src')
      common.save_plain(src, source_tree(layers, leaves, kib), chunk)
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 2**20
      got = {}
      for m in ('plain', 'in_memory', 'ours'):
        runs = []
        for rep in range(args.reps):
          runs.append(run(m, src, os.path.join(root, f'{m}{rep}'), args.memory_budget_mib))
          shutil.rmtree(os.path.join(root, f'{m}{rep}'), ignore_errors=True)
        got[m] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    finally:
      shutil.rmtree(root, ignore_errors=True)
    peaks[label] = got['ours']['peak_rss_mib']
    for mode, r in got.items():
      print(f'{label:34} {layers * leaves:6d} {size:6.0f} {mode:10} {r["wall"]:7.2f} {r["cpu"]:7.2f}'
            f' {r["peak_rss_mib"]:8.0f} {r["peak_rss_mib"] / size:8.3f}'
            f' {r["wall"] / got["in_memory"]["wall"]:7.3f} {r["wall"] / got["plain"]["wall"]:8.3f}')
  if 'memory scaling 1x' in peaks:
    print(f'ours: peak RSS at 4x array size / at 1x: {peaks["memory scaling 4x"] / peaks["memory scaling 1x"]:.3f}'
          f' (memory_budget {args.memory_budget_mib} MiB; the interpreter and JAX included)')


if __name__ == '__main__':
  main()
