"""An Orbax item's leaf metadata read from `_METADATA` and the stored zarr headers, in one batch.

Orbax's `metadata()` opens a tensorstore per array (plus a JSON read per sharding) to learn
shapes and dtypes: about 0.5 ms a leaf, most of a small-leaf conversion. The same facts are
in each array's zarr header (`.zarray` / `zarr.json`), which one kvstore reads for every
leaf concurrently. The result is the `ArrayMetadata` / `ScalarMetadata` Orbax itself
builds (tested against it); anything this does not know (a custom TypeHandler, a non-default
metadata key, rich value metadata) returns None and the caller asks Orbax.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from orbax_nnx import compat, errors
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources import untrusted

ARRAY_TYPES = ('jax.Array', 'np.ndarray', 'scalar')
EMPTY_TYPES = ('None', 'Dict', 'List', 'Tuple', 'NamedTuple')
SHARDING_FILE = '_sharding'
ARRAY_METADATA_DIR = 'array_metadatas'  # Orbax's per-process array metadata files (`process_N`)
KEY_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')  # JAX's PRNG implementations, by the names Orbax records


def storage_format(flags: Mapping[str, Any]) -> tuple[bool, bool]:
  """(use_ocdbt, use_zarr3): how an Orbax item's arrays are stored, as its `_METADATA` JSON (`flags`) records it;
  Orbax's defaults (OCDBT, zarr v2) where it records nothing."""
  return bool(flags.get('use_ocdbt', True)), bool(flags.get('use_zarr3', False))


def read(directory: epath.Path, flags: Mapping[str, Any], handler: Any,
         specs: Callable[[], 'ReadSpecs'] | None = None) -> tuple[dict[DiskPath, Any], bool] | None:
  """`({path: Orbax value metadata}, has empty nodes)` from the headers, or None where Orbax must be asked.
  `specs` gives the item's read specs (`ReadSpecs`), shared with its array reads; by default, new ones."""
  entries = _entries(flags, handler)
  if entries is None:
    return None
  leaves = {path: typestr for path, typestr, _ in entries if typestr not in EMPTY_TYPES}
  write_shapes = {path: shape for path, _, shape in entries}
  has_empty = len(leaves) != len(entries)
  if not leaves:
    return {}, has_empty
  use_ocdbt, use_zarr3 = storage_format(flags)
  names = {path: '.'.join(path) for path in leaves}
  headers = _read_headers(list(names.values()), use_zarr3,
                          specs or (lambda: ReadSpecs(directory, use_ocdbt, use_zarr3)))
  if headers is None:
    return None
  shardings = _shardings(directory) if 'jax.Array' in leaves.values() else {}
  out = {}
  for path, typestr in leaves.items():
    facts = _array_facts(headers[names[path]], use_zarr3)
    if facts is None:
      return None
    shape, dtype, chunk, zarr = facts
    name = names[path]
    if typestr == 'scalar':
      out[path] = ocp.metadata.ScalarMetadata(name=name, directory=directory, dtype=dtype)
      continue
    sharding = shardings.get(name) if typestr == 'jax.Array' else None
    out[path] = ocp.metadata.ArrayMetadata(
        name=name, directory=directory, shape=shape, dtype=dtype, sharding=sharding,
        storage=ocp.metadata.StorageMetadata(chunk_shape=chunk, write_shape=write_shapes[path], zarr_metadata=zarr))
  return out, has_empty


def _entries(flags: Mapping[str, Any], handler: Any) -> list[tuple[DiskPath, str, Any]] | None:
  """(path, value type, write shape) per stored entry, or None when a type or option is outside what `read` knows."""
  tree = flags.get('tree_metadata')
  if not isinstance(tree, Mapping) or flags.get('value_metadata_tree') or not _default_handlers(handler):
    return None
  out = []
  for entry in tree.values():
    try:
      path = tuple(str(k['key']) for k in entry['key_metadata'])
      value = entry['value_metadata']
      typestr, skip = value['value_type'], bool(value.get('skip_deserialize', False))
      write_shape = tuple(value['write_shape']) if value.get('write_shape') is not None else None
    except (KeyError, TypeError):
      return None
    if (typestr in EMPTY_TYPES and skip) or (typestr in ARRAY_TYPES and not skip):
      out.append((path, typestr, write_shape))
    else:
      return None
  paths = sorted(p for p, _, _ in out)
  if any(b[:len(a)] == a for a, b in zip(paths, paths[1:])):  # a prefix entry: Orbax's own rules apply
    return None
  return out


def _default_handlers(handler: Any) -> bool:
  """Whether the handler reads arrays with Orbax's own TypeHandlers and header names."""
  registry = compat.type_handler_registry_of(handler) if handler is not None else None
  if registry is None:
    registry = compat.global_type_handler_registry()
  expected = {'jax.Array': compat.ArrayHandler, 'np.ndarray': ocp.type_handlers.NumpyHandler,
              'scalar': ocp.type_handlers.ScalarHandler}
  try:
    handlers = {name: registry.get(name) for name in expected}
  except ValueError:
    return False
  return all(type(h) is expected[name] and compat.type_handler_metadata_key(h) is None  # pylint: disable=unidiomatic-typecheck
             for name, h in handlers.items())


