"""Reading Orbax item metadata (never array bytes) into a flat, path-keyed view."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from orbax_nnx import compat, errors
from orbax_nnx.nnx_tree import VALUE_KEY, DiskPath, VariableRecord
from orbax_nnx.sources import listing, untrusted, zarr_headers

CUSTOM_KEY = 'orbax_nnx'
METADATA_FILE = '_METADATA'


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """Shape, dtype and saved sharding of one stored leaf."""

  shape: tuple[int, ...]
  dtype: Any
  metadata: Any  # the Orbax value metadata (ArrayMetadata, ScalarMetadata, ...)
  key_impl: str | None = None  # a typed PRNG key stored as key data: its impl (Orbax's `random_key_impl`)

  @property
  def nbytes(self) -> int:
    if isinstance(self.dtype, np.dtype):  # (the common case, without jax's slower dtype checks)
      itemsize = self.dtype.itemsize
    else:
      itemsize = 8 if jax.dtypes.issubdtype(self.dtype, jax.dtypes.prng_key) else np.dtype(self.dtype).itemsize
    return int(np.prod(self.shape, dtype=np.int64)) * itemsize

  def saved_sharding(self) -> jax.sharding.Sharding | None:
    """The sharding it was saved with, if it can be built on the current devices."""
    sharding_meta = getattr(self.metadata, 'sharding', None)
    if sharding_meta is None:
      return None
    try:
      return sharding_meta.to_jax_sharding()
    except Exception:  # saved on other devices
      return None


@dataclasses.dataclass(frozen=True)
class ItemMetadata:
  """The stored tree of one Orbax item, flattened by path, plus custom metadata."""

  directory: epath.Path
  leaves: Mapping[DiskPath, LeafInfo]
  custom: Mapping[str, Any]
  empty_nodes: bool = False  # None / empty entries (e.g. optax MaskedNode) in the stored tree
  format: str = 'orbax'  # 'orbax' (an Orbax PyTree item), 'safetensors' (keyed by tensor name), 'live' (in memory)
  flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # an Orbax item's `_METADATA` JSON, as stored

  @property
  def has_empty_nodes(self) -> bool:
    """Whether the stored tree has None / empty entries (Orbax leaves are read to know)."""
    if isinstance(self.leaves, _OrbaxLeaves):
      len(self.leaves)  # loads them
      return self.leaves.has_empty
    return self.empty_nodes

  @functools.cached_property
  def ours(self) -> Mapping[str, Any]:
    """Our own custom metadata block (empty for checkpoints others wrote), its fields type-checked."""
    block = self.custom.get(CUSTOM_KEY) if isinstance(self.custom, Mapping) else None
    if not isinstance(block, Mapping):
      return {}
    where = self.directory / METADATA_FILE
    for key, kind in (('variables', list), ('scan_axes', Mapping), ('conversion', Mapping), ('flavour', str)):
      if block.get(key) is not None:
        untrusted.field(block[key], kind, where, f'custom metadata {CUSTOM_KEY}.{key}')
    conversion = block.get('conversion') or {}
    for name, axes in (('scan_axes', block.get('scan_axes')), ('conversion.source_scan_axes',
                                                             conversion.get('source_scan_axes'))):
      if axes is not None and not (isinstance(axes, Mapping) and all(
          isinstance(a, int) and not isinstance(a, bool) for a in axes.values())):
        raise errors.CorruptCheckpointError(where, f'custom metadata {CUSTOM_KEY}.{name} should map paths to'
                                            ' integer axes')
    return block

  def record_of(self, disk: DiskPath) -> VariableRecord | None:
    """Our Variable record for a stored leaf (either NNX flavour), if we wrote one."""
    return self.records.get(disk[:-1] if disk and disk[-1] == VALUE_KEY else disk)

  @functools.cached_property
  def records(self) -> dict[tuple, VariableRecord]:
    """Variable records keyed by the string-keyed path (as on disk, without 'value')."""
    out = {}
    where = self.directory / METADATA_FILE
    for data in self.ours.get('variables') or []:  # a list: `ours` checked it
      try:
        record = VariableRecord.from_json(data)
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise errors.CorruptCheckpointError(
            where, f'a Variable record in custom metadata {CUSTOM_KEY}.variables is malformed ({type(e).__name__});'
            f' restore with a target, or remove the {CUSTOM_KEY!r} block') from e
      out[tuple(str(k) for k in record.path)] = record
    return out


@contextlib.contextmanager
def _readable(path: epath.Path):
  """Turns a permission error met while looking at `path` (local, or an object store's 403) into a
  NotACheckpointError."""
  try:
    yield
  except (OSError, ValueError) as e:
    if not untrusted.is_permission_error(e):
      raise
    raise errors.NotACheckpointError(getattr(e, 'filename', None) or path, untrusted.PERMISSION_ADVICE) from e


def _check_dir(directory: epath.Path) -> None:
  if not directory.exists():
    raise errors.NotACheckpointError(directory, 'it does not exist')
  if not directory.is_dir():
    raise errors.NotACheckpointError(directory, 'it is a file, not a directory')
  if not (directory / METADATA_FILE).exists():
    names = sorted(p.name for p in directory.iterdir())[:8]
    raise errors.NotACheckpointError(
        directory, f'no {METADATA_FILE} file (found {names or "an empty directory"})'
    )


def is_legacy_item(directory: epath.PathLike, handler: ocp.PyTreeCheckpointHandler) -> bool:
  """Whether `directory` is an item in Orbax's older format, which its PyTree handler still restores: no
  `_METADATA`, the tree (and its small leaves) in the handler's aggregate msgpack file."""
  directory = epath.Path(directory)
  with _readable(directory):
    listing.look(directory)
    return (directory.is_dir() and not (directory / METADATA_FILE).exists()
            and (directory / compat.aggregate_filename(handler)).is_file())


def _flatten_tree(tree: Any, prefix: DiskPath = ()) -> dict[DiskPath, Any]:
  out: dict[DiskPath, Any] = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      out.update(_flatten_tree(value, prefix + (str(key),)))
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      out.update(_flatten_tree(value, prefix + (str(i),)))
  elif tree is not None:
    out[prefix] = tree
  return out


def _leaf_info(meta: Any, key_impls: Mapping[str, str]) -> LeafInfo:
  shape = tuple(getattr(meta, 'shape', ()) or ())
  dtype = getattr(meta, 'dtype', None)
  if dtype is None:
    dtype = np.dtype(np.float64)
  return LeafInfo(shape, dtype, meta, key_impls.get(getattr(meta, 'name', None)))


_READER = None


def _reader() -> ocp.PyTreeCheckpointHandler:
  global _READER
  if _READER is None:
    _READER = ocp.PyTreeCheckpointHandler()
  return _READER


def read_item_metadata(
    directory: epath.PathLike, handler: ocp.PyTreeCheckpointHandler | None = None
) -> ItemMetadata:
  """Reads an Orbax PyTree item's metadata, or a safetensors source's headers (no array bytes).

  Args:
    directory: the item directory (or safetensors file or folder).
    handler: the Orbax PyTree handler to read with (default: a new one).

  Returns:
    The `ItemMetadata`: each stored leaf's path, shape, dtype and storage, and our custom metadata.

  Raises:
    NotACheckpointError: not an Orbax item (or not readable: permission denied).
    CorruptCheckpointError: metadata that is damaged or hostile.
  """
  from orbax_nnx.sources import safetensors as safetensors_source  # local: it builds on this module

  directory = absolute(directory)
  with _readable(directory):
    listing.look(directory)
    if safetensors_source.is_safetensors(directory):
      return safetensors_source.read_metadata(directory)
    check_committed(directory)  # first: an unfinished item may lack any file yet
    _check_dir(directory)
  flags = _item_file(directory)
  custom = flags.get('custom_metadata')
  return ItemMetadata(directory, _OrbaxLeaves(directory, handler, flags), custom if isinstance(custom, Mapping) else {},
                      flags=flags)


def commits_by_marker(path: epath.PathLike) -> bool:
  """Whether Orbax commits checkpoints at `path` with a marker file (`commit_success.txt`, written last) rather
  than an atomic rename: object stores without rename (`gs://`). Orbax's own choice, so readers and writers
  agree with it."""
  return (ocp.path.atomicity_defaults.get_default_temporary_path_class(epath.Path(path))
          is ocp.path.atomicity.CommitFileTemporaryPath)


def check_committed(item_dir: epath.Path) -> None:
  """Raises NotACheckpointError for an item a writer has not finished: where Orbax commits by marker, the item
  or its step directory must hold `commit_success.txt` (as Orbax's own `Checkpointer.restore` requires)."""
  if not commits_by_marker(item_dir) or not item_dir.is_dir():
    return  # committed by rename (an unfinished item sits under a temporary name), or nothing there to judge
  marker = ocp.path.atomicity.COMMIT_SUCCESS_FILE
  if not any((d / marker).exists() for d in (item_dir, item_dir.parent)):
    raise errors.NotACheckpointError(
        item_dir, f'it is incomplete: neither it nor its step directory holds {marker}, the file Orbax writes last'
        ' when a save on this store has finished. Its writer was interrupted or is still running (or it was copied'
        ' without the marker: add the marker only if you know the copy is complete)')


def _item_file(directory: epath.Path) -> Mapping[str, Any]:
  """The item's `_METADATA` JSON (tree, format flags, custom metadata); no array is opened."""
  data = untrusted.read_json(directory / METADATA_FILE)  # there, so this is an Orbax item: damaged, or not ours
  return data if isinstance(data, Mapping) else {}


def _metadata_error(directory: epath.Path, e: BaseException) -> errors.OrbaxNNXError:
  reason = f'its metadata cannot be read ({type(e).__name__}: {str(e)[:500]})'
  if untrusted.is_permission_error(e):
    return errors.NotACheckpointError(directory, f'{untrusted.PERMISSION_ADVICE} ({str(e)[:300]})')
  return untrusted.damaged(directory, reason, e)


class _OrbaxLeaves(Mapping):
  """An Orbax item's leaves (path -> LeafInfo), read on first use, from the zarr headers in one
  batch (`zarr_headers`) or, for what those do not cover, by Orbax's `metadata()`."""

  def __init__(self, directory: epath.Path, handler: ocp.PyTreeCheckpointHandler | None,
               flags: Mapping[str, Any]):
    self._directory, self._handler, self._flags = directory, handler, flags
    self._leaves: dict[DiskPath, LeafInfo] | None = None
    self._asked_orbax: Any = None  # Orbax's `metadata()`, where the headers did not cover the item
    self.has_empty = False

  @functools.cached_property
  def read_specs(self) -> zarr_headers.ReadSpecs:
    """Orbax's tensorstore read specs for this item's arrays: one tensorstore context (so one copy of its
    cached manifest and index nodes) for its headers and every array read of the operation."""
    return zarr_headers.ReadSpecs(self._directory, *zarr_headers.storage_format(self._flags))

  def _load(self) -> dict[DiskPath, LeafInfo]:
    if self._leaves is None:
      fast = zarr_headers.read(self._directory, self._flags, self._handler, lambda: self.read_specs)
      if fast is not None:
        flat, self.has_empty = fast
        impls = zarr_headers.key_impls(self._directory)
        self._leaves = {path: _leaf_info(m, impls) for path, m in flat.items()}
        return self._leaves
      try:
        tree_meta = (self._handler or _reader()).metadata(self._directory)
      except errors.OrbaxNNXError:
        raise
      except Exception as e:
        raise _metadata_error(self._directory, e) from e
      self._asked_orbax = tree_meta
      tree = getattr(tree_meta, 'tree', tree_meta)
      flat = _flatten_tree(tree)
      self.has_empty = len(jax.tree.leaves(tree, is_leaf=lambda x: x is None)) != len(flat)
      impls = zarr_headers.key_impls(self._directory)
      self._leaves = {path: _leaf_info(m, impls) for path, m in flat.items()}
    return self._leaves

  def tree_metadata(self) -> Any:
    """The item's metadata as Orbax's `metadata()` returns it (a `TreeMetadata` of Orbax value metadata,
    shaped as stored), built from the leaves read here: Orbax's own opens every array (measured 2.5 s of a
    10,001-leaf untargeted restore). Leaves holding typed PRNG keys are left to Orbax's own."""
    leaves = self._load()
    if self._asked_orbax is not None:
      return self._asked_orbax
    by_name = {'.'.join(path): info.metadata for path, info in leaves.items()}
    try:  # (`_METADATA` is untrusted: what Orbax's own parse would choke on is reported as damage)
      if any(info.key_impl is not None for info in leaves.values()):
        return (self._handler or _reader()).metadata(self._directory)
      internal = compat.InternalTreeMetadata.from_json(dict(self._flags))
      reference = internal.as_nested_tree()
      flat = {}
      for keypath, value in ocp.tree.to_flat_dict(reference).items():
        if value.skip_deserialize:  # (the headers cover only empty nodes among these)
          flat[keypath] = compat.empty_value_from_typestr(value.value_type, internal.pytree_metadata_options)
        else:
          flat[keypath] = by_name['.'.join(map(str, keypath))]
      return compat.build_default_tree_metadata(ocp.tree.from_flat_dict(flat, target=reference),
                                                custom_metadata=internal.custom_metadata,
                                                use_zarr3=internal.use_zarr3)
    except errors.OrbaxNNXError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _metadata_error(self._directory, e) from e

  def __getitem__(self, key):
    return self._load()[key]

  def __iter__(self):
    return iter(self._load())

  def __len__(self) -> int:
    return len(self._load())


def _is_step_dir(path: epath.Path) -> bool:
  """A step directory: Orbax's `_CHECKPOINT_METADATA` in it, or a step name (`ocp.path.step`) over items.

  A folder that merely holds an item directory (a data folder, a run's parent) is not one."""
  if (path / '_CHECKPOINT_METADATA').exists():
    return True
  return _step_of(path.name) is not None and bool(_items_in(path))


def _items_in(path: epath.Path) -> list[str]:
  """The names of the item directories (holding `_METADATA`) in a folder, sorted."""
  items = []
  for child in path.iterdir():
    if child.is_dir():
      listing.look(child)
      if (child / METADATA_FILE).exists():
        items.append(child.name)
  return sorted(items)


def manager_steps(root: epath.Path) -> dict[int, epath.Path]:
  """Finalized step directories under a manager root, by step, in any naming Orbax writes.

  Names are read with Orbax's own step API (`ocp.path.step`): plain (`5`), fixed length
  (`00000005`) and prefixed (`ckpt_5`, `ckpt_00000005`); temporary (uncommitted) steps are skipped.
  """
  steps: dict[int, epath.Path] = {}
  listing.forget(root)  # steps written since this process last listed it
  for child in root.iterdir():
    if not child.is_dir():
      continue
    step = _step_of(child.name)
    if step is not None:
      listing.look(child)
    if step is None or not ocp.path.step.is_path_finalized(child) or not _is_step_dir(child):
      continue
    if step in steps:
      raise errors.LayoutError(
          f'{root} holds two directories for step {step}: {steps[step].name!r} and {child.name!r}'
          ' (two naming schemes in one root); pass the step directory itself.')
    steps[step] = child
  return dict(sorted(steps.items()))


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` made absolute once, at the API boundary (Orbax and tensorstore refuse relative paths);
  object-store paths (`gs://...`) are returned as they are."""
  path = epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path))) if untrusted.is_local(path) else path


