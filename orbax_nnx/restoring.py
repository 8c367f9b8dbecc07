"""Restoring NNX targets from an Orbax PyTree item (same layout on disk).

Plans from metadata first: every target leaf is matched to a stored leaf (either
NNX flavour), shapes are checked and shardings chosen before Orbax reads a byte.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from flax import nnx

from orbax_nnx import budget, errors, shardings
from orbax_nnx import nnx_tree
from orbax_nnx.metadata import ItemMetadata
from orbax_nnx.nnx_tree import VALUE_KEY, DiskPath, Path, path_str

MissingPolicy = Literal['error', 'keep']
ExtraPolicy = Literal['error', 'ignore']


@dataclasses.dataclass(frozen=True)
class LeafMatch:
  """One target leaf and where it lives on disk."""

  path: Path
  disk: DiskPath
  leaf: Any  # Variable or array-like from the target


def stored_path(meta: ItemMetadata, path: Path, is_variable: bool) -> DiskPath | None:
  """The disk path of a target leaf, trying the raw flavour then the pure one."""
  keys = tuple(str(k) for k in path)
  candidates = [keys + (VALUE_KEY,), keys] if is_variable else [keys]
  for candidate in candidates:
    if candidate in meta.leaves:
      return candidate
  return None


def match_target(
    meta: ItemMetadata, target: Any, missing: MissingPolicy, extra: ExtraPolicy, exclude=nnx_tree.DEFAULT_EXCLUDE
) -> list[LeafMatch]:
  """Matches target leaves to stored leaves, raising on mismatch per policy."""
  matches, missing_paths = [], []
  for path, leaf in nnx_tree.flatten(target, exclude):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    disk = stored_path(meta, path, isinstance(leaf, nnx.Variable))
    if disk is None:
      if missing == 'keep' and _is_concrete(value):
        continue
      missing_paths.append(path_str(path))
      continue
    matches.append(LeafMatch(path, disk, leaf))
  used = {m.disk for m in matches}
  extra_paths = [] if extra == 'ignore' else ['/'.join(p) for p in meta.leaves if p not in used]
  if missing_paths or extra_paths:
    raise errors.StructureMismatchError(missing_paths, extra_paths, where=f'at {meta.directory}')
  return matches


def _is_concrete(value: Any) -> bool:
  return isinstance(value, jax.Array) or (hasattr(value, 'shape') and not isinstance(value, jax.ShapeDtypeStruct))


def _same_shape(match: LeafMatch, meta: ItemMetadata) -> bool:
  try:
    _check_shape(match, meta, match.leaf.get_value() if isinstance(match.leaf, nnx.Variable) else match.leaf)
  except errors.ShapeMismatchError:
    return False
  return True


def _check_shape(match: LeafMatch, meta: ItemMetadata, value: Any) -> None:
  info = meta.leaves[match.disk]
  requested = tuple(getattr(value, 'shape', ()))
  if jax.dtypes.issubdtype(getattr(value, 'dtype', None) or float, jax.dtypes.prng_key):
    return  # key arrays: Orbax stores key data; shape is checked on read
  if info.shape != requested:
    raise errors.ShapeMismatchError('/'.join(match.disk), info.shape, requested)


def restore_args_for(matches: list[LeafMatch], meta: ItemMetadata, default_sharding=None):
  """(item tree, restore_args tree) for Orbax's PyTree restore, keyed by disk path."""
  item, args = {}, {}
  for match in matches:
    value = match.leaf.get_value() if isinstance(match.leaf, nnx.Variable) else match.leaf
    if not hasattr(value, 'shape'):
      raise errors.OrbaxNNXError(
          f'Target leaf {path_str(match.path)} is a {type(value).__name__}; expected an array,'
          ' jax.ShapeDtypeStruct or Variable holding one.'
      )
    _check_shape(match, meta, value)
    where = path_str(match.path)
    sharding = (
        shardings.target_sharding(value, where)
        or meta.leaves[match.disk].saved_sharding()
        or default_sharding
        or shardings.default_sharding()
    )
    sds = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    restore_arg = ocp.checkpoint_utils.construct_restore_args({'x': sds})['x']
    nnx_tree.set_path(item, match.disk, sds)
    nnx_tree.set_path(args, match.disk, restore_arg)
  return item, args