class ReadSpecs:
  """Orbax's tensorstore read spec for any array of one item, built once: Orbax's own
  `build_array_read_spec` costs ~80 us a leaf, and only the kvstore path differs by name."""

  PROBE = 'orbax_nnx_probe'

  def __init__(self, directory: epath.Path, use_ocdbt: bool, use_zarr3: bool):
    self.directory, self.use_ocdbt, self.use_zarr3 = directory, use_ocdbt, use_zarr3
    self.context = compat.get_ts_context(use_ocdbt=use_ocdbt)
    self._template = self._orbax(self.PROBE)
    path = self._template['kvstore'].get('path', '')
    self.prefix = path[:-len(self.PROBE)] if path.endswith(self.PROBE) else None

  def _orbax(self, name: str) -> dict:
    info = compat.ParamInfo(name=name, parent_dir=self.directory, is_ocdbt_checkpoint=self.use_ocdbt,
                            use_zarr3=self.use_zarr3, ts_context=self.context)
    return compat.build_array_read_spec(info, use_ocdbt=self.use_ocdbt).json

  def spec(self, name: str) -> dict:
    """The read spec JSON of the array stored under `name` (its tree path joined with '.')."""
    if self.prefix is None:  # a spec shape this does not know: ask Orbax each time
      return self._orbax(name)
    return dict(self._template, kvstore=dict(self._template['kvstore'], path=self.prefix + name))

  def kvstore(self):
    """The item's kvstore (keys: `<name>/<zarr header or chunk>`), or None if its layout is unknown."""
    if self.prefix is None:
      return None
    return ts.KvStore.open(dict(self._template['kvstore'], path=self.prefix), context=self.context).result()


def _read_headers(names: list[str], use_zarr3: bool, specs: Callable[[], 'ReadSpecs']) -> dict | None:
  """Each array's zarr header JSON, read concurrently through one kvstore (None if one is missing)."""
  header = 'zarr.json' if use_zarr3 else '.zarray'
  try:
    store = specs().kvstore()
    if store is None:
      return None
    with ts.Batch() as batch:  # one batch: the store coalesces reads of the same data file
      futures = {name: store.read(f'{name}/{header}', batch=batch) for name in names}
    out = {}
    for name, future in futures.items():
      result = future.result()
      if result.state != 'value':
        return None
      out[name] = json.loads(result.value)
  except Exception:  # pylint: disable=broad-except  (unreadable here: Orbax's path reports it)
    return None
  return out


def _array_facts(header: Any, use_zarr3: bool) -> tuple[tuple[int, ...], Any, tuple[int, ...], Any] | None:
  """(shape, dtype, read chunk shape, ZarrMetadata) from one zarr header, or None if unusual."""
  try:
    shape = tuple(header['shape'])
    if use_zarr3:
      dtype = jnp.dtype(header['data_type'])
      chunk = tuple(header['chunk_grid']['configuration']['chunk_shape'])
      codecs = header.get('codecs') or []
      if codecs and codecs[0].get('name') == 'sharding_indexed':
        chunk = tuple(codecs[0]['configuration']['chunk_shape'])
    else:
      if not isinstance(header['dtype'], str):
        return None
      dtype = _zarr2_dtype(header['dtype'])
      chunk = tuple(header['chunks'])
    if len(chunk) != len(shape) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                           for n in shape + chunk):
      return None  # damaged (or unusual): Orbax's own reader reports it
  except (KeyError, TypeError, ValueError, AttributeError):
    return None
  try:
    zarr = compat.ZarrMetadata.from_json(header)
  except Exception:  # pylint: disable=broad-except  (best effort, as in Orbax)
    zarr = None
  return shape, dtype, chunk, zarr


@functools.lru_cache(maxsize=None)
def _zarr2_dtype(name: str) -> Any:
  """The dtype of a zarr v2 dtype string (`<f4`, `|b1`, `bfloat16`), native byte order as Orbax reports it."""
  return jnp.dtype(np.dtype(name).name if name[:1] in '<>|=' else name)


def _shardings(directory: epath.Path) -> dict[str, Any]:
  """Saved sharding metadata by parameter name, from the item's `_sharding` JSON file."""
  path = directory / SHARDING_FILE
  if not path.exists():
    return {}
  data = untrusted.field(untrusted.read_json(path), dict, path, f'{SHARDING_FILE}')
  out = {}
  for key, serialized in data.items():
    try:
      name = base64.urlsafe_b64decode(key.encode()).decode('utf-8')
      out[name] = compat.sharding_from_serialized(serialized) if serialized else None
    except Exception:  # pylint: disable=broad-except  (as in Orbax: an unreadable sharding is no sharding)
      continue
  return out


def key_impls(directory: epath.Path) -> dict[str, str]:
  """The PRNG impl of every array stored as typed-key data, by parameter name (Orbax's `random_key_impl`
  in `array_metadatas/process_*`); empty when the item has none."""
  folder = directory / ARRAY_METADATA_DIR
  if not folder.exists():
    return {}
  out = {}
  for file in sorted(folder.iterdir()):
    data = untrusted.field(untrusted.read_json(file), dict, file, 'array metadata')
    for entry in untrusted.field(data.get('array_metadatas') or [], list, file, '"array_metadatas"'):
      meta = entry.get('array_metadata') if isinstance(entry, dict) else None
      ext = meta.get('ext_metadata') if isinstance(meta, dict) else None
      impl = ext.get('random_key_impl') if isinstance(ext, dict) else None
      if impl is not None and impl not in KEY_IMPLS:
        raise errors.CorruptCheckpointError(file, f'random_key_impl {str(impl)[:40]!r} is not a JAX PRNG'
                                            f' implementation ({", ".join(KEY_IMPLS)})')
      if impl is not None and isinstance(meta.get('param_name'), str):
        out[meta['param_name']] = impl
  return out