def resolve_item(path: epath.PathLike, *, step: int | None = None, item: str | None = None) -> epath.Path:
  """The item directory for an item dir, a step dir (+ `item`), or a manager root (+ `step`).

  A safetensors file or directory is returned as is.

  A manager root defaults to its latest step; a step directory with one item needs no `item`.
  Step directories may be named in any way `CheckpointManagerOptions` allows (`step_prefix`,
  `step_format_fixed_length`).

  Args:
    path: an item dir, step dir, manager root, or safetensors file or folder (local or `gs://`).
    step: the step of a manager root (default: its latest).
    item: the item of a step dir with several items.

  Returns:
    The item directory, absolute.

  Raises:
    NotACheckpointError: no checkpoint there, no such step, or several items and no `item`.
    OptionError: `step` or `item` that is not a step number or item name, or that an item dir does not match.
  """
  if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
    raise errors.OptionError(f'step={step!r} is not a step number; use a non-negative int.')
  if item is not None and not isinstance(item, str):
    raise errors.OptionError(f'item={item!r} is not an item name; use a str.')
  path = absolute(path)
  with _readable(path):
    return _resolve_item(path, step, item)


def _resolve_item(path: epath.Path, step: int | None, item: str | None) -> epath.Path:
  from orbax_nnx.sources import safetensors as safetensors_source  # local: it builds on this module

  listing.look(path)
  if not path.exists():
    raise errors.NotACheckpointError(path, 'it does not exist')
  if safetensors_source.is_safetensors(path):
    if step is not None or item is not None:
      raise errors.OptionError(f'{path} is a safetensors checkpoint: it has no steps or items (drop step=/item=).')
    return path
  if not path.is_dir():
    raise errors.NotACheckpointError(path, 'it is a file, not a directory')
  if (path / METADATA_FILE).exists():  # an item directory: step= and item= must name it, or are refused
    if item is not None and item != path.name:
      raise errors.OptionError(f'{path} is an item directory ({path.name!r}), not a step directory: item={item!r}'
                               ' names another item; pass the step directory or drop item=.')
    if step is not None and _step_of(path.parent.name) != step:
      raise errors.OptionError(f'{path} is an item directory, not a manager root: step={step} cannot be honoured;'
                               ' pass the manager root or drop step=.')
    return path
  step_dir = _is_step_dir(path)
  steps = {} if step_dir else manager_steps(path)
  if not step_dir and not steps:
    items = _items_in(path)
    if items:
      raise errors.NotACheckpointError(path, f'it is neither an item, a step directory nor a manager root, but holds'
                                       f' the item directories {items[:8]}: pass one of them')
  if steps:
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise errors.NotACheckpointError(path, f'it has no step {step} (steps: {sorted(steps)})')
    path = steps[step]
  elif step is not None and _step_of(path.name) != step:
    raise errors.NotACheckpointError(path, f'step={step} given but this is not a manager root')
  items = _items_in(path)
  if item is not None:
    if item not in items:
      raise errors.NotACheckpointError(path / item, f'no item {item!r} here (items: {items})')
    return path / item
  if len(items) == 1:
    return path / items[0]
  if not items:
    check_committed(path)  # an unfinished write says so
    _check_dir(path)  # raises with what was found
  raise errors.LayoutError(f'{path} holds several items {items}; choose one with item=... (--item).')


def _step_of(name: str) -> int | None:
  try:
    return ocp.path.step.step_from_checkpoint_name(name)
  except ValueError:
    return None
