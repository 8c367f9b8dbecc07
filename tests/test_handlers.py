"""NNXCheckpointHandler through CheckpointManager, plain Orbax interop, Variable kinds, errors."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import assert_same_state, flat, host

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx import examples as ex

CFG = ex.Config(num_layers=3)


def trained(mesh_shape=(2, 4), cfg=CFG):
  with jax.set_mesh(ex.make_mesh(mesh_shape)):
    model = ex.Transformer(cfg, rngs=nnx.Rngs(0, dropout=1))
    opt = ex.make_optimizer(model)
  ex.train_steps(model, opt, 2)
  return model, opt


def abstract_model_state(mesh_shape, cfg=CFG):
  _, state = nnx.get_abstract_model(lambda: ex.Transformer(cfg, rngs=nnx.Rngs(5, dropout=6)), ex.make_mesh(mesh_shape))
  return state


def abstract_train_state(mesh_shape, cfg=CFG):
  def init():
    model = ex.Transformer(cfg, rngs=nnx.Rngs(5, dropout=6))
    return {'model': model, 'optimizer': ex.make_optimizer(model)}
  with jax.set_mesh(ex.make_mesh(mesh_shape)):
    abstract = nnx.eval_shape(init)
  mesh = ex.make_mesh(mesh_shape)
  return {k: nnx.state(v) for k, v in abstract.items()}, mesh


def manager(path, **options):
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(**options), handler_registry=orbax_nnx.nnx_registry
  )


@pytest.mark.parametrize('restore_mesh', [(4, 2), (8, 1), (1, 1)])
def test_standard_args_roundtrip_across_meshes(ckpt_dir, restore_mesh):
  model, opt = trained((2, 4))
  with manager(ckpt_dir) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)), optimizer=ocp.args.StandardSave(nnx.state(opt))))
  with manager(ckpt_dir) as mngr:
    assert mngr.latest_step() == 3
    target = abstract_model_state(restore_mesh)
    restored = mngr.restore(3, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  assert_same_state(restored.model, nnx.state(model))
  kernel = restored.model['layers']['up']['kernel'].get_value()
  want = target['layers']['up']['kernel'].get_value().sharding
  assert kernel.sharding == want
  assert kernel.sharding.mesh.devices.shape == restore_mesh


def test_abstract_mesh_target_is_concretized(ckpt_dir):
  model, opt = trained((2, 4))
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(state=orbax_nnx.NNXSave({'model': model, 'optimizer': opt})))
  target, mesh = abstract_train_state((4, 2))
  sharding = target['model']['layers']['up']['kernel'].get_value().sharding
  assert isinstance(sharding.mesh, jax.sharding.AbstractMesh)
  with manager(ckpt_dir) as mngr:
    restored = mngr.restore(1, args=ocp.args.Composite(state=orbax_nnx.NNXRestore(target))).state
  assert_same_state(restored['model'], nnx.state(model))
  assert_same_state(restored['optimizer'], nnx.state(opt))
  got = restored['model']['layers']['up']['kernel'].get_value().sharding
  assert isinstance(got.mesh, jax.sharding.Mesh) and got.mesh.shape == mesh.shape


def test_restore_into_live_objects_in_place(ckpt_dir):
  model, opt = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model), optimizer=orbax_nnx.NNXSave(opt)))
  fresh_model, fresh_opt = trained((4, 2))  # other values, other mesh
  ex.train_steps(fresh_model, fresh_opt, 1, seed=9)
  with manager(ckpt_dir) as mngr:
    out = mngr.restore(1, args=ocp.args.Composite(
        model=orbax_nnx.NNXRestore(fresh_model), optimizer=orbax_nnx.NNXRestore(fresh_opt)))
  assert out.model is fresh_model and out.optimizer is fresh_opt
  assert_same_state(fresh_model, model)
  assert_same_state(fresh_opt, opt)
  assert int(fresh_opt.step[...]) == 2
  tokens = jnp.arange(16).reshape(2, 8) % CFG.vocab
  forward = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(np.asarray(forward(fresh_model, tokens)), np.asarray(forward(model, tokens)),
                             atol=1e-5)  # other mesh


def test_graphdef_pair_target_returns_module(ckpt_dir):
  model, _ = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model)))
  graphdef, abstract = nnx.get_abstract_model(lambda: ex.Transformer(CFG, rngs=nnx.Rngs(1)), ex.make_mesh((8, 1)))
  with manager(ckpt_dir) as mngr:
    restored = mngr.restore(1, args=ocp.args.Composite(model=orbax_nnx.NNXRestore((graphdef, abstract)))).model
  assert isinstance(restored, ex.Transformer)
  assert_same_state(restored, model)


def test_no_args_restore_in_fresh_process(ckpt_dir):
  model, opt = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(7, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model)),
                                         optimizer=orbax_nnx.NNXSave(opt)))
  script = textwrap.dedent(f"""
      import os, json
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import hashlib
      import jax, numpy as np, orbax.checkpoint as ocp
      from flax import nnx
      import orbax_nnx
      mngr = ocp.CheckpointManager({str(ckpt_dir)!r}, handler_registry=orbax_nnx.nnx_registry)
      out = mngr.restore(mngr.latest_step())
      report = {{}}
      for item in ('model', 'optimizer'):
        for path, v in nnx.to_flat_state(out[item]):
          x = v.get_value()
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
          report[item + ':' + repr(tuple(path))] = [type(v).__name__, str(v.get_value().dtype),
                                                    hashlib.sha256(np.asarray(x).tobytes()).hexdigest()]
      print(json.dumps(report))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  expected = {}
  for item, obj in (('model', model), ('optimizer', opt)):
    for path, v in flat(obj).items():
      expected[item + ':' + repr(path)] = [type(v).__name__, str(v.get_value().dtype),
                                           hashlib.sha256(host(v).tobytes()).hexdigest()]
  assert report == expected


