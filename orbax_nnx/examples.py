"""A small transformer-style NNX model used by the demo, tests and benchmarks.

Build it under `jax.set_mesh(make_mesh((a, b)))`: its kernels are annotated
with the mesh axes ('fsdp', 'tensor').

`Transformer(cfg, rngs=...)` stacks its blocks on axis 0 with `nnx.vmap`
(`cfg.scan_layers=True`) or unrolls them as attributes `layers_0..N-1`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 64
  emb: int = 32
  mlp: int = 64
  num_layers: int = 4
  scan_layers: bool = True
  dropout: float = 0.0
  layer_axis_name: str | None = None  # mesh axis the stacked layer dim is sharded on


MESH_AXES = ('fsdp', 'tensor')


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
  """A mesh with the axes the example model's `out_sharding` names use."""
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[: shape[0] * shape[1]])


class Block(nnx.Module):
  """Pre-norm MLP block with a dropout rng stream (per-layer rng state when stacked)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(cfg.emb, rngs=rngs)
    self.up = nnx.Linear(cfg.emb, cfg.mlp, rngs=rngs,
                         kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('fsdp', 'tensor')))
    self.down = nnx.Linear(cfg.mlp, cfg.emb, rngs=rngs,
                           kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('tensor', 'fsdp')))
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x):
    h = self.up(self.norm(x))
    return x + self.dropout(self.down(jax.nn.gelu(h)))


class Transformer(nnx.Module):
  """Embedding, `num_layers` blocks (stacked or unrolled), final norm, tied-free head."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.emb, rngs=rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: cfg.layer_axis_name})
      def make(rngs):
        return Block(cfg, rngs=rngs)
      self.layers = make(rngs)
    else:
      for i in range(cfg.num_layers):
        setattr(self, f'layers_{i}', Block(cfg, rngs=rngs))
    self.final_norm = nnx.LayerNorm(cfg.emb, rngs=rngs)
    self.head = nnx.Linear(cfg.emb, cfg.vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    if self.cfg.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)
      x = run(x, self.layers)
    else:
      for i in range(self.cfg.num_layers):
        x = getattr(self, f'layers_{i}')(x)
    return self.head(self.final_norm(x))


def make_optimizer(model: nnx.Module, lr: float = 1e-2) -> nnx.Optimizer:
  """Adam-W behind a global-norm clip: `opt_state` has an EmptyState gap at index 0."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_steps(model: nnx.Module, optimizer: nnx.Optimizer, steps: int, seed: int = 0) -> float:
  """Runs a few next-token steps on random data; returns the last loss."""

  @nnx.jit
  def step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  key = jax.random.key(seed)
  loss = jnp.nan
  for _ in range(steps):
    key, sub = jax.random.split(key)
    tokens = jax.random.randint(sub, (8, 9), 0, model.cfg.vocab)
    loss = step(model, optimizer, tokens)
  return float(loss)
