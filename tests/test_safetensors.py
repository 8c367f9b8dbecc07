"""Hugging Face safetensors as a source: a tiny Llama-family checkpoint as `save_pretrained` writes it,
loaded into the example NNX Llama by rules (unrolled and stacked, sharded, bf16), and damaged files."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
from orbax_nnx.llama import Llama, LlamaConfig, hf_rules
from orbax_nnx.sources import safetensors as safetensors_source

CFG = LlamaConfig(vocab=64, emb=32, mlp=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
FAMILIES = {
    'llama-unrolled': (CFG, 'llama'),
    'llama-stacked': (dataclasses.replace(CFG, scan_layers=True), 'llama'),
    'qwen2-bias-stacked': (dataclasses.replace(CFG, attn_bias=True, scan_layers=True), 'qwen2'),
    'qwen3-qknorm-tied': (dataclasses.replace(CFG, qk_norm=True, tie_embeddings=True), 'qwen3'),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_hf_checkpoint_into_nnx_llama(tmp_path, family):
  cfg, model_type = FAMILIES[family]
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / 'hf', tensors, hf_config(cfg, model_type))
  assert LlamaConfig.from_hf(tmp_path / 'hf' / 'config.json', scan_layers=cfg.scan_layers) == cfg
  model = orbax_nnx.restore(tmp_path / 'hf', abstract(cfg), rules=hf_rules(cfg))
  got, want = params_by_path(model, cfg), reference_params(cfg, tensors)
  assert sorted(got) == sorted(want)
  for name, value in want.items():  # bf16 -> f32 is exact: bit-identical
    assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab, (2, 7))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), reference_logits(cfg, tensors, tokens),
                             rtol=2e-4, atol=2e-4)


def test_sharded_bf16_param_load_reads_each_byte_once(tmp_path, monkeypatch):
  cfg = dataclasses.replace(CFG, scan_layers=True)
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / 'hf', tensors, hf_config(cfg))
  read = []
  original = safetensors_source._FileReader.read_into
  monkeypatch.setattr(safetensors_source._FileReader, 'read_into',
                      lambda self, file, offset, out: (read.append(out.nbytes), original(self, file, offset, out)))
  mesh = make_mesh((4, 2))
  target = abstract(cfg, mesh)
  loaded = orbax_nnx.load_params(tmp_path / 'hf', nnx.state(target, nnx.Param), dtype=jnp.bfloat16,
                                 rules=hf_rules(cfg))
  payload = sum(t.nbytes for t in tensors.values())
  assert payload <= sum(read) <= 1.1 * payload, (sum(read), payload)
  # shards that cut a tensor's rows into column pieces share reads of whole rows: one read per tensor here,
  # not one per row per shard
  assert len(read) == len(tensors), (len(read), len(tensors))
  want = reference_params(cfg, tensors)
  wanted_shardings = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(target, nnx.Param))}
  for path, v in nnx.to_flat_state(loaded):
    value = v.get_value()
    assert value.dtype == jnp.bfloat16 and value.sharding == wanted_shardings[path], path
    name = '/'.join(map(str, path))
    if path[0] == 'layers':
      for i in range(cfg.num_layers):
        np.testing.assert_array_equal(np.asarray(value[i]), want[f'layers/{i}/' + '/'.join(map(str, path[1:]))]
                                      .astype(BF16), err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(value), want[name].astype(BF16), err_msg=name)
  assert any(len(v.get_value().sharding.device_set) == 8 for _, v in nnx.to_flat_state(loaded))


def test_single_file_plan_and_inspect(tmp_path):
  tensors = hf_tensors(CFG)
  write_hf(tmp_path / 'one', tensors, hf_config(CFG), shards=1)
  for source in (tmp_path / 'one', tmp_path / 'one' / 'model.safetensors'):
    plan = orbax_nnx.plan(source, abstract(CFG), rules=hf_rules(CFG))
    assert not plan.missing and not plan.unused
    text = str(plan)
    assert ('layers/0/attn/q_proj/kernel  <-  cast(transpose(reshape(model.layers.0.self_attn.q_proj.weight,'
            ' (4, 8, 32)), (2, 0, 1)), float32)') in text, text
    assert 'embed/embedding  <-  cast(model.embed_tokens.weight, float32)' in text
  info = orbax_nnx.inspect(tmp_path / 'one')
  assert info['layout'] == 'safetensors'
  rows = {r['path']: r for r in info['leaves']}
  assert rows['model.layers.2.mlp.up_proj.weight'] == {
      'path': 'model.layers.2.mlp.up_proj.weight', 'shape': [48, 32], 'dtype': 'bfloat16', 'bytes': 48 * 32 * 2,
      'category': 'params'}
  assert rows['model.norm.weight']['dtype'] == 'float32'
  assert info['total_bytes'] == sum(t.nbytes for t in tensors.values())
  assert any('3 layers' in g for g in info['groups'])
  depth = {r['path']: r['leaves'] for r in orbax_nnx.inspect(tmp_path / 'one', depth=3)['leaves']}
  assert depth['model.layers.0'] == 9


def test_rules_are_checked(tmp_path):
  write_hf(tmp_path / 'hf', hf_tensors(CFG), hf_config(CFG))
  qwen3 = dataclasses.replace(CFG, qk_norm=True)
  with pytest.raises(errors.PlanError, match=r'rules that match no stored path.*q\|k\)_norm'):
    orbax_nnx.restore(tmp_path / 'hf', abstract(qwen3), rules=hf_rules(qwen3))
  with pytest.raises(errors.StructureMismatchError, match='layers/0/attn/q_proj/kernel'):
    orbax_nnx.restore(tmp_path / 'hf', abstract(CFG), rules=hf_rules(CFG)[:4])
  wrong = dataclasses.replace(CFG, num_heads=2, num_kv_heads=1, head_dim=16)  # same flattened sizes, other head split
  with pytest.raises(errors.ShapeMismatchError, match=r'[qk]_proj'):
    orbax_nnx.restore(tmp_path / 'hf', abstract(CFG), rules=hf_rules(wrong))
  with pytest.raises(errors.OptionError, match='needs a target'):
    orbax_nnx.restore(tmp_path / 'hf')


def _damage(tmp_path, how: str):
  path = tmp_path / how
  write_hf(path, hf_tensors(CFG), hf_config(CFG))
  first = path / 'model-00001-of-00002.safetensors'
  data = first.read_bytes()
  size = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + size])
  if how == 'truncated':
    first.write_bytes(data[:-100])
  elif how == 'lying-offsets':
    name = next(n for n in header if n != '__metadata__')
    header[name]['data_offsets'][1] += 2
    raw = json.dumps(header).encode()
    first.write_bytes(len(raw).to_bytes(8, 'little') + raw + data[8 + size:])
  elif how == 'missing-shard':
    (path / 'model-00002-of-00002.safetensors').unlink()
  elif how == 'overlap':
    names = [n for n in header if n != '__metadata__']
    a, b = header[names[0]], header[names[1]]
    if b['data_offsets'][1] - b['data_offsets'][0] == a['data_offsets'][1] - a['data_offsets'][0]:
      b['data_offsets'] = list(a['data_offsets'])
    else:
      b['data_offsets'] = [a['data_offsets'][0], a['data_offsets'][0] + b['data_offsets'][1] - b['data_offsets'][0]]
    raw = json.dumps(header).encode()
    first.write_bytes(len(raw).to_bytes(8, 'little') + raw + data[8 + size:])
  elif how == 'garbage-header':
    first.write_bytes((50).to_bytes(8, 'little') + b'{not json' + data[17:])
  elif how == 'index-lies':
    index = json.loads((path / 'model.safetensors.index.json').read_text())
    index['weight_map']['model.extra.weight'] = 'model-00001-of-00002.safetensors'
    (path / 'model.safetensors.index.json').write_text(json.dumps(index))
  elif how == 'unknown-dtype':
    name = next(n for n in header if n != '__metadata__')
    header[name]['dtype'] = 'C64'
    raw = json.dumps(header).encode()
    first.write_bytes(len(raw).to_bytes(8, 'little') + raw + data[8 + size:])
  return path


@pytest.mark.parametrize('how,error,match', [
    ('truncated', errors.CorruptCheckpointError, 'truncated'),
    ('lying-offsets', errors.CorruptCheckpointError, 'lies about its offsets'),
    ('overlap', errors.CorruptCheckpointError, 'overlap'),
    ('missing-shard', errors.CorruptCheckpointError, 'model-00002-of-00002.safetensors'),
    ('garbage-header', errors.CorruptCheckpointError, 'not valid JSON'),
    ('index-lies', errors.CorruptCheckpointError, 'model.extra.weight'),
    ('unknown-dtype', errors.LayoutError, 'C64'),
])
def test_damaged_files_raise_typed_errors(tmp_path, how, error, match):
  path = _damage(tmp_path, how)
  before = sorted(p.name for p in path.iterdir())
  with pytest.raises(error, match=match):
    orbax_nnx.restore(path, abstract(CFG), rules=hf_rules(CFG))
  with pytest.raises(error, match=match):
    orbax_nnx.inspect(path)
  assert sorted(p.name for p in path.iterdir()) == before


def test_not_safetensors(tmp_path):
  (tmp_path / 'x.safetensors').write_bytes(b'\x01')
  with pytest.raises(errors.CorruptCheckpointError, match='shorter than a safetensors header'):
    orbax_nnx.inspect(tmp_path / 'x.safetensors')
  with pytest.raises(errors.OptionError, match='no steps'):
    orbax_nnx.inspect(tmp_path / 'x.safetensors', step=3)


def test_convert_hf_to_nnx_orbax_checkpoint(tmp_path):
  """One streaming pass: HF safetensors -> the model's own NNX Orbax checkpoint, restorable by plain Orbax."""
  import orbax.checkpoint as ocp

  cfg = dataclasses.replace(CFG, scan_layers=True)
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / 'hf', tensors, hf_config(cfg))
  report = orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(cfg), rules=hf_rules(cfg),
                             dtype=jnp.bfloat16)
  assert report.bytes_read == sum(t.nbytes for t in tensors.values())
  want = reference_params(cfg, tensors)
  abstract_state = nnx.state(abstract(cfg))
  abstract_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), abstract_state)
  for restored in (orbax_nnx.restore(tmp_path / 'nnx', abstract_bf16),
                   ocp.StandardCheckpointer().restore(tmp_path / 'nnx', abstract_bf16)):
    flat = {'/'.join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(nnx.State(restored) if not isinstance(restored, nnx.State) else restored)}
    np.testing.assert_array_equal(flat['layers/attn/q_proj/kernel'][1], want['layers/1/attn/q_proj/kernel'].astype(BF16))
    np.testing.assert_array_equal(flat['embed/embedding'], want['embed/embedding'])
  untargeted = orbax_nnx.restore(tmp_path / 'nnx')  # our records: Variable types come back
  assert type(untargeted['layers']['mlp']['up_proj']['kernel']) is nnx.Param
  with pytest.raises(errors.OptionError, match='Pass target='):
    orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'x')


