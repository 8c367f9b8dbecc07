"""One process of the 2-process test (see test_multiprocess.py). Prints a JSON report.

ROOT may be a local folder or a `gs://` root (the GCS API server's address comes in the environment)."""

import json
import os
import sys

process_id, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402

import orbax_nnx  # noqa: E402

L, EMB, MLP = 8, 256, 512
P = jax.sharding.PartitionSpec
AUTO = (jax.sharding.AxisType.Auto,) * 2


def rchar() -> int:
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


def global_array(value: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def check(array: jax.Array, value: np.ndarray) -> bool:
  return all(np.array_equal(np.asarray(s.data), value[s.index]) for s in array.addressable_shards)


report = {'process': process_id, 'devices': jax.device_count(), 'local': jax.local_device_count()}
rng = np.random.default_rng(0)
w = rng.standard_normal((L, EMB, MLP)).astype(np.float32)  # same on both processes
mu = np.cos(1000 * w)
save_mesh = jax.make_mesh((2, 4), ('a', 'b'), axis_types=AUTO)
restore_mesh = jax.make_mesh((4, 2), ('a', 'b'), axis_types=AUTO)

# 1. NNX train state through a CheckpointManager, restored on another mesh
sh = jax.sharding.NamedSharding(save_mesh, P('a', 'b'))
state = {'model': nnx.State({'layers': {'w': nnx.Param(global_array(w, sh))}}),
         'optimizer': nnx.State({'step': nnx.training.optimizer.OptState(global_array(np.uint32(3) * np.ones((), np.uint32),
                                                                         jax.sharding.NamedSharding(save_mesh, P()))),
                                 'opt_state': {0: {'mu': {'layers': {'w': nnx.training.optimizer.OptVariable(
                                     global_array(mu, sh))}}}}})}
mngr_dir = epath.Path(root) / 'mngr'
with ocp.CheckpointManager(mngr_dir, handler_registry=orbax_nnx.nnx_registry) as mngr:
  mngr.save(3, args=ocp.args.Composite(state=orbax_nnx.NNXSave(state)))
  mngr.wait_until_finished()
rsh = jax.sharding.NamedSharding(restore_mesh, P('b', 'a'))
target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rsh if x.ndim == 3 else
                                                     jax.sharding.NamedSharding(restore_mesh, P())), state)
with ocp.CheckpointManager(mngr_dir, handler_registry=orbax_nnx.nnx_registry) as mngr:
  out = mngr.restore(3, args=ocp.args.Composite(state=orbax_nnx.NNXRestore(target)))['state']
report['nnx_restore'] = (check(out['model']['layers']['w'].get_value(), w)
                         and check(out['optimizer']['opt_state'][0]['mu']['layers']['w'].get_value(), mu)
                         and out['model']['layers']['w'].get_value().sharding == rsh)

# 2. a Linen-layout checkpoint (params scanned on axis 1) restored into an unrolled, sharded NNX model
linen_w = np.moveaxis(w, 0, 1)  # (EMB, L, MLP)
flat_mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
linen = {'step': global_array(np.int32(3) * np.ones((), np.int32), jax.sharding.NamedSharding(flat_mesh, P())),
         'params': {'params': {'layers': {'w': global_array(linen_w, jax.sharding.NamedSharding(flat_mesh, P('x')))}}}}
ckptr = ocp.StandardCheckpointer()
ckptr.save(epath.Path(root) / 'linen', linen)
ckptr.wait_until_finished()
unrolled_sh = jax.sharding.NamedSharding(restore_mesh, P(('a', 'b'), None))  # fully sharded over 8 devices
target = nnx.State({f'layers_{i}': {'w': nnx.Param(jax.ShapeDtypeStruct((EMB, MLP), np.float32, sharding=unrolled_sh))}
                    for i in range(L)})
r0 = rchar()
out = orbax_nnx.restore(epath.Path(root) / 'linen', target)
report['linen_read'] = rchar() - r0
report['linen_restore'] = all(check(out[f'layers_{i}']['w'].get_value(), w[i]) for i in range(L))
report['linen_bytes'] = int(w.nbytes)

# 3. Params only from the NNX train state, bf16
r0 = rchar()
params = orbax_nnx.load_params(mngr_dir, nnx.State({'layers': {'w': nnx.Param(
    jax.ShapeDtypeStruct((L, EMB, MLP), np.float32, sharding=rsh))}}), dtype='bfloat16')
report['params_read'] = rchar() - r0
value = params['layers']['w'].get_value()
report['load_params'] = value.dtype == jax.numpy.bfloat16 and check(value, w.astype(value.dtype))
# 4. convert the Linen checkpoint to NNX, unrolled: every process writes its own shards, Orbax commits once
r0 = rchar()
orbax_nnx.convert(epath.Path(root) / 'linen', epath.Path(root) / 'converted', scan_layers=False)
report['convert_read'] = rchar() - r0
out = orbax_nnx.restore(epath.Path(root) / 'converted', nnx.State({'model': target}), extra='ignore')
report['convert'] = all(check(out['model'][f'layers_{i}']['w'].get_value(), w[i]) for i in range(L))
# 4b. and back to Linen, stacked, under a 4 MiB budget: the 4 MiB stacked array is written block by block,
# each process its own shards, never held whole
orbax_nnx.convert(epath.Path(root) / 'converted', epath.Path(root) / 'back', memory_budget=4 * 2**20)
back = orbax_nnx.restore(epath.Path(root) / 'back', nnx.State({'layers': {'w': nnx.Param(
    jax.ShapeDtypeStruct((L, EMB, MLP), np.float32, sharding=rsh))}}), extra='ignore')
