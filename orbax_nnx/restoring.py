"""Restoring NNX targets from an Orbax PyTree item (same layout on disk).

Plans from metadata first: every target leaf is matched to a stored leaf (either
NNX flavour), shapes are checked and shardings chosen before Orbax reads a byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

from orbax_nnx import compat, errors, nnx_tree, shardings
from orbax_nnx.io import budget
from orbax_nnx.lazy_flax import nnx
from orbax_nnx.nnx_tree import VALUE_KEY, DiskPath, Path, path_str
from orbax_nnx.sources import untrusted
from orbax_nnx.sources.metadata import ItemMetadata

MissingPolicy = Literal['error', 'keep']
ExtraPolicy = Literal['error', 'ignore']


@dataclasses.dataclass(frozen=True)
class LeafMatch:
  """One target leaf and where it lives on disk."""

  path: Path
  disk: DiskPath
  leaf: Any  # Variable or array-like from the target


@dataclasses.dataclass(frozen=True)
class OrbaxOptions:
  """Orbax's own restore arguments, honoured where Orbax reads the target's tree as stored.

  Attributes:
    strict: False lets Orbax pad or truncate arrays whose stored shape differs.
    support_layout: restore onto each target leaf's `format` (device-local layout).
    restore_args: `RestoreArgs` by target path, used instead of the ones we build.
  """

  strict: bool = True
  support_layout: bool = False
  restore_args: Mapping[Path, Any] | None = None

  def refuse_in_plan(self, layout_kind: str) -> None:
    """Raises for options a layout conversion cannot honour."""
    given = [name for name, on in (('strict=False', not self.strict), ('support_layout=True', self.support_layout),
                                   ('restore_args', self.restore_args is not None)) if on]
    if given:
      raise errors.UnsupportedArgumentError(
          f'{", ".join(given)}: honoured only when the checkpoint stores the target\'s own tree, but this one'
          f' is converted on the way ({layout_kind} layout). Drop the argument, or convert the checkpoint'
          ' first (orbax-nnx convert) and restore the result.')


def stored_path(meta: ItemMetadata, path: Path, is_variable: bool) -> DiskPath | None:
  """The disk path of a target leaf, trying the raw flavour then the pure one."""
  keys = tuple(str(k) for k in path)
  candidates = [keys + (VALUE_KEY,), keys] if is_variable else [keys]
  for candidate in candidates:
    if candidate in meta.leaves:
      return candidate
  return None


def placeholder_paths(target: Any, exclude=nnx_tree.DEFAULT_EXCLUDE) -> list[tuple[Path, bool]]:
  """`(path, is_variable)` of target leaves set to `ocp.PLACEHOLDER` (not restored)."""
  return [(path, isinstance(leaf, nnx.Variable)) for path, leaf in nnx_tree.flatten(target, exclude, keep_empty=True)
          if nnx_tree.is_placeholder(leaf)]


def match_target(
    meta: ItemMetadata, target: Any, missing: MissingPolicy, extra: ExtraPolicy, exclude=nnx_tree.DEFAULT_EXCLUDE
) -> list[LeafMatch]:
  """Matches target leaves to stored leaves, raising on mismatch per policy."""
  matches, missing_paths = [], []
  for path, leaf in nnx_tree.flatten(target, exclude):
    value = nnx_tree.value_of(leaf)
    disk = stored_path(meta, path, isinstance(leaf, nnx.Variable))
    if disk is None:
      if missing == 'keep' and _is_concrete(value):
        continue
      missing_paths.append(path_str(path))
      continue
    matches.append(LeafMatch(path, disk, leaf))
  used = {m.disk for m in matches} | {stored_path(meta, p, v) for p, v in placeholder_paths(target, exclude)}
  extra_paths = [] if extra == 'ignore' else ['/'.join(p) for p in meta.leaves if p not in used]
  if missing_paths or extra_paths:
    raise errors.StructureMismatchError(missing_paths, extra_paths, where=f'at {meta.directory}')
  if not matches and meta.leaves:
    raise errors.StructureMismatchError(
        [path_str(p) for p, _ in nnx_tree.flatten(target, exclude)], [],
        where=f'at {meta.directory}: no target leaf is stored there, so nothing would be restored')
  return matches


def _is_concrete(value: Any) -> bool:
  return isinstance(value, jax.Array) or (hasattr(value, 'shape') and not isinstance(value, jax.ShapeDtypeStruct))


def _same_shape(match: LeafMatch, meta: ItemMetadata) -> bool:
  try:
    _check_shape(match, meta, nnx_tree.value_of(match.leaf))
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


def check_sharding(where: str, shape: tuple[int, ...], sharding: Any) -> None:
  """Raises ShardingError when `sharding` cannot lay out an array of `shape` (e.g. does not divide it)."""
  if not isinstance(sharding, jax.sharding.Sharding):
    return
  try:
    sharding.shard_shape(tuple(shape))
  except Exception as e:  # IndivisibleError, rank mismatch
    raise errors.ShardingError(
        f'{where}: the requested sharding {sharding} cannot lay out the stored shape {tuple(shape)}: {e}.'
        ' Give this leaf a sharding whose mesh axes divide its dimensions (or replicate it).') from e


def restore_args_for(matches: list[LeafMatch], meta: ItemMetadata, default_sharding=None,
                     orbax: OrbaxOptions = OrbaxOptions()):
  """(item tree, restore_args tree) for Orbax's PyTree restore, keyed by disk path."""
  item, args = {}, {}
  given = orbax.restore_args or {}
  for match in matches:
    value = nnx_tree.value_of(match.leaf)
    if not hasattr(value, 'shape'):
      raise errors.OrbaxNNXError(
          f'Target leaf {path_str(match.path)} is a {type(value).__name__}; expected an array,'
          ' jax.ShapeDtypeStruct or Variable holding one.'
      )
    user_arg = given.get(match.path)
    lenient = not orbax.strict or getattr(user_arg, 'global_shape', None) is not None or (
        user_arg is not None and not getattr(user_arg, 'strict', True))
    if not lenient:
      _check_shape(match, meta, value)
    where = path_str(match.path)
    if isinstance(value, np.ndarray):  # numpy in the target stays numpy, as in Orbax
      restore_arg = user_arg or ocp.RestoreArgs(restore_type=np.ndarray, dtype=value.dtype)
      nnx_tree.set_path(item, match.disk, value)
      nnx_tree.set_path(args, match.disk, restore_arg)
      continue
    sharding = (
        shardings.target_sharding(value, where)
        or meta.leaves[match.disk].saved_sharding()
        or default_sharding
        or shardings.default_sharding()
    )
    if orbax.strict and user_arg is None:
      check_sharding(where, value.shape, sharding)
    sds = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    placement = sharding
    if orbax.support_layout:
      placement = compat.get_sharding_or_format(value, support_format=True) or sharding
    restore_arg = user_arg or ocp.checkpoint_utils.construct_restore_args(
        {'x': sds}, {'x': placement}, strict=orbax.strict)['x']
    nnx_tree.set_path(item, match.disk, sds)
    nnx_tree.set_path(args, match.disk, restore_arg)
  return item, args


