"""Child of test_crash_safety.py: saves, converts and exports in a loop until killed."""

import os
import sys

root, src = sys.argv[1], sys.argv[2]
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

import orbax_nnx  # noqa: E402


def state_for(step: int) -> dict:
  return {'model': nnx.State({'w': nnx.Param(jnp.full((512, 1024), float(step), jnp.float32)),
                              'b': nnx.Param(jnp.arange(1024, dtype=jnp.float32) + step)})}


start = int(sys.argv[3])
for i in range(start, start + 1000):
  # todelete_subdir: max_to_keep retires old steps by an atomic rename; a plain rmtree killed halfway
  # leaves a half-deleted step that all_steps() still lists (seen: its _CHECKPOINT_METADATA gone first)
  options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=bool(i % 2),
                                         todelete_subdir='retired')
  with ocp.CheckpointManager(os.path.join(root, 'mngr'), options=options,
                             handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(i, args=ocp.args.Composite(state=orbax_nnx.NNXSave(state_for(i))))
    mngr.wait_until_finished()
  print(f'saved {i}', flush=True)
  if i % 2 == 0:
    orbax_nnx.convert(src, os.path.join(root, f'conv_{i}'), scan_layers=False)
    print(f'converted {i}', flush=True)
  else:
    orbax_nnx.export_params(src, os.path.join(root, f'export_{i}'), scan_layers=False)
    print(f'exported {i}', flush=True)
