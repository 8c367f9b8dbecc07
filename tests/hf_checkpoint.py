"""Tiny Hugging Face Llama-family checkpoints laid out as `save_pretrained` writes them, and numpy references."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from orbax_nnx.llama import Llama, LlamaConfig

BF16 = np.dtype(ml_dtypes.bfloat16)


def hf_tensors(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """HF names and shapes (torch Linear weights are (out, in)); bf16 weights beside f32 norms."""
  rng = np.random.default_rng(seed)
  n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb, cfg.mlp

  def w(*shape):
    return (rng.standard_normal(shape) * 0.2).astype(BF16)

  def norm(size):
    return (1 + 0.1 * rng.standard_normal(size)).astype(np.float32)

  out = {'model.embed_tokens.weight': w(cfg.vocab, d)}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    out[p + 'input_layernorm.weight'] = norm(d)
    out[p + 'self_attn.q_proj.weight'] = w(n * h, d)
    out[p + 'self_attn.k_proj.weight'] = w(k * h, d)
    out[p + 'self_attn.v_proj.weight'] = w(k * h, d)
    out[p + 'self_attn.o_proj.weight'] = w(d, n * h)
    if cfg.attn_bias:
      for name, size in (('q', n * h), ('k', k * h), ('v', k * h)):
        out[p + f'self_attn.{name}_proj.bias'] = w(size)
    if cfg.qk_norm:
      out[p + 'self_attn.q_norm.weight'] = norm(h)
      out[p + 'self_attn.k_norm.weight'] = norm(h)
    out[p + 'post_attention_layernorm.weight'] = norm(d)
    if cfg.num_experts:  # every expert its own (out, in) tensors, as save_pretrained writes Qwen3-MoE / Mixtral
      moe, (gate, up, down) = _moe_names(cfg)
      out[p + f'{moe}.gate.weight'] = w(cfg.num_experts, d)
      for e in range(cfg.num_experts):
        out[p + f'{moe}.experts.{e}.{gate}.weight'] = w(cfg.moe_mlp, d)
        out[p + f'{moe}.experts.{e}.{up}.weight'] = w(cfg.moe_mlp, d)
        out[p + f'{moe}.experts.{e}.{down}.weight'] = w(d, cfg.moe_mlp)
      continue
    out[p + 'mlp.gate_proj.weight'] = w(f, d)
    out[p + 'mlp.up_proj.weight'] = w(f, d)
    out[p + 'mlp.down_proj.weight'] = w(d, f)
  out['model.norm.weight'] = norm(d)
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = w(cfg.vocab, d)
  return out


def _moe_names(cfg: LlamaConfig) -> tuple[str, tuple[str, str, str]]:
  """Where HF keeps a layer's experts, and its names for (gate, up, down)."""
  return ('block_sparse_moe', ('w1', 'w3', 'w2')) if cfg.moe_names == 'mixtral' else (
      'mlp', ('gate_proj', 'up_proj', 'down_proj'))


def hf_config(cfg: LlamaConfig, model_type: str = 'llama') -> dict:
  if cfg.num_experts:
    moe = {'num_local_experts' if model_type == 'mixtral' else 'num_experts': cfg.num_experts,
           'num_experts_per_tok': cfg.experts_per_token}
    if model_type == 'mixtral':
      moe['intermediate_size'] = cfg.moe_mlp
    else:
      moe.update(moe_intermediate_size=cfg.moe_mlp, norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                 mlp_only_layers=[])
    return {**_dense_config(cfg, model_type), **moe}
  return _dense_config(cfg, model_type)


def _dense_config(cfg: LlamaConfig, model_type: str) -> dict:
  return {'architectures': ['LlamaForCausalLM'], 'model_type': model_type, 'vocab_size': cfg.vocab,
          'hidden_size': cfg.emb, 'intermediate_size': cfg.mlp, 'num_hidden_layers': cfg.num_layers,
          'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
          'head_dim': cfg.head_dim, 'rms_norm_eps': cfg.rms_eps, 'rope_theta': cfg.rope_theta,
          'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': cfg.attn_bias, 'torch_dtype': 'bfloat16'}


