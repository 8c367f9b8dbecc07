"""An example NNX Llama (Llama 2/3, Mistral, Qwen2/3, and the mixture-of-experts Qwen3-MoE and Mixtral) and the
rules that load Hugging Face weights into it.

    cfg = orbax_nnx.llama.LlamaConfig.from_hf('path/to/hf_model/config.json')
    abstract = nnx.eval_shape(lambda: orbax_nnx.llama.Llama(cfg, rngs=nnx.Rngs(0)))
    model = orbax_nnx.restore('path/to/hf_model', abstract, rules=orbax_nnx.llama.hf_rules(cfg),
                              scan_axis=orbax_nnx.llama.SCAN_AXIS)

`hf_export_rules(cfg)` is the way back (`export_params(..., format='safetensors')`).
The rules are data: copy `hf_rules` and edit the target paths and views for your own model.
HF torch `Linear` weights are `(out, in)` and attention projections flatten their heads, so
the views transpose and reshape; layers `model.layers.N` become `layers/N`, which restores
into unrolled layers (`nnx.List`) and, stacked on axis 0, into scanned ones (`nnx.vmap`). Pass
`scan_axis=SCAN_AXIS` for scanned ones: when the layer count equals another dimension (32 layers
and 32 heads), nothing in the shapes says which axis the layers are on, and that is an error.

Mixture-of-experts layers hold one array per projection with the experts on axis 0 (`gate_proj` is
`(experts, emb, moe_mlp)`); Hugging Face stores each expert apart, so their rules fill those arrays slot by slot:
`model.layers.N.mlp.experts.E.gate_proj.weight` -> `layers/N/mlp/gate_proj[E]` (see `hf_rules`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from orbax_nnx import errors
from orbax_nnx.mapping.views import view


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and family switches: Mistral is plain Llama (sliding-window attention is not modelled: full causal
  attention, the same below the window); Qwen2 sets `attn_bias`; Qwen3 `qk_norm`. `num_experts > 0` makes every
  layer's MLP a mixture of experts (a router and `num_experts` experts of width `moe_mlp`, `experts_per_token`
  chosen per token, their weights renormalized when `norm_topk_prob`); `moe_names` is how Hugging Face names
  them: `'qwen'` (`mlp.gate`, `mlp.experts.E.gate_proj`: Qwen3-MoE) or `'mixtral'` (`block_sparse_moe.gate`,
  `block_sparse_moe.experts.E.w1`).

  Attributes:
    vocab: vocabulary size.
    emb: embedding (model) width.
    mlp: dense MLP width.
    num_layers: decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when fewer).
    head_dim: width of one head.
    rms_eps: RMSNorm epsilon.
    rope_theta: rotary embedding base.
    tie_embeddings: the head reuses the embedding (no `lm_head`).
    attn_bias: q/k/v projections have biases (Qwen2).
    qk_norm: RMSNorm on queries and keys per head (Qwen3).
    scan_layers: layers stacked on axis 0 (`nnx.vmap`) instead of `layers/N`.
    param_dtype: dtype of the parameters.
    rope_scaling: Hugging Face `rope_scaling` as JSON (weights load; this example's forward refuses it).
    num_experts: experts per MoE layer (0: dense MLPs).
    experts_per_token: experts chosen per token.
    moe_mlp: width of one expert.
    norm_topk_prob: renormalize the chosen experts' weights.
    moe_names: how Hugging Face names the experts: 'qwen' or 'mixtral'.
  """

  vocab: int = 64
  emb: int = 32
  mlp: int = 48
  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 8
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  attn_bias: bool = False
  qk_norm: bool = False
  scan_layers: bool = False
  param_dtype: Any = jnp.float32
  rope_scaling: str | None = None  # HF `rope_scaling` as JSON: weights load, but this example's forward refuses it
  num_experts: int = 0
  experts_per_token: int = 0
  moe_mlp: int = 0
  norm_topk_prob: bool = True
  moe_names: str = 'qwen'

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | epath.PathLike, **overrides: Any) -> 'LlamaConfig':
    """From a Hugging Face `config.json` (a path or its dict); `overrides` win.

    Raises:
      OptionError: a mixture-of-experts layout this example does not model (shared experts, dense layers
        between sparse ones).
    """
    if not isinstance(config, Mapping):
      config = json.loads(epath.Path(config).read_text())
    heads = config['num_attention_heads']
    model_type = config.get('model_type')
    experts = int(config.get('num_experts') or config.get('num_local_experts') or 0)
    if experts:
      _check_moe(config)
    values = dict(
        vocab=config['vocab_size'], emb=config['hidden_size'], mlp=config['intermediate_size'],
        num_layers=config['num_hidden_layers'], num_heads=heads,
        num_kv_heads=config.get('num_key_value_heads') or heads,
        head_dim=config.get('head_dim') or config['hidden_size'] // heads,
        rms_eps=config.get('rms_norm_eps', 1e-6), rope_theta=config.get('rope_theta', 10000.0),
        tie_embeddings=bool(config.get('tie_word_embeddings', False)),
        attn_bias=bool(config.get('attention_bias', config.get('model_type') == 'qwen2')),
        qk_norm=model_type in ('qwen3', 'qwen3_moe'),
        rope_scaling=json.dumps(config['rope_scaling'], sort_keys=True) if config.get('rope_scaling') else None)
    if experts:
      values.update(
          num_experts=experts, experts_per_token=int(config['num_experts_per_tok']),
          moe_mlp=int(config.get('moe_intermediate_size') or config['intermediate_size']),
          # Mixtral always renormalizes the chosen experts' weights; Qwen's MoE configs say so (HF default False)
          norm_topk_prob=bool(config.get('norm_topk_prob', model_type == 'mixtral')),
          moe_names='mixtral' if model_type == 'mixtral' else 'qwen')
    return cls(**{**values, **overrides})


