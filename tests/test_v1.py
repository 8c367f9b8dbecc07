"""Orbax v1: NNX objects through `save_checkpointables`/`load_checkpointables` and `training.Checkpointer`,
cross-version reads both ways, mapped (Linen -> NNX, bf16 param-only) loads, plain pytrees untouched."""

import json
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
from helpers import assert_same_state, data_only
from orbax.checkpoint.experimental import v1

import orbax_nnx
from orbax_nnx.examples import make_mesh
from orbax_nnx.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab=64, emb=32, mlp=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, scan_layers=True)


def make(mesh=None, seed=0):
  def build():
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  if mesh is None:
    return build()
  with jax.set_mesh(mesh):
    return build()


def abstract_states(mesh):
  graphdef, state = nnx.get_abstract_model(lambda: make(seed=1), mesh)
  model, opt = nnx.merge(graphdef, state)
  return nnx.state(model), nnx.state(opt)


def test_save_and_load_checkpointables_with_resharding(tmp_path):
  model, opt = make(make_mesh((2, 4)))
  v1.save_checkpointables(tmp_path / 'c', {'model': model, 'optimizer': opt})
  meta = json.loads((tmp_path / 'c' / '_CHECKPOINT_METADATA').read_text())
  assert meta['item_handlers'] == {'model': 'orbax_nnx.v1.NNXHandler', 'optimizer': 'orbax_nnx.v1.NNXHandler'}
  model_target, opt_target = abstract_states(make_mesh((4, 2)))
  out = v1.load_checkpointables(tmp_path / 'c', {'model': model_target, 'optimizer': opt_target})
  assert_same_state(out['model'], nnx.state(model))
  assert_same_state(data_only(out['optimizer']), data_only(nnx.state(opt)))
  kernel = out['model']['layers']['mlp']['up_proj']['kernel'].get_value()
  assert kernel.sharding == model_target['layers']['mlp']['up_proj']['kernel'].get_value().sharding
  assert kernel.sharding.mesh.devices.shape == (4, 2)
  # no abstract: the stored Variables come back with their types
  untargeted = v1.load_checkpointables(tmp_path / 'c')
  assert type(untargeted['model']['embed']['embedding']) is nnx.Param
  assert type(untargeted['optimizer']['step']) is nnx.training.optimizer.OptState
  # a live module as the abstract: a module comes back (v1 hands handlers a copy of what it is given)
  fresh, _ = make(seed=7)
  loaded = v1.load_checkpointables(tmp_path / 'c', {'model': fresh})['model']
  assert isinstance(loaded, Llama)
  np.testing.assert_array_equal(loaded.embed.embedding.get_value(), model.embed.embedding.get_value())


