"""Assertions shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import orbax_nnx


def save_plain(path, tree):
  """Saves a plain pytree with Orbax's StandardCheckpointer; returns `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  return path


def save_nnx(path, tree):
  """Saves NNX objects with our handler; returns `path`."""
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(path, args=orbax_nnx.NNXSave(tree))
  return path


def sds(shape, dtype=jnp.float32):
  """An abstract array on the first device."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def host(x) -> np.ndarray:
  """A host copy of an array; typed PRNG keys become their key data."""
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def data_only(state) -> nnx.State:
  """The leaves that hold arrays (drops empty nodes such as optax MaskedNode)."""
  return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if hasattr(v.get_value(), 'dtype')])


def flat(state) -> dict:
  if not isinstance(state, nnx.State):
    state = nnx.state(state)
  return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def assert_same_state(actual, expected, *, check_types: bool = True) -> None:
  """Same paths, Variable types, dtypes, shapes and bit-identical values."""
  a, e = flat(actual), flat(expected)
  assert sorted(map(str, a)) == sorted(map(str, e)), (sorted(a), sorted(e))
  for path, ev in e.items():
    av = a[path]
    if check_types:
      assert type(av) is type(ev), (path, type(av), type(ev))
    ax, ex = (av.get_value() if isinstance(av, nnx.Variable) else av), (ev.get_value() if isinstance(ev, nnx.Variable) else ev)
    if not hasattr(ex, 'dtype'):  # an empty node (optax MaskedNode): no data, same node back
      assert type(ax) is type(ex) and ax == ex, (path, ax, ex)
      continue
    assert ax.dtype == ex.dtype, (path, ax.dtype, ex.dtype)
    assert ax.shape == ex.shape, (path, ax.shape, ex.shape)
    np.testing.assert_array_equal(host(ax), host(ex), err_msg=str(path))


def shardings(state) -> dict:
  return {p: v.get_value().sharding for p, v in flat(state).items()}
