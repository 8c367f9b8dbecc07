"""Child of test_crash_safety.py: saves, converts and exports in a loop until killed."""

import os
import sys

root, src = sys.argv[1], sys.argv[2]
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

import orbax_nnx  # noqa: E402


def state_for(step: int) -> dict:
  return {'model': nnx.State({'w': nnx.Param(jnp.full((512, 1024), float(step), jnp.float32)),
                              'b': nnx.Param(jnp.arange(1024, dtype=jnp.float32) + step)})}


start = int(sys.argv[3])
on_store = root.startswith('gs://')
# the export's model: the source's 4 stacked layers unrolled, one tensor per layer (several files + index)
export_target = nnx.State({'layers': {k: {'w': nnx.Param(jax.ShapeDtypeStruct((256, 512), jnp.float32))} for k in range(4)},
                           'head': {'kernel': nnx.Param(jax.ShapeDtypeStruct((256, 64), jnp.float32))}})
export_rules = [(r'layers/(\d+)/w', r'model.layers.\1.w'), ('head/kernel', 'lm_head.weight')]
for i in range(start, start + 1000):
  if i % 3 == 0:
    orbax_nnx.convert(src, os.path.join(root, f'conv_{i}'), scan_layers=False)
    print(f'converted {i}', flush=True)
  elif i % 3 == 1:
    orbax_nnx.export_params(src, os.path.join(root, f'export_{i}'), scan_layers=False)
    print(f'exported {i}', flush=True)
  else:
    orbax_nnx.export_params(src, os.path.join(root, f'st_{i}'), format='safetensors', target=export_target,
                            export_rules=export_rules, dtype=None, max_shard_size=256 * 512 * 4)
    print(f'exported safetensors {i}', flush=True)
  # locally, todelete_subdir: max_to_keep retires old steps by an atomic rename; a plain rmtree killed halfway
  # leaves a half-deleted step that all_steps() still lists (seen: its _CHECKPOINT_METADATA gone first). An object
  # store has no atomic rename, so Orbax's retiring cannot be atomic there: steps are kept.
  options = (ocp.CheckpointManagerOptions(enable_async_checkpointing=bool(i % 2)) if on_store else
             ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=bool(i % 2),
                                          todelete_subdir='retired'))
  with ocp.CheckpointManager(os.path.join(root, 'mngr'), options=options,
                             handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(i, args=ocp.args.Composite(state=orbax_nnx.NNXSave(state_for(i))))
    mngr.wait_until_finished()
  print(f'saved {i}', flush=True)
