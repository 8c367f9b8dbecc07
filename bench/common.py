"""Shared pieces of the benchmarks: a MaxText-style Linen train state and process figures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

EMB, MLP, VOCAB = 1024, 4096, 256


def layers_for(params_mib: int) -> int:
  return max(2, int(params_mib * 2**20 / (2 * EMB * MLP * 4)))


def linen_params(layers: int, rng, scale: float) -> dict:
  """Params scanned on axis 1 (MaxText's param_scan_axis)."""
  return {'embed': {'embedding': rng.standard_normal((VOCAB, EMB), np.float32) * scale},
          'layers': {'up': {'kernel': rng.standard_normal((EMB, layers, MLP), np.float32) * scale},
                     'down': {'kernel': rng.standard_normal((MLP, layers, EMB), np.float32) * scale},
                     'norm': {'scale': rng.standard_normal((EMB, layers), np.float32) * scale}}}


def linen_tree(layers: int, seed: int = 0) -> dict:
  """A MaxText-style Linen train state: params/params, Adam mu/nu under opt_state, int32 step."""
  rng = np.random.default_rng(seed)
  return {'step': np.int32(10), 'params': {'params': linen_params(layers, rng, 1.0)},
          'opt_state': [None, [{'count': np.int32(10), 'mu': {'params': linen_params(layers, rng, 0.1)},
                                'nu': {'params': linen_params(layers, rng, 0.01)}}, None, None]]}


def vmhwm_mib() -> float:
  """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith('VmHWM')).split()[1]) / 1024


def rchar() -> int:
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


# Workers run as an installed package does: with bytecode caches. A sandbox may set PYTHONDONTWRITEBYTECODE, and
# then every worker compiles orbax_nnx from source (0.25 s of each small row) while site-packages has its bytecode.
WORKER_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}


def warm_page_cache(path: str) -> None:
  """Reads every file under `path` once, so that each timed tool starts with its source in the page cache. Tools
  run one after another, and one that holds several GiB evicts the source for whichever runs next: the first tool
  of a case then read a 2.8 GiB source from disk while the ones after it read it from memory."""
  for folder, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(folder, name), 'rb') as f:
        while f.read(16 << 20):
          pass


def run_worker(script: str, *args) -> dict:
  out = subprocess.run([sys.executable, script, '--worker', *map(str, args)], capture_output=True, text=True,
                       check=False, env=WORKER_ENV)
  if out.returncode:
    raise RuntimeError(out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def save_plain(path: str, tree, chunk_mib: int | None = None, use_zarr3: bool = False) -> None:
  """Plain Orbax save. `chunk_mib` caps stored chunks (as a sharded save on many devices would);
  None stores each array as one chunk, the worst case for reading layer slices. `use_zarr3`: zarr v3, as
  MaxText saves by default (`checkpoint_storage_use_zarr3`), through the PyTree handler MaxText uses."""
  import jax
  import orbax.checkpoint as ocp
  save_args = None
  if chunk_mib:
    save_args = jax.tree.map(lambda x: ocp.SaveArgs(chunk_byte_size=chunk_mib * 2**20) if np.ndim(x) else
                             ocp.SaveArgs(), tree)
  if use_zarr3:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as ckptr:
      ckptr.save(path, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    return
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree, save_args=save_args)
  ckptr.wait_until_finished()


@contextlib.contextmanager
def source_checkpoint(args, prefix: str):
  """A temp dir holding the benchmark's Linen train state (as `args` size and chunk it);
  yields (root, checkpoint path, layers) and removes it all afterwards."""
  layers = layers_for(args.params_mib)
  root = tempfile.mkdtemp(prefix=prefix)
  path = os.path.join(root, 'linen')
  try:
    save_plain(path, linen_tree(layers), args.source_chunk_mib)
    yield root, path, layers
  finally:
    shutil.rmtree(root, ignore_errors=True)


def describe_source(args) -> str:
  return f'source chunks: {f"{args.source_chunk_mib} MiB max" if args.source_chunk_mib else "one per array"}'


def parse_or_work(worker, reps: int):
  """Parses `--params-mib/--reps`; in `--worker A B C` mode runs `worker(A, B, C)`, prints JSON, returns None."""
  import argparse
  import os

  parser = argparse.ArgumentParser()
  parser.add_argument('--params-mib', type=int, default=1024)
  parser.add_argument('--reps', type=int, default=reps)
  parser.add_argument('--worker', nargs=3)
  parser.add_argument('--source-chunk-mib', type=int, default=None,
                      help='cap the source checkpoint chunks (default: one chunk per array, the worst case)')
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('MALLOC_ARENA_MAX', '2')
  if args.worker:
    print(json.dumps(worker(*args.worker)))
    return None
  return args
