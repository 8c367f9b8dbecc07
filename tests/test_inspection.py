"""inspect: facts per layout (not formatting), and metadata only (array bytes not read)."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import orbax_nnx
from orbax_nnx.inspection import inspect_checkpoint


def test_facts_for_an_nnx_train_state(tmp_path):
  model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  state = {'model': nnx.State({'lin': nnx.state(model), 'rngs': nnx.state(nnx.Rngs(1))}),
           'optimizer': nnx.State({'step': nnx.training.optimizer.OptState(jnp.uint32(3))})}
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=orbax_nnx.NNXSave(state)))
  facts = inspect_checkpoint(tmp_path)
  assert facts['layout'] == 'nnx' and facts['flavour'] == 'raw' and facts['step'] == 3
  assert facts['totals'] == {'params': (4 * 8 + 8) * 4, 'rng': 8 + 4, 'optimizer': 4}
  assert facts['orbax_nnx']['version'] == orbax_nnx.__version__
  kernel = next(r for r in facts['leaves'] if r['path'] == 'model/lin/kernel/value')
  assert kernel['shape'] == [4, 8] and kernel['dtype'] == 'float32' and kernel['bytes'] == 128
  grouped = inspect_checkpoint(tmp_path, depth=1)
  assert {r['path']: r['leaves'] for r in grouped['leaves']} == {'model': 4, 'optimizer': 1}
  only = inspect_checkpoint(tmp_path, pattern='kernel')
  assert [r['path'] for r in only['leaves']] == ['model/lin/kernel/value']


def test_inspect_reads_no_array_bytes(tmp_path):
  big = np.random.default_rng(0).standard_normal((64, 1024, 256)).astype(np.float32)  # 64 MiB
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'c', {'params': {'w': big}, 'step': np.int32(1)})
  ckptr.wait_until_finished()
  script = textwrap.dedent(f"""
      import json
      from orbax_nnx.inspection import inspect_checkpoint
      def rchar():
        return int([l for l in open('/proc/self/io') if l.startswith('rchar')][0].split()[1])
      r0 = rchar()
      facts = inspect_checkpoint({str(tmp_path / 'c')!r})
      print(json.dumps({{'read': rchar() - r0, 'total': facts['total_bytes']}}))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300,
                       check=True)
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  assert figures['total'] == big.nbytes + 4
  assert figures['read'] < 0.02 * big.nbytes, figures