def restore_target(
    impl: ocp.PyTreeCheckpointHandler,
    meta: ItemMetadata,
    target: Any,
    *,
    missing: MissingPolicy = 'error',
    extra: ExtraPolicy = 'error',
    default_sharding: jax.sharding.Sharding | None = None,
    exclude=nnx_tree.DEFAULT_EXCLUDE,
    rules: Sequence[tuple[str, str]] = (),
    scan_axis: Any = None,
    param_scan_axis: int = 1,
) -> Any:
  """Restores `target` (abstract state, Module, Optimizer, dict of these).

  When the stored tree matches the target path for path (either NNX flavour), Orbax
  reads it directly. Otherwise the layout is detected and a plan (renames, Linen <->
  NNX, stacking/unrolling layers) is evaluated lazily, per target shard.
  """
  if not rules:
    try:
      matches = match_target(meta, target, missing, extra, exclude)
    except errors.StructureMismatchError:
      matches = None
    if matches is not None and all(_same_shape(m, meta) for m in matches):
      item, restore_args = restore_args_for(matches, meta, default_sharding)
      partial = len(matches) != len(meta.leaves)
      restored = _orbax_restore(impl, meta, ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=partial))
      values = {m.path: nnx_tree.get_path(restored, m.disk) for m in matches}
      return nnx_tree.rebuild(target, values, exclude)
  return restore_planned(meta, target, missing=missing, extra=extra, default_sharding=default_sharding,
                         exclude=exclude, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis)


def _orbax_restore(impl: ocp.PyTreeCheckpointHandler, meta: ItemMetadata, args) -> Any:
  """Orbax's own restore; damaged array data becomes a CorruptCheckpointError."""
  try:
    return impl.restore(meta.directory, args=args)
  except errors.OrbaxNNXError:
    raise
  except Exception as e:  # Orbax and tensorstore raise plain Exceptions for damaged data too
    raise errors.CorruptCheckpointError(meta.directory, f'{type(e).__name__}: {str(e)[:500]}') from e


def restore_planned(meta: ItemMetadata, target: Any, *, missing: MissingPolicy = 'error',
                    extra: ExtraPolicy = 'error', default_sharding=None, exclude=nnx_tree.DEFAULT_EXCLUDE,
                    rules=(), scan_axis=None, param_scan_axis: int = 1) -> Any:
  """Restores `target` from any supported layout through a plan and lazy region reads."""
  from orbax_nnx.layout import detect  # local: these modules import this one's users
  from orbax_nnx.planner import build, target_leaves
  from orbax_nnx.reader import execute

  layout = detect(meta)
  targets = target_leaves(target, exclude, rules)
  the_plan = build(layout, targets, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis)
  check_plan(the_plan, target, missing, extra, exclude)
  values_by_target = {path: leaf for path, leaf in nnx_tree.flatten(target, exclude)}
  sharding_for = {}
  for path in the_plan.entries:
    leaf = values_by_target[path]
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    sharding_for[path] = (shardings.target_sharding(value, path_str(path)) or default_sharding
                          or shardings.default_sharding())
  values = execute(the_plan, sharding_for)
  return nnx_tree.rebuild(target, values, exclude)


def check_plan(the_plan, target: Any, missing: MissingPolicy, extra: ExtraPolicy, exclude) -> None:
  """Raises StructureMismatchError for missing/unused leaves the policies do not allow."""
  leaves = {path_str(path): leaf for path, leaf in nnx_tree.flatten(target, exclude)}
  absent = []
  for name in the_plan.missing:
    leaf = leaves[name]
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if missing == 'keep' and _is_concrete(value):
      continue
    absent.append(name)
  unused = the_plan.unused if extra == 'error' else []
  if absent or unused:
    raise errors.StructureMismatchError(
        absent, unused, where=f'at {the_plan.source.meta.directory} ({the_plan.source.kind} layout)')


def restore_untargeted(
    impl: ocp.PyTreeCheckpointHandler,
    meta: ItemMetadata,
    default_sharding: jax.sharding.Sharding | None = None,
) -> nnx.State:
  """Restores everything; Variable types come from our records when present."""
  item, restore_args, allocations = {}, {}, []
  for disk, info in meta.leaves.items():
    sharding = info.saved_sharding() or default_sharding or shardings.default_sharding()
    allocations.append(('/'.join(disk), info.shape, info.dtype, sharding))
    restore_args_leaf = ocp.checkpoint_utils.construct_restore_args(
        {'x': info.metadata}, {'x': sharding}
    )['x']
    nnx_tree.set_path(item, disk, info.metadata)
    nnx_tree.set_path(restore_args, disk, restore_args_leaf)
  budget.check_fits(meta.directory, allocations, what='restoring every stored array',
                    advice='restore into a target that shards the arrays over more devices or processes,'
                    ' or only a part of them (a partial target, orbax_nnx.load_params)')
  restored = _orbax_restore(impl, meta, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  flat: dict[Path, Any] = {}
  records = meta.records
  for disk in meta.leaves:
    value = nnx_tree.get_path(restored, disk)
    wrapped = disk[-1] == VALUE_KEY
    key = disk[:-1] if wrapped else disk
    record = records.get(key)
    if record is not None:
      flat[record.path] = nnx_tree.make_variable(record, value)
    elif wrapped:
      flat[key] = nnx.Variable(value)
    else:
      flat[disk] = value
  return nnx.from_flat_state(flat)