def _layer_axes_differ(match: LeafMatch, meta: ItemMetadata, names) -> bool:
  """Whether a stored leaf's recorded sharding names put its layer axis elsewhere than the target's do.

  The target's own tree (same paths, same shapes) restores as stored, as Orbax restores it; only when both
  sides name a layer axis and the names disagree is it planned (the layer axis then moves)."""
  record = meta.record_of(match.disk)
  stored = names.names_axis(record.metadata.get('out_sharding')) if record else None
  wanted = (names.names_axis(match.leaf.get_metadata().get('out_sharding'))
            if isinstance(match.leaf, nnx.Variable) else None)
  return stored is not None and wanted is not None and stored != wanted


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
    orbax: OrbaxOptions = OrbaxOptions(),
    memory_budget: int | None = None,
    layout: str | None = None,
    groups=None,
) -> Any:
  """Restores `target` (abstract state, Module, Optimizer, dict of these).

  When the stored tree matches the target path for path (either NNX flavour), Orbax
  reads it directly. Otherwise the layout is detected and a plan (renames, Linen <->
  NNX, stacking/unrolling layers) is evaluated lazily, per target shard.
  """
  if not rules and meta.format == 'orbax':
    from orbax_nnx.mapping.groups import group_names  # local: mapping builds on this module's users
    names = group_names(groups)
    try:
      matches = match_target(meta, target, missing, extra, exclude)
    except errors.StructureMismatchError:
      matches = None
    if matches is not None and (not orbax.strict or all(_same_shape(m, meta) for m in matches)) and not any(
        _layer_axes_differ(m, meta, names) for m in matches):
      item, restore_args = restore_args_for(matches, meta, default_sharding, orbax)
      # partial when we ask for less than the stored tree: leaves skipped by policy or placeholders,
      # or empty nodes (optax MaskedNode is stored as None)
      partial = len(matches) != len(meta.leaves) or meta.has_empty_nodes
      restored = orbax_restore(impl, meta, ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=partial))
      values = {m.path: nnx_tree.get_path(restored, m.disk) for m in matches}
      return nnx_tree.rebuild(target, values, exclude)
  return restore_planned(meta, target, missing=missing, extra=extra, default_sharding=default_sharding,
                         exclude=exclude, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis,
                         orbax=orbax, memory_budget=memory_budget, layout=layout, groups=groups)