def test_training_checkpointer_async_max_to_keep_fresh_process(tmp_path):
  model, opt = make()
  policy = v1.training.preservation_policies.LatestN(2)
  every_step = v1.training.save_decision_policies.FixedIntervalPolicy(1)
  with v1.training.Checkpointer(tmp_path / 'run', preservation_policy=policy,
                                save_decision_policy=every_step) as ckptr:
    for step in range(4):
      model.final_norm.scale.set_value(jnp.full((CFG.emb,), float(step)))
      done = ckptr.save_checkpointables_async(step, {'model': model, 'optimizer': opt})
      assert done is not None
      done.result()
    ckptr.wait()
    assert [c.step for c in ckptr.checkpoints] == [2, 3]
    out = ckptr.load_checkpointables(3, {'model': nnx.state(nnx.eval_shape(lambda: make()[0]))})
  np.testing.assert_array_equal(out['model']['final_norm']['scale'].get_value(), np.full((CFG.emb,), 3.0))
  script = textwrap.dedent(f'''
      import json, sys
      from orbax.checkpoint.experimental import v1
      import orbax_nnx
      from flax import nnx
      with v1.training.Checkpointer({str(tmp_path / 'run')!r}) as ckptr:
        out = ckptr.load_checkpointables(ckptr.latest.step)
      scale = out['model']['final_norm']['scale']
      print(json.dumps([type(scale).__name__, float(scale.get_value()[0]), type(out['optimizer']['step']).__name__]))
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == ['Param', 3.0, 'OptState']


def test_cross_version_reads(tmp_path):
  model, opt = make()
  # v0 (a CheckpointManager with nnx_registry) -> v1
  with ocp.CheckpointManager(tmp_path / 'v0', handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model))))
    mngr.wait_until_finished()
  out = v1.load_checkpointables(tmp_path / 'v0' / '1')
  assert type(out['model']['layers']['attn']['q_proj']['kernel']) is nnx.Param
  assert_same_state(out['model'], nnx.state(model))
  # v1 -> v0: our restore, a v0 CheckpointManager, and plain Orbax
  v1.save_checkpointables(tmp_path / 'v1' / '5', {'model': model})
  target = nnx.state(nnx.eval_shape(lambda: make()[0]))
  assert_same_state(orbax_nnx.restore(tmp_path / 'v1', target), nnx.state(model))
  with ocp.CheckpointManager(tmp_path / 'v1', handler_registry=orbax_nnx.nnx_registry) as mngr:
    restored = mngr.restore(5, args=ocp.args.Composite(model=orbax_nnx.NNXRestore(target)))['model']
  assert_same_state(restored, nnx.state(model))
  plain = ocp.StandardCheckpointer().restore(tmp_path / 'v1' / '5' / 'model', target)
  np.testing.assert_array_equal(plain['embed']['embedding'].get_value(), model.embed.embedding.get_value())
  # fresh processes, no args: v0's manager finds the handler by the typestr v1 recorded, and the other way
  script = textwrap.dedent(f'''
      import json
      import orbax.checkpoint as ocp
      from orbax.checkpoint.experimental import v1
      import orbax_nnx
      with ocp.CheckpointManager({str(tmp_path / 'v1')!r}, handler_registry=orbax_nnx.nnx_registry) as mngr:
        from_v1 = mngr.restore(5).model
      from_v0 = v1.load_checkpointables({str(tmp_path / 'v0' / '1')!r})['model']
      print(json.dumps([type(from_v1['embed']['embedding']).__name__, type(from_v0['embed']['embedding']).__name__]))
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == ['Param', 'Param']


def test_mapped_loads_through_v1(tmp_path):
  """A Linen-layout train state saved by v1 itself, loaded into the NNX model: full, and Params in bf16."""
  model, _ = make()
  linen_params = {'params': jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
  linen_params['params']['layers'] = jax.tree.map(lambda x: np.moveaxis(x, 0, 1) if x.ndim > 1 else x,
                                                  linen_params['params']['layers'])  # MaxText: layers on axis 1
  v1.save_pytree(tmp_path / 'linen', {'step': np.asarray(3, np.int32), 'params': linen_params})
  target = nnx.state(nnx.eval_shape(lambda: make()[0]))
  def load(t):  # `state` is the name `save_pytree` gives its item
    return v1.load_checkpointables(tmp_path / 'linen', {'state': t})['state']

  out = load(orbax_nnx.NNXRestore(target, extra='ignore', scan_axis={r'model/layers/.*': 1}))
  assert_same_state(out, nnx.state(model))
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), nnx.state(target, nnx.Param))
  params = load(orbax_nnx.NNXRestore(bf16, extra='ignore', scan_axis={r'model/layers/.*': 1}))
  value = params['layers']['attn']['o_proj']['kernel'].get_value()
  assert value.dtype == jnp.bfloat16
  np.testing.assert_array_equal(value, model.layers.attn.o_proj.kernel.get_value().astype(jnp.bfloat16))


