"""Test helpers for users and benchmarks."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

_MOMENTS = {'mu': jnp.cos, 'nu': jnp.sin}


def add_entropy(state: Any) -> Any:
  """Sets Adam `mu`/`nu` to `cos(1000 p)` / `sin(1000 p)` of the params they mirror.

  `state`: a train state `{'model': ..., 'optimizer': ...}` (Modules/Optimizers, updated
  in place, or `nnx.State`s). Elementwise and shard-local, so a converter that swaps the
  moments, or moves one without its param, is caught by a value comparison.
  Returns `state`.
  """
  model, optimizer = state['model'], state['optimizer']
  params = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(
      model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param))}
  opt_state = optimizer if isinstance(optimizer, nnx.State) else nnx.state(optimizer)
  for path, var in nnx.to_flat_state(opt_state):
    keys = tuple(str(k) for k in path)
    for i, key in enumerate(keys):
      if key in _MOMENTS and keys[i + 1:] in params:
        param = params[keys[i + 1:]].get_value()
        var.set_value(_MOMENTS[key](1000.0 * param).astype(var.get_value().dtype))
        break
  if not isinstance(optimizer, nnx.State):
    nnx.update(optimizer, opt_state)
  return state
