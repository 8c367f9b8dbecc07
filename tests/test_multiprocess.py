"""Two jax.distributed processes on 127.0.0.1 (4 simulated CPU devices each, gloo collectives).

Each runs tests/mp_worker.py: save an NNX train state through a CheckpointManager and restore it on
another mesh; restore a Linen-layout checkpoint into an unrolled, fully sharded NNX target; load
params only in bf16; load Hugging Face safetensors and export them back. Values are checked on every process, and bytes read per process (rchar from
/proc/self/io) are about half the data: each process reads only its own shards.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), 'mp_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_together(commands: list[tuple[list[str], dict]], timeout: float = 240) -> list[str]:
  """Starts every (argv, env) at once, waits for all (killing leftovers), returns their stdouts.

  Output goes to files, not pipes: a process blocked on a full pipe while another waits for it in a collective
  would hang both."""
  with contextlib.ExitStack() as stack:
    files = [(stack.enter_context(tempfile.TemporaryFile('w+')), stack.enter_context(tempfile.TemporaryFile('w+')))
             for _ in commands]
    procs = [subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
             for (argv, env), (out, err) in zip(commands, files)]
    deadline = time.monotonic() + timeout
    try:
      for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    outputs = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      outputs.append(out.read())
      assert p.returncode == 0, err.read()[-3000:]
  return outputs


def base_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = os.pathsep.join(sys.path)
  return env


@pytest.mark.slow
def test_two_processes(tmp_path):
  port = free_port()
  outputs = run_together([([sys.executable, WORKER, str(i), str(port), str(tmp_path)], base_env())
                          for i in range(2)])
  reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  for r in reports:
    assert r['devices'] == 8 and r['local'] == 4
    assert r['nnx_restore'] and r['linen_restore'] and r['load_params'] and r['convert'] and r['export'], r
    assert r['blocked_convert'] and r['export_copied'] and r['zarr3_copied'] and r['zarr3_convert'], r
    assert r['hf_restore'] and r['hf_export'], r
    assert r['hf_read'] < 0.7 * r['linen_bytes'], r  # safetensors: only this process's byte ranges
    # each process reads its half of the shards (plus a little metadata), not the whole array
    assert r['linen_read'] < 0.7 * r['linen_bytes'], r
    assert r['params_read'] < 0.7 * r['linen_bytes'], r
    assert r['convert_read'] < 0.7 * r['linen_bytes'], r


@pytest.mark.slow
def test_two_processes_on_an_object_store(gcs):
  """The same worker with its root on gs://: Orbax commits there by marker, each process writes its shards."""
  port = free_port()
  outputs = run_together([([sys.executable, WORKER, str(i), str(port), f'{gcs}/run'], base_env())
                          for i in range(2)])
  for r in (json.loads(out.strip().splitlines()[-1]) for out in outputs):
    assert r['nnx_restore'] and r['linen_restore'] and r['load_params'] and r['convert'] and r['export'], r
    assert r['blocked_convert'] and r['export_copied'] and r['hf_restore'] and r['hf_export'], r
    assert r['zarr3_copied'] and r['zarr3_convert'], r


def _launch(args: list[str], n: int = 2) -> None:
  """Runs `python -m orbax_nnx ARGS` as n jax.distributed processes (4 CPU devices each)."""
  port = free_port()
  envs = [{**base_env(), 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': str(n), 'JAX_PROCESS_ID': str(i)}
          for i in range(n)]
  outputs = run_together([([sys.executable, '-m', 'orbax_nnx', *args, '--quiet'], env) for env in envs])
  assert outputs == [''] * n, outputs  # --quiet: nothing on stdout, native (gloo) lines included


@pytest.mark.slow
def test_cli_convert_and_export_as_two_processes(tmp_path):
  """The README's recipe: the same CLI command on every process, joined through JAX_* variables."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from flax import nnx

  import orbax_nnx

  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 64, 128)).astype(np.float32)
  linen = {'params': {'params': {'layers': {'w': np.moveaxis(w, 0, 1)}}}, 'step': np.int32(9)}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'linen', linen)
  ckptr.wait_until_finished()

  _launch(['convert', str(tmp_path / 'linen'), str(tmp_path / 'nnx'), '--no-scan-layers'])
  _launch(['export-params', str(tmp_path / 'nnx'), str(tmp_path / 'decode'), '--dtype', 'bfloat16'])

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = nnx.State({'model': {f'layers_{i}': {'w': nnx.Param(jax.ShapeDtypeStruct((64, 128), np.float32,
                                                                                      sharding=device))}
                                for i in range(4)}})
  out = orbax_nnx.restore(tmp_path / 'nnx', target, extra='ignore')
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(out['model'][f'layers_{i}']['w'].get_value()), w[i])
  decoded = orbax_nnx.NNXCheckpointHandler().restore(tmp_path / 'decode')
  assert decoded['layers_0']['w'].get_value().dtype == jax.numpy.bfloat16
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(decoded[f'layers_{i}']['w'].get_value(), np.float32),
                                  w[i].astype(jax.numpy.bfloat16).astype(np.float32))
