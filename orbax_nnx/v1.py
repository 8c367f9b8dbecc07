"""Orbax v1 (`orbax.checkpoint.experimental.v1`): an NNX `CheckpointableHandler`, registered globally.

    from orbax.checkpoint import v1 as ocp          # or orbax.checkpoint.experimental.v1
    import orbax_nnx                                 # registers orbax_nnx.v1.NNXHandler

    ocp.save_checkpointables(path, {'model': model, 'optimizer': optimizer})
    out = ocp.load_checkpointables(path, {'model': abstract_model, 'optimizer': abstract_optimizer})
    with ocp.training.Checkpointer(root) as ckptr:   # async saves, max_to_keep, ...
      ckptr.save_checkpointables(step, {'model': model})

Anything holding NNX objects (a Module, an Optimizer, an `nnx.State`, dicts of them) is saved by
this handler, on disk exactly as our v0 handler writes it (the Flax guide's format plus our
records), so either API reads what the other wrote. Plain pytrees are not ours: v1's own
`PyTreeHandler` keeps them. Loads take an abstract NNX object, nothing (the stored Variables),
or `orbax_nnx.NNXRestore(target, rules=..., ...)` for per-call options: any layout we read
(Linen, MaxText, the other NNX flavour, safetensors through `restore`) maps into the target on
the way, lazily per shard.

`ocp.save(path, nnx_state)` (and `save_pytree`) names its item `state`, which the global registry
binds to v1's PyTreeHandler by name: it keeps the values, not the Variable types. Inside
`orbax_nnx.v1.context()` (or with `training.Checkpointer(root, context=orbax_nnx.v1.context())`)
that binding is lifted, so `ocp.save`/`ocp.load` of NNX objects go through `NNXHandler` too, and
plain pytrees still through PyTreeHandler. Mapped loads of a `state` item:
`load_checkpointables(path, {'state': orbax_nnx.NNXRestore(target, rules=...)})` (`load_pytree`
refuses abstract leaves it does not know).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable

import orbax.checkpoint as ocp
from etils import epath

from orbax_nnx import compat, errors, nnx_tree
from orbax_nnx.handlers import NNXCheckpointHandler, NNXRestore, NNXSave

TYPESTR = 'orbax_nnx.v1.NNXHandler'  # what v1 records for items this handler saved (module.qualname)


class NNXHandler:
  """Saves and loads NNX objects (Modules, Optimizers, States) for Orbax v1; built without arguments.

  Registered by `import orbax_nnx`, so `ocp.save_checkpointables(path, {'model': model})` keeps Variable types,
  and `ocp.load_checkpointables(path, {'model': abstract})` (or an `orbax_nnx.NNXRestore` as the abstract
  checkpointable) maps any supported layout onto the target.
  """

  async def save(self, directory, checkpointable: Any) -> Awaitable[None]:
    """Starts the save (device-to-host copies now); the returned awaitable writes and commits. The active
    Context's array saving options (format, compression, OCDBT file size, memory limits) apply as they do to
    Orbax v1's own PyTree handler; per-leaf `storage_options` are refused by name."""
    context = compat.v1_context()
    saving = context.array.saving
    if saving.storage_options != type(saving.storage_options)() or saving.scoped_storage_options_creator is not None:
      raise errors.UnsupportedArgumentError(
          'Context array.saving.storage_options / scoped_storage_options_creator (per-leaf dtype, chunks) is not'
          ' applied to NNX objects: save without it, or give per-leaf ocp.SaveArgs through'
          ' orbax_nnx.NNXSave(save_args=...) with the v0 API.')
    v0 = _v0_handler(context)
    commit_futures = await v0.async_save(directory.path, NNXSave(
        checkpointable, ocdbt_target_data_file_size=saving.ocdbt_target_data_file_size))

    async def background() -> None:
      path = await directory.await_creation()
      for f in commit_futures or ():
        await asyncio.to_thread(f.result)
      name = f'orbax_nnx_v1_{path.name}_{path.parent.name}'
      await asyncio.to_thread(ocp.multihost.sync_global_processes, f'{name}_committed')
      if ocp.multihost.process_index() == 0:
        await asyncio.to_thread(v0.finalize, epath.Path(path))
      await asyncio.to_thread(ocp.multihost.sync_global_processes, f'{name}_finalized')

    return background()

  async def load(self, directory, abstract_checkpointable: Any = None) -> Awaitable[Any]:
    """Loads into `abstract_checkpointable` (an abstract NNX object, a live one, or `NNXRestore`). The active
    Context's `pytree.loading.partial_load` skips stored leaves the target does not name (`extra='ignore'`),
    `array.loading.enable_padding_and_truncation` pads or truncates as Orbax does (`strict=False`);
    `raise_array_data_missing_error=False` is refused by name."""
    context = compat.v1_context()
    args = (abstract_checkpointable if isinstance(abstract_checkpointable, NNXRestore)
            else NNXRestore(target=abstract_checkpointable))
    loading = context.array.loading
    if not loading.raise_array_data_missing_error:
      raise errors.UnsupportedArgumentError(
          'Context array.loading.raise_array_data_missing_error=False (zeros for unwritten ranges) is not applied'
          ' to NNX objects: stored data that is missing is always an error (MissingDataError). Load without it.')
    if context.pytree.loading.partial_load:
      args = dataclasses.replace(args, extra='ignore')
    if loading.enable_padding_and_truncation:
      args = dataclasses.replace(args, strict=False)
    v0 = _v0_handler(context)

    async def background() -> Any:
      return await asyncio.to_thread(v0.restore, epath.Path(directory), args)

    return background()

  async def metadata(self, directory) -> Any:
    """The stored tree's metadata (Orbax's, as for a pytree)."""
    return _v0_handler(compat.v1_context()).metadata(epath.Path(directory))

  def is_handleable(self, checkpointable: Any) -> bool:
    return nnx_tree.contains_nnx(checkpointable)

  def is_abstract_handleable(self, abstract_checkpointable: Any) -> bool:
    return isinstance(abstract_checkpointable, NNXRestore) or nnx_tree.contains_nnx(abstract_checkpointable)