@pytest.mark.parametrize('family', ['llama-stacked', 'qwen2-bias-stacked', 'qwen3-qknorm-tied'])
def test_export_back_to_hf_safetensors(tmp_path, family):
  """HF -> NNX Orbax checkpoint (stacked) -> HF files: the same tensors, loadable by the safetensors library."""
  from safetensors import safe_open

  cfg, model_type = FAMILIES[family]
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / 'hf', tensors, hf_config(cfg, model_type))
  orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(cfg), rules=orbax_nnx.llama.hf_rules(cfg))
  payload = sum(t.nbytes for t in tensors.values() if t.dtype == BF16) + sum(
      t.nbytes // 2 for t in tensors.values() if t.dtype != BF16)
  report = orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', target=abstract(cfg),
                                   export_rules=orbax_nnx.llama.hf_export_rules(cfg), dtype='bfloat16', max_shard_size=20_000)
  assert report.bytes_written == payload
  index = json.loads((tmp_path / 'out' / 'model.safetensors.index.json').read_text())
  assert index['metadata']['total_size'] == payload and sorted(index['weight_map']) == sorted(tensors)
  files = sorted(p.name for p in (tmp_path / 'out').iterdir() if p.name.endswith('.safetensors'))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  got = {}
  for name in files:
    with safe_open(str(tmp_path / 'out' / name), 'np') as f:
      assert f.metadata() == {'format': 'pt'}
      got.update({k: f.get_tensor(k) for k in f.keys()})
  assert sorted(got) == sorted(tensors)
  for name, value in tensors.items():  # weights bit-identical; f32 norms exported in bf16 as asked
    assert got[name].dtype == BF16 and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value.astype(BF16), err_msg=name)
  # and it loads back into the model with our loader
  again = orbax_nnx.restore(tmp_path / 'out', abstract(cfg), rules=orbax_nnx.llama.hf_rules(cfg))
  assert params_by_path(again, cfg).keys() == reference_params(cfg, tensors).keys()


