"""On-disk conversion of a scanned Linen train state (params + Adam): orbax-nnx's streaming
`convert` vs an in-memory converter written the MaxText way (restore everything, rewrite
with numpy, save). Same source, same run, each in its own process.

    .venv/bin/python bench/bench_convert.py [--params-mib 1024] [--reps 1]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def in_memory_unroll(src: str, dst: str) -> None:
  """The MaxText way: whole checkpoint in host memory, numpy rewrite, save."""
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath

  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(src))

  def unroll(params):
    out = {k: v for k, v in params.items() if k != 'layers'}
    layers = params['layers']
    n = layers['norm']['scale'].shape[1]
    for i in range(n):
      out[f'layers_{i}'] = {'up': {'kernel': np.asarray(layers['up']['kernel'][:, i])},
                            'down': {'kernel': np.asarray(layers['down']['kernel'][:, i])},
                            'norm': {'scale': np.asarray(layers['norm']['scale'][:, i])}}
    return out

  adam = tree['opt_state'][1][0]
  new = {'model': unroll(tree['params']['params']),
         'optimizer': {'step': np.uint32(tree['step']),
                       'opt_state': {'1': {'0': {'count': adam['count'], 'mu': unroll(adam['mu']['params']),
                                                 'nu': unroll(adam['nu']['params'])}}}}}
  del tree
  common.save_plain(dst, new)


def worker(mode: str, src: str, dst: str) -> dict:
  t0, c0 = time.perf_counter(), time.process_time()
  if mode == 'ours':
    import orbax_nnx
    orbax_nnx.convert(src, dst, scan_layers=False)
  elif mode == 'ours_back':
    import orbax_nnx
    orbax_nnx.convert(src, dst)
  else:
    in_memory_unroll(src, dst)
  return {'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0, 'peak_rss_mib': common.vmhwm_mib()}


def main():
  args = common.parse_or_work(worker, reps=1)
  if args is None:
    return
  with common.source_checkpoint(args, 'bench_convert_') as (root, src, layers):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 2**20
    results = {m: [] for m in ('in_memory', 'ours', 'ours_back')}
    for rep in range(args.reps):
      for mode in ('in_memory', 'ours'):
        dst = os.path.join(root, f'{mode}_{rep}')
        results[mode].append(common.run_worker(__file__, mode, src, dst))
      results['ours_back'].append(common.run_worker(__file__, 'ours_back', os.path.join(root, f'ours_{rep}'),
                                                    os.path.join(root, f'back_{rep}')))
      for mode in ('in_memory', 'ours', 'back'):
        shutil.rmtree(os.path.join(root, f'{mode}_{rep}'), ignore_errors=True)
  med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
  print(f'Linen train state, {layers} layers scanned on axis 1, {size:.0f} MiB on disk; {args.reps} reps, medians')
  print(common.describe_source(args))
  print(f'{"mode":28} {"wall s":>8} {"cpu s":>8} {"wall x":>7} {"cpu x":>7} {"peak RSS MiB":>13} {"RSS/ckpt":>9}')
  labels = {'in_memory': 'in-memory (MaxText way)', 'ours': 'orbax-nnx stacked->unrolled',
            'ours_back': 'orbax-nnx unrolled->stacked'}
  for m, label in labels.items():
    r = med[m]
    print(f'{label:28} {r["wall"]:8.2f} {r["cpu"]:8.2f} {r["wall"] / med["in_memory"]["wall"]:7.3f} '
          f'{r["cpu"] / med["in_memory"]["cpu"]:7.3f} {r["peak_rss_mib"]:13.0f} {r["peak_rss_mib"] / size:9.3f}')


if __name__ == '__main__':
  main()