def write_hf(path, tensors: dict[str, np.ndarray], config: dict, shards: int = 2) -> None:
  """`model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` + `config.json` (one file: `model.safetensors`)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config))
  names = list(tensors)
  if shards == 1:
    safetensors.numpy.save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
    return
  per = -(-len(names) // shards)
  weight_map = {}
  for s in range(shards):
    file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
    safetensors.numpy.save_file(part, path / file, metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(part, file))
  total = sum(t.nbytes for t in tensors.values())
  (path / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))


def reference_params(cfg: LlamaConfig, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The example Llama's params, target path -> array, written out by hand from the HF tensors."""
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb
  out = {'embed/embedding': t['model.embed_tokens.weight'], 'final_norm/scale': t['model.norm.weight']}
  if not cfg.tie_embeddings:
    out['lm_head/kernel'] = t['lm_head.weight'].T
  for i in range(cfg.num_layers):
    p, q = f'model.layers.{i}.', f'layers/{i}/'
    out[q + 'attn_norm/scale'] = t[p + 'input_layernorm.weight']
    out[q + 'mlp_norm/scale'] = t[p + 'post_attention_layernorm.weight']
    out[q + 'attn/q_proj/kernel'] = np.transpose(t[p + 'self_attn.q_proj.weight'].reshape(n, h, d), (2, 0, 1))
    for name in ('k', 'v'):
      out[q + f'attn/{name}_proj/kernel'] = np.transpose(t[p + f'self_attn.{name}_proj.weight'].reshape(k, h, d), (2, 0, 1))
    out[q + 'attn/o_proj/kernel'] = np.transpose(t[p + 'self_attn.o_proj.weight'].reshape(d, n, h), (1, 2, 0))
    if cfg.attn_bias:
      for name in ('q', 'k', 'v'):
        out[q + f'attn/{name}_proj/bias'] = t[p + f'self_attn.{name}_proj.bias'].reshape(-1, h)
    if cfg.qk_norm:
      out[q + 'attn/q_norm/scale'] = t[p + 'self_attn.q_norm.weight']
      out[q + 'attn/k_norm/scale'] = t[p + 'self_attn.k_norm.weight']
    if cfg.num_experts:
      moe, hf_names = _moe_names(cfg)
      out[q + 'mlp/router/kernel'] = t[p + f'{moe}.gate.weight'].T
      for name, hf in zip(('gate', 'up', 'down'), hf_names):
        out[q + f'mlp/{name}_proj'] = np.stack([t[p + f'{moe}.experts.{e}.{hf}.weight'].T
                                                for e in range(cfg.num_experts)])
      continue
    for name in ('gate', 'up', 'down'):
      out[q + f'mlp/{name}_proj/kernel'] = t[p + f'mlp.{name}_proj.weight'].T
  return out


def reference_logits(cfg: LlamaConfig, t: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
  """The HF Llama forward pass in float32 numpy, straight from the HF tensors."""
  f = {name: np.asarray(v, np.float32) for name, v in t.items()}
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps) * w

  def rope(x, pos):  # (B, T, heads, h)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h)
    emb = np.concatenate([pos[..., None] * inv] * 2, -1)[:, :, None, :]
    rot = np.concatenate([-x[..., h // 2:], x[..., : h // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)

  b, s = tokens.shape
  pos = np.broadcast_to(np.arange(s, dtype=np.float32), (b, s))
  x = f['model.embed_tokens.weight'][tokens]
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    y = rms(x, f[p + 'input_layernorm.weight'])
    proj = {}
    for name, heads in (('q', n), ('k', k), ('v', k)):
      z = y @ f[p + f'self_attn.{name}_proj.weight'].T
      if cfg.attn_bias:
        z = z + f[p + f'self_attn.{name}_proj.bias']
      proj[name] = z.reshape(b, s, heads, h)
    q, kk, v = proj['q'], proj['k'], proj['v']
    if cfg.qk_norm:
      q, kk = rms(q, f[p + 'self_attn.q_norm.weight']), rms(kk, f[p + 'self_attn.k_norm.weight'])
    q, kk = rope(q, pos), rope(kk, pos)
    kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)
    scores = np.einsum('btnh,bsnh->bnts', q, kk) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum('bnts,bsnh->btnh', probs, v).reshape(b, s, n * h)
    x = x + attn @ f[p + 'self_attn.o_proj.weight'].T
    y = rms(x, f[p + 'post_attention_layernorm.weight'])
    if cfg.num_experts:
      x = x + _moe_reference(cfg, f, p, y)
      continue
    gate, up = y @ f[p + 'mlp.gate_proj.weight'].T, y @ f[p + 'mlp.up_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ f[p + 'mlp.down_proj.weight'].T
  x = rms(x, f['model.norm.weight'])
  head = f['model.embed_tokens.weight'] if cfg.tie_embeddings else f['lm_head.weight']
  return x @ head.T


def _moe_reference(cfg: LlamaConfig, f: dict[str, np.ndarray], p: str, y: np.ndarray) -> np.ndarray:
  """HF's sparse MoE block, token by token: softmax router, top-k experts, optionally renormalized."""
  moe, (gate_name, up_name, down_name) = _moe_names(cfg)
  out = np.zeros_like(y)
  for b in range(y.shape[0]):
    for s in range(y.shape[1]):
      token = y[b, s]
      logits = f[p + f'{moe}.gate.weight'] @ token
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      chosen = np.argsort(-probs, kind='stable')[: cfg.experts_per_token]
      weights = probs[chosen] / (probs[chosen].sum() if cfg.norm_topk_prob else 1.0)
      for e, weight in zip(chosen, weights):
        q = f'{p}{moe}.experts.{e}.'
        gate, up = f[q + f'{gate_name}.weight'] @ token, f[q + f'{up_name}.weight'] @ token
        out[b, s] += weight * (f[q + f'{down_name}.weight'] @ (gate / (1 + np.exp(-gate)) * up))
  return out


def abstract(cfg, mesh=None):
  if mesh is None:
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.get_abstract_model(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  return nnx.merge(graphdef, state)


def params_by_path(model, cfg) -> dict[str, np.ndarray]:
  """Target path -> host array, stacked layers split into `layers/N/...` as the reference writes them."""
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, value = '/'.join(map(str, path)), np.asarray(v.get_value())
    if cfg.scan_layers and path[0] == 'layers':
      for i in range(cfg.num_layers):
        out[f'layers/{i}/' + '/'.join(map(str, path[1:]))] = value[i]
    else:
      out[name] = value
  return out