# tensorstore / Orbax messages that mean the stored bytes or metadata are damaged or gone
_DAMAGE_MARKERS = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE', 'Error reading', 'Error opening', 'Error decoding',
                   'corrupt', 'Corrupt', 'checksum', 'Checksum', 'truncated', 'Truncated', 'Unexpected end',
                   'Failed to decode', 'decompress', 'No such file')


def looks_damaged(error: BaseException) -> bool:
  """Whether an exception from Orbax/tensorstore (or its causes) says the stored data is damaged."""
  return any(isinstance(e, (FileNotFoundError, EOFError)) or any(marker in f'{e}' for marker in _DAMAGE_MARKERS)
             for e in untrusted.causes(error))


@contextlib.contextmanager
def orbax_errors(directory, *, others_as_restore_error: bool = True):
  """Orbax's own reads: a permission error (local, or a store's 403) becomes NotACheckpointError, damaged array
  data CorruptCheckpointError, anything else RestoreError (or, for a plain restore, Orbax's own exception)."""
  try:
    yield
  except errors.OrbaxNNXError:
    raise
  except Exception as e:
    if untrusted.is_permission_error(e):
      raise errors.NotACheckpointError(directory, f'{untrusted.PERMISSION_ADVICE} ({str(e)[:300]})') from e
    if looks_damaged(e):
      raise untrusted.damaged(directory, f'{type(e).__name__}: {str(e)[:500]}', e) from e
    if not others_as_restore_error:
      raise
    raise errors.RestoreError(
        f'Orbax could not restore {directory}: {type(e).__name__}: {str(e)[:800]}. Its stored data'
        ' reads fine as far as we can tell; check what was asked of it (target shapes, dtypes, shardings,'
        ' restore_args).') from e


def orbax_restore(impl: ocp.PyTreeCheckpointHandler, meta: ItemMetadata, args) -> Any:
  """Orbax's own restore, its errors typed by `orbax_errors`."""
  with orbax_errors(meta.directory):
    return impl.restore(meta.directory, args=args)


