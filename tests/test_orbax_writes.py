"""`io.orbax_writes` writes arrays from their host shards exactly as Orbax's own ArrayHandler writes them."""

import asyncio
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from orbax_nnx import compat
from orbax_nnx.io import orbax_writes
from orbax_nnx.io.regions import normalize, region_key
from orbax_nnx.io.sharding_file import ShardingFile


def _cases() -> list[tuple[str, jax.Array, ocp.SaveArgs]]:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  rng = np.random.default_rng(0)
  grid = rng.standard_normal((8, 12)).astype(np.float32)
  return [
      ('layers.0.kernel', jax.device_put(grid, NamedSharding(mesh, PartitionSpec('data', 'model'))), ocp.SaveArgs()),
      ('embed', jax.device_put(grid[:6, :5], NamedSharding(mesh, PartitionSpec())), ocp.SaveArgs()),  # replicated
      ('count', jax.device_put(np.int32(3), SingleDeviceSharding(jax.devices()[1])), ocp.SaveArgs()),  # a scalar
      ('to_half', jax.device_put(grid, NamedSharding(mesh, PartitionSpec(None, 'model'))),
       ocp.SaveArgs(dtype=np.dtype(np.float16))),  # cast on write
      ('chunked', jax.device_put(rng.standard_normal((16, 64)).astype(jax.numpy.bfloat16),
                                 NamedSharding(mesh, PartitionSpec('data'))),
       ocp.SaveArgs(chunk_byte_size=256, shard_axes=(1,))),
      ('a/b~c.d', jax.device_put(np.arange(4, dtype=np.uint8), NamedSharding(mesh, PartitionSpec('model'))),
       ocp.SaveArgs()),
  ]


def _infos(directory, names, ocdbt, zarr3=False):
  return [compat.ParamInfo(name=n, parent_dir=epath.Path(directory), is_ocdbt_checkpoint=ocdbt, use_zarr3=zarr3,
                           ts_context=compat.get_ts_context(use_ocdbt=ocdbt)) for n in names]


def _hosts(array: jax.Array) -> dict:
  return {region_key(normalize(shard.index, array.shape)): np.asarray(shard.data) for shard in array.addressable_shards}


def _files(root) -> dict[str, bytes]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = open(path, 'rb').read()
  return out


@pytest.mark.parametrize('ocdbt,zarr3', [(False, False), (False, True), (True, False)],
                         ids=['per-array-files', 'zarr3', 'ocdbt'])
def test_host_shards_are_written_as_orbax_writes_the_arrays(tmp_path, ocdbt, zarr3):
  names, arrays, args = zip(*_cases())
  theirs, ours = tmp_path / 'orbax', tmp_path / 'ours'
  theirs.mkdir()
  ours.mkdir()
  # the oracle: Orbax's handler, each shard written whole (its replica-parallel mode splits replicated shards
  # among their replicas; a streaming write holds each shard once, on one device)
  handler = compat.ArrayHandler(use_replica_parallel=False, array_metadata_store=compat.ArrayMetadataStore())

  async def orbax_save():
    for future in await handler.serialize(list(arrays), _infos(theirs, names, ocdbt, zarr3), list(args)):
      await asyncio.to_thread(future.result)
  asyncio.run(orbax_save())

  options = {'array_metadata_store': compat.ArrayMetadataStore(), 'primary_host': 0, 'metadata_key': None,
             'sharding_file': ShardingFile(), 'records': orbax_writes.Records()}

  async def ours_save():
    await orbax_writes.write_whole(list(arrays), [_hosts(a) for a in arrays], _infos(ours, names, ocdbt, zarr3),
                                   list(args), options)
    await options['records'].flush(options)
  asyncio.run(ours_save())

  if ocdbt:  # the same keys and values in the database (its files are laid out by commit)
    def contents(root):
      store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{root}/ocdbt.process_0/'}).result()
      return {key: store.read(key).result().value for key in store.list().result()}
    mine, oracle = contents(ours), contents(theirs)
    assert sorted(mine) == sorted(oracle) and mine == oracle
    assert len(mine) >= 2 * len(names)  # every array's metadata and chunks
    mine, oracle = ({k: v for k, v in _files(d).items() if not k.startswith('ocdbt.process_')}
                    for d in (ours, theirs))
  else:  # byte for byte, every file
    mine, oracle = _files(ours), _files(theirs)
  assert sorted(mine) == sorted(oracle)
  for name in oracle:
    if name.startswith('array_metadatas'):  # the same records, in the order each writer listed them
      key = lambda record: record['array_metadata']['param_name']  # noqa: E731
      assert sorted(json.loads(mine[name])['array_metadatas'], key=key) == \
          sorted(json.loads(oracle[name])['array_metadatas'], key=key)
    else:
      assert mine[name] == oracle[name], name

  if ocdbt:  # (restoring needs the per-process databases merged, which the handler's finalize does)
    return
  restored = asyncio.run(compat.ArrayHandler().deserialize(
      _infos(ours, names, ocdbt, zarr3), [ocp.ArrayRestoreArgs(sharding=a.sharding) for a in arrays]))
  for array, arg, back in zip(arrays, args, restored):
    expected = np.asarray(array).astype(arg.dtype) if arg.dtype is not None else np.asarray(array)
    assert back.dtype == expected.dtype and back.sharding == array.sharding
    np.testing.assert_array_equal(np.asarray(back), expected)


def test_which_arrays_are_written_here():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  assert orbax_writes.writes_directly(jax.device_put(np.ones((2, 4)), NamedSharding(mesh, PartitionSpec('data'))))
  assert not orbax_writes.writes_directly(jax.random.key(0))  # Orbax stores a key's impl
  assert not orbax_writes.writes_directly(np.ones((0, 3)))  # Orbax refuses empty arrays


def test_each_shard_has_one_writer():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  regions = orbax_writes.own_regions((8, 12), NamedSharding(mesh, PartitionSpec('data')))
  assert regions == [(slice(0, 4), slice(0, 12)), (slice(4, 8), slice(0, 12))]  # 4 replicas each: written once
  assert orbax_writes.own_regions((3,), NamedSharding(mesh, PartitionSpec())) == [(slice(0, 3),)]