def test_plain_orbax_reads_ours(ckpt_dir):
  model, _ = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model)))
  target = abstract_model_state((4, 2))
  plain = ocp.StandardCheckpointer().restore(ckpt_dir / '1' / 'model', target)
  assert_same_state(plain, model)
  plain_mngr = ocp.CheckpointManager(ckpt_dir)
  out = plain_mngr.restore(1, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  assert_same_state(out.model, model)


@pytest.mark.parametrize('flavour', ['raw', 'pure'])
def test_ours_reads_plain_orbax(tmp_path, flavour):
  model, _ = trained()
  state = nnx.state(model)
  item = state if flavour == 'raw' else nnx.to_pure_dict(state)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'plain', item)
  ckptr.wait_until_finished()
  handler = orbax_nnx.NNXCheckpointHandler()
  restored = handler.restore(tmp_path / 'plain', orbax_nnx.NNXRestore(abstract_model_state((4, 2))))
  assert_same_state(restored, model)
  # no records of ours: nothing says these dicts were Variables, so the tree comes back as Orbax
  # returns it (a `value` key stays a key), not guessed into Variables
  untargeted = handler.restore(tmp_path / 'plain')
  stock = ocp.StandardCheckpointer().restore(tmp_path / 'plain')
  assert type(untargeted) is dict and jax.tree.structure(untargeted) == jax.tree.structure(stock)
  leaf = untargeted['layers']['up']['kernel']
  if flavour == 'raw':
    assert type(leaf) is dict and list(leaf) == ['value']
    leaf = leaf['value']
  np.testing.assert_array_equal(np.asarray(leaf), host(model.layers.up.kernel))


def test_pure_flavour_written_on_request(ckpt_dir):
  model, _ = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model, flavour='pure')))
  meta = orbax_nnx.read_item_metadata(ckpt_dir / '1' / 'model')
  assert ('layers', 'up', 'kernel') in meta.leaves
  assert not any(p[-1] == 'value' for p in meta.leaves)
  with manager(ckpt_dir) as mngr:
    restored = mngr.restore(1).model
  assert_same_state(restored, model)  # Variable types come back from our metadata


class Custom(nnx.Variable):
  """A user-defined Variable kind."""


class KitchenSink(nnx.Module):
  def __init__(self, rngs):
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.lora = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
    self.custom = Custom(jnp.arange(6, dtype=jnp.int8).reshape(2, 3))
    self.cache = nnx.Cache(jnp.ones((3,)))
    self.half = nnx.Param(jnp.linspace(0, 1, 5, dtype=jnp.bfloat16))
    self.rngs = nnx.Rngs(3, noise=4)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked(rngs):
      return nnx.Dropout(0.5, rngs=rngs)
    self.stacked = stacked(nnx.Rngs(dropout=7))


def test_every_variable_kind_roundtrips(ckpt_dir):
  model = KitchenSink(nnx.Rngs(0))
  model.rngs.noise()  # advance a count
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), wrt=nnx.Param)
  kinds = {type(v).__name__ for v in flat(model).values()} | {type(v).__name__ for v in flat(opt).values()}
  assert {'Param', 'BatchStat', 'RngKey', 'RngCount', 'LoRAParam', 'Custom', 'OptState', 'OptArray', 'OptVariable'} <= kinds
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model), optimizer=orbax_nnx.NNXSave(opt)))
  stored = orbax_nnx.read_item_metadata(ckpt_dir / '1' / 'model').leaves
  assert not any('cache' in p for p in stored), 'Caches are never saved'
  assert stored[('stacked', 'rngs', 'key', 'value')].shape[0] == 3  # key data (3, 2)
  expected_model = {p: v for p, v in flat(model).items() if not isinstance(v, nnx.Cache)}
  with manager(ckpt_dir) as mngr:
    out = mngr.restore(1)
  assert_same_state(out.model, nnx.from_flat_state(expected_model))
  assert_same_state(out.optimizer, opt)
  assert out.model['half'].get_value().dtype == jnp.bfloat16
  assert jax.dtypes.issubdtype(out.model['rngs']['noise']['key'].get_value().dtype, jax.dtypes.prng_key)
  # and into a live module of the same kind, in place
  other = KitchenSink(nnx.Rngs(9))
  with manager(ckpt_dir) as mngr:
    mngr.restore(1, args=ocp.args.Composite(model=orbax_nnx.NNXRestore(other)))
  assert_same_state(nnx.state(other, nnx.Not(nnx.Cache)), nnx.state(model, nnx.Not(nnx.Cache)))