def _check_moe(config: Mapping[str, Any]) -> None:
  """Refuses the mixture-of-experts variants the example model does not have, by the config key that says so."""
  unmodelled = {
      'shared_expert_intermediate_size': 'shared experts (Qwen2-MoE)',
      'n_shared_experts': 'shared experts (DeepSeek)',
      'first_k_dense_replace': 'dense layers before the sparse ones (DeepSeek)',
      'mlp_only_layers': 'dense layers between sparse ones',
  }
  for key, what in unmodelled.items():
    if config.get(key):
      raise errors.OptionError(f'config.json sets {key}={config[key]!r}: {what}, which this example model does not'
                               ' have. Copy orbax_nnx/llama.py and add them (the rules are data).')
  if config.get('decoder_sparse_step', 1) != 1:
    raise errors.OptionError(f'config.json sets decoder_sparse_step={config["decoder_sparse_step"]!r}: only every'
                             ' n-th layer sparse, which this example model does not have (all layers are sparse).')


SCAN_AXIS = {r'model/layers/.*': 0}  # `Llama(scan_layers=True)` stacks its layers on axis 0 (nnx.vmap)


def _init(names: tuple):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding on `(B, T, heads, head_dim)`, Hugging Face's rotate-half convention."""
  half = x.shape[-1] // 2
  inv = 1.0 / theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half))
  freqs = positions[..., None].astype(jnp.float32) * inv
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention; projections keep their heads: q `(emb, heads, head_dim)`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.emb, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = nnx.Einsum('BTD,DNH->BTNH', (d, n, h), (n, h) if cfg.attn_bias else None,
                             kernel_init=_init(('fsdp', 'tensor', None)), **kw)
    self.k_proj = nnx.Einsum('BTD,DNH->BTNH', (d, k, h), (k, h) if cfg.attn_bias else None,
                             kernel_init=_init(('fsdp', 'tensor', None)), **kw)
    self.v_proj = nnx.Einsum('BTD,DNH->BTNH', (d, k, h), (k, h) if cfg.attn_bias else None,
                             kernel_init=_init(('fsdp', 'tensor', None)), **kw)
    self.o_proj = nnx.Einsum('BTNH,NHD->BTD', (n, h, d), kernel_init=_init(('tensor', None, 'fsdp')), **kw)
    if cfg.qk_norm:
      self.q_norm = nnx.RMSNorm(h, epsilon=cfg.rms_eps, **kw)
      self.k_norm = nnx.RMSNorm(h, epsilon=cfg.rms_eps, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.rope_scaling is not None:
      raise NotImplementedError(f'rope_scaling={cfg.rope_scaling}: this example model implements plain RoPE only;'
                                ' the weights load, but its logits would be wrong.')
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    repeat = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    scores = jnp.einsum('BTNH,BSNH->BNTS', q, k) / jnp.sqrt(cfg.head_dim).astype(q.dtype)
    t = x.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(scores, axis=-1), v)
    return self.o_proj(out)


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(cfg.emb, cfg.mlp, kernel_init=_init(('fsdp', 'tensor')), **kw)
    self.up_proj = nnx.Linear(cfg.emb, cfg.mlp, kernel_init=_init(('fsdp', 'tensor')), **kw)
    self.down_proj = nnx.Linear(cfg.mlp, cfg.emb, kernel_init=_init(('tensor', 'fsdp')), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nnx.Module):
  """A sparse MLP: a router picks `experts_per_token` of `num_experts` SwiGLU experts per token. The experts'
  projections are stacked on axis 0 (`gate_proj`: `(experts, emb, moe_mlp)`), which is sharded on `fsdp`
  (expert parallelism). Every expert is computed for every token and the unchosen ones weighted 0: an example
  that is easy to check, not a fast kernel."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, d, f = cfg.num_experts, cfg.emb, cfg.moe_mlp
    self.router = nnx.Linear(d, e, use_bias=False, param_dtype=cfg.param_dtype, kernel_init=_init((None, None)),
                             rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), cfg.param_dtype), out_sharding=('fsdp', None, 'tensor'))
    self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), cfg.param_dtype), out_sharding=('fsdp', None, 'tensor'))
    self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), cfg.param_dtype), out_sharding=('fsdp', 'tensor', None))

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
      top = top / jnp.sum(top, axis=-1, keepdims=True)
    weights = jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts, dtype=top.dtype) * top[..., None], axis=-2)
    gate = jnp.einsum('BTD,EDF->BTEF', x, self.gate_proj[...])
    hidden = jax.nn.silu(gate) * jnp.einsum('BTD,EDF->BTEF', x, self.up_proj[...])
    out = jnp.einsum('BTEF,EFD->BTED', hidden, self.down_proj[...])
    return jnp.einsum('BTED,BTE->BTD', out, weights.astype(out.dtype))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    kw = dict(epsilon=cfg.rms_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(cfg.emb, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.emb, **kw)
    self.mlp = MoE(cfg, rngs=rngs) if cfg.num_experts else MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Embedding, decoder layers (`layers/N` unrolled, or `layers` stacked on axis 0), norm, head.

  Args:
    cfg: the sizes and family switches.
    rngs: initialization keys.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    # kernels carry mesh axis names ('fsdp', 'tensor'); they shard eagerly only under a mesh
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self._build(cfg, rngs)

  def _build(self, cfg: LlamaConfig, rngs: nnx.Rngs) -> None:
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.emb, param_dtype=cfg.param_dtype,
                           embedding_init=_init(('tensor', 'fsdp')), rngs=rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def make(rngs):
        return DecoderLayer(cfg, rngs=rngs)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.emb, epsilon=cfg.rms_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.emb, cfg.vocab, use_bias=False, param_dtype=cfg.param_dtype,
                                kernel_init=_init(('fsdp', 'tensor')), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens)
    if self.cfg.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
      def run(x, layer, positions):
        return layer(x, positions)
      x = run(x, self.layers, positions)
    else:
      for layer in self.layers:
        x = layer(x, positions)
    x = self.final_norm(x)
    return self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)


def hf_rules(cfg: LlamaConfig) -> list:
  """Rules from Hugging Face tensor names (`model.layers.N.self_attn.q_proj.weight`) to `Llama` paths.

  Only the rules for tensors `cfg` says exist are included: a rule that matches nothing is an error.

  Args:
    cfg: the model's config (`LlamaConfig.from_hf`).

  Returns:
    `(pattern, replacement or {replacement: view})` rules for `rules=` (`orbax_nnx.Mapping`).

  Raises:
    OptionError: never for a valid config; the rules are plain data, checked where they are used.
  """
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb
  layer = r'model\.layers\.(\d+)\.'
  rules = [
      (r'model\.embed_tokens\.weight', 'embed/embedding'),
      (r'model\.norm\.weight', 'final_norm/scale'),
      (layer + r'input_layernorm\.weight', r'layers/\1/attn_norm/scale'),
      (layer + r'post_attention_layernorm\.weight', r'layers/\1/mlp_norm/scale'),
      # (heads * head_dim, emb) -> (emb, heads, head_dim)
      (layer + r'self_attn\.q_proj\.weight', {r'layers/\1/attn/q_proj/kernel': view.reshape(n, h, d).transpose(2, 0, 1)}),
      (layer + r'self_attn\.(k|v)_proj\.weight', {r'layers/\1/attn/\2_proj/kernel': view.reshape(k, h, d).transpose(2, 0, 1)}),
      # (emb, heads * head_dim) -> (heads, head_dim, emb)
      (layer + r'self_attn\.o_proj\.weight', {r'layers/\1/attn/o_proj/kernel': view.reshape(d, n, h).transpose(1, 2, 0)}),
  ]
  if cfg.num_experts:  # each stored expert fills its slot of the stacked projection: (out, in) -> (in, out)
    moe, names = _hf_moe_names(cfg)
    rules.append((layer + moe + r'\.gate\.weight', {r'layers/\1/mlp/router/kernel': view.T}))
    rules += [(layer + moe + rf'\.experts\.(\d+)\.{hf}\.weight', {rf'layers/\1/mlp/{ours}_proj[\2]': view.T})
              for hf, ours in names]
  else:
    rules.append((layer + r'mlp\.(gate|up|down)_proj\.weight', {r'layers/\1/mlp/\2_proj/kernel': view.T}))
  if not cfg.tie_embeddings:
    rules.append((r'lm_head\.weight', {'lm_head/kernel': view.T}))
  if cfg.attn_bias:
    rules.append((layer + r'self_attn\.(q|k|v)_proj\.bias', {r'layers/\1/attn/\2_proj/bias': view.reshape(-1, h)}))
  if cfg.qk_norm:
    rules.append((layer + r'self_attn\.(q|k)_norm\.weight', r'layers/\1/attn/\2_norm/scale'))
  return rules


def hf_export_rules(cfg: LlamaConfig) -> list:
  """The inverse of `hf_rules`: `Llama` paths (stacked layers seen as `layers/N`) to Hugging Face tensors.

  Args:
    cfg: the model's config.

  Returns:
    Rules for `export_params(format='safetensors', export_rules=...)`.

  Raises:
    OptionError: never for a valid config; the rules are plain data, checked where they are used.
  """
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb
  layer, hf = r'layers/(\d+)/', r'model.layers.\1.'
  rules = [
      ('embed/embedding', 'model.embed_tokens.weight'),
      ('final_norm/scale', 'model.norm.weight'),
      (layer + 'attn_norm/scale', hf + 'input_layernorm.weight'),
      (layer + 'mlp_norm/scale', hf + 'post_attention_layernorm.weight'),
      (layer + 'attn/q_proj/kernel', {hf + 'self_attn.q_proj.weight': view.transpose(1, 2, 0).reshape(n * h, d)}),
      (layer + r'attn/(k|v)_proj/kernel', {hf + r'self_attn.\2_proj.weight': view.transpose(1, 2, 0).reshape(k * h, d)}),
      (layer + 'attn/o_proj/kernel', {hf + 'self_attn.o_proj.weight': view.transpose(2, 0, 1).reshape(d, n * h)}),
  ]
  if cfg.num_experts:  # each expert of a stacked projection, `gate_proj[E]`, is its own tensor
    moe, names = _hf_moe_names(cfg)
    rules.append((layer + 'mlp/router/kernel', {hf + moe + '.gate.weight': view.T}))
    rules += [(layer + rf'mlp/{ours}_proj\[(\d+)\]', {hf + moe + rf'.experts.\2.{hf_name}.weight': view.T})
              for hf_name, ours in names]
  else:
    rules.append((layer + r'mlp/(gate|up|down)_proj/kernel', {hf + r'mlp.\2_proj.weight': view.T}))
  if not cfg.tie_embeddings:
    rules.append(('lm_head/kernel', {'lm_head.weight': view.T}))
  if cfg.attn_bias:
    rules.append((layer + r'attn/(q|k|v)_proj/bias', {hf + r'self_attn.\2_proj.bias': view.reshape(-1)}))
  if cfg.qk_norm:
    rules.append((layer + r'attn/(q|k)_norm/scale', hf + r'self_attn.\2_norm.weight'))
  return rules


def _hf_moe_names(cfg: LlamaConfig) -> tuple[str, list[tuple[str, str]]]:
  """Where Hugging Face keeps a layer's experts (a regex) and its names for their projections -> ours."""
  if cfg.moe_names == 'mixtral':
    return r'block_sparse_moe', [('w1', 'gate'), ('w3', 'up'), ('w2', 'down')]
  if cfg.moe_names == 'qwen':
    return r'mlp', [(f'{p}_proj', p) for p in ('gate', 'up', 'down')]
  raise errors.OptionError(f"LlamaConfig.moe_names={cfg.moe_names!r}: use 'qwen' or 'mixtral'.")


