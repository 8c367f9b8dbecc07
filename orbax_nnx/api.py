"""One-call functions for checkpoints outside a CheckpointManager."""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from orbax_nnx import nnx_tree, options
from orbax_nnx.handlers import NNXCheckpointHandler, NNXRestore
from orbax_nnx.io import operation
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item


@options.takes_options('mapping')
@listing.looking_once
@operation.moves_bytes
def restore(path: epath.PathLike, target: Any = None, *, missing: str = 'error', extra: str = 'error',
            mapping: options.Mapping | None = None, memory_budget: int | str | None = None,
            default_sharding: jax.sharding.Sharding | None = None, exclude: Any = nnx_tree.DEFAULT_EXCLUDE,
            strict: bool = True, support_layout: bool = False, restore_args: Any = None,
            step: int | None = None, item: str | None = None) -> Any:
  """Restores `target` from an item dir, a step dir, or a manager root (latest step by default).

  Any supported layout on disk (NNX either flavour, Linen, MaxText, param-only, safetensors with rules) is
  converted to the target on the way, reading only the regions each target shard needs.

      model = nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0)))
      state = orbax_nnx.restore('ckpt', nnx.state(model))

  Args:
    path: an item dir, step dir or manager root.
    target: the NNX model the data lands in: an abstract `nnx.State`, a live Module/Optimizer (updated in place
      and returned), a `(graphdef, abstract_state)` pair, a dict of these, or None (an `nnx.State` rebuilt from
      the checkpoint's own metadata).
    missing: 'error', or 'keep': leaves the checkpoint lacks keep the target's own (concrete) values.
    extra: 'error', or 'ignore': checkpoint leaves with no place in the target.
    mapping: how the checkpoint's leaves map onto the target (`orbax_nnx.Mapping`: rules, layout, groups,
      scan_axis, param_scan_axis); its fields may also be passed as keywords.
    memory_budget: bytes a converted restore holds besides the restored arrays (an int, or '512MiB', '2GB').
    default_sharding: for leaves whose target gives no sharding and whose saved one does not fit these devices.
    exclude: Variable types the target never restores (default: Cache, Intermediate).
    step: the step of a manager root.
    item: the item inside a step dir with several items.
    strict: False lets Orbax pad or truncate arrays whose stored shape differs (as
      `StandardRestore(strict=False)`); only where the stored tree matches the target.
    support_layout: restore onto the target leaves' `format` (as `StandardRestore(support_layout=True)`).
    restore_args: Orbax `RestoreArgs` per leaf, a tree shaped like `target` (as for `PyTreeRestore`); only
      where the stored tree matches the target.

  Returns:
    The restored tree, shaped as `target` (the module itself when `target` is one).

  Raises:
    NotACheckpointError: nothing readable at `path`.
    StructureMismatchError, ShapeMismatchError: the checkpoint does not fit `target`.
    LayoutError, PlanError: the stored layout cannot be mapped onto `target`.
    CorruptCheckpointError: stored bytes or metadata are damaged.
  """
  directory = resolve_item(path, step=step, item=item)
  args = NNXRestore(target=target, missing=missing, extra=extra, memory_budget=memory_budget,
                    default_sharding=default_sharding, exclude=exclude, strict=strict, support_layout=support_layout,
                    restore_args=restore_args, **mapping.as_kwargs())
  handler = NNXCheckpointHandler()
  try:
    return handler.restore_item(read_item_metadata(directory), args)
  finally:
    handler.close()
