"""Orbax's `_sharding` file, written a batch of arrays at a time.

Orbax's `ArrayHandler` records each array's sharding under its own key of one JSON file, opening a
tensorstore per key, one after another: 0.25-0.3 s of CPU per 1,000 small arrays (measured: saving
1,080 arrays of 150-380 KiB took 1.39-1.49 s with it, 1.18-1.25 s with one write of the whole
document). A streaming save hands Orbax many batches, so its arrays are written with Orbax's sharding
file turned off and their shardings go through `ShardingFile`: one read-modify-write of the document
per batch, with Orbax's spec, key encoding and serializer, so the file is the one Orbax writes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorstore as ts

from orbax_nnx import compat


class ShardingFile:
  """The `_sharding` writes of one save, shared by all its handlers: the lock makes the read-modify-writes
  one at a time (batches are written from several threads and event loops)."""

  def __init__(self, primary_host: int | None = 0):
    self.primary_host = primary_host
    self._lock = threading.Lock()

  async def write(self, arrays: Sequence[jax.Array], infos: Sequence[compat.ParamInfo]) -> None:
    """Records the shardings of `arrays` (a PRNG key array's as Orbax stores it: its key data's)."""
    directories = [await compat.resolved_parent_dir(info) for info in infos]  # (one: once it exists, at once)
    if not ocp.multihost.is_primary_host(self.primary_host):
      return
    files: dict[str, tuple[dict, dict[str, str]]] = collections.defaultdict(lambda: ({}, {}))
    serialized_of: dict[Any, str | None] = {}  # (arrays of a save mostly share a few shardings)
    for array, info, directory in zip(arrays, infos, directories):
      spec = compat.sharding_file_spec(directory.as_posix(), info.name)
      sharding = _stored(array).sharding
      if sharding not in serialized_of:
        serialized_of[sharding] = compat.serialized_sharding(sharding)
      serialized = serialized_of[sharding]
      if serialized is None:
        continue
      document, entries = files[json.dumps(spec['kvstore'], sort_keys=True)]
      if not document:
        document.update((k, v) for k, v in spec.items() if k != 'json_pointer')
      entries[_pointer_key(spec['json_pointer'])] = serialized
    if files:  # off the event loop, whole: a cancelled caller cannot leave the lock taken
      await asyncio.to_thread(self._merge, list(files.values()), infos[0].ts_context)

  def _merge(self, files: list[tuple[dict, dict[str, str]]], context: ts.Context) -> None:
    with self._lock:
      for document, entries in files:
        stored = ts.KvStore.open(document['kvstore'], context=context).result().read(b'').result()
        merged = json.loads(stored.value) if stored.state == 'value' else {}
        merged.update(entries)
        ts.open(document, open=True, context=context).result().write(merged).result()


def _pointer_key(pointer: str) -> str:
  """The object key a one-level JSON pointer (`/key`, RFC 6901 escapes) names."""
  return pointer[1:].replace('~1', '/').replace('~0', '~')


def _stored(array: jax.Array) -> jax.Array:
  return jax.random.key_data(array) if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key) else array