@dataclasses.dataclass(frozen=True)
class HFPreset:
  """What the CLI's `--model llama` uses: the abstract model and the rules both ways.

  Attributes:
    config: the model's `LlamaConfig`.
    target: an abstract `Llama` (`nnx.eval_shape`).
    rules: Hugging Face names -> model paths (loading).
    export_rules: model paths -> Hugging Face names (exporting).
    scan_axis: where scanned layers are stacked.
  """

  config: LlamaConfig
  target: Any  # an abstract `Llama` (nnx.eval_shape)
  rules: list  # Hugging Face names -> model paths (loading)
  export_rules: list  # model paths -> Hugging Face names (exporting)
  scan_axis: dict  # where scanned layers are stacked


def hf_preset(config: Mapping[str, Any] | epath.PathLike, **overrides: Any) -> HFPreset:
  """The Llama-family preset for a Hugging Face `config.json` (a path or its dict).

  Args:
    config: a `config.json` path or its dict.
    **overrides: `LlamaConfig` fields that win over the file (e.g. `scan_layers=True`).

  Returns:
    The `HFPreset`.

  Raises:
    OptionError: a model layout this example does not model (see `LlamaConfig.from_hf`).
  """
  cfg = LlamaConfig.from_hf(config, **overrides)
  target = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  return HFPreset(cfg, target, hf_rules(cfg), hf_export_rules(cfg), dict(SCAN_AXIS))
