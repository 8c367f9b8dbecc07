"""One-call functions for checkpoints outside a CheckpointManager."""

from __future__ import annotations

from typing import Any

from etils import epath

from orbax_nnx.handlers import NNXCheckpointHandler, NNXRestore
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item
from orbax_nnx.sources import listing


@listing.looking_once
def restore(path: epath.PathLike, target: Any = None, *, step: int | None = None, item: str | None = None,
            **options: Any) -> Any:
  """Restores `target` from an item dir, a step dir, or a manager root (latest step by default).

  `target` and `options` are those of `NNXRestore` (missing, extra, rules, scan_axis, ...).
  Any supported layout on disk (NNX either flavour, Linen, MaxText, param-only) is converted
  to the target on the way, reading only the regions each target shard needs.
  """
  directory = resolve_item(path, step=step, item=item)
  handler = NNXCheckpointHandler()
  try:
    return handler.restore_item(read_item_metadata(directory), NNXRestore(target=target, **options))
  finally:
    handler.close()
