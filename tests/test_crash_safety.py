"""SIGKILL a process that saves (sync and async), converts and exports, at random points (seeded).

After every kill: the manager lists only complete steps and each restores bit-exactly; every
conversion / export DST is absent or a complete checkpoint equal to what it should be; the
conversion source is byte-identical to before.
"""

import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from helpers import host, sds

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.compare import compare
from orbax_nnx.sources import listing

KILLS = 50
WORKER = os.path.join(os.path.dirname(__file__), 'crash_worker.py')


def digest(path) -> dict:
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(path).rglob('*') if p.is_file()}


def make_source(path) -> dict:
  rng = np.random.default_rng(0)
  tree = {'step': np.int32(5), 'params': {'params': {'layers': {'w': rng.standard_normal((256, 4, 512), np.float32)},
                                                    'head': {'kernel': rng.standard_normal((256, 64), np.float32)}}},
          'opt_state': [None, [{'count': np.int32(5), 'mu': {'params': {
              'layers': {'w': rng.standard_normal((256, 4, 512), np.float32)},
              'head': {'kernel': rng.standard_normal((256, 64), np.float32)}}}}]]}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  return tree


def check_safetensors(dst, tree: dict) -> None:
  """A finished safetensors export (crash_worker.py's rules) holds the source's layers, one tensor each."""
  params = tree['params']['params']
  target = nnx.State({**{f'layers_{k}': {'w': nnx.Param(sds((256, 512)))} for k in range(4)},
                      'head': {'kernel': nnx.Param(sds((256, 64)))}})
  out = orbax_nnx.restore(dst, target, rules=[(r'model\.layers\.(\d+)\.w', r'layers_\1/w'),
                                              (r'lm_head\.weight', 'head/kernel')])
  for k in range(4):
    np.testing.assert_array_equal(host(out[f'layers_{k}']['w']), params['layers']['w'][:, k])
  np.testing.assert_array_equal(host(out['head']['kernel']), params['head']['kernel'])


def check(root: epath.Path, src: pathlib.Path, src_digest: dict, seen: set, tree: dict) -> int:
  """After a kill: every step the manager lists restores bit-exactly; every DST is absent, complete and equal to
  what it should be, or (on an object store, where there is no atomic rename) refused as unfinished."""
  on_store = str(root).startswith('gs://')
  mngr_dir = root / 'mngr'
  if mngr_dir.exists():
    with ocp.CheckpointManager(mngr_dir, handler_registry=orbax_nnx.nnx_registry) as mngr:
      steps = mngr.all_steps()
      assert mngr.latest_step() == (max(steps) if steps else None)
      for step in steps:
        try:
          # explicit args: a kill right after Orbax's rename can leave a complete item without the
          # step-level _CHECKPOINT_METADATA that a no-args restore needs to find the handler
          state = mngr.restore(step, args=ocp.args.Composite(state=orbax_nnx.NNXRestore()))['state']
        except Exception as e:  # report which step and what is on disk
          files = sorted(p.name for p in (mngr_dir / str(step)).iterdir())[:30]
          raise AssertionError(f'step {step} of {steps} does not restore: {e!r}; files: {files}') from e
        assert np.all(np.asarray(state['model']['w'].get_value()) == step), step
        np.testing.assert_array_equal(np.asarray(state['model']['b'].get_value()), np.arange(1024) + step)
  listing.forget(root)  # this process listed it before the child wrote more
  for dst in sorted(root.iterdir()):
    if dst.name in seen or dst.name.startswith('.') or '.orbax-checkpoint-tmp' in dst.name:
      continue  # checked, or a temporary name (written by rename, locally)
    if not dst.name.startswith(('conv_', 'export_', 'st_')):
      continue
    seen.add(dst.name)  # every writer gets a fresh DST: what is unfinished now stays so
    try:
      orbax_nnx.detect_layout(dst)
    except (errors.NotACheckpointError, errors.CorruptCheckpointError) as e:
      # an unfinished write at its final name: refused as such, never read as a checkpoint
      assert on_store and ('incomplete' in str(e) or 'numbered shards' in str(e)), e
      continue
    if dst.name.startswith('conv_'):
      report = compare(src, dst, values=True)
      assert report.equal, report.summary()
    elif dst.name.startswith('st_'):
      check_safetensors(dst, tree)
  assert digest(src) == src_digest, 'the conversion source was modified'
  return len(steps) if mngr_dir.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize('store, kills, window', [('local', 50, (1.5, 4.0)), ('gs', 10, (4.0, 10.0))])
def test_sigkill_never_costs_a_checkpoint(tmp_path, request, store, kills, window):
  src = tmp_path / 'src'
  tree = make_source(src)
  src_digest = digest(src)
  root = epath.Path(tmp_path / 'work' if store == 'local' else request.getfixturevalue('gcs') + '/work')
  root.mkdir(parents=True, exist_ok=True)
  rng = random.Random(1234)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  env.pop('XLA_FLAGS', None)
  deadline = time.monotonic() + 600
  next_step, seen, progress = 0, set(), 0
  for kill in range(kills):
    assert time.monotonic() < deadline, f'only {kill} kills in the time bound'
    with tempfile.TemporaryFile('w+') as out:  # a file, not a pipe: a child never blocks on its output
      child = subprocess.Popen([sys.executable, WORKER, str(root), str(src), str(next_step)], env=env,
                               stdout=out, stderr=subprocess.DEVNULL, text=True)
      time.sleep(rng.uniform(*window))  # each request to a store takes longer
      child.send_signal(signal.SIGKILL)
      child.wait(timeout=60)
      out.seek(0)
      progress += out.read().count('\n')
    next_step += 1000  # fresh step numbers and DST names for the next child
    check(root, src, src_digest, seen, tree)
  assert progress > kills, 'the children were killed before doing any work'
  assert {name.split('_')[0] for name in seen} == {'conv', 'export', 'st'}, seen