def _v0_handler(context: Any) -> NNXCheckpointHandler:
  """Our v0 handler, built with what `context` asks of Orbax v1's own PyTree handler."""
  return NNXCheckpointHandler(**compat.v1_handler_options(context))


def context(**options: Any):
  """A v1 `Context` whose handler registry lets `ocp.save`/`ocp.load` (the `state` item) use `NNXHandler`.

  The global registry binds the name `state` to PyTreeHandler; here every global handler is kept,
  in order, without that name binding, so the most recently registered handler that can take an
  object wins: ours for NNX objects, PyTreeHandler for plain pytrees.

      with orbax_nnx.v1.context():
        ocp.save(path, nnx.state(model))

  Args:
    **options: passed to `ocp.Context` (e.g. `context=` a parent context to copy the other options from).

  Returns:
    The `ocp.Context`, to enter with `with`, or to pass as `training.Checkpointer(..., context=...)`.

  Raises:
    TypeError: from Orbax, for an option `ocp.Context` does not take.
  """
  from orbax.checkpoint.experimental import v1 as ocp_v1

  global_registry = ocp_v1.handlers.global_registry()
  registry = ocp_v1.handlers.local_registry(include_global_registry=False)
  added = set()
  for handler_type, name in global_registry.get_all_entries():
    if name == 'state' or (handler_type, name) in added:
      continue
    registry.add(handler_type, checkpointable_name=name,
                 secondary_typestrs=global_registry.get_secondary_typestrs(handler_type))
    added.add((handler_type, name))
  context = ocp_v1.Context(**options)
  context.checkpointables.registry = registry  # Orbax's dot-notation configuration (no deprecation warning)
  return context


class V1ItemCheckpointHandler(NNXCheckpointHandler):
  """Our v0 handler under the typestr v1 records: a v0 CheckpointManager restores v1-saved NNX items
  with no args.

  Args:
    **options: as `NNXCheckpointHandler`'s.
  """

  @classmethod
  def typestr(cls) -> str:
    return TYPESTR


# Orbax wants args classes of its own for each handler class (the same fields as ours)
ocp.args.register_with_handler(V1ItemCheckpointHandler, for_save=True)(
    type('NNXSaveOfV1Item', (NNXSave,), {'__doc__': 'NNXSave for items of Orbax v1 layout.'}))
ocp.args.register_with_handler(V1ItemCheckpointHandler, for_restore=True)(
    type('NNXRestoreOfV1Item', (NNXRestore,), {'__doc__': 'NNXRestore for items Orbax v1 saved with NNXHandler.'}))


def register() -> None:
  """Registers `NNXHandler` with Orbax v1 (done on `import orbax_nnx`): v0 NNX items load through it,
  and v1-saved NNX items through a v0 CheckpointManager.

  Raises:
    ValueError: from Orbax, if another handler is registered under our typestr.
  """
  from orbax.checkpoint.experimental.v1 import handlers

  assert f'{NNXHandler.__module__}.{NNXHandler.__qualname__}' == TYPESTR
  compat.register_handler_type(V1ItemCheckpointHandler)
  try:
    handlers.register_handler(NNXHandler, secondary_typestrs=[NNXCheckpointHandler.typestr()])
  except Exception as e:  # already registered (a re-import)
    if 'already' not in str(e).lower():
      raise
