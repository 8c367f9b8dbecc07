"""Mixture-of-experts checkpoints: Hugging Face stores each expert apart; rules fill the slots of one stacked
array per projection (`layers/N/mlp/gate_proj[E]`), and export names each slot back (`gate_proj\\[(\\d+)\\]`)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from hf_checkpoint import (
  BF16,
  abstract,
  hf_config,
  hf_tensors,
  params_by_path,
  reference_logits,
  reference_params,
  write_hf,
)

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.examples import make_mesh
from orbax_nnx.io.regions import read_regions
from orbax_nnx.llama import SCAN_AXIS, LlamaConfig, hf_export_rules, hf_rules
from orbax_nnx.sources import safetensors as safetensors_source

# 12 experts (the case); moe_mlp == num_experts: nothing in the shapes tells the expert axis, and nothing
# needs to (the rules name each slot)
MOE = LlamaConfig(vocab=64, emb=32, mlp=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                  num_experts=12, experts_per_token=2, moe_mlp=12, norm_topk_prob=True)
FAMILIES = {
    'qwen3_moe-unrolled': (MOE, 'qwen3_moe'),
    'qwen3_moe-stacked': (dataclasses.replace(MOE, scan_layers=True, norm_topk_prob=False), 'qwen3_moe'),
    'mixtral-stacked': (dataclasses.replace(MOE, qk_norm=False, moe_names='mixtral', mlp=16, moe_mlp=16,
                                        scan_layers=True),
                        'mixtral'),
}


def write(tmp_path, cfg, model_type, name='hf'):
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / name, tensors, hf_config(cfg, model_type))
  return tensors


@pytest.mark.parametrize('family', list(FAMILIES))
def test_moe_checkpoint_into_nnx_model(tmp_path, family):
  cfg, model_type = FAMILIES[family]
  tensors = write(tmp_path, cfg, model_type)
  files = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())['weight_map']
  layer_files = {files[n] for n in files if '.experts.' in n and n.startswith('model.layers.0.')}
  assert len(layer_files) == 2 or len({files[n] for n in files if n.startswith('model.layers.1.')}) == 2
  assert LlamaConfig.from_hf(tmp_path / 'hf' / 'config.json', scan_layers=cfg.scan_layers) == cfg
  model = orbax_nnx.restore(tmp_path / 'hf', abstract(cfg), rules=hf_rules(cfg),
                            scan_axis=SCAN_AXIS if cfg.scan_layers else None)
  got, want = params_by_path(model, cfg), reference_params(cfg, tensors)
  assert sorted(got) == sorted(want)
  for name, value in want.items():  # bf16 -> f32 is exact
    assert got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab, (2, 6))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), reference_logits(cfg, tensors, tokens),
                             rtol=2e-4, atol=2e-4)


def test_plan_shows_the_slots_stacked_in_numeric_order(tmp_path):
  write(tmp_path, MOE, 'qwen3_moe')
  plan = orbax_nnx.plan(tmp_path / 'hf', abstract(MOE), rules=hf_rules(MOE))
  assert not plan.missing and not plan.unused and not plan.inferred
  text = str(plan)
  assert ('layers/1/mlp/down_proj  <-  stack([cast(transpose(model.layers.1.mlp.experts.0.down_proj.weight, (1, 0)),'
          ' float32) .. cast(transpose(model.layers.1.mlp.experts.11.down_proj.weight, (1, 0)), float32)] x12,'
          ' axis=0)') in text, text
  stack = plan.entries[('layers', 1, 'mlp', 'gate_proj')]  # 12 after 2 (numeric, not string order)
  assert [str(next(read_regions(e, ((slice(0, 1),) * 2)))[0][-1]) for e in stack.exprs] == [
      f'model.layers.1.mlp.experts.{e}.gate_proj.weight' for e in range(12)]


def test_expert_sharded_bf16_load_reads_each_expert_once_per_shard(tmp_path, monkeypatch):
  cfg = dataclasses.replace(MOE, scan_layers=True)
  tensors = write(tmp_path, cfg, 'qwen3_moe')
  read = []
  original = safetensors_source._FileReader.read_into
  monkeypatch.setattr(safetensors_source._FileReader, 'read_into',
                      lambda self, file, offset, out: (read.append(out.nbytes), original(self, file, offset, out)))
  mesh = make_mesh((4, 2))  # experts on 'fsdp': 3 per shard
  target = nnx.state(abstract(cfg, mesh), nnx.Param)
  loaded = orbax_nnx.load_params(tmp_path / 'hf', target, dtype=jnp.bfloat16, rules=hf_rules(cfg), scan_axis=SCAN_AXIS)
  payload = sum(t.nbytes for t in tensors.values())
  assert payload <= sum(read) <= 1.05 * payload, (sum(read), payload)
  want = reference_params(cfg, tensors)
  flat = dict(nnx.to_flat_state(loaded))
  gate = flat[('layers', 'mlp', 'gate_proj')].get_value()
  assert gate.dtype == jnp.bfloat16 and gate.shape == (2, 12, 32, 12)
  assert gate.sharding == dict(nnx.to_flat_state(target))[('layers', 'mlp', 'gate_proj')].get_value().sharding
  for shard in gate.addressable_shards:  # each device holds 3 of the 12 experts
    assert shard.index[1].stop - shard.index[1].start == 3
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(gate[i]), want[f'layers/{i}/mlp/gate_proj'].astype(BF16))
  # a shard of the expert axis reads only its own experts' tensors
  plan = orbax_nnx.plan(tmp_path / 'hf', target, rules=hf_rules(cfg), scan_axis=SCAN_AXIS)
  region = (slice(0, 2), slice(3, 6), slice(0, 32), slice(0, 6))
  sources = sorted({'/'.join(s) for s, _ in read_regions(plan.entries[('layers', 'mlp', 'gate_proj')], region)})
  assert sources == sorted(f'model.layers.{i}.mlp.experts.{e}.gate_proj.weight' for i in range(2) for e in (3, 4, 5))


@pytest.mark.parametrize('family', ['qwen3_moe-stacked', 'mixtral-stacked'])
def test_export_back_to_hf_bit_identical(tmp_path, family):
  from safetensors import safe_open

  cfg, model_type = FAMILIES[family]
  tensors = write(tmp_path, cfg, model_type)
  orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(cfg), rules=hf_rules(cfg),
                    scan_axis=SCAN_AXIS, dtype='bfloat16')
  report = orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', target=abstract(cfg),
                                   export_rules=hf_export_rules(cfg), dtype='bfloat16', max_shard_size='40KB',
                                   scan_axis=SCAN_AXIS)
  index = json.loads((tmp_path / 'out' / 'model.safetensors.index.json').read_text())
  assert sorted(index['weight_map']) == sorted(tensors)
  got = {}
  for name in sorted(set(index['weight_map'].values())):
    with safe_open(str(tmp_path / 'out' / name), 'np') as f:
      got.update({k: f.get_tensor(k) for k in f.keys()})
  for name, value in tensors.items():
    assert got[name].dtype == BF16 and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value.astype(BF16), err_msg=name)
  assert report.bytes_written == sum(v.size * 2 for v in tensors.values())


def test_export_an_unrolled_live_model_and_an_orbax_decode_checkpoint(tmp_path):
  cfg = MOE
  tensors = write(tmp_path, cfg, 'qwen3_moe')
  model = orbax_nnx.restore(tmp_path / 'hf', abstract(cfg), rules=hf_rules(cfg))
  orbax_nnx.export_params(model, tmp_path / 'out', format='safetensors', export_rules=hf_export_rules(cfg), dtype=None)
  back = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  assert sorted(back) == sorted(tensors)
  for name, value in tensors.items():  # exported in the model's float32: exact
    np.testing.assert_array_equal(back[name], value.astype(np.float32), err_msg=name)
  # the Orbax way: HF -> stacked NNX checkpoint -> unrolled bf16 decode checkpoint
  stacked = dataclasses.replace(cfg, scan_layers=True)
  orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(stacked), rules=hf_rules(stacked),
                    scan_axis=SCAN_AXIS)
  orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'decode', scan_layers=False, scan_axis=SCAN_AXIS)
  decoded = orbax_nnx.restore(tmp_path / 'decode')
  want = reference_params(cfg, tensors)
  for e in (0, 11):
    np.testing.assert_array_equal(np.asarray(decoded['layers_1']['mlp']['up_proj'][e]),
                                  want['layers/1/mlp/up_proj'][e].astype(BF16))


def _expert_rules(target='layers/\\1/mlp/\\3_proj[\\2]'):
  return [(r'model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight', {target: orbax_nnx.view.T})]


def _experts(tmp_path, experts, layers=1, f=6, d=4):
  rng = np.random.default_rng(0)
  stored = {f'model.layers.{i}.mlp.experts.{e}.{p}_proj.weight': rng.standard_normal((f, d) if p != 'down' else (d, f))
            .astype(np.float32) for i in range(layers) for e in experts for p in ('gate', 'up', 'down')}
  safetensors.numpy.save_file(stored, tmp_path / 'model.safetensors')
  return stored


def _target(n, layers=1, f=6, d=4):
  return {'layers': {str(i): {'mlp': {'gate_proj': jax.ShapeDtypeStruct((n, d, f), np.float32),
                                      'up_proj': jax.ShapeDtypeStruct((n, d, f), np.float32),
                                      'down_proj': jax.ShapeDtypeStruct((n, f, d), np.float32)}}
                     for i in range(layers)}}


def test_a_missing_expert_is_an_error_naming_its_slot(tmp_path):
  _experts(tmp_path, [e for e in range(12) if e != 5])
  with pytest.raises(errors.SlotError, match=r'layers/0/mlp/gate_proj\[5\]: no stored tensor fills this slot'
                     r' \(filled: 0\.\.4, 6\.\.11\)') as info:
    orbax_nnx.restore(tmp_path / 'model.safetensors', _target(12), rules=_expert_rules())
  assert info.value.slot == 5 and info.value.target == 'layers/0/mlp/gate_proj'
  # the last slot missing: only the target's size tells
  _experts(tmp_path, range(11))
  with pytest.raises(errors.SlotError, match=r'gate_proj\[11\]: no stored tensor'):
    orbax_nnx.restore(tmp_path / 'model.safetensors', _target(12), rules=_expert_rules())
  params = nnx.State(jax.tree.map(nnx.Param, _target(12)))
  with pytest.raises(errors.SlotError, match=r'_proj\[11\]: no stored tensor'):
    orbax_nnx.load_params(tmp_path / 'model.safetensors', params, rules=_expert_rules())
  with pytest.raises(errors.OptionError, match='selects no Variable of the target'):  # plain arrays: not silently empty
    orbax_nnx.load_params(tmp_path / 'model.safetensors', _target(12), rules=_expert_rules())


def test_an_expert_past_the_end_or_filled_twice_is_an_error(tmp_path):
  _experts(tmp_path, range(12))
  with pytest.raises(errors.SlotError, match=r'gate_proj\[11\]: the target has 8 slots on axis 0 \(0\.\.7\); the rules'
                     r' send model\.layers\.0\.mlp\.experts\.11\.gate_proj\.weight past the end'):
    orbax_nnx.plan(tmp_path / 'model.safetensors', _target(8), rules=_expert_rules())
  twice = [(r'model\.layers\.0\.mlp\.experts\.(1|3)\.gate_proj\.weight',
            {r'layers/0/mlp/gate_proj[3]': orbax_nnx.view.T})] + _expert_rules()
  with pytest.raises(errors.SlotError, match=r'gate_proj\[3\]: rules fill this slot twice, from'
                     r' model\.layers\.0\.mlp\.experts\.1\.gate_proj\.weight and .*experts\.3\.gate_proj\.weight'):
    orbax_nnx.plan(tmp_path / 'model.safetensors', _target(12), rules=twice)
  whole = _expert_rules() + [(r'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight', 'layers/0/mlp/gate_proj')]
  whole.reverse()  # the whole-target rule first: it wins expert 0, the other experts fill slots of the same path
  with pytest.raises(errors.PlanError, match='slot by slot'):
    orbax_nnx.plan(tmp_path / 'model.safetensors', _target(12), rules=whole)


def test_slots_of_unequal_shapes_and_bad_brackets_are_refused(tmp_path):
  rng = np.random.default_rng(0)
  stored = {f'e.{i}': rng.standard_normal((3, 4) if i != 2 else (4, 3)).astype(np.float32) for i in range(4)}
  safetensors.numpy.save_file(stored, tmp_path / 'model.safetensors')
  target = {'w': jax.ShapeDtypeStruct((4, 3, 4), np.float32)}
  with pytest.raises(errors.SlotError, match=r'w\[2\]: e\.2 is \(4, 3\) after view, but slot 0 is \(3, 4\)'):
    orbax_nnx.restore(tmp_path / 'model.safetensors', target, rules=[(r'e\.(\d+)', r'w[\1]')])
  for bad in (r'w[-\1]', r'w[\1][0]', r'w[\1]/x', 'w[a]'):
    with pytest.raises(errors.OptionError, match='may end in one \\[i\\]'):
      orbax_nnx.plan(tmp_path / 'model.safetensors', target, rules=[(r'e\.(\d+)', bad)])
  # a plain rename into slots (no view), mixed dtypes cast per slot, and the wrong total shape
  stored = {f'e.{i}': np.full((3, 4), i, np.float16 if i % 2 else np.float32) for i in range(4)}
  safetensors.numpy.save_file(stored, tmp_path / 'model.safetensors')
  out = orbax_nnx.restore(tmp_path / 'model.safetensors', target, rules=[(r'e\.(\d+)', r'w[\1]')])
  np.testing.assert_array_equal(np.asarray(out['w']), np.stack([np.full((3, 4), i, np.float32) for i in range(4)]))
  with pytest.raises(errors.ShapeMismatchError, match=r'stored \(4, 3, 4\), requested \(4, 4, 3\)'):
    orbax_nnx.restore(tmp_path / 'model.safetensors', {'w': jax.ShapeDtypeStruct((4, 4, 3), np.float32)},
                      rules=[(r'e\.(\d+)', r'w[\1]')])


def test_export_rules_name_each_slot_and_every_slot_needs_one(tmp_path):
  state = nnx.State({'moe': {'w': nnx.Param(jnp.arange(24, dtype=jnp.float32).reshape(3, 2, 4))}})
  orbax_nnx.export_params(state, tmp_path / 'out', format='safetensors', dtype=None,
                          export_rules=[(r'moe/w\[(\d+)\]', {r'experts.\1.weight': orbax_nnx.view.T})])
  back = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  assert sorted(back) == ['experts.0.weight', 'experts.1.weight', 'experts.2.weight']
  for e in range(3):
    np.testing.assert_array_equal(back[f'experts.{e}.weight'], np.arange(24, dtype=np.float32).reshape(3, 2, 4)[e].T)
  with pytest.raises(errors.PlanError, match=r"no export rule names: \['moe/w\[2\]'\]"):
    orbax_nnx.export_params(state, tmp_path / 'out2', format='safetensors', dtype=None,
                            export_rules=[(r'moe/w\[(0|1)\]', r'experts.\1.weight')])
  assert not (tmp_path / 'out2').exists()


def test_from_hf_refuses_moe_variants_the_example_lacks():
  base = hf_config(MOE, 'qwen3_moe')
  for key, value in (('shared_expert_intermediate_size', 64), ('mlp_only_layers', [0]), ('decoder_sparse_step', 2)):
    with pytest.raises(errors.OptionError, match=key):
      LlamaConfig.from_hf({**base, key: value})
