"""What an object-store client knows of a folder: one listing per checkpoint folder per operation.

On `gs://` every `exists()` / `is_dir()` is a request or two (gcsfs: a GET of the object and a LIST of the
prefix), and reading one checkpoint asks about the same folder's files many times (ours and Orbax's own
calls: `_METADATA`, `_sharding`, `commit_success.txt`, `array_metadatas`, ...). gcsfs answers those from its
listing cache when the folder has been listed, so an operation that runs inside `one_look()` lists each
checkpoint folder it reads once (`look`) and every later question about its files is free.

The cache is gcsfs's own, per process, and it does not see writes made by others (tensorstore, other hosts):
`look` drops any earlier listing before it lists, and the scope drops what it listed when it ends, so nothing
outside the operation sees a listing it made. Only folders being read as checkpoints are listed, never a
destination or its parents. Local paths are untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from etils import epath

from orbax_nnx.sources import untrusted

_F = TypeVar('_F', bound=Callable[..., Any])
_LISTED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar('orbax_nnx_listed', default=None)


def _filesystem(path: str) -> Any:
  """The fsspec filesystem epath uses for `path`, or None (another epath backend caches nothing of ours)."""
  try:
    from etils.epath import backend
    return backend.fsspec_backend.fs(path)
  except Exception:  # pylint: disable=broad-except
    return None


def forget(folder: epath.PathLike, below: bool = False) -> None:
  """Drops the client's cached listing of `folder` (and of its parents; with `below`, of every folder inside it
  too), so the next question goes to the store: gcsfs caches listings per process, and a long-lived process must
  see steps written since it last looked."""
  if untrusted.is_local(folder):
    return
  fs = _filesystem(os.fspath(folder))
  if fs is None or not hasattr(fs, 'invalidate_cache'):
    return
  fs.invalidate_cache(os.fspath(folder))
  cache = getattr(fs, 'dircache', None)
  if below and cache is not None:
    inside = fs._strip_protocol(os.fspath(folder)).rstrip('/') + '/'  # pylint: disable=protected-access
    for key in [k for k in list(cache) if k.startswith(inside)]:
      cache.pop(key, None)


@contextlib.contextmanager
def one_look() -> Iterator[None]:
  """The scope of one operation: folders `look`ed at inside it are listed once, and forgotten when it ends.

  Nested scopes join the outermost one."""
  if _LISTED.get() is not None:
    yield
    return
  token = _LISTED.set(set())
  try:
    yield
  finally:
    listed = _LISTED.get() or set()
    _LISTED.reset(token)
    for folder in listed:
      forget(folder, below=True)


def looking_once(fn: _F) -> _F:
  """`fn` runs inside `one_look()` (for the public operations that read checkpoints)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with one_look():
      return fn(*args, **kwargs)

  return wrapper  # type: ignore[return-value]


def look(folder: epath.PathLike) -> None:
  """Lists a checkpoint folder on an object store once in this operation, so questions about its files are
  answered from that listing. Outside `one_look()`, and for local paths, it does nothing. A folder that is not
  there (or not readable) is left for the caller's own checks to report."""
  listed = _LISTED.get()
  path = os.fspath(folder)
  if listed is None or untrusted.is_local(path) or path in listed:
    return
  fs = _filesystem(path)
  if fs is None or not hasattr(fs, 'invalidate_cache'):
    return
  listed.add(path)
  fs.invalidate_cache(path)
  try:
    fs.ls(path, detail=True)
  except Exception:  # pylint: disable=broad-except  (missing, a file, denied: the caller's checks say which)
    pass
