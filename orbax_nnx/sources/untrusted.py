"""Reading untrusted checkpoint metadata: the one place every source parses what a stored file claims.

Checkpoints come from model hubs, so their metadata files (safetensors headers and indexes, Orbax
`_METADATA`, `_sharding`, our custom records) are hostile until checked:

- `member(folder, name)`: a file a folder's index names must be a plain file name inside that folder (no
  separator, no `..`, not absolute), checked before anything is opened; a member that is a symlink (the
  Hugging Face cache: `snapshots/<rev>/x.safetensors` -> `blobs/<sha>`) is followed;
- `check_regular(file)`: only regular files are opened (no FIFO, device or directory), checked first;
- `read_bytes(file, limit)` / `parse_json(raw)`: size-capped reads, JSON whose nesting is too deep is an error,
  not a `RecursionError`; OS errors become `NotACheckpointError` / `CorruptCheckpointError` naming the file;
- `field(...)`, `shape_of(...)`: every field type-checked; dimensions are non-negative ints and element counts
  are Python ints (no int64 wrap-around).

No message quotes a file's contents beyond the key names that the checkpoint itself declares.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

from etils import epath

from orbax_nnx import errors

MAX_JSON_BYTES = 256 * 2**20  # any metadata file larger than this is refused unread


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on a local filesystem (not an object store such as `gs://`)."""
  return '://' not in os.fspath(path)


def is_permission_error(e: BaseException) -> bool:
  """Whether `e` says access was denied: a local PermissionError, an object store's 403 (gcsfs raises
  `OSError('Forbidden: ...')`), or tensorstore's PERMISSION_DENIED (through Orbax, a ValueError)."""
  if isinstance(e, PermissionError):
    return True
  text = str(e)
  return isinstance(e, (OSError, ValueError)) and (
      text.startswith('Forbidden') or 'PERMISSION_DENIED' in text or 'Permission denied' in text)


def causes(error: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
  """`error` and the exceptions it was raised from or during (at most `limit`)."""
  for _ in range(limit):
    if error is None:
      return
    yield error
    error = error.__cause__ or error.__context__


def is_missing_data(e: BaseException) -> bool:
  """Whether `e` (or one of its causes) says a stored file or object is not there: a FileNotFoundError, or
  tensorstore's NOT_FOUND (through Orbax, a ValueError)."""
  return any(isinstance(c, FileNotFoundError) or 'NOT_FOUND' in str(c) for c in causes(e))


def damaged(directory: epath.PathLike, reason: str, cause: BaseException) -> errors.CorruptCheckpointError:
  """The error for an item whose stored data `cause` could not be read: a `MissingDataError` (also a
  FileNotFoundError, as Orbax raises) when something stored is not there, else a `CorruptCheckpointError`."""
  kind = errors.MissingDataError if is_missing_data(cause) else errors.CorruptCheckpointError
  return kind(directory, reason)


PERMISSION_ADVICE = 'permission denied; check its file modes or this process\'s storage credentials'


@contextlib.contextmanager
def os_errors(file: epath.PathLike) -> Iterator[None]:
  """Turns an OS error met on `file` into a typed error that names it."""
  try:
    yield
  except errors.OrbaxNNXError:
    raise
  except OSError as e:
    if is_permission_error(e):
      raise errors.NotACheckpointError(file, PERMISSION_ADVICE) from e
    reason = {errno.ENOENT: 'it is missing (a dangling symbolic link or an incomplete download?)',
              errno.ELOOP: 'it is a loop of symbolic links',
              errno.EISDIR: 'it is a directory, not a file'}.get(e.errno, f'it cannot be read ({e.strerror or e})')
    raise damaged(file, reason, e) from e


def member(folder: epath.Path, name: Any, *, what: str) -> epath.Path:
  """`folder / name` for a file name read from `folder`'s own metadata (`what` names where it was read).

  Raises:
    CorruptCheckpointError: `name` is not a plain file name (a path, `.`, `..`, empty, not a string).
  """
  if (not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or '\\' in name or
      '\0' in name or os.path.isabs(name)):
    shown = repr(name)[:100] if isinstance(name, str) else type(name).__name__
    raise errors.CorruptCheckpointError(folder, f'{what} names {shown} as a file: only plain file names inside'
                                        ' the checkpoint folder are read')
  return folder / name


def check_regular(file: epath.Path) -> None:
  """Raises unless `file` is a regular file (symlinks followed), before anything opens it."""
  if not is_local(file):
    return  # object stores hold objects only
  with os_errors(file):
    mode = os.stat(os.fspath(file)).st_mode
  if not stat.S_ISREG(mode):
    kind = 'a directory' if stat.S_ISDIR(mode) else 'not a regular file (a pipe, socket or device)'
    raise errors.CorruptCheckpointError(file, f'it is {kind}; a checkpoint file must be a regular file')


def read_bytes(file: epath.Path, limit: int = MAX_JSON_BYTES) -> bytes:
  """The bytes of a regular metadata file of at most `limit` bytes."""
  check_regular(file)
  with os_errors(file):
    with file.open('rb') as f:
      raw = f.read(limit + 1)
  if len(raw) > limit:
    raise errors.CorruptCheckpointError(file, f'it is larger than {limit} bytes: not checkpoint metadata')
  return raw


def parse_json(raw: bytes | str, file: epath.PathLike, *, what: str = 'its JSON') -> Any:
  """JSON from an untrusted file: malformed or too deeply nested input is a CorruptCheckpointError."""
  try:
    return json.loads(raw)
  except RecursionError as e:
    raise errors.CorruptCheckpointError(file, f'{what} is nested too deeply to be checkpoint metadata') from e
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.CorruptCheckpointError(file, f'{what} is not valid JSON ({type(e).__name__} at'
                                        f' {getattr(e, "pos", "?")})') from e


def read_json(file: epath.Path, limit: int = MAX_JSON_BYTES) -> Any:
  """`parse_json(read_bytes(file))`."""
  return parse_json(read_bytes(file, limit), file)


def field(value: Any, kind: type | tuple[type, ...], file: epath.PathLike, what: str) -> Any:
  """`value` if it is a `kind` (bools are not ints), else a CorruptCheckpointError naming `what`."""
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    names = ' or '.join(k.__name__ for k in kinds)
    raise errors.CorruptCheckpointError(file, f'{what} should be a {names}, not a {type(value).__name__}')
  return value


def shape_of(value: Any, file: epath.PathLike, what: str) -> tuple[int, ...]:
  """A stored shape: a list of non-negative ints (not bools)."""
  field(value, (list, tuple), file, f'{what} shape')
  if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
    raise errors.CorruptCheckpointError(file, f'{what} has shape {str(list(value))[:100]}: dimensions must be'
                                        ' non-negative integers')
  return tuple(value)