report['blocked_convert'] = check(back['layers']['w'].get_value(), w)

# 5. export a bf16 decode checkpoint of the NNX train state; plain Orbax restores it sharded
orbax_nnx.export_params(mngr_dir, epath.Path(root) / 'decode', dtype='bfloat16')
decode_target = {'layers': {'w': {'value': jax.ShapeDtypeStruct((L, EMB, MLP), jax.numpy.bfloat16, sharding=rsh)}}}
decoded = ocp.StandardCheckpointer().restore(epath.Path(root) / 'decode', decode_target)
report['export'] = check(decoded['layers']['w']['value'], w.astype(jax.numpy.bfloat16))
# 5b. the unrolled NNX params of step 4 in their stored dtype: copied as stored, each chunk by one process
from orbax_nnx.sources import chunk_stream  # noqa: E402

copied_chunks = []
_check = chunk_stream.check_stored
chunk_stream.check_stored = lambda data, fmt, key: (copied_chunks.append(key), _check(data, fmt, key))
orbax_nnx.export_params(epath.Path(root) / 'converted', epath.Path(root) / 'copied', dtype=None)
chunk_stream.check_stored = _check
copied = ocp.StandardCheckpointer().restore(epath.Path(root) / 'copied', {f'layers_{i}': {'w': {'value': jax.ShapeDtypeStruct(
    (EMB, MLP), np.float32, sharding=jax.sharding.NamedSharding(restore_mesh, P('b')))}} for i in range(L)})
report['export_copied'] = bool(copied_chunks) and all(
    check(copied[f'layers_{i}']['w']['value'], w[i]) for i in range(L))
report['copied_chunks'] = len(copied_chunks)

# 5c. a zarr v3 Linen checkpoint (MaxText's default format) converted to NNX stays zarr v3: its head copied shard
# by shard, each shard by one process (k mod 2), the layers unrolled through the normal zarr v3 write
head = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float32)
zarr3_src = {'params': {'params': {'head': {'kernel': global_array(head, jax.sharding.NamedSharding(flat_mesh, P('x')))},
                                   'layers': {'w': linen['params']['params']['layers']['w']}}}}
with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as zarr3_ckptr:
  zarr3_ckptr.save(epath.Path(root) / 'linen_zarr3', args=ocp.args.PyTreeSave(zarr3_src))
copied_chunks.clear()
chunk_stream.check_stored = lambda data, fmt, key: (copied_chunks.append(key), _check(data, fmt, key))
orbax_nnx.convert(epath.Path(root) / 'linen_zarr3', epath.Path(root) / 'nnx_zarr3', to='nnx', scan_layers=False)
chunk_stream.check_stored = _check
report['zarr3_copied'] = sorted(copied_chunks) == [f'c/{k}/0' for k in range(process_id, 8, 2)]
report['zarr3_convert'] = (json.loads((epath.Path(root) / 'nnx_zarr3' / '_METADATA').read_text())['use_zarr3'] is True
                           and orbax_nnx.compare(epath.Path(root) / 'linen_zarr3', epath.Path(root) / 'nnx_zarr3',
                                                 values=True).equal)

# 6. Hugging Face safetensors (process 0 writes them): each process reads only its shards' byte ranges
import safetensors.numpy  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

hf_dir = epath.Path(root) / 'hf'
if process_id == 0:
  hf_dir.mkdir(parents=True, exist_ok=True)
  (hf_dir / 'model.safetensors').write_bytes(safetensors.numpy.save(
      {f'model.layers.{i}.mlp.up_proj.weight': np.ascontiguousarray(w[i].T) for i in range(L)},
      metadata={'format': 'pt'}))
multihost_utils.sync_global_devices('hf written')
rules = [(r'model\.layers\.(\d+)\.mlp\.up_proj\.weight', {r'layers/\1/w': orbax_nnx.view.T})]
hf_target = nnx.State({'layers': {'w': nnx.Param(jax.ShapeDtypeStruct((L, EMB, MLP), np.float32, sharding=rsh))}})
r0 = rchar()
out = orbax_nnx.restore(hf_dir, hf_target, rules=rules)
report['hf_read'] = rchar() - r0
report['hf_restore'] = check(out['layers']['w'].get_value(), w)
# and back: one process writes each file, every process returns after it is in place
orbax_nnx.export_params(mngr_dir, epath.Path(root) / 'hf_out', format='safetensors', dtype=None,
                        target=nnx.State({'layers': {'w': nnx.Param(jax.ShapeDtypeStruct((L, EMB, MLP), np.float32))}}),
                        export_rules=[(r'layers/(\d+)/w', {r'model.layers.\1.mlp.up_proj.weight': orbax_nnx.view.T})])
exported = safetensors.numpy.load((epath.Path(root) / 'hf_out' / 'model.safetensors').read_bytes())
report['hf_export'] = all(np.array_equal(exported[f'model.layers.{i}.mlp.up_proj.weight'], w[i].T) for i in range(L))
print(json.dumps(report), flush=True)
jax.distributed.shutdown()
