"""What every public operation that reads or writes array bytes sets up for its duration, in one place."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from orbax_nnx.io import buffers, heap

_F = TypeVar('_F', bound=Callable)


def moves_bytes(fn: _F) -> _F:
  """`fn` runs with the objects alive before it frozen out of GC passes (`heap.older_objects_frozen`) and its
  dropped host buffers reused for later ones (`buffers.recycling`)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with heap.older_objects_frozen(), buffers.recycling():
      return fn(*args, **kwargs)

  return wrapper  # type: ignore[return-value]
