"""Choosing the sharding each restored array lands on."""

from __future__ import annotations

from typing import Any

import jax

from orbax_nnx import compat, errors


def concrete_mesh_for(abstract: jax.sharding.AbstractMesh, where: str = '') -> jax.sharding.Mesh:
  """A concrete Mesh with the axis names and sizes of `abstract`.

  Uses the mesh set with `jax.set_mesh` when it matches, else lays the mesh out
  over all devices with `jax.make_mesh`.
  """
  current = compat.get_concrete_mesh()
  if (
      current is not None
      and not getattr(current, 'empty', False)
      and tuple(current.axis_names) == tuple(abstract.axis_names)
      and tuple(current.axis_sizes) == tuple(abstract.axis_sizes)
  ):
    return current
  size = 1
  for s in abstract.axis_sizes:
    size *= s
  if size != jax.device_count():
    raise errors.ShardingError(
        f'{where or "target"}: its sharding uses an AbstractMesh {dict(zip(abstract.axis_names, abstract.axis_sizes))}'
        f' ({size} devices) but {jax.device_count()} devices are available. Build the target'
        ' with nnx.get_abstract_model(init_fn, mesh) for a concrete mesh, or restore under'
        ' `with jax.set_mesh(mesh):` with a matching concrete mesh.'
    )
  return jax.make_mesh(tuple(abstract.axis_sizes), tuple(abstract.axis_names),
                       axis_types=tuple(abstract.axis_types))


def concretize(sharding: Any, where: str = '') -> jax.sharding.Sharding | None:
  """Turns AbstractMesh-based NamedShardings into concrete ones; passes others through."""
  if sharding is None:
    return None
  if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
    return jax.sharding.NamedSharding(concrete_mesh_for(sharding.mesh, where), sharding.spec)
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return None


def default_sharding() -> jax.sharding.Sharding:
  """Where a leaf with no requested and no usable saved sharding goes."""
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.sharding.Mesh(jax.devices(), ('replica',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def target_sharding(leaf: Any, where: str = '') -> jax.sharding.Sharding | None:
  """The sharding a target leaf asks for (jax.Array or ShapeDtypeStruct), if any."""
  return concretize(getattr(leaf, 'sharding', None), where)
