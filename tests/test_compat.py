"""Pins every private Orbax / JAX / Flax API in `orbax_nnx.compat`: an upgrade that removes or
changes one fails here, naming the symbol, before it fails somewhere obscure."""

import asyncio
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from flax import nnx

import orbax_nnx
from orbax_nnx import compat


@pytest.mark.parametrize('name', ['run_sync', 'is_graph_node', 'get_concrete_mesh', 'get_sharding_or_format',
                                  'CommitFuture', 'ArrayMetadataStore', 'ArrayHandler', 'ParamInfo', 'SaveArgs',
                                  'get_ts_context', 'build_array_read_spec', 'create_type_handler_registry',
                                  'register_handler_type', 'get_handler_type', 'build_array_write_spec',
                                  'process_index_for_subdir', 'sharding_file_spec', 'serialized_sharding',
                                  'global_type_handler_registry', 'sharding_from_serialized',
                                  'type_handler_registry_of', 'type_handler_metadata_key', 'aggregate_filename',
                                  'check_handler_options', 'standard_handler', 'v1_context', 'v1_handler_options'])
def test_symbol_exists_and_is_callable(name):
  assert callable(getattr(compat, name)), f'orbax_nnx.compat.{name} is gone: find its new home in this release'


def test_run_sync_runs_a_coroutine():
  async def answer():
    return 42
  assert compat.run_sync(answer()) == 42


def test_is_graph_node():
  assert compat.is_graph_node(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  assert not compat.is_graph_node(jnp.ones(2))


def test_get_concrete_mesh_follows_set_mesh():
  mesh = jax.make_mesh((8,), ('x',))
  with jax.set_mesh(mesh):
    assert compat.get_concrete_mesh() == mesh


def test_get_sharding_or_format():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  x = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)
  assert compat.get_sharding_or_format(x, support_format=True) == sharding
  assert compat.get_sharding_or_format(object()) is None


def test_param_info_and_read_spec_fields():
  fields = set(inspect.signature(compat.ParamInfo).parameters)
  assert {'name', 'parent_dir', 'is_ocdbt_checkpoint', 'ts_context'} <= fields, 'ParamInfo fields changed'
  assert 'use_ocdbt' in inspect.signature(compat.build_array_read_spec).parameters
  assert 'use_ocdbt' in inspect.signature(compat.get_ts_context).parameters


def test_default_type_handlers_and_key_impl():
  types = [ty for ty, _ in compat.default_type_handlers()]
  assert jax.Array in types and np.ndarray in types
  key = jax.random.key(0)
  assert compat.key_impl(key.dtype).key_shape == (2,)


def test_array_handler_serialize_signature():
  params = inspect.signature(compat.ArrayHandler.serialize).parameters
  assert list(params)[:4] == ['self', 'values', 'infos', 'args'], 'ArrayHandler.serialize signature changed'
  assert 'array_metadata_store' in inspect.signature(compat.ArrayHandler.__init__).parameters