def test_plain_pytrees_stay_with_v1s_own_handler(tmp_path):
  tree = {'a': np.arange(6, dtype=np.int64).reshape(2, 3), 'b': {'value': np.asarray([2.5], np.float32)}}
  v1.save_pytree(tmp_path / 'p', tree)
  meta = json.loads((tmp_path / 'p' / '_CHECKPOINT_METADATA').read_text())
  assert 'orbax_nnx' not in json.dumps(meta['item_handlers'])
  out = v1.load_pytree(tmp_path / 'p')
  assert sorted(out) == ['a', 'b'] and out['a'].dtype == np.int64
  np.testing.assert_array_equal(np.asarray(out['a']), tree['a'])


def test_save_and_load_the_state_item_inside_our_context(tmp_path):
  """`ocp.save(path, x)` binds the `state` item to PyTreeHandler by name; orbax_nnx.v1.context() lifts that."""
  model, opt = make()
  v1.save(tmp_path / 'plain_api', nnx.state(model))  # without our context: values kept, types not
  assert not isinstance(v1.load(tmp_path / 'plain_api')['embed']['embedding'], nnx.Variable)
  with orbax_nnx.v1.context():
    v1.save(tmp_path / 's', nnx.state(model))
    out = v1.load(tmp_path / 's')
    v1.save(tmp_path / 'plain', {'a': np.arange(3.0)})  # plain pytrees: still v1's PyTreeHandler
  assert type(out['layers']['mlp']['down_proj']['kernel']) is nnx.Param
  assert_same_state(out, nnx.state(model))
  handlers = json.loads((tmp_path / 'plain' / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  assert handlers['state'].endswith('PyTreeHandler')
  with v1.training.Checkpointer(tmp_path / 'run', context=orbax_nnx.v1.context()) as ckptr:
    ckptr.save_pytree(0, nnx.state(opt))
    ckptr.wait()
    back = ckptr.load_pytree(0)
  assert type(back['step']) is nnx.training.optimizer.OptState


class Tower(nnx.Module):
  """LoRA, BatchNorm and an rng stream: every NNX Variable kind a training state carries."""

  def __init__(self, rngs):
    self.lora = nnx.LoRALinear(8, 8, lora_rank=2, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.bn(self.lora(x)))


def test_lora_batchnorm_rng_state_through_v1(tmp_path):
  model = Tower(nnx.Rngs(0, dropout=1))
  model(jnp.ones((4, 8)))  # batch stats and the dropout counter move
  v1.save_checkpointables(tmp_path / 'c', {'model': model})
  out = v1.load_checkpointables(tmp_path / 'c')['model']
  assert_same_state(out, nnx.state(model))
  kinds = {type(v).__name__ for _, v in nnx.to_flat_state(out)}
  assert {'LoRAParam', 'BatchStat', 'RngKey', 'RngCount', 'Param'} <= kinds, kinds
  target = nnx.state(nnx.eval_shape(lambda: Tower(nnx.Rngs(5, dropout=6))))
  assert_same_state(v1.load_checkpointables(tmp_path / 'c', {'model': target})['model'], nnx.state(model))


def test_partial_load_of_the_active_context_is_honoured(tmp_path):
  """tunix's LoRA restore: a full model saved through `training.Checkpointer`, its LoRA params loaded alone inside
  a Context with `pytree.loading.partial_load = True`; without it, the stored leaves the target lacks are an
  error."""
  class Lora(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.LoRA(4, 2, 4, rngs=rngs)
      self.dense = nnx.Linear(4, 4, rngs=rngs)

  saved = Lora(nnx.Rngs(0))
  saved.lin.lora_b.set_value(jnp.arange(8.0).reshape(2, 4))
  with v1.training.Checkpointer(tmp_path / 'run') as ckptr:
    ckptr.save_checkpointables(1, {'model_params': nnx.state(saved)})
    fresh = Lora(nnx.Rngs(1))
    with pytest.raises(Exception) as raised:  # v1 wraps every load error in its NoEntryError
      ckptr.load_checkpointables(1, {'model_params': nnx.state(fresh, nnx.LoRAParam)})
    assert isinstance(raised.value.__cause__, orbax_nnx.errors.StructureMismatchError)
    assert 'dense/kernel' in str(raised.value.__cause__)
    context = v1.Context()
    context.pytree.loading.partial_load = True
    with context:
      out = ckptr.load_checkpointables(1, {'model_params': nnx.state(fresh, nnx.LoRAParam)})
  nnx.update(fresh, out['model_params'])
  np.testing.assert_array_equal(np.asarray(fresh.lin.lora_b.get_value()), np.arange(8.0).reshape(2, 4))
  assert set(out['model_params']) == {'lin'}


def test_the_contexts_array_saving_options_apply_as_to_v1s_own_handler(tmp_path):
  """NNX objects saved through v1 are stored as v1's own PyTreeHandler stores a pytree under the same Context
  (zarr3 by default, OCDBT or not); per-leaf storage options are refused by name."""
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  tree = {'w': np.arange(6.0).reshape(2, 3)}
  for name, use_ocdbt in (('ocdbt', True), ('plain', False)):
    context = v1.Context()
    context.array.saving.use_ocdbt = use_ocdbt
    with context:
      v1.save_checkpointables(tmp_path / name, {'model': model, 'tree': tree})
      out = v1.load_checkpointables(tmp_path / name, {'model': nnx.eval_shape(lambda: nnx.state(model))})
    np.testing.assert_array_equal(np.asarray(out['model']['kernel'].get_value()), np.asarray(model.kernel.get_value()))
    for item in ('model', 'tree'):
      flags = json.loads((tmp_path / name / item / '_METADATA').read_text())
      assert flags['use_zarr3'] is True and flags.get('use_ocdbt', True) is use_ocdbt, (name, item, flags)
      assert (tmp_path / name / item / 'manifest.ocdbt').exists() is use_ocdbt
  context = v1.Context()
  context.array.saving.storage_options = type(context.array.saving.storage_options)(dtype=np.float16)
  with context, pytest.raises(Exception) as raised:
    v1.save_checkpointables(tmp_path / 'cast', {'model': model})
  chain = [raised.value, raised.value.__cause__, raised.value.__context__]
  assert any(isinstance(e, orbax_nnx.errors.UnsupportedArgumentError) and 'storage_options' in str(e) for e in chain)


def test_the_contexts_array_loading_options_are_honoured_or_refused(tmp_path):
  """`enable_padding_and_truncation` pads a grown target as Orbax does; `raise_array_data_missing_error=False`
  (zeros for unwritten data) is refused by name."""
  v1.save_checkpointables(tmp_path / 'c', {'model': nnx.State({'emb': nnx.Param(jnp.arange(6.0).reshape(3, 2))})})
  grown = {'model': nnx.State({'emb': nnx.Param(jax.ShapeDtypeStruct((4, 2), jnp.float32))})}
  context = v1.Context()
  context.array.loading.enable_padding_and_truncation = True
  with context:
    out = v1.load_checkpointables(tmp_path / 'c', grown)
  np.testing.assert_array_equal(np.asarray(out['model']['emb'].get_value()),
                                np.concatenate([np.arange(6.0).reshape(3, 2), np.zeros((1, 2))]))
  context = v1.Context()
  context.array.loading.raise_array_data_missing_error = False
  with context, pytest.raises(Exception) as raised:
    v1.load_checkpointables(tmp_path / 'c', {'model': nnx.State({'emb': nnx.Param(jax.ShapeDtypeStruct((3, 2),
                                                                                                      jnp.float32))})})
  chain = [raised.value, raised.value.__cause__, raised.value.__context__]
  assert any(isinstance(e, orbax_nnx.errors.UnsupportedArgumentError) and 'raise_array_data_missing_error' in str(e)
             for e in chain)
