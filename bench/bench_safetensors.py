"""Hugging Face safetensors (bf16, ~1 GiB, Llama-shaped, 2 shard files) into the example NNX Llama:
orbax-nnx `load_params` vs the eager way (every tensor read whole with `safetensors.numpy`,
transposed/reshaped with copies, `device_put`: what tunix's default loader does) vs reading the
raw file bytes (the physical limit here, page cache warm). Then export back to HF files:
`export_params(format='safetensors')` from the converted NNX checkpoint vs restoring it and
`safetensors.numpy.save_file` of the whole dict. Each run in its own process (peak RSS = VmHWM).

    .venv/bin/python bench/bench_safetensors.py [--params-mib 1024] [--reps 2] [--mesh 4x2]

`--mesh 4x2` loads into the model sharded on a (fsdp, tensor) mesh of 8 simulated CPU devices (the eager way
`device_put`s each whole tensor onto the target's sharding, as tunix does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import common  # noqa: E402


def config(params_mib: int):
  from orbax_nnx.llama import LlamaConfig
  base = LlamaConfig(vocab=32000, emb=2048, mlp=5632, num_layers=1, num_heads=16, num_kv_heads=4, head_dim=128)
  per_layer = 2 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 5632)
  fixed = 2 * 2 * 32000 * 2048
  layers = max(1, round((params_mib * 2**20 - fixed) / per_layer))
  return dataclasses.replace(base, num_layers=layers)


def _time(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def worker(mode: str, root: str, params_mib: str, mesh_shape: str = '') -> dict:
  if mesh_shape:
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import orbax_nnx
  from orbax_nnx.llama import Llama, hf_export_rules, hf_rules

  cfg = config(int(params_mib))
  hf, nnx_dir, out_dir = (os.path.join(root, n) for n in ('hf', 'nnx', 'out'))
  make = lambda: Llama(dataclasses.replace(cfg, param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))  # noqa: E731
  if mesh_shape:
    from orbax_nnx.examples import make_mesh
    abstract = nnx.merge(*nnx.get_abstract_model(make, make_mesh(tuple(int(n) for n in mesh_shape.split('x')))))
  else:
    abstract = nnx.eval_shape(make)
  shardings = {p: v.get_value().sharding if mesh_shape else None
               for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  files = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith('.safetensors'))
  loaded = sum(os.path.getsize(f) for f in files)
  if mode == 'raw':  # the bytes through one reused buffer: the storage limit
    def run():
      buf = bytearray(64 * 2**20)
      for f in files:
        with open(f, 'rb', buffering=0) as fh:
          while fh.readinto(buf):
            pass
  elif mode == 'raw_arrays':  # each tensor read into a fresh array: what any loader must at least do
    def run():
      from orbax_nnx.sources.safetensors import read_metadata
      arrays = []
      for info in read_metadata(hf).leaves.values():
        out = np.empty(info.shape, info.dtype)
        with open(info.metadata.file, 'rb', buffering=0) as fh:
          fh.seek(info.metadata.start)
          fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        arrays.append(out)
      return arrays
  elif mode == 'ours':
    def run():
      budget = {'memory_budget': os.environ['OURS_MEMORY_BUDGET']} if os.environ.get('OURS_MEMORY_BUDGET') else {}
      state = orbax_nnx.load_params(hf, nnx.state(abstract, nnx.Param), dtype=jnp.bfloat16, rules=hf_rules(cfg),
                                    **budget)
      jax.block_until_ready(state)
      return state
  elif mode == 'eager':
    def run():  # the eager loader: whole tensors on the host, copies for each transpose/reshape, device_put
      import safetensors.numpy
      n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb
      flat = {}
      for f in files:
        for name, t in safetensors.numpy.load_file(f).items():
          if name == 'model.embed_tokens.weight':
            flat[('embed', 'embedding')] = t
          elif name == 'model.norm.weight':
            flat[('final_norm', 'scale')] = t
          elif name == 'lm_head.weight':
            flat[('lm_head', 'kernel')] = np.ascontiguousarray(t.T)
          else:
            parts = name.split('.')
            i, rest = int(parts[2]), '.'.join(parts[3:])
            key = {'input_layernorm.weight': ('attn_norm', 'scale'),
                   'post_attention_layernorm.weight': ('mlp_norm', 'scale')}.get(rest)
            if key is not None:
              value = t
            elif rest.startswith('self_attn.'):
              proj = parts[4]
              heads = n if proj in ('q_proj', 'o_proj') else k
              value = (np.transpose(t.reshape(d, n, h), (1, 2, 0)) if proj == 'o_proj'
                       else np.transpose(t.reshape(heads, h, d), (2, 0, 1)))
              key = ('attn', proj, 'kernel')
            else:
              key, value = ('mlp', parts[4], 'kernel'), t.T
            flat[('layers', i) + key] = np.ascontiguousarray(value)
      state = nnx.from_flat_state({p: nnx.Param(jax.device_put(v, shardings[p])) for p, v in flat.items()})
      jax.block_until_ready(state)
      return state
  elif mode == 'export_ours':
    def run():
      shutil.rmtree(out_dir, ignore_errors=True)
      return orbax_nnx.export_params(nnx_dir, out_dir, format='safetensors', target=abstract,
                                     export_rules=hf_export_rules(cfg), dtype='bfloat16', max_shard_size=600 * 2**20)
  elif mode == 'export_eager':
    def run():
      import safetensors.numpy
      shutil.rmtree(out_dir, ignore_errors=True)
      os.makedirs(out_dir)
      state = orbax_nnx.restore(nnx_dir, nnx.state(abstract))
      n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb
      tensors = {'model.embed_tokens.weight': np.asarray(state['embed']['embedding'].get_value()),
                 'model.norm.weight': np.asarray(state['final_norm']['scale'].get_value()),
                 'lm_head.weight': np.ascontiguousarray(np.asarray(state['lm_head']['kernel'].get_value()).T)}
      for i, layer in state['layers'].items():
        p = f'model.layers.{i}.'
        tensors[p + 'input_layernorm.weight'] = np.asarray(layer['attn_norm']['scale'].get_value())
        tensors[p + 'post_attention_layernorm.weight'] = np.asarray(layer['mlp_norm']['scale'].get_value())
        for proj, heads in (('q_proj', n), ('k_proj', k), ('v_proj', k)):
          kernel = np.asarray(layer['attn'][proj]['kernel'].get_value())
          tensors[p + f'self_attn.{proj}.weight'] = np.ascontiguousarray(np.transpose(kernel, (1, 2, 0)).reshape(heads * h, d))
        o = np.asarray(layer['attn']['o_proj']['kernel'].get_value())
        tensors[p + 'self_attn.o_proj.weight'] = np.ascontiguousarray(np.transpose(o, (2, 0, 1)).reshape(d, n * h))
        for proj in ('gate_proj', 'up_proj', 'down_proj'):
          tensors[p + f'mlp.{proj}.weight'] = np.ascontiguousarray(np.asarray(layer['mlp'][proj]['kernel'].get_value()).T)
      safetensors.numpy.save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    raise ValueError(mode)
  base = common.vmhwm_mib()
  _, wall, cpu = _time(run)
  return {'mode': mode, 'wall': wall, 'cpu': cpu, 'peak_mib': common.vmhwm_mib(), 'base_mib': base,
          'loaded_mib': loaded / 2**20}


def setup(root: str, params_mib: int) -> None:
  import numpy as np
  from flax import nnx
  from hf_checkpoint import hf_config, write_hf

  import orbax_nnx
  from orbax_nnx.llama import Llama, hf_rules

  cfg = config(params_mib)
  rng = np.random.default_rng(0)
  tensors = {}
  n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb, cfg.mlp
  shapes = {'model.embed_tokens.weight': (cfg.vocab, d)}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'input_layernorm.weight': (d,), p + 'self_attn.q_proj.weight': (n * h, d),
                   p + 'self_attn.k_proj.weight': (k * h, d), p + 'self_attn.v_proj.weight': (k * h, d),
                   p + 'self_attn.o_proj.weight': (d, n * h), p + 'post_attention_layernorm.weight': (d,),
                   p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d), p + 'mlp.down_proj.weight': (d, f)})
  shapes.update({'model.norm.weight': (d,), 'lm_head.weight': (cfg.vocab, d)})
  from hf_checkpoint import BF16
  for name, shape in shapes.items():
    tensors[name] = rng.standard_normal(shape, np.float32).astype(BF16)
  import pathlib
  write_hf(pathlib.Path(root) / 'hf', tensors, hf_config(cfg))
  del tensors
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  orbax_nnx.convert(os.path.join(root, 'hf'), os.path.join(root, 'nnx'), target=abstract, rules=hf_rules(cfg),
                    dtype='bfloat16')


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == '--worker':
    print(json.dumps(worker(*sys.argv[2:])))
    return
  parser = argparse.ArgumentParser()
  parser.add_argument('--params-mib', type=int, default=1024)
  parser.add_argument('--reps', type=int, default=2)
  parser.add_argument('--mesh', default='', help="e.g. 4x2: load into a sharded target (fsdp x tensor)")
  parser.add_argument('--only', nargs='*', help='modes to run (raw and raw_arrays always run)')
  parser.add_argument('--memory-budget', default=None, help="ours: load_params(memory_budget=...), e.g. 128MiB")
  args = parser.parse_args()
  if args.memory_budget:  # the workers read it (each mode runs in its own process)
    os.environ['OURS_MEMORY_BUDGET'] = args.memory_budget
  root = tempfile.mkdtemp(prefix='bench_st_')
  try:
    setup(root, args.params_mib)
    results = {}
    modes = ('raw', 'raw_arrays', 'ours', 'eager', 'export_ours', 'export_eager')
    for mode in [m for m in modes if not args.only or m in ('raw', 'raw_arrays') or m in args.only]:
      runs = [common.run_worker(__file__, mode, root, args.params_mib, args.mesh) for _ in range(args.reps)]
      results[mode] = {'wall': statistics.median(r['wall'] for r in runs),
                       'cpu': statistics.median(r['cpu'] for r in runs),
                       'peak_mib': max(r['peak_mib'] for r in runs), 'base_mib': min(r['base_mib'] for r in runs),
                       'loaded_mib': runs[0]['loaded_mib']}
    loaded = results['raw']['loaded_mib']
    print(f'# HF safetensors, {loaded:.0f} MiB bf16 ({config(args.params_mib).num_layers} layers), median of'
          f' {args.reps}, {"mesh " + args.mesh if args.mesh else "1 device"}')
    print(f'{"mode":14} {"wall s":>8} {"cpu s":>8} {"peak MiB":>9} {"growth MiB":>11}')
    for mode, r in results.items():
      print(f'{mode:14} {r["wall"]:8.2f} {r["cpu"]:8.2f} {r["peak_mib"]:9.0f} {r["peak_mib"] - r["base_mib"]:11.0f}')
    if 'ours' not in results or 'eager' not in results:
      return
    ours, eager, raw = results['ours'], results['eager'], results['raw']
    print(f'load: ours / raw read = {ours["wall"] / raw["wall"]:.2f}x wall (target <= 1.2),'
          f' / raw into arrays = {ours["wall"] / results["raw_arrays"]["wall"]:.2f}x;'
          f' ours / eager = {ours["wall"] / eager["wall"]:.2f}x wall')
    print(f'load: RSS growth / loaded bytes: ours {(ours["peak_mib"] - ours["base_mib"]) / loaded:.2f},'
          f' eager {(eager["peak_mib"] - eager["base_mib"]) / loaded:.2f}')
    if 'export_ours' not in results or 'export_eager' not in results:
      return
    ex, ee = results['export_ours'], results['export_eager']
    print(f'export: ours / eager (restore + save_file) = {ex["wall"] / ee["wall"]:.2f}x wall;'
          f' peak RSS {ex["peak_mib"]:.0f} vs {ee["peak_mib"]:.0f} MiB')
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
