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
      # the same format as the first: its write spec made from the first's (`WriteSpecs`)
      ('layers.1.kernel', jax.device_put(grid * 2, NamedSharding(mesh, PartitionSpec('data', 'model'))),
       ocp.SaveArgs()),
      ('layers.2.to_half', jax.device_put(grid * 3, NamedSharding(mesh, PartitionSpec(None, 'model'))),
       ocp.SaveArgs(dtype=np.dtype(np.float16))),
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
             'sharding_file': ShardingFile(), 'records': orbax_writes.Records(),
             'write_specs': orbax_writes.WriteSpecs()}

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


def _spec_cases(tmp_path) -> list[tuple[dict, tuple, tuple, np.dtype, ocp.SaveArgs | None]]:
  """(ParamInfo fields, global shape, write shape, dtype, SaveArgs): the formats Orbax's builder tells apart."""
  local = dict(parent_dir=epath.Path(tmp_path), is_ocdbt_checkpoint=True)
  return [
      (local, (64, 32), (64, 32), np.dtype('float32'), None),
      ({**local, 'use_zarr3': True}, (64, 32), (32, 32), np.dtype('float32'), ocp.SaveArgs()),
      ({**local, 'is_ocdbt_checkpoint': False}, (8,), (8,), np.dtype('int8'), ocp.SaveArgs()),
      ({**local, 'use_compression': False, 'ocdbt_target_data_file_size': 2**20}, (4, 256, 64), (4, 256, 64),
       np.dtype(jax.numpy.bfloat16), ocp.SaveArgs(chunk_byte_size=4096, shard_axes=(0,))),
      (local, (16, 16), (16, 16), np.dtype('float32'), ocp.SaveArgs(dtype=np.dtype('float16'))),  # cast
      ({**local, 'parent_dir': epath.Path('gs://bucket/run/ckpt')}, (3, 5), (3, 5), np.dtype('float32'), None),
      ({**local, 'parent_dir': epath.Path('gs://bucket/run/ckpt'), 'is_ocdbt_checkpoint': False}, (3, 5), (3, 5),
       np.dtype('float32'), None),
      (local, (), (), np.dtype('int32'), None),  # a scalar
  ]


class _Value:
  def __init__(self, shape, dtype):
    self.shape, self.dtype = shape, dtype


@pytest.mark.parametrize('case', range(8))
def test_write_specs_are_orbax_specs_built_once_per_format(tmp_path, case):
  """`WriteSpecs` gives every array exactly the spec Orbax's builder gives it (json and recorded metadata),
  though it builds each format once and renames it; names that are not plain are built as Orbax builds them."""
  fields, shape, local, dtype, arg = _spec_cases(tmp_path)[case]
  options = {'metadata_key': None, 'write_specs': orbax_writes.WriteSpecs()}
  calls = []
  build = compat.build_array_write_spec

  def counting(**kwargs):
    calls.append(kwargs['info'].name)
    return build(**kwargs)
  names = ['model.layers.0.mlp.kernel', 'model.layers.1.mlp.kernel', 'opt.mu.layers.7.mlp.kernel',
           'a/b c', 'model.layers.2.mlp.kernel']
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(compat, 'build_array_write_spec', counting)
    specs = [orbax_writes.write_spec(_Value(shape, dtype), compat.ParamInfo(name=n, **fields), arg, options, local)
             for n in names]
  for name, spec in zip(names, specs):
    theirs = build(info=compat.ParamInfo(name=name, **fields), arg=arg, global_shape=shape, local_shape=local,
                   dtype=dtype, use_ocdbt=fields['is_ocdbt_checkpoint'],
                   process_index=compat.process_index_for_subdir(fields['is_ocdbt_checkpoint']))
    assert spec.json == theirs.json and spec.metadata == theirs.metadata, name
  # the template, the first array's own spec (the check), and the name that is not plain
  assert calls == [orbax_writes.WriteSpecs.PLACEHOLDER, names[0], 'a/b c']


def test_write_specs_fall_back_where_a_name_is_not_a_plain_substitution(tmp_path, monkeypatch):
  """A builder whose output depends on the name in another way than the name itself appearing in it (here an
  escaped name) fails the first array's check: every spec is then built by the builder."""
  build = compat.build_array_write_spec

  def escaping(**kwargs):
    spec = build(**kwargs)
    spec.json['kvstore']['path'] = spec.json['kvstore']['path'].replace('.', '%2E')
    return spec
  monkeypatch.setattr(compat, 'build_array_write_spec', escaping)
  options = {'metadata_key': None, 'write_specs': orbax_writes.WriteSpecs()}
  for name in ('a.0.w', 'a.1.w', 'a.2.w'):
    info = compat.ParamInfo(name=name, parent_dir=epath.Path(tmp_path), is_ocdbt_checkpoint=True)
    spec = orbax_writes.write_spec(_Value((4,), np.dtype('float32')), info, None, options, (4,))
    assert spec.json['kvstore']['path'] == name.replace('.', '%2E') and spec.metadata.param_name == name


def test_a_failed_write_is_raised_and_nothing_is_left_waiting(tmp_path):
  """`write_whole` chains each array's open and writes in tensorstore callbacks: a write that fails (data of
  another shape than its region) raises from the call instead of leaving it waiting, and records nothing."""
  good = jax.device_put(np.ones((4, 4), np.float32))
  bad = jax.device_put(np.ones((2, 2), np.float32))
  options = {'array_metadata_store': compat.ArrayMetadataStore(), 'primary_host': 0, 'metadata_key': None,
             'sharding_file': ShardingFile(), 'records': orbax_writes.Records(),
             'write_specs': orbax_writes.WriteSpecs()}
  hosts = [_hosts(good), {region_key(normalize((), (2, 2))): np.ones((3, 3), np.float32)}]

  async def save():
    await asyncio.wait_for(orbax_writes.write_whole([good, bad], hosts, _infos(tmp_path, ['good', 'bad'], True),
                                                    [ocp.SaveArgs()] * 2, options), timeout=60)
  with pytest.raises(ValueError, match='mismatch with target dimension'):
    asyncio.run(save())
  assert options['records']._written == []  # noqa: SLF001


def test_countdown_settles_once_every_split_step_is_done():
  """`Countdown`: a step split into none is done at once (a process owning no shard of an array), one split into
  two needs both; the future settles only then, from any thread, and a later error changes nothing."""
  import threading

  async def run():
    countdown = orbax_writes.Countdown(asyncio.get_running_loop(), 2)
    countdown.split(0)
    countdown.split(2)
    worker = threading.Thread(target=countdown.step)
    worker.start()
    worker.join()
    await asyncio.sleep(0.01)
    assert not countdown.future.done()
    countdown.step()
    await asyncio.wait_for(countdown.future, timeout=10)
    countdown.fail(ValueError('late'))
    await asyncio.sleep(0.01)
    assert countdown.future.exception() is None
  asyncio.run(run())