def test_export_errors_write_nothing(tmp_path):
  cfg = CFG
  write_hf(tmp_path / 'hf', hf_tensors(cfg), hf_config(cfg))
  orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(cfg), rules=hf_rules(cfg))
  rules = orbax_nnx.llama.hf_export_rules(cfg)
  with pytest.raises(errors.PlanError, match='no export rule names.*lm_head/kernel'):
    orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', target=abstract(cfg),
                            export_rules=[r for r in rules if r[0] != 'lm_head/kernel'])
  with pytest.raises(errors.PlanError, match='match no model leaf'):
    orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', target=abstract(cfg),
                            export_rules=rules + [('nothing/here', 'x')])
  with pytest.raises(errors.PlanError, match='two model leaves export'):
    orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', target=abstract(cfg),
                            export_rules=[(r'.*', 'same')])
  with pytest.raises(errors.OptionError, match='needs target='):
    orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors')
  stacked = dataclasses.replace(cfg, scan_layers=True)  # a wrong layer axis shows as unequal layer counts
  with pytest.raises(errors.PlanError, match='not all on axis 1|cannot reshape|scan_axis says axis 1'):
    orbax_nnx.export_params(Llama(stacked, rngs=nnx.Rngs(0)), tmp_path / 'out', format='safetensors',
                            export_rules=orbax_nnx.llama.hf_export_rules(stacked), scan_axis=1)
  with pytest.raises(errors.UnsupportedArgumentError, match='filter'):
    orbax_nnx.export_params(tmp_path / 'nnx', tmp_path / 'out', format='safetensors', filter='LoRAParam')
  assert not (tmp_path / 'out').exists()
  assert not [p for p in tmp_path.iterdir() if 'tmp' in p.name]


