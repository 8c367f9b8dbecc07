"""A real Linen client: the Linen twin of `orbax_nnx.examples.Transformer`, trained and saved with plain Orbax.

Same module names as the NNX model (embed, layers, norm, up, down, final_norm, head), blocks
stacked with `nn.scan` on `param_scan_axis` (MaxText's default is 1), kernels boxed with
`nn.with_partitioning`, and a flax `TrainState` with an optax chain (clip + adamw).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from orbax_nnx import examples as ex


class Block(nn.Module):
  cfg: ex.Config

  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers.lecun_normal()
    h = nn.LayerNorm(name='norm')(x)
    h = nn.Dense(self.cfg.mlp, name='up', kernel_init=nn.with_partitioning(init, ('fsdp', 'tensor')))(h)
    h = nn.Dense(self.cfg.emb, name='down', kernel_init=nn.with_partitioning(init, ('tensor', 'fsdp')))(jax.nn.gelu(h))
    return x + h, None


class Transformer(nn.Module):
  cfg: ex.Config
  param_scan_axis: int = 1

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.cfg.vocab, self.cfg.emb, name='embed')(tokens)
    if self.cfg.scan_layers:
      stack = nn.scan(Block, variable_axes={'params': self.param_scan_axis}, split_rngs={'params': True},
                      length=self.cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(self.cfg, name='layers')(x, None)
    else:
      for i in range(self.cfg.num_layers):
        x, _ = Block(self.cfg, name=f'layers_{i}')(x, None)
    x = nn.LayerNorm(name='final_norm')(x)
    return nn.Dense(self.cfg.vocab, name='head')(x)


def tx(lr: float = 1e-2):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))


def make_state(cfg: ex.Config, *, param_scan_axis: int = 1, maxtext: bool = False, seed: int = 0):
  """A TrainState; `maxtext=True` keeps the whole variables dict (`params/params/...`)."""
  model = Transformer(cfg, param_scan_axis)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))

  def apply_fn(params, tokens):
    return model.apply(params if maxtext else {'params': params}, tokens)

  params = variables if maxtext else variables['params']
  return train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx())


def batch(cfg: ex.Config, seed: int):
  return jax.random.randint(jax.random.key(seed), (8, 9), 0, cfg.vocab)


def loss_fn(apply_fn, params, tokens):
  logits = apply_fn(params, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train(state, cfg: ex.Config, steps: int, first_seed: int = 0):
  step = jax.jit(lambda s, t: s.apply_gradients(grads=jax.grad(lambda p: loss_fn(s.apply_fn, p, t))(s.params)))
  for i in range(steps):
    state = step(state, batch(cfg, first_seed + i))
  return state
