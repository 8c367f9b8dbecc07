"""`io.sharding_file.ShardingFile` writes the `_sharding` file Orbax's own ArrayHandler writes, a batch at a time."""

import asyncio
import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from orbax.checkpoint._src.serialization import jax_array_handlers  # the oracle: Orbax's per-key writer

from orbax_nnx import compat
from orbax_nnx.io.sharding_file import ShardingFile


def _arrays() -> dict:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  return {
      'params.layers.0.kernel': jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, PartitionSpec('data', 'model'))),
      'params.embed': jax.device_put(np.ones((4, 2), np.float32), NamedSharding(mesh, PartitionSpec())),
      'opt_state.0.count': jax.device_put(np.int32(3), SingleDeviceSharding(jax.devices()[1])),
      'rngs.key': jax.device_put(jax.random.key(0), SingleDeviceSharding(jax.devices()[0])),
      'a/b~c.d': jax.device_put(np.zeros((4,), np.float32), NamedSharding(mesh, PartitionSpec('model'))),
  }


def _infos(directory, names):
  return [compat.ParamInfo(name=n, parent_dir=directory, is_ocdbt_checkpoint=True, use_zarr3=False,
                           ts_context=compat.get_ts_context(use_ocdbt=True)) for n in names]


def test_batches_write_the_file_orbax_writes(tmp_path):
  arrays = _arrays()
  names = list(arrays)
  stored = [jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
            for a in arrays.values()]
  (tmp_path / 'orbax').mkdir()
  (tmp_path / 'ours').mkdir()
  asyncio.run(jax_array_handlers._async_serialize_shardings(  # pylint: disable=protected-access
      [a.sharding for a in stored], _infos(tmp_path / 'orbax', names), primary_host=0))

  shardings = ShardingFile()
  infos = _infos(tmp_path / 'ours', names)
  values = list(arrays.values())

  async def two_batches_at_once():
    await asyncio.gather(shardings.write(values[:2], infos[:2]), shardings.write(values[2:], infos[2:]))
  asyncio.run(two_batches_at_once())

  theirs, ours = (tmp_path / 'orbax' / '_sharding').read_bytes(), (tmp_path / 'ours' / '_sharding').read_bytes()
  assert ours == theirs
  recorded = json.loads(ours)
  assert len(recorded) == len(names)
  for name, array in zip(names, stored):
    key = compat.sharding_file_spec('x', name)['json_pointer'][1:]
    assert compat.sharding_from_serialized(recorded[key]).to_jax_sharding() == array.sharding


def test_a_later_batch_keeps_what_is_there_and_only_the_primary_host_writes(tmp_path):
  arrays = _arrays()
  names, values = list(arrays), list(arrays.values())
  infos = _infos(tmp_path, names)
  asyncio.run(ShardingFile().write(values[:1], infos[:1]))
  asyncio.run(ShardingFile().write(values[1:3], infos[1:3]))
  assert len(json.loads((tmp_path / '_sharding').read_text())) == 3
  asyncio.run(ShardingFile(primary_host=1).write(values[3:], infos[3:]))  # this process is 0: not the writer
  assert len(json.loads((tmp_path / '_sharding').read_text())) == 3