def test_cli_with_the_llama_preset(tmp_path, capsys):
  from orbax_nnx import cli

  tensors = hf_tensors(CFG)
  write_hf(tmp_path / 'hf', tensors, hf_config(CFG))
  assert cli.main(['inspect', str(tmp_path / 'hf')]) == 0
  assert 'model.layers.1.self_attn.o_proj.weight' in capsys.readouterr().out
  assert cli.main(['plan', str(tmp_path / 'hf'), '--model', 'llama', '--scan-layers']) == 0
  assert 'layers/mlp/up_proj/kernel  <-  stack([cast(transpose(model.layers.0.mlp.up_proj.weight' in capsys.readouterr().out
  assert cli.main(['convert', str(tmp_path / 'hf'), str(tmp_path / 'nnx'), '--model', 'llama', '--scan-layers',
                   '--quiet', '--memory-budget', '1']) == 0
  assert cli.main(['export-params', str(tmp_path / 'nnx'), str(tmp_path / 'out'), '--format', 'safetensors',
                   '--model', 'llama', '--config', str(tmp_path / 'hf' / 'config.json'), '--quiet',
                   '--memory-budget', '1', '--max-shard-size', '0.01MB']) == 0
  assert cli.main(['compare', str(tmp_path / 'hf'), str(tmp_path / 'nnx'), '--values', '--model', 'llama',
                   '--memory-budget', '1']) == 0
  import safetensors.numpy
  shards = sorted((tmp_path / 'out').glob('model-*.safetensors'))  # 10 kB files: several
  assert len(shards) > 1 and (tmp_path / 'out' / 'model.safetensors.index.json').exists()
  got = {}
  for shard in shards:
    got.update(safetensors.numpy.load_file(shard))
  assert sorted(got) == sorted(tensors)
  capsys.readouterr()
  assert cli.main(['convert', str(tmp_path / 'hf'), str(tmp_path / 'nnx2'), '--model', 'llama',
                   '--memory-budget', '0']) == 2
  assert "--memory-budget='0' must be positive" in capsys.readouterr().err
  np.testing.assert_array_equal(got['model.layers.2.self_attn.q_proj.weight'],
                                tensors['model.layers.2.self_attn.q_proj.weight'])
  with pytest.raises(SystemExit, match='--config'):
    cli.main(['plan', str(tmp_path / 'nnx'), '--preset', 'llama'])


