"""Two jax.distributed processes on 127.0.0.1 (4 simulated CPU devices each, gloo collectives).

Each runs tests/mp_worker.py: save an NNX train state through a CheckpointManager and restore it on
another mesh; restore a Linen-layout checkpoint into an unrolled, fully sharded NNX target; load
params only in bf16. Values are checked on every process, and bytes read per process (rchar from
/proc/self/io) are about half the data: each process reads only its own shards.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), 'mp_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = os.pathsep.join(sys.path)
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  reports = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    reports.append(json.loads(out.strip().splitlines()[-1]))
  for r in reports:
    assert r['devices'] == 8 and r['local'] == 4
    assert r['nnx_restore'] and r['linen_restore'] and r['load_params'], r
    # each process reads its half of the shards (plus a little metadata), not the whole array
    assert r['linen_read'] < 0.7 * r['linen_bytes'], r
    assert r['params_read'] < 0.7 * r['linen_bytes'], r
