"""Test helpers for users and benchmarks (`orbax_nnx.testing`, imported with `orbax_nnx`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from orbax_nnx import errors

_MOMENTS = {'mu': jnp.cos, 'nu': jnp.sin}


def add_entropy(model: Any, optimizer: Any = None) -> Any:
  """Sets Adam `mu`/`nu` to `cos(1000 p)` / `sin(1000 p)` of the params they mirror.

  Elementwise and shard-local, so a converter that swaps the moments, or moves one without its param, is
  caught by a value comparison.

      orbax_nnx.testing.add_entropy(model, optimizer)
      orbax_nnx.testing.add_entropy({'model': model, 'optimizer': optimizer})

  Args:
    model: the model (a Module, updated in place, or its `nnx.State`); or a train state dict
      `{'model': ..., 'optimizer': ...}` when `optimizer` is None.
    optimizer: the `nnx.Optimizer` (updated in place) or its `nnx.State`.

  Returns:
    What was given: the dict, or `(model, optimizer)`.

  Raises:
    OptionError: no optimizer, or an optimizer state with no `mu`/`nu` moments for these params.
  """
  pair, given = optimizer is not None, model
  if not pair:
    if not (isinstance(model, Mapping) and {'model', 'optimizer'} <= set(model)):
      raise errors.OptionError('add_entropy(model, optimizer), or add_entropy({"model": ..., "optimizer": ...}):'
                               ' pass the optimizer whose moments to set.')
    model, optimizer = model['model'], model['optimizer']
  params = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(
      model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param))}
  opt_state = optimizer if isinstance(optimizer, nnx.State) else nnx.state(optimizer)
  found = 0
  for path, var in nnx.to_flat_state(opt_state):
    keys = tuple(str(k) for k in path)
    for i, key in enumerate(keys):
      if key in _MOMENTS and keys[i + 1:] in params:
        param = params[keys[i + 1:]].get_value()
        var.set_value(_MOMENTS[key](1000.0 * param).astype(var.get_value().dtype))
        found += 1
        break
  if not found:
    raise errors.OptionError('add_entropy: the optimizer state has no mu/nu moments mirroring these params'
                             ' (an Adam-family optax state is needed).')
  if not isinstance(optimizer, nnx.State):
    nnx.update(optimizer, opt_state)
  return (model, optimizer) if pair else given