def test_async_saves_max_to_keep_latest_step(ckpt_dir):
  model, opt = trained()
  with manager(ckpt_dir, max_to_keep=2, enable_async_checkpointing=True) as mngr:
    for step in range(4):
      ex.train_steps(model, opt, 1, seed=step)
      mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model))))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]
    assert mngr.latest_step() == 3
    out = mngr.restore(3, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model_state((2, 4)))))
  assert_same_state(out.model, model)


def test_plain_pytrees_pass_through(ckpt_dir):
  tree = {'a': jnp.arange(8.0), 'b': {'c': np.int32(3) * jnp.ones((2, 2), jnp.int32)}}
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(extra=ocp.args.StandardSave(tree)))
  with manager(ckpt_dir) as mngr:
    out = mngr.restore(1, args=ocp.args.Composite(extra=ocp.args.StandardRestore(tree))).extra
  np.testing.assert_array_equal(out['a'], tree['a'])
  np.testing.assert_array_equal(out['b']['c'], tree['b']['c'])


def test_custom_metadata_records_types_and_shardings(ckpt_dir):
  model, _ = trained()
  with manager(ckpt_dir) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=orbax_nnx.NNXSave(model, custom_metadata={'run': 'x'})))
  meta = orbax_nnx.read_item_metadata(ckpt_dir / '1' / 'model')
  assert meta.custom['run'] == 'x'
  assert meta.ours['version'] == orbax_nnx.__version__
  record = meta.records[('layers', 'up', 'kernel')]
  assert record.type_name == 'flax.nnx.variablelib.Param'
  assert tuple(record.metadata['out_sharding']) == (None, 'fsdp', 'tensor')


# -- errors ------------------------------------------------------------------


def _save_model(ckpt_dir, cfg=CFG):
  model, _ = trained(cfg=cfg)
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(ckpt_dir, args=orbax_nnx.NNXSave(model))
  return model, orbax_nnx.NNXCheckpointHandler()


def test_structure_mismatch_lists_missing_and_extra(ckpt_dir):
  _, handler = _save_model(ckpt_dir)
  target = abstract_model_state((2, 4))
  renamed = [(('output',) + p[1:] if p[0] == 'head' else p, v) for p, v in nnx.to_flat_state(target)]
  with pytest.raises(errors.StructureMismatchError) as info:
    handler.restore(ckpt_dir, orbax_nnx.NNXRestore(nnx.from_flat_state(renamed)))
  message = str(info.value)
  assert 'output/kernel' in message and 'missing' in message
  assert 'head/kernel/value' in message and 'no place in the target' in message
  assert 'output/kernel' in info.value.missing


def test_extra_leaves_can_be_ignored(ckpt_dir):
  model, handler = _save_model(ckpt_dir)
  target = nnx.state(nnx.eval_shape(lambda: model))  # reuse shapes
  partial = {'embed': target['embed']}
  out = handler.restore(ckpt_dir, orbax_nnx.NNXRestore(partial, extra='ignore'))
  np.testing.assert_array_equal(host(out['embed']['embedding']), host(model.embed.embedding))


def test_shape_mismatch_names_path_and_shapes(ckpt_dir):
  _, handler = _save_model(ckpt_dir)
  target = abstract_model_state((2, 4), ex.Config(num_layers=3, emb=16))
  with pytest.raises(errors.ShapeMismatchError) as info:
    handler.restore(ckpt_dir, orbax_nnx.NNXRestore(target))
  assert f'stored {info.value.stored}, requested {info.value.requested}' in str(info.value)
  assert info.value.path.endswith('/value')
  assert info.value.stored != info.value.requested


@pytest.mark.parametrize('kind', ['missing', 'file', 'empty', 'foreign'])
def test_not_a_checkpoint(tmp_path, kind):
  path = tmp_path / 'x'
  if kind == 'file':
    path.write_text('hi')
  elif kind == 'empty':
    path.mkdir()
  elif kind == 'foreign':
    path.mkdir()
    (path / 'weights.bin').write_bytes(b'\0' * 16)
  with pytest.raises(errors.NotACheckpointError) as info:
    orbax_nnx.NNXCheckpointHandler().restore(path, orbax_nnx.NNXRestore())
  assert str(path) in str(info.value)


def test_save_rejects_reserved_custom_metadata(ckpt_dir):
  model, _ = trained()
  with pytest.raises(errors.OrbaxNNXError, match='reserved'):
    with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
      ckptr.save(ckpt_dir, args=orbax_nnx.NNXSave(model, custom_metadata={'orbax_nnx': 1}))
  assert not ckpt_dir.exists()