def restore_planned(meta: ItemMetadata, target: Any, *, missing: MissingPolicy = 'error',
                    extra: ExtraPolicy = 'error', default_sharding=None, exclude=nnx_tree.DEFAULT_EXCLUDE,
                    rules=(), scan_axis=None, param_scan_axis: int = 1,
                    orbax: OrbaxOptions = OrbaxOptions(), memory_budget: int | None = None,
                    layout: str | None = None, groups=None) -> Any:
  """Restores `target` from any supported layout through a plan and lazy region reads.

  `memory_budget` bounds what is held besides the restored arrays (see `NNXRestore`); `layout` forces a
  preset and `groups` declares layer-group names (see `orbax_nnx.detect_layout`).
  """
  from orbax_nnx.io.reader import execute
  from orbax_nnx.io.source_arrays import SourceArrays
  from orbax_nnx.mapping.layout import detect  # local: these modules import this one's users
  from orbax_nnx.planning.planner import build, target_leaves

  found = detect(meta, layout=layout, groups=groups)
  orbax.refuse_in_plan(found.kind)
  targets = target_leaves(target, exclude)
  the_plan = build(found, targets, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis)
  check_plan(the_plan, target, missing, extra, exclude)
  values_by_target = {path: leaf for path, leaf in nnx_tree.flatten(target, exclude)}
  sharding_for = {}
  for path in the_plan.entries:
    leaf = values_by_target[path]
    value = nnx_tree.value_of(leaf)
    sharding_for[path] = (shardings.target_sharding(value, path_str(path)) or default_sharding
                          or shardings.default_sharding())
    check_sharding(path_str(path), value.shape, sharding_for[path])
  if memory_budget is None and found.kind == 'safetensors':
    # exact reads keep no chunks: host buffers in flight sized from what is read, as conversions size theirs
    # (337 MiB bf16 into a Llama: 0.51 -> 0.42 s and RSS growth 1.39 -> 1.13x the loaded bytes, vs 1 GiB)
    values = execute(the_plan, sharding_for,
                     inflight_bytes=budget.default_in_flight(the_plan.bytes_read(), writes=False))
  elif memory_budget is None:
    values = execute(the_plan, sharding_for)
  else:  # half for decoded chunks kept for other regions, half for host buffers in flight
    values = execute(the_plan, sharding_for, source=SourceArrays(meta, cache_bytes=memory_budget // 2),
                     inflight_bytes=max(1, memory_budget - memory_budget // 2))
  return nnx_tree.rebuild(target, values, exclude)


def check_plan(the_plan, target: Any, missing: MissingPolicy, extra: ExtraPolicy, exclude) -> None:
  """Raises StructureMismatchError for missing/unused leaves the policies do not allow."""
  leaves = {path_str(path): leaf for path, leaf in nnx_tree.flatten(target, exclude)}
  absent = []
  for name in the_plan.missing:
    if missing == 'keep' and _is_concrete(nnx_tree.value_of(leaves[name])):
      continue
    absent.append(name)
  skipped = {path_str(p) + suffix for p, _ in placeholder_paths(target, exclude) for suffix in ('', '/' + VALUE_KEY)}
  unused = [u for u in the_plan.unused if u not in skipped] if extra == 'error' else []
  if absent or unused:
    advice = None
    if missing == 'keep' and absent:
      advice = ("  missing='keep' keeps a target's own values, but these target leaves are abstract (no values to"
                ' keep): restore into a live model (an nnx.Module, or a state with arrays) for them, or fix the'
                " target" + (", and extra='ignore' skips unused checkpoint leaves." if unused else '.'))
    raise errors.StructureMismatchError(
        absent, unused, where=f'at {the_plan.source.meta.directory} ({the_plan.source.kind} layout)', advice=advice)
  if not the_plan.entries and leaves:
    raise errors.StructureMismatchError(
        sorted(leaves), [], where=f'at {the_plan.source.meta.directory}: no target leaf is stored there'
        f' ({the_plan.source.kind} layout), so nothing would be restored')


def _stored_placement(meta: ItemMetadata, default_sharding: jax.sharding.Sharding | None) -> dict:
  """Where an untargeted restore puts each stored leaf: its saved sharding (None: a host array)."""
  placed = {}
  for disk, info in meta.leaves.items():
    sharding = None
    if isinstance(info.metadata, ocp.metadata.ArrayMetadata) and info.metadata.sharding is not None:
      sharding = info.saved_sharding() or default_sharding or shardings.default_sharding()
    placed[disk] = sharding
  return placed


_RESTORABLE = (ocp.metadata.ArrayMetadata, ocp.metadata.ScalarMetadata, ocp.metadata.StringMetadata)


def check_untargeted_fits(meta: ItemMetadata, default_sharding: jax.sharding.Sharding | None = None,
                          placed: dict | None = None) -> None:
  """Raises before an untargeted restore (ours or plain Orbax's) that cannot work: CorruptCheckpointError for a
  leaf whose metadata holds no value, ResourceError when the stored shapes cannot fit.

  Every untargeted restore allocates by the shapes the metadata declares, which may be damaged or forged; an
  item need not carry our records for this check to run.
  """
  for disk, info in meta.leaves.items():
    if not isinstance(info.metadata, _RESTORABLE):  # e.g. `skip_deserialize` forged on an array leaf
      raise errors.CorruptCheckpointError(
          meta.directory, f'its stored leaf {"/".join(disk)!r} is marked as holding no value'
          f' ({type(info.metadata).__name__}), so restoring everything cannot give it back; restore into a'
          ' target that leaves it out')
  placed = _stored_placement(meta, default_sharding) if placed is None else placed
  budget.check_fits(meta.directory, [('/'.join(disk), info.shape, info.dtype, placed[disk])
                                     for disk, info in meta.leaves.items()],
                    what='restoring every stored array',
                    advice='restore into a target that shards the arrays over more devices or processes,'
                    ' or only a part of them (a partial target, orbax_nnx.load_params)')


def restore_untargeted(
    impl: ocp.PyTreeCheckpointHandler,
    meta: ItemMetadata,
    default_sharding: jax.sharding.Sharding | None = None,
) -> nnx.State:
  """Restores an NNX item we wrote, everything in it: Orbax reads it as stored (numpy stays
  numpy, dtypes kept), then our records turn leaves back into their Variable types."""
  item, restore_args = {}, {}
  placed = _stored_placement(meta, default_sharding)
  check_untargeted_fits(meta, default_sharding, placed)
  for disk, info in meta.leaves.items():
    restore_arg = ocp.checkpoint_utils.construct_restore_args({'x': info.metadata}, {'x': placed[disk]})['x']
    nnx_tree.set_path(item, disk, info.metadata)
    nnx_tree.set_path(restore_args, disk, restore_arg)
  restored = orbax_restore(impl, meta, ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                             partial_restore=meta.has_empty_nodes))
  flat: dict[Path, Any] = {}
  for disk in meta.leaves:
    value = nnx_tree.get_path(restored, disk)
    record = meta.record_of(disk)
    if record is not None:
      flat[record.path] = nnx_tree.make_variable(record, value)
    else:  # a plain leaf inside the NNX item (e.g. a step counter beside the model)
      flat[disk] = value
  return nnx.from_flat_state(flat)
