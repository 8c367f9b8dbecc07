"""Where a writer may write: the one SRC/DST decision that every writer calls.

`check_destination(dst, sources=..., overwrite=...)` is called by `convert`, `export_params` (Orbax, Linen
and safetensors), and so by the CLI, before anything is created or deleted. It:

- resolves relative paths and symlinks in DST's parents (a DST that is itself a symlink is refused: nothing is
  ever deleted through a link);
- refuses DST equal to a source, inside one, or a parent of one;
- refuses the filesystem root (or a bucket root), the user's home directory and its parents;
- with `overwrite=True`, accepts an existing DST only when it is an empty directory or a checkpoint
  (an Orbax item, step directory or manager root, or a safetensors folder): anything else is refused, naming
  what would be lost.

Writers create their temporary directory next to DST only after this check.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

from etils import epath

from orbax_nnx import errors
from orbax_nnx.sources import untrusted

_LISTED = 6


def normalized(path: epath.PathLike) -> epath.Path:
  """`path` absolute, with `..` and the symlinks of its parents resolved (the last component kept as is)."""
  from orbax_nnx.sources import metadata  # local: sources build on io

  path = epath.Path(path)
  if not untrusted.is_local(path):
    text = os.fspath(path)
    scheme, rest = text.split('://', 1)
    return epath.Path(f'{scheme}://{posixpath.normpath(rest).lstrip("/")}')
  parent, name = os.path.split(os.fspath(metadata.absolute(path)))
  return epath.Path(os.path.join(os.path.realpath(parent), name) if name else parent)


def _real(path: epath.PathLike) -> str:
  """The comparable form of a path: fully resolved when local (symlinks included)."""
  path = epath.Path(path)
  return os.path.realpath(os.fspath(path)) if untrusted.is_local(path) else os.fspath(normalized(path))


def _within(inner: str, outer: str) -> bool:
  return inner.startswith(outer.rstrip('/') + '/')


def protected_paths() -> set[str]:
  """Directories no writer may replace: the filesystem root and the user's home (and its parents)."""
  home = os.path.realpath(os.path.expanduser('~'))
  out = {os.path.realpath(os.sep), home}
  while os.path.dirname(home) != home:
    home = os.path.dirname(home)
    out.add(home)
  return out


def _holds_steps(path: epath.Path) -> bool:
  from orbax_nnx.sources import metadata  # local: sources build on io

  try:
    return path.is_dir() and bool(metadata.manager_steps(path))
  except errors.OrbaxNNXError:
    return False


def _checkpoint_kind(path: epath.Path) -> str | None:
  """What checkpoint an existing directory holds ('Orbax item', ...), or None."""
  from orbax_nnx.sources import metadata, safetensors  # local: sources build on io

  if (path / metadata.METADATA_FILE).exists():
    return 'Orbax item'
  if (path / '_CHECKPOINT_METADATA').exists():
    return 'Orbax step directory'
  if safetensors.is_safetensors(path):
    return 'safetensors folder'
  children = [c for c in path.iterdir()]
  if children and all(c.is_dir() and (c / metadata.METADATA_FILE).exists() for c in children):
    return 'Orbax step directory'
  try:
    steps = metadata.manager_steps(path)
  except errors.OrbaxNNXError:
    return None
  # a manager root holds steps (and Orbax's root metadata, tmp, hidden and retired-step entries), never
  # unrelated folders
  others = [c for c in children if c not in steps.values() and not c.name.startswith('.') and
            'orbax-checkpoint-tmp' not in c.name and c.name != 'metadata' and not _holds_steps(c)]
  return 'CheckpointManager root' if steps and not others else None


def check_destination(dst: epath.PathLike, *, sources: Iterable[epath.PathLike] = (),
                      overwrite: bool = False) -> epath.Path:
  """Checks that a writer may create (or replace) `dst`; returns it normalised.

  Args:
    dst: the directory the writer will create.
    sources: the paths the writer reads (each as given and as resolved): DST may not be one of them, lie
      inside one, or contain one.
    overwrite: whether an existing DST may be replaced (only an empty directory or a checkpoint).

  Returns:
    `dst` as an absolute path (symlinked parents resolved), to write to.

  Raises:
    DestinationError: for any of the cases above, naming DST and what to do.
  """
  errors.check_choice('overwrite', overwrite, (True, False))
  given = epath.Path(dst)
  dst = normalized(given)
  if untrusted.is_local(dst) and os.path.islink(os.fspath(dst)):
    raise errors.DestinationError(
        given, f'it is a symbolic link (to {os.readlink(os.fspath(dst))}); nothing is written or deleted through a'
        ' link: pass the directory it points to, or remove the link')
  real = _real(dst)
  protected = protected_paths() if untrusted.is_local(dst) else {real.rstrip('/')} if real.count('/') <= 2 else set()
  if real in protected:
    raise errors.DestinationError(given, 'it is the filesystem root, a bucket root, or your home directory (or one'
                                  ' of its parents); write the checkpoint into a folder of its own')
  for src in sources:
    for form in {_real(src), os.fspath(normalized(src))}:
      if real == form:
        raise errors.DestinationError(given, f'it is the source {src}; write somewhere else')
      if _within(real, form):
        raise errors.DestinationError(given, f'it is inside the source {src}; write outside the source checkpoint')
      if _within(form, real):
        raise errors.DestinationError(given, f'the source {src} is inside it; replacing it would destroy the source')
  if not dst.exists():
    return dst
  if not overwrite:
    raise errors.DestinationError(given, 'it exists; pass overwrite=True (--overwrite) to replace it')
  if not dst.is_dir():
    raise errors.DestinationError(given, 'it is a file, not a checkpoint directory; overwrite replaces only'
                                  ' checkpoints and empty directories')
  entries = sorted(c.name for c in dst.iterdir())
  if entries and _checkpoint_kind(dst) is None:
    shown = ', '.join(entries[:_LISTED]) + (f' and {len(entries) - _LISTED} more' if len(entries) > _LISTED else '')
    raise errors.DestinationError(
        given, f'it is not a checkpoint, and replacing it would delete {shown}; overwrite replaces only'
        ' checkpoints (an Orbax item, step directory or manager root, a safetensors folder) and empty directories:'
        ' pick a new DST')
  return dst