def test_composite_frames_are_found(tmp_path):
  """The item name and registry lookups rely on CompositeCheckpointHandler's frame names and locals."""
  with ocp.CheckpointManager(tmp_path, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(0, args=ocp.args.Composite(plain=ocp.args.StandardSave({'x': np.ones(2)}),
                                         model=ocp.args.StandardSave(nnx.State({'w': nnx.Param(jnp.ones(2))}))))
  handlers = json.loads((tmp_path / '0' / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  assert handlers['plain'] == ocp.StandardCheckpointHandler.typestr(), (
      'compat.composite_item_in_flight no longer finds CompositeCheckpointHandler._get_item_handlers(item_name)')
  assert handlers['model'] == orbax_nnx.NNXCheckpointHandler.typestr()
  assert compat.composite_item_in_flight() is None and compat.composite_registry_in_flight() is None


def test_handler_type_registry_finds_our_v1_item_handler():
  from orbax_nnx import v1
  assert compat.get_handler_type(v1.TYPESTR) is v1.V1ItemCheckpointHandler
  assert compat.get_handler_type(orbax_nnx.NNXCheckpointHandler.typestr()) is orbax_nnx.NNXCheckpointHandler


def test_array_handler_options_and_write_spec(tmp_path):
  """Per-block writes build Orbax's own write spec and reuse the handler's options."""
  store = compat.ArrayMetadataStore()
  options = compat.array_handler_options(compat.ArrayHandler(array_metadata_store=store))
  assert options['array_metadata_store'] is store
  assert options['primary_host'] == 0 and options['metadata_key'] is None
  info = compat.ParamInfo(name='w', parent_dir=tmp_path, is_ocdbt_checkpoint=True, use_zarr3=False)
  spec = compat.build_array_write_spec(info=info, arg=compat.SaveArgs(chunk_byte_size=4096), global_shape=(64, 32),
                                       local_shape=(64, 32), dtype=np.dtype('float32'), use_ocdbt=True,
                                       process_index=compat.process_index_for_subdir(True))
  assert spec.metadata.chunk_shape == (32, 32) and spec.json['driver'] == 'zarr'
  sharding_spec = compat.sharding_file_spec(tmp_path.as_posix(), 'a.b')
  assert sharding_spec['driver'] == 'json' and sharding_spec['json_pointer'].startswith('/')
  assert sharding_spec['kvstore']['path'].endswith('_sharding')
  assert json.loads(compat.serialized_sharding(jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  assert compat.serialized_sharding(None) is None


def test_type_handler_registry_and_metadata_key_are_read():
  registry = compat.create_type_handler_registry((np.ndarray, ocp.type_handlers.NumpyHandler(metadata_key='.meta')))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  assert compat.type_handler_registry_of(handler) is registry
  assert compat.type_handler_metadata_key(registry.get('np.ndarray')) == '.meta'
  assert compat.type_handler_metadata_key(ocp.type_handlers.NumpyHandler()) is None


@pytest.mark.parametrize('zarr3', [False, True])
def test_write_spec_info_builds_the_spec_the_param_info_builds(tmp_path, zarr3):
  """`write_spec_info` hands Orbax's spec builder the fields it reads, with the directory read once: the same
  spec as the ParamInfo itself gives. `parent_dir` is the resolved directory; an unresolved one raises, as
  Orbax's property does, until `resolved_parent_dir` awaits its creation."""
  info = compat.ParamInfo(name='a.w', parent_dir=epath.Path(tmp_path), is_ocdbt_checkpoint=True, use_zarr3=zarr3,
                          ocdbt_target_data_file_size=2**20, use_compression=False)
  kwargs = dict(arg=compat.SaveArgs(chunk_byte_size=4096), global_shape=(64, 32), local_shape=(64, 32),
                dtype=np.dtype('float32'), use_ocdbt=True, process_index=compat.process_index_for_subdir(True))
  ours = compat.build_array_write_spec(info=compat.write_spec_info(info), **kwargs)
  theirs = compat.build_array_write_spec(info=info, **kwargs)
  assert ours.json == theirs.json and ours.metadata == theirs.metadata
  assert compat.parent_dir(info) == info.parent_dir == epath.Path(tmp_path)

  class Deferred:  # what Orbax's `DeferredPath` is to the protocol: awaited before use
    async def await_creation(self):
      return epath.Path(tmp_path)

    def __truediv__(self, other):
      return self

    @property
    def path(self):
      return epath.Path(tmp_path)

  later = compat.ParamInfo(name='a.w', parent_dir=Deferred(), is_ocdbt_checkpoint=True)
  with pytest.raises(ValueError, match='await_path_creation'):
    compat.parent_dir(later)
  assert compat.planned_parent_dir(later) == epath.Path(tmp_path) == compat.planned_parent_dir(info)
  context = ts.Context()
  copied = compat.with_ts_context(later, context)  # (ParamInfo is a plain class: copied, not replaced)
  assert copied.ts_context is context and later.ts_context is not context and copied.name == 'a.w'
  assert asyncio.run(compat.resolved_parent_dir(copied)) == epath.Path(tmp_path) == copied.parent_dir
  assert asyncio.run(compat.resolved_parent_dir(later)) == epath.Path(tmp_path) == later.parent_dir
