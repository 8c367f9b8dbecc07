"""Typed errors raised by orbax_nnx.

Every error names the offending tree path or directory and says what to do.
All derive from `OrbaxNNXError`, so `except orbax_nnx.errors.OrbaxNNXError` catches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_MAX_LISTED = 20


def _listing(paths: Iterable[str]) -> str:
  paths = sorted(paths)
  shown = '\n'.join(f'    {p}' for p in paths[:_MAX_LISTED])
  more = len(paths) - _MAX_LISTED
  return shown + (f'\n    ... and {more} more' if more > 0 else '')


class OrbaxNNXError(Exception):
  """Base class of all orbax_nnx errors."""


class NotACheckpointError(OrbaxNNXError, FileNotFoundError):
  """A path is not (or no longer) a complete Orbax checkpoint."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    super().__init__(
        f'{self.path} is not a readable Orbax checkpoint: {reason}. Pass a step'
        ' directory written by Orbax (with a _METADATA file per item), an item'
        ' directory, a CheckpointManager root, or Hugging Face safetensors (a .safetensors file or a directory'
        ' of them).'
    )


class StructureMismatchError(OrbaxNNXError, ValueError):
  """Target and checkpoint trees have different leaves."""

  def __init__(self, missing: Sequence[str], extra: Sequence[str], where: str = '', advice: str | None = None):
    self.missing = sorted(missing)
    self.extra = sorted(extra)
    parts = [f'Checkpoint{" " + where if where else ""} does not match the target tree.']
    if self.missing:
      parts.append(
          f'  {len(self.missing)} target leaves are missing from the checkpoint:\n'
          + _listing(self.missing)
      )
    if self.extra:
      parts.append(
          f'  {len(self.extra)} checkpoint leaves have no place in the target:\n'
          + _listing(self.extra)
      )
    parts.append(advice or (
        "  Fix the target, or relax the policy: missing='keep' keeps the target's"
        " values, extra='ignore' skips unused checkpoint leaves."))
    super().__init__('\n'.join(parts))


class CorruptCheckpointError(OrbaxNNXError, ValueError):
  """An Orbax item whose stored bytes or metadata are missing or damaged (never raised for a wrong target)."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    super().__init__(f'{self.path}: stored data cannot be read ({reason}). The checkpoint is incomplete or'
                     ' damaged; restore an earlier step or re-create it.')


class MissingDataError(CorruptCheckpointError, FileNotFoundError):
  """A `CorruptCheckpointError` raised when a file or object the item's metadata names is not there (a deleted
  `.zarray`, a lost OCDBT data file): also a `FileNotFoundError`, as Orbax's own restore raises it."""


class ShapeMismatchError(OrbaxNNXError, ValueError):
  """A stored array has another shape than the one requested."""

  def __init__(self, path: str, stored: Sequence[int], requested: Sequence[int], hint: str = ''):
    self.path, self.stored, self.requested = path, tuple(stored), tuple(requested)
    super().__init__(
        f'Shape mismatch at {path}: stored {self.stored}, requested'
        f' {self.requested}.'
        + (f' {hint}' if hint else ' Check the model config matches the checkpoint.')
    )


class LayoutError(OrbaxNNXError, ValueError):
  """A checkpoint layout could not be recognised or is ambiguous."""


class PlanError(OrbaxNNXError, ValueError):
  """A conversion plan could not be built (e.g. ambiguous scan axis)."""


class SlotError(PlanError):
  """Rules that fill a stacked target slot by slot (`path[i]`) leave a slot empty, fill one twice, or name one
  past the end of the target's first axis. `target` is the stacked path, `slot` the offending index."""

  def __init__(self, target: str, slot: int, reason: str):
    self.target, self.slot = target, slot
    super().__init__(f'{target}[{slot}]: {reason}')


class ShardingError(OrbaxNNXError, ValueError):
  """A target sharding cannot be used on the available devices."""


class DestinationError(OrbaxNNXError, ValueError):
  """A writer's DST may not be written or replaced (a source, a protected folder, not a checkpoint, a link)."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    super().__init__(f'Refusing to write DST {self.path}: {reason}.')


class ResourceError(OrbaxNNXError, MemoryError):
  """An operation would need more memory than this process can get (checked before allocating)."""


class OptionError(OrbaxNNXError, ValueError):
  """An argument has a value the function does not accept (named, with the accepted values)."""


class UnsupportedArgumentError(OrbaxNNXError, ValueError):
  """An Orbax argument that this code path cannot honour (named, with what to do instead)."""


class RestoreError(OrbaxNNXError, RuntimeError):
  """Orbax failed to restore for a reason that is not known to be damaged data (the cause is chained)."""


def check_int(name: str, value) -> None:
  """Raises OptionError unless `value` is an int (not a bool or a string of digits)."""
  if not isinstance(value, int) or isinstance(value, bool):
    raise OptionError(f'{name}={value!r} must be an int.')


def check_choice(name: str, value, allowed: Sequence) -> None:
  """Raises OptionError unless `value` is one of `allowed` (compared exactly, case included)."""
  if not any(value == a and type(value) is type(a) for a in allowed):
    raise OptionError(f'{name}={value!r} is not accepted; use one of {", ".join(repr(a) for a in allowed)}.')