def test_column_cut_regions_read_only_their_bytes(tmp_path):
  """A shard that cuts columns of an (out, in) weight reads its own columns row by row, nothing else."""
  import safetensors.numpy

  from orbax_nnx.io.source_arrays import SourceArrays

  weight = np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096).astype(BF16)
  safetensors.numpy.save_file({'w': weight, 'b': weight[0]}, tmp_path / 'model.safetensors')
  source = SourceArrays(orbax_nnx.read_item_metadata(tmp_path / 'model.safetensors'))
  part = source.read(('w',), (slice(8, 40), slice(2048, 4096)))
  np.testing.assert_array_equal(part, weight[8:40, 2048:])
  assert source.bytes_read == 32 * 2048 * 2
  np.testing.assert_array_equal(source.read(('w',), (slice(0, 64), slice(100, 300))), weight[:, 100:300])
  assert source.bytes_read == 32 * 2048 * 2 + 64 * 200 * 2
  np.testing.assert_array_equal(source.read(('w',), (slice(0, 64), slice(7, 9))), weight[:, 7:9])  # tiny runs: rows
  np.testing.assert_array_equal(source.read(('b',), (slice(5, 9),)), weight[0, 5:9])
  np.testing.assert_array_equal(source.read(('w',), (3, slice(0, 4096)), perm=None), weight[3])


def test_rope_scaling_is_not_ignored():
  config = hf_config(CFG) | {'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}
  cfg = LlamaConfig.from_hf(config)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match='rope_scaling'):
    model(jnp.zeros((1, 3), jnp.int32))


def test_layer_count_equal_to_heads_follows_its_group_and_plan_says_so(tmp_path):
  """4 layers and 4 heads: o_proj stacks to (4, 4, 8, 32) with either axis fitting. The group's other leaves
  stack on axis 0 by their shapes alone, so o_proj does too, and `plan` prints that inference."""
  cfg = dataclasses.replace(CFG, num_layers=4, scan_layers=True)
  tensors = hf_tensors(cfg)
  write_hf(tmp_path / 'hf', tensors, hf_config(cfg))
  the_plan = orbax_nnx.plan(tmp_path / 'hf', nnx.state(abstract(cfg)), rules=hf_rules(cfg))
  assert any('o_proj' in note and 'as the other leaves of its group' in note for note in the_plan.inferred)
  for scan_axis in (None, orbax_nnx.llama.SCAN_AXIS):
    model = orbax_nnx.restore(tmp_path / 'hf', abstract(cfg), rules=hf_rules(cfg), scan_axis=scan_axis)
    got, want = params_by_path(model, cfg), reference_params(cfg, tensors)
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)


def test_a_group_of_only_square_leaves_is_an_error_not_a_guess(tmp_path):
  """Every leaf of the group has the layer count at two axes: nothing decides, so it is refused."""
  from safetensors.numpy import save_file
  (tmp_path / 'hf').mkdir()
  save_file({f'layers.{i}.w': np.full((2,), i, np.float32) for i in range(2)}, str(tmp_path / 'hf' / 'model.safetensors'))
  target = nnx.State({'layers': {'w': nnx.Param(jax.ShapeDtypeStruct((2, 2), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])))}})
  with pytest.raises(errors.PlanError, match=r'ambiguous layer axis.*scan_axis'):
    orbax_nnx.restore(tmp_path / 'hf', target, rules=[(r'layers\.(\d+)\.w', r'layers/\1/w')])


def test_export_a_live_model(tmp_path):
  """A fine-tuned model in memory (stacked layers) straight to HF files, and back into the unrolled model."""
  import safetensors.numpy

  cfg = dataclasses.replace(CFG, scan_layers=True, attn_bias=True)
  model = Llama(cfg, rngs=nnx.Rngs(3))
  report = orbax_nnx.export_params(model, tmp_path / 'out', format='safetensors',
                                   export_rules=orbax_nnx.llama.hf_export_rules(cfg), dtype=None)
  assert report.source_kind == 'live model'
  got = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  np.testing.assert_array_equal(got['model.layers.1.mlp.down_proj.weight'],
                                np.asarray(model.layers.mlp.down_proj.kernel.get_value()[1]).T)
  np.testing.assert_array_equal(got['model.layers.2.self_attn.k_proj.bias'],
                                np.asarray(model.layers.attn.k_proj.bias.get_value()[2]).reshape(-1))
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  back = orbax_nnx.restore(tmp_path / 'out', abstract(unrolled), rules=hf_rules(unrolled))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (2, 5)))
  np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


