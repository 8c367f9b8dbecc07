"""The cases of issue #26, each run in its own process with default settings on both sides, same source, same run.

A MaxText-like Linen train state (params/params, Adam mu/nu under opt_state, int32 step; 9 params per layer:
attention q/k/v/o, mlp wi_0/wi_1/wo, two norms), saved with plain Orbax, scanned (layers on axis 1) or unscanned
(`layers_N`), converted to NNX three ways. The source's leaves are `jax.Array`s (`--source-type jax`, the
default: what a training run saves, with `_sharding`) or numpy arrays (`--source-type numpy`: what an in-memory
converter saves). Orbax restores each as it was saved, so the type changes what the peers cost: restoring
1,085 small jax.Arrays took 1.55-1.65 s against 0.72 s as numpy; saving 1,080 took 1.46-1.53 s against
0.92-0.95 s.

- ours: the command line, `orbax-nnx convert SRC DST --to nnx --quiet [--no-scan-layers]`, no other flag;
- in-memory: what MaxText's converter does (restore everything, rewrite with numpy, save);
- plain: Orbax restore + save of the same tree, unchanged (the cost of moving the bytes at all);
- plain-out: Orbax restore + save, unchanged, of a checkpoint laid out as the conversion's output (made by ours
  before the timed runs): the cost of moving the same bytes as the same arrays. Unrolling writes 1,083 arrays
  where the scanned source has 32, and Orbax's save alone of 1,085 small arrays took 1.07 s against 0.57 s for the
  same bytes as 85 (numpy, in memory, 5 runs each); `plain` cannot pay that per-array cost, `plain-out` does.

Wall time is the whole process (imports included), peak RSS its VmHWM. The tools take turns; a ratio is the
median over turns of ours / the peer within each turn (with its range when `--reps` > 1). Every run starts with
the source in the page cache (`common.warm_page_cache`): a tool holding several GiB evicts it for whichever tool
runs next.

    .venv/bin/python bench/bench_cases.py [--sizes small,big] [--only unscanned,scanned,unrolled] [--reps 1]
                                          [--source-type jax|numpy] [--zarr3]

`--zarr3` saves the source in zarr v3 (MaxText's default); the peers then save zarr v3 too, as ours does (a
conversion keeps its source's zarr version).
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

# name: (layers, emb, mlp)
SIZES = {'small': (40, 192, 512), 'big': (16, 1024, 4096)}  # ~0.2 GiB and ~3 GiB with Adam
TOOLS = ('ours', 'in-memory', 'plain', 'plain-out')
NAMES = ('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo', 'pre_norm', 'post_norm')


def _shape(name: str, emb: int, mlp: int) -> tuple[int, ...]:
  return {'wi_0': (emb, mlp), 'wi_1': (emb, mlp), 'wo': (mlp, emb)}.get(
      name, (emb,) if name.endswith('norm') else (emb, emb))


def _layer_params(rng, layers: int, emb: int, mlp: int, scanned: bool, scale: float) -> dict:
  import numpy as np
  out = {'embed': {'embedding': rng.standard_normal((256, emb), np.float32) * scale}}
  if scanned:  # MaxText: params stacked on axis 1
    out['layers'] = {n: {'kernel': np.moveaxis(rng.standard_normal((layers,) + _shape(n, emb, mlp), np.float32)
                                               * scale, 0, 1)} for n in NAMES}
  else:
    for i in range(layers):
      out[f'layers_{i}'] = {n: {'kernel': rng.standard_normal(_shape(n, emb, mlp), np.float32) * scale}
                            for n in NAMES}
  return out


def source_tree(size: str, scanned: bool, source_type: str = 'numpy') -> dict:
  import numpy as np
  layers, emb, mlp = SIZES[size]
  rng = np.random.default_rng(0)
  if source_type == 'jax':  # on the default device, as a one-host training run saves them
    import jax
    return jax.tree.map(lambda x: jax.device_put(x), source_tree(size, scanned))
  return {'step': np.int32(10), 'params': {'params': _layer_params(rng, layers, emb, mlp, scanned, 1.0)},
          'opt_state': [None, [{'count': np.int32(10),
                                'mu': {'params': _layer_params(rng, layers, emb, mlp, scanned, 0.1)},
                                'nu': {'params': _layer_params(rng, layers, emb, mlp, scanned, 0.01)}}, None, None]]}


def in_memory(src: str, dst: str, unroll: bool, zarr3: bool) -> None:
  """The MaxText way: the whole checkpoint in host memory, a numpy rewrite, one save."""
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath

  tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(src))

  def nnx(params):
    out = {k: v for k, v in params.items() if k != 'layers'}
    if 'layers' in params:
      stacked = {n: np.moveaxis(np.asarray(leaf['kernel']), 1, 0) for n, leaf in params['layers'].items()}
      if unroll:
        for i in range(next(iter(stacked.values())).shape[0]):
          out[f'layers_{i}'] = {n: {'kernel': np.ascontiguousarray(x[i])} for n, x in stacked.items()}
      else:
        out['layers'] = {n: {'kernel': np.ascontiguousarray(x)} for n, x in stacked.items()}
    return ocp_value(out)

  def ocp_value(node):
    if isinstance(node, dict):
      return {k: ocp_value(v) for k, v in node.items()}
    return {'value': node}

  adam = tree['opt_state'][1][0]
  new = {'model': nnx(tree['params']['params']),
         'optimizer': {'step': {'value': np.uint32(tree['step'])},
                       'opt_state': {'0': {'count': {'value': np.asarray(adam['count'])},
                                           'mu': nnx(adam['mu']['params']), 'nu': nnx(adam['nu']['params'])}}}}
  del tree, adam
  common.save_plain(dst, new, use_zarr3=zarr3)


def plain(src: str, dst: str, zarr3: bool) -> None:
  import orbax.checkpoint as ocp
  from etils import epath
  common.save_plain(dst, ocp.PyTreeCheckpointHandler().restore(epath.Path(src)), use_zarr3=zarr3)


def worker(tool: str, src: str, dst: str, unroll: str, zarr3: str) -> None:
  if tool == 'ours':  # the command line, as a user runs it; its peak RSS is printed once it has exited main
    import atexit

    from orbax_nnx import cli
    atexit.register(lambda: print(json.dumps({'rss_mib': common.vmhwm_mib()}), flush=True))
    cli.run(['convert', src, dst, '--to', 'nnx', '--quiet', *(['--no-scan-layers'] if unroll == '1' else [])])
  elif tool == 'in-memory':
    in_memory(src, dst, unroll == '1', zarr3 == '1')
  else:  # plain, or plain-out (given the output-layout checkpoint as src)
    plain(src, dst, zarr3 == '1')
  print(json.dumps({'rss_mib': common.vmhwm_mib()}))


def run(tool: str, src: str, dst: str, unroll: bool, zarr3: bool) -> dict:
  shutil.rmtree(dst, ignore_errors=True)
  subprocess.run(['sync'], check=False)
  common.warm_page_cache(src)
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, __file__, '--worker', tool, src, dst, '1' if unroll else '0',
                        '1' if zarr3 else '0'],
                       capture_output=True, text=True, check=False, env=common.WORKER_ENV)
  wall = time.perf_counter() - t0
  if out.returncode:
    raise RuntimeError(out.stderr[-4000:])
  return {'wall': wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def paired_ratios(ours: list[dict], peer: list[dict]) -> tuple[float, float, float]:
  """(median, lowest, highest) of ours / peer over the turns, each ratio within one turn: on a machine whose
  speed drifts between turns (this VM's disk and page faults swing 2x within an hour) a turn's two runs share
  the drift, where medians taken apart need not."""
  ratios = [a['wall'] / b['wall'] for a, b in zip(ours, peer)]
  return statistics.median(ratios), min(ratios), max(ratios)


def _bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='small,big')
  parser.add_argument('--only', default='unscanned,scanned,unrolled')
  parser.add_argument('--reps', type=int, default=1)
  parser.add_argument('--source-type', choices=('jax', 'numpy'), default='jax')
  parser.add_argument('--zarr3', action='store_true', help='sources (and the peers\' outputs) in zarr v3')
  args = parser.parse_args()
  cases = {'unscanned': (False, False), 'scanned': (True, False), 'unrolled': (True, True)}
  print(f'source leaves: {args.source_type}, zarr {"v3" if args.zarr3 else "v2"}')
  print(f'{"case":<26} {"ours s":>7} {"in-mem s":>9} {"plain s":>8} {"p-out s":>8} {"/in-mem":>8} {"/plain":>7}'
        f' {"/p-out":>7} {"RSS MiB ours/in-mem/plain":>27} {"RSS/ckpt":>9}')
  for size in args.sizes.split(','):
    root = tempfile.mkdtemp(prefix='bench_cases_')
    try:
      sources = {}
      for scanned in sorted({cases[c][0] for c in args.only.split(',')}):
        sources[scanned] = os.path.join(root, f'src_{scanned}')
        common.save_plain(sources[scanned], source_tree(size, scanned, args.source_type),
                          use_zarr3=args.zarr3)
      for case in args.only.split(','):
        scanned, unroll = cases[case]
        src = sources[scanned]
        laid_out = os.path.join(root, 'output_layout')  # the conversion's output, for plain-out
        run('ours', src, laid_out, unroll, args.zarr3)
        figures: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
        for _ in range(args.reps):  # the tools take turns: a machine slowing down mid-run weighs on all of them
          for tool in TOOLS:
            figures[tool].append(run(tool, laid_out if tool == 'plain-out' else src, os.path.join(root, tool),
                                     unroll, args.zarr3))
        med = {t: statistics.median(r['wall'] for r in rs) for t, rs in figures.items()}
        rss = {t: max(r['rss_mib'] for r in rs) for t, rs in figures.items()}
        ratio = {t: paired_ratios(figures['ours'], figures[t]) for t in TOOLS[1:]}
        ckpt_mib = _bytes(src) / 2**20
        print(f'{size + " " + case:<26} {med["ours"]:>7.2f} {med["in-memory"]:>9.2f} {med["plain"]:>8.2f}'
              f' {med["plain-out"]:>8.2f} {ratio["in-memory"][0]:>8.2f} {ratio["plain"][0]:>7.2f}'
              f' {ratio["plain-out"][0]:>7.2f}'
              f' {rss["ours"]:>9.0f}/{rss["in-memory"]:.0f}/{rss["plain"]:.0f}'
              f' {rss["ours"] / ckpt_mib:>9.2f}   (checkpoint {ckpt_mib:.0f} MiB)', flush=True)
        if args.reps > 1:
          print(' ' * 26 + '  ratio ranges over turns: ' + ', '.join(
              f'/{t} {lo:.2f}-{hi:.2f}' for t, (_, lo, hi) in ratio.items()), flush=True)
    finally:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--worker':
    worker(*sys.argv[2:7])
  else:
    main()
