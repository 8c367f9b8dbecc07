"""Leaf metadata from the zarr headers equals what Orbax's own `metadata()` builds, in every format."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from orbax_nnx import compat
from orbax_nnx.sources import metadata as metadata_lib
from orbax_nnx.sources import zarr_headers

FORMATS = [(ocdbt, zarr3) for ocdbt in (True, False) for zarr3 in (False, True)]


def _tree():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b'))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a', 'b'))
  return {
      'w': jax.device_put(jnp.arange(64 * 32, dtype=jnp.bfloat16).reshape(64, 32), sharded),
      'big': jnp.ones((256, 512), jnp.float32),
      'n': np.ones((3, 5), np.int8),
      'step': 3, 'lr': 2.5, 'half': np.zeros((), np.float16),
      'opt': [np.zeros(4, bool), None, {'mu': jnp.zeros((7,), jnp.float32)}],
      'empty': {},
  }


def _save(path, ocdbt, zarr3, tree):
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), tree)
  if 'big' in tree:
    save_args['big'] = ocp.SaveArgs(chunk_byte_size=64 * 1024)  # several chunks
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(tree, save_args=save_args))
  return json.loads((path / '_METADATA').read_text())


@pytest.mark.parametrize('ocdbt,zarr3', FORMATS)
def test_headers_give_orbax_metadata(tmp_path, ocdbt, zarr3):
  path = tmp_path / 'item'
  flags = _save(path, ocdbt, zarr3, _tree())
  fast, has_empty = zarr_headers.read(path, flags, None)
  ref = metadata_lib._flatten_tree(ocp.PyTreeCheckpointHandler().metadata(path).tree)
  assert set(fast) == set(ref) and has_empty
  for key, want in ref.items():
    got = fast[key]
    assert type(got) is type(want) and got == want, key
    assert str(got.dtype) == str(want.dtype), key
  assert fast[('big',)].storage.chunk_shape != (256, 512)  # chunked: the read chunk, as Orbax reports it
  assert fast[('w',)].sharding is not None and fast[('w',)].sharding == ref[('w',)].sharding


@pytest.mark.parametrize('ocdbt,zarr3', FORMATS)
def test_read_specs_equal_orbax_per_name(tmp_path, ocdbt, zarr3):
  specs = zarr_headers.ReadSpecs(tmp_path, ocdbt, zarr3)
  for name in ('w', 'params.params.layers_0.mlp.kernel', 'opt.0'):
    info = compat.ParamInfo(name=name, parent_dir=tmp_path, is_ocdbt_checkpoint=ocdbt, use_zarr3=zarr3,
                            ts_context=specs.context)
    assert specs.spec(name) == compat.build_array_read_spec(info, use_ocdbt=ocdbt).json


def test_unknown_value_types_are_left_to_orbax(tmp_path):
  path = tmp_path / 'item'
  flags = _save(path, True, False, {'name': 'a string', 'x': np.arange(3)})
  assert zarr_headers.read(path, flags, None) is None  # 'string' is not a zarr array
  leaves = metadata_lib.read_item_metadata(path).leaves  # Orbax's metadata() answers instead
  assert set(leaves) == {('name',), ('x',)} and leaves[('x',)].shape == (3,)


def test_a_custom_type_handler_is_left_to_orbax(tmp_path):
  path = tmp_path / 'item'
  flags = _save(path, True, False, {'x': np.arange(3)})

  class MyNumpyHandler(ocp.type_handlers.NumpyHandler):
    pass

  registry = compat.create_type_handler_registry((np.ndarray, MyNumpyHandler()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  assert zarr_headers.read(path, flags, handler) is None
  assert zarr_headers.read(path, flags, ocp.PyTreeCheckpointHandler()) is not None


def test_a_missing_header_is_left_to_orbax(tmp_path):
  path = tmp_path / 'item'
  flags = _save(path, False, False, {'x': np.arange(3), 'y': np.ones(2)})
  (path / 'y' / '.zarray').unlink()
  assert zarr_headers.read(path, flags, None) is None


@pytest.mark.parametrize('ocdbt,zarr3', [(True, False), (False, True)])
def test_tree_metadata_is_orbaxs_and_the_untargeted_restore_too(tmp_path, ocdbt, zarr3):
  """The item's whole `metadata()` built from the headers (lists, None, empty dicts, scalars, sharded arrays)
  equals Orbax's, and so the untargeted restore built on it returns what StandardCheckpointHandler does."""
  import orbax_nnx
  path = tmp_path / 'item'
  tree = _tree()
  _save(path, ocdbt, zarr3, tree)
  meta = metadata_lib.read_item_metadata(path)
  ours, want = meta.leaves.tree_metadata(), ocp.PyTreeCheckpointHandler().metadata(path)
  assert meta.leaves._asked_orbax is None  # (built from the headers, not asked of Orbax)
  assert ours.tree == want.tree and ours.custom_metadata == want.custom_metadata
  assert jax.tree.structure(ours.tree) == jax.tree.structure(want.tree)
  got, ref = orbax_nnx.restore(path), ocp.StandardCheckpointHandler().restore(path)
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert getattr(a, 'sharding', None) == getattr(b, 'sharding', None)