def test_fuse_separate_projections_into_one_target(tmp_path):
  """q, k and v stored apart, fused into one (in, q+k+v) kernel: view.concat, read per shard."""
  import safetensors.numpy

  rng = np.random.default_rng(0)
  stored = {f'layers.{i}.{n}_proj.weight': rng.standard_normal((rows, 4)).astype(np.float32)
            for i in range(2) for n, rows in (('q', 8), ('k', 4), ('v', 4))}
  safetensors.numpy.save_file(stored, tmp_path / 'model.safetensors')
  rules = [(r'layers\.(\d+)\.q_proj\.weight', {
      r'layers/\1/qkv': orbax_nnx.view.concat(r'layers.\1.k_proj.weight', r'layers.\1.v_proj.weight').T})]
  mesh = jax.make_mesh((2,), ('x',), devices=jax.devices()[:2])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'x'))  # shards cut q|k and k|v
  target = {'layers': {str(i): {'qkv': jax.ShapeDtypeStruct((4, 16), np.float32, sharding=sharding)} for i in range(2)}}
  plan = orbax_nnx.plan(tmp_path / 'model.safetensors', target, rules=rules)
  assert not plan.unused and 'concat([layers.0.q_proj.weight, layers.0.k_proj.weight, layers.0.v_proj.weight]' in str(plan)
  out = orbax_nnx.restore(tmp_path / 'model.safetensors', target, rules=rules)
  for i in range(2):
    want = np.concatenate([stored[f'layers.{i}.{n}_proj.weight'] for n in 'qkv']).T
    np.testing.assert_array_equal(np.asarray(out['layers'][str(i)]['qkv']), want)
  with pytest.raises(errors.PlanError, match='not stored here'):
    orbax_nnx.restore(tmp_path / 'model.safetensors', target,
                      rules=[(rules[0][0], {r'layers/\1/qkv': orbax_nnx.view.concat(r'layers.\1.x_proj.weight').T})])


def test_export_layer_counts_must_agree(tmp_path):
  state = nnx.State({'layers': {'a': nnx.Param(jnp.zeros((3, 4))), 'b': nnx.Param(jnp.zeros((3, 5)))}})
  rules = [(r'layers/(\d+)/(a|b)', r'\2.\1')]
  with pytest.raises(errors.PlanError, match='layers/b: 5 layers on axis 1, but layers/a has 4|scan_axis says axis 1'):
    orbax_nnx.export_params(state, tmp_path / 'out', format='safetensors', export_rules=rules, scan_axis=1)
  orbax_nnx.export_params(state, tmp_path / 'out', format='safetensors', export_rules=rules, dtype=None)
  import safetensors.numpy
  assert sorted(safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')) == [
      'a.0', 'a.1', 'a.2', 'b.0', 'b.1', 'b.2']


def test_compare_hf_safetensors_with_its_nnx_conversion(tmp_path, capsys):
  from orbax_nnx import cli

  cfg = dataclasses.replace(CFG, scan_layers=True)
  write_hf(tmp_path / 'hf', hf_tensors(cfg), hf_config(cfg))
  orbax_nnx.convert(tmp_path / 'hf', tmp_path / 'nnx', target=abstract(cfg), rules=hf_rules(cfg))
  report = orbax_nnx.compare(tmp_path / 'hf', tmp_path / 'nnx', values=True, rules=hf_rules(cfg))
  assert report.equal and report.compared == len(nnx.to_flat_state(nnx.state(abstract(cfg)))), report.summary()
  assert cli.main(['compare', str(tmp_path / 'hf'), str(tmp_path / 'nnx'), '--values', '--preset', 'llama']) == 0
  assert 'EQUAL' in capsys.readouterr().out
  with pytest.raises(errors.OptionError, match='pass rules='):
    orbax_nnx.compare(tmp_path / 'hf', tmp_path / 'nnx')
  partial = orbax_nnx.compare(tmp_path / 'hf', tmp_path / 'nnx', rules=hf_rules(cfg)[:2] + hf_rules(cfg)[3:])
  assert not partial.equal and 'model.layers.0.input_layernorm.weight' in partial.only_a


def test_export_merges_lora_adapters(tmp_path):
  """A LoRA fine-tune exported as plain HF weights: W + A @ B (float32) into each kernel, adapters gone."""
  import safetensors.numpy

  class Tuned(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.LoRALinear(4, 6, lora_rank=2, use_bias=False, rngs=rngs)

  model = Tuned(nnx.Rngs(0))
  model.proj.lora.lora_b.set_value(jnp.full((2, 6), 0.5))  # LoRA starts at B = 0: make it count
  rules = [('proj/kernel', {'proj.weight': orbax_nnx.view.T})]
  orbax_nnx.export_params(model, tmp_path / 'out', format='safetensors', export_rules=rules, dtype=None, merge_lora=True)
  got = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  assert sorted(got) == ['proj.weight']
  want = np.asarray(model.proj.kernel.get_value()) + np.asarray(model.proj.lora.lora_a.get_value()) @ np.full((2, 6), 0.5)
  np.testing.assert_allclose(got['proj.weight'], want.T, rtol=1e-6)
  with pytest.raises(errors.PlanError, match='no export rule names.*lora'):
    orbax_nnx.export_params(model, tmp_path / 'out2', format='safetensors', export_rules=rules, dtype=None)


def test_shards_share_slabs_of_whole_rows_across_odd_boundaries(tmp_path, monkeypatch):
  """Slabs smaller than a shard and not aligned with shard edges: each shard gets exactly its values, through
  a transpose, a reshape and a cast; each stored byte read once."""
  import safetensors.numpy

  from orbax_nnx.io import reader

  rng = np.random.default_rng(0)
  stored = {'w': rng.standard_normal((24, 16)).astype(BF16), 'q': rng.standard_normal((4 * 6, 8)).astype(np.float32)}
  safetensors.numpy.save_file(stored, tmp_path / 'model.safetensors')
  mesh = jax.make_mesh((4, 2), ('a', 'b'))
  P = jax.sharding.PartitionSpec
  target = {'w': jax.ShapeDtypeStruct((16, 24), np.float32, sharding=jax.sharding.NamedSharding(mesh, P('a', 'b'))),
            'q': jax.ShapeDtypeStruct((8, 4, 6), np.float32, sharding=jax.sharding.NamedSharding(mesh, P('a', 'b')))}
  rules = [('w', {'w': orbax_nnx.view.T}), ('q', {'q': orbax_nnx.view.reshape(4, 6, 8).transpose(2, 0, 1)})]
  read = []
  original = safetensors_source._FileReader.read_into
  monkeypatch.setattr(safetensors_source._FileReader, 'read_into',
                      lambda self, file, offset, out: (read.append(out.nbytes), original(self, file, offset, out)))
  monkeypatch.setattr(reader, 'SLAB_BYTES', 7 * 16 * 4)  # 7 of w's 24 target columns per slab
  out = orbax_nnx.restore(tmp_path / 'model.safetensors', target, rules=rules)
  np.testing.assert_array_equal(np.asarray(out['w']), stored['w'].T.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(out['q']), stored['q'].reshape(4, 6, 8).transpose(2, 0, 1))
  assert out['w'].sharding == target['w'].sharding
  assert sum(read) == sum(t.nbytes for t in stored.values())
  assert len(read) == 4 + 2  # w: 24 rows in slabs of 7 (7, 7, 7, 3); q: two heads (12 rows) per slab
  # slabs along an inner axis of a reshape would each read every head's rows: the heads' axis is taken instead
  read.clear()
  inner = {'q': jax.ShapeDtypeStruct((6, 4, 8), np.float32, sharding=jax.sharding.NamedSharding(mesh, P('b', None, 'a')))}
  out = orbax_nnx.restore(tmp_path / 'model.safetensors', inner, rules=[
      ('q', {'q': orbax_nnx.view.reshape(4, 6, 8).transpose(1, 0, 2)}), ('w', 'unused/w')], extra='ignore')
  np.testing.assert_array_equal(np.asarray(out['q']), stored['q'].reshape(4, 6, 8).transpose(1, 0, 2))
  assert sum(read) == stored['q'].nbytes
