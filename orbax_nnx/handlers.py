"""`NNXCheckpointHandler`, its args `NNXSave` / `NNXRestore`, and `nnx_registry`.

The handler writes exactly what `ocp.StandardCheckpointer().save(dir, nnx.state(x))`
writes (plus our extras in Orbax custom metadata), so plain Orbax reads it, and it
reads both NNX flavours (`.../value`-wrapped and pure dict) into any NNX target.
Bytes move through Orbax's own PyTree machinery.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_nnx import compat, errors, nnx_tree, options, restoring, sizes, version
from orbax_nnx.io import operation
from orbax_nnx.lazy_flax import nnx
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import CUSTOM_KEY, is_legacy_item, read_item_metadata

PyTree = Any


@dataclasses.dataclass
class NNXSave(ocp.args.CheckpointArgs):
  """Save args: an `nnx.State`, Module, Optimizer, or nested dicts of these.

  Attributes:
    item: what to save.
    custom_metadata: JSON-able user metadata (a dict), stored beside ours.
    flavour: 'raw' writes `.../kernel/value` (the Flax guide format, default);
      'pure' writes `.../kernel` (the `nnx.to_pure_dict` format).
    exclude: an nnx Filter of Variables never saved (default: Cache, Intermediate).
    save_args: Orbax `SaveArgs` per leaf, a tree shaped like `item` (as for `StandardSave`).
    ocdbt_target_data_file_size: as for `PyTreeSave`.
  """

  item: PyTree = None
  custom_metadata: Any = None
  flavour: nnx_tree.Flavour = 'raw'
  exclude: Any = nnx_tree.DEFAULT_EXCLUDE
  save_args: PyTree = None
  ocdbt_target_data_file_size: int | None = None

  def __post_init__(self):
    errors.check_choice('flavour', self.flavour, ('raw', 'pure'))
    if self.custom_metadata is not None and not isinstance(self.custom_metadata, Mapping):
      raise errors.OptionError(f'custom_metadata must be a JSON-able dict, not {type(self.custom_metadata).__name__}.')


@dataclasses.dataclass
class NNXRestore(ocp.args.CheckpointArgs):
  """Restore args. Every field has a default so a no-args manager restore works.

  Attributes:
    target: None (returns an `nnx.State` rebuilt from our metadata), an abstract
      `nnx.State`, a live Module/Optimizer (updated in place and returned), a
      `(graphdef, abstract_state)` pair (returns the merged module), or a dict of these.
      Leaves set to `ocp.PLACEHOLDER` are skipped and come back as `ocp.PLACEHOLDER`.
    missing: 'error' (default) or 'keep': keep the target's own value for
      leaves absent from the checkpoint (target leaves must be concrete).
    extra: 'error' (default) or 'ignore': checkpoint leaves with no place in the target.
    default_sharding: for leaves whose target gives no sharding and whose saved
      sharding does not fit the current devices.
    exclude: Variables the target never restores (default: Cache, Intermediate).
    rules: `(pattern, replacement)` regex rules: a pattern fullmatches a stored path as
      `orbax-nnx inspect` prints it (or its canonical form, as `plan` prints it); the
      replacement names a target path, or maps target paths to views (`orbax_nnx.view`).
    scan_axis: the layer axis of stacked source arrays when shapes leave it
      ambiguous: an int, or `{regex over canonical paths: axis}`.
    param_scan_axis: for Linen/MaxText sources, the layer axis of Params when nothing else
      decides (MaxText: 1). From NNX sources an undecided axis is an error (pass scan_axis).
    strict: False lets Orbax pad or truncate arrays whose stored shape differs (as
      `StandardRestore(strict=False)`); only where the stored tree matches the target.
    support_layout: restore onto the target leaves' `format` (device-local layouts), as
      `StandardRestore(support_layout=True)`.
    restore_args: Orbax `RestoreArgs` per leaf, a tree shaped like `target` (as for
      `PyTreeRestore`); only where the stored tree matches the target.
    layout: force a preset by name instead of detecting it (`orbax-nnx presets`, e.g. 'linen-flax').
    groups: more layer-group names or regexes beside the built-in ones.
    memory_budget: bytes (an int, or a string such as '512MiB' or '2GB') a converted (planned)
      restore holds besides the restored arrays: half for decoded chunks kept for other regions (at least one chunk), half for host
      buffers in flight. None: room for two of the largest stored arrays and 1 GiB in flight.
    item: Orbax's `PyTreeRestore` field, for its older call `ocp.Checkpointer(handler).restore(path, item=...,
      restore_args=..., transforms=...)` (which builds these args): the restore is then exactly that
      `PyTreeRestore` (with `restore_args`, `transforms`, and `extra='ignore'` as `partial_restore`); no other
      field may be set with it. Otherwise use `target`.
    transforms: with `item`, as `PyTreeRestore(transforms=)`.

  When the stored layout differs from the target (Linen train state, MaxText,
  other NNX flavour, stacked vs unrolled layers), the restore goes through a plan
  evaluated lazily per target shard; see `orbax_nnx.plan`.
  """

  target: PyTree = None
  missing: restoring.MissingPolicy = 'error'
  extra: restoring.ExtraPolicy = 'error'
  default_sharding: jax.sharding.Sharding | None = None
  exclude: Any = nnx_tree.DEFAULT_EXCLUDE
  rules: Sequence[tuple[str, str]] = ()
  scan_axis: Any = None
  param_scan_axis: int = 1
  strict: bool = True
  support_layout: bool = False
  restore_args: PyTree = None
  memory_budget: int | str | None = None
  layout: str | None = None
  groups: Sequence[str] = ()
  item: PyTree = None
  transforms: Any = None

  def __post_init__(self):
    self.memory_budget = sizes.parse_bytes(self.memory_budget, 'memory_budget')
    errors.check_choice('missing', self.missing, ('error', 'keep'))
    errors.check_choice('extra', self.extra, ('error', 'ignore'))
    errors.check_choice('strict', self.strict, (True, False))
    errors.check_choice('support_layout', self.support_layout, (True, False))
    if self.default_sharding is not None and not isinstance(self.default_sharding, jax.sharding.Sharding):
      raise errors.OptionError(f'default_sharding must be a jax.sharding.Sharding, not {self.default_sharding!r}.')
    mapping = options.Mapping(rules=self.rules, layout=self.layout, groups=self.groups, scan_axis=self.scan_axis,
                              param_scan_axis=self.param_scan_axis)  # validated where `Mapping` is
    self.rules, self.groups, self.scan_axis = mapping.rules, mapping.groups, mapping.scan_axis
    if self.item is not None or self.transforms is not None:
      given = [f.name for f in dataclasses.fields(self) if f.name not in _PYTREE_RESTORE_FIELDS
               and not _is_default(getattr(self, f.name), f.default)]
      if given:
        raise errors.OptionError(
            f'NNXRestore(item=..., transforms=...) is Orbax\'s PyTreeRestore, restored as it is; it takes no'
            f' {", ".join(given)}: pass target= instead of item= for those.')

  def as_pytree_restore(self) -> ocp.args.PyTreeRestore | None:
    """The `PyTreeRestore` these args are when given Orbax's `item`/`transforms` (None otherwise)."""
    if self.item is None and self.transforms is None:
      return None
    return ocp.args.PyTreeRestore(item=self.item, restore_args=self.restore_args, transforms=self.transforms,
                                  partial_restore=self.extra == 'ignore')


_PYTREE_RESTORE_FIELDS = ('item', 'transforms', 'restore_args', 'extra')  # what NNXRestore shares with PyTreeRestore


def _is_default(value: Any, default: Any) -> bool:
  """Whether a field still has its default (None, a string, a number, a tuple); never compares arrays."""
  if value is default:
    return True
  if not isinstance(default, (str, int, float, tuple)) or not isinstance(value, (str, int, float, tuple, list)):
    return False
  return tuple(value) == default if isinstance(value, list) else value == default


class _TypestrDescriptor:
  """`typestr()` on the class: our stable name; on an instance: the name for what it last wrote.

  Orbax records each item's handler typestr in the step metadata, and a no-args restore (in
  plain Orbax too) picks the handler by it. A plain item saved through `nnx_registry` records
  the stock handler it went through, so plain Orbax restores it without orbax_nnx.
  """

  def __get__(self, obj, cls):
    if obj is None:
      return lambda: TYPESTR
    return obj._typestr_for_item  # pylint: disable=protected-access


TYPESTR = 'orbax_nnx.NNXCheckpointHandler'
_STOCK_TYPESTRS = {
    'standard': ocp.StandardCheckpointHandler.typestr(),
    'pytree': ocp.PyTreeCheckpointHandler.typestr(),
}


def _item_name(directory: epath.Path) -> str:
  """The item an item directory holds (Orbax may write it under a temporary name first)."""
  return directory.name.split('.orbax-checkpoint-tmp')[0]


class NNXCheckpointHandler(ocp.AsyncCheckpointHandler):
  """Orbax handler for Flax NNX objects, and exactly Orbax for any other PyTree.

  Accepts `NNXSave`/`NNXRestore`, and also `StandardSave`/`StandardRestore` and
  `PyTreeSave`/`PyTreeRestore`, so one handler serves an item whatever args the
  caller uses. A tree with no NNX object in it (and a checkpoint we did not write as
  NNX) goes to Orbax's own Standard/PyTree handler untouched.

  Args:
    **options: the keyword options of `ocp.StandardCheckpointHandler` or `ocp.PyTreeCheckpointHandler`
      (e.g. `use_ocdbt=False`, `use_zarr3=True`, `type_handler_registry=...`), so the handler drops in for
      either.
  """

  typestr = _TypestrDescriptor()

  def __init__(self, **options: Any):
    """A handler for one item of one CheckpointManager (Orbax keeps one per item).

    Args:
      **options: the keyword options of `ocp.StandardCheckpointHandler` or `ocp.PyTreeCheckpointHandler`.

    Raises:
      TypeError: an option neither of them takes (named), as Orbax's own handlers raise it.
    """
    compat.check_handler_options(options)
    self._options = options
    self._standard: ocp.StandardCheckpointHandler | None = None
    self._saved_kinds: dict[str, str] = {}  # item name -> 'nnx' | 'standard' | 'pytree'
    self._last_kind = 'nnx'

  def _typestr_for_item(self) -> str:
    item = compat.composite_item_in_flight()
    kind = self._saved_kinds.get(item, 'nnx') if item is not None else self._last_kind
    return _STOCK_TYPESTRS.get(kind, TYPESTR)

  def _note_save(self, directory: epath.Path, kind: str) -> None:
    self._saved_kinds[_item_name(epath.Path(directory))] = kind
    self._last_kind = kind

  @property
  def _std(self) -> ocp.StandardCheckpointHandler:
    if self._standard is None:  # created lazily: a closed handler can be reused
      self._standard = compat.standard_handler(self._options)
    return self._standard

  @property
  def _pytree(self) -> ocp.PyTreeCheckpointHandler:
    return self._std._impl  # pylint: disable=protected-access

  # -- save -------------------------------------------------------------------

  async def async_save(self, directory: epath.Path, item: Any = None, save_args: Any = None,
                       args: ocp.args.CheckpointArgs | None = None):
    """Saves `args`; Orbax's older call form `async_save(directory, item, save_args)` is honoured as
    `args=PyTreeSave(item, save_args)`, as Orbax's own PyTree handler does."""
    args = _legacy_save_args(item, save_args, args)
    directory = epath.Path(directory)  # (Orbax's handlers need an epath.Path; a pathlib one fails deep inside)
    if isinstance(args, NNXSave) and not nnx_tree.contains_nnx(args.item):
      # no NNX object in it (as `ocp.Checkpointer(handler).save(path, tree)` builds NNXSave): plain, as Orbax
      args = ocp.args.PyTreeSave(item=args.item, save_args=args.save_args, custom_metadata=args.custom_metadata,
                                 ocdbt_target_data_file_size=args.ocdbt_target_data_file_size)
    if isinstance(args, NNXSave):
      return await self._async_save_nnx(directory, args)
    if isinstance(args, ocp.args.StandardSave):
      if nnx_tree.contains_nnx(args.item):
        return await self._async_save_nnx(directory, NNXSave(
            args.item, custom_metadata=args.custom_metadata, save_args=args.save_args))
      self._note_save(directory, 'standard')
      return await self._std.async_save(directory, args=args)
    if isinstance(args, ocp.args.PyTreeSave):
      if nnx_tree.contains_nnx(args.item):
        return await self._async_save_nnx(directory, NNXSave(
            args.item, custom_metadata=args.custom_metadata, save_args=args.save_args,
            ocdbt_target_data_file_size=args.ocdbt_target_data_file_size))
      self._note_save(directory, 'pytree')
      return await self._pytree.async_save(directory, args=args)
    raise TypeError(f'NNXCheckpointHandler cannot save with {type(args).__name__}.')

  async def _async_save_nnx(self, directory: epath.Path, args: NNXSave):
    tree, ours = to_save_tree(args.item, args.flavour, args.exclude)
    save_args = None
    if args.save_args is not None:
      save_args = _disk_tree(args.item, args.save_args, args.flavour, args.exclude, 'save_args', ocp.SaveArgs)
    self._note_save(directory, 'nnx')
    return await self._pytree.async_save(directory, args=ocp.args.PyTreeSave(
        item=tree, save_args=save_args, custom_metadata=_merge_custom(args.custom_metadata, ours),
        ocdbt_target_data_file_size=args.ocdbt_target_data_file_size))

  def save(self, directory: epath.Path, item: Any = None, save_args: Any = None,
           args: ocp.args.CheckpointArgs | None = None) -> None:
    async def run():
      futures = await self.async_save(directory, item, save_args, args)
      for f in futures or ():
        f.result()

    compat.run_sync(run())

  # -- restore ----------------------------------------------------------------

  @listing.looking_once
  @operation.moves_bytes
  def restore(self, directory: epath.Path, item: Any = None, restore_args: Any = None, transforms: Any = None,
              transforms_default_to_original: bool = True, legacy_transform_fn: Any = None,
              args: ocp.args.CheckpointArgs | None = None) -> Any:
    """Restores `args`; Orbax's older call form `restore(directory, item, restore_args, ...)` is honoured as
    `args=PyTreeRestore(item, restore_args, ...)`, as Orbax's own PyTree handler does."""
    directory = epath.Path(directory)
    if isinstance(item, ocp.args.CheckpointArgs) and args is None:
      item, args = None, item  # restore(directory, args) positionally
    if args is None and (item is not None or restore_args is not None or transforms is not None or
                         legacy_transform_fn is not None):
      args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, transforms=transforms,
                                    transforms_default_to_original=transforms_default_to_original,
                                    legacy_transform_fn=legacy_transform_fn)
    if args is None:
      args = NNXRestore()
    if isinstance(args, NNXRestore):
      args = args.as_pytree_restore() or args
    if isinstance(args, NNXRestore):
      return self._restore_nnx(directory, args)
    # an untargeted restore reads the item's metadata once: whether it is ours, and whether it fits; an item in
    # Orbax's older format (no _METADATA) is plain, restored by Orbax as it is
    untargeted = isinstance(args, (ocp.args.StandardRestore, ocp.args.PyTreeRestore)) and args.item is None
    if untargeted and is_legacy_item(directory, self._pytree):
      untargeted = False
    meta = read_item_metadata(directory, self._pytree) if untargeted else None

    def as_nnx(nnx_args: NNXRestore) -> Any:
      return self.restore_item(meta if meta is not None else read_item_metadata(directory, self._pytree), nnx_args)

    if isinstance(args, ocp.args.StandardRestore):
      if nnx_tree.contains_nnx(args.item) or (meta is not None and meta.ours):
        return as_nnx(NNXRestore(target=args.item, default_sharding=args.fallback_sharding, strict=args.strict,
                                 support_layout=args.support_layout))
      return self._standard_restore(directory, meta, args)
    if isinstance(args, ocp.args.PyTreeRestore):
      nnx_item = nnx_tree.contains_nnx(args.item) or (meta is not None and bool(meta.ours))
      if not nnx_item:
        _check_plain_untargeted(meta)
        return self._pytree.restore(directory, args=args)
      # Orbax's empty `transforms` restores what the item names and drops the rest: `extra='ignore'`
      empty_transforms = args.transforms == {} and args.item is not None
      partial = args.partial_restore or empty_transforms
      for name in ('transforms', 'legacy_transform_fn'):
        if getattr(args, name) is not None and not (name == 'transforms' and empty_transforms):
          raise errors.UnsupportedArgumentError(
              f'PyTreeRestore({name}=...) is not supported for NNX items: pass rules=[(pattern, replacement)]'
              ' to orbax_nnx.NNXRestore or orbax_nnx.restore, which also stack and unroll layers.')
      if args.item is None and args.restore_args is not None:
        raise errors.UnsupportedArgumentError(
            'PyTreeRestore(restore_args=...) needs item= for an NNX checkpoint: give the target whose'
            ' leaves the restore_args describe.')
      return as_nnx(NNXRestore(target=args.item, extra='ignore' if partial else 'error',
                               restore_args=args.restore_args))
    raise TypeError(f'NNXCheckpointHandler cannot restore with {type(args).__name__}.')

  def _restore_nnx(self, directory: epath.Path, args: NNXRestore) -> Any:
    return self.restore_item(read_item_metadata(directory, self._pytree), args)

  def restore_item(self, meta, args: NNXRestore) -> Any:
    """Restores from already-read item metadata (used by `orbax_nnx.restore`)."""
    target = args.target
    if target is None:
      if meta.format != 'orbax':
        raise errors.OptionError(f'{meta.directory} is a {meta.format} checkpoint: restoring it needs a target'
                                 ' (an abstract NNX model or state) and usually rules=...; see `orbax-nnx inspect`.')
      if not meta.ours:  # not an NNX item we wrote: exactly what Orbax returns
        with restoring.orbax_errors(meta.directory, others_as_restore_error=False):
          return self._standard_restore(meta.directory, meta, ocp.args.StandardRestore(
              fallback_sharding=args.default_sharding))
      return restoring.restore_untargeted(self._pytree, meta, args.default_sharding)
    graphdef = None
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], nnx.GraphDef):
      graphdef, target = target
    restore_args = None
    if args.restore_args is not None:
      restore_args = {path: leaf for path, leaf in _flat_args(args.restore_args, args.exclude, 'restore_args',
                                                             ocp.RestoreArgs)}
    restored = restoring.restore_target(
        self._pytree, meta, target, missing=args.missing, extra=args.extra,
        default_sharding=args.default_sharding, exclude=args.exclude, rules=tuple(args.rules),
        scan_axis=args.scan_axis, param_scan_axis=args.param_scan_axis,
        orbax=restoring.OrbaxOptions(strict=args.strict, support_layout=args.support_layout,
                                     restore_args=restore_args),
        memory_budget=args.memory_budget, layout=args.layout, groups=args.groups,
    )
    return nnx.merge(graphdef, restored) if graphdef is not None else restored

  def _standard_restore(self, directory: epath.Path, meta, args: ocp.args.StandardRestore) -> Any:
    """StandardCheckpointHandler's restore of a plain item (`meta`: its metadata when untargeted). Untargeted,
    the restore args come from the leaves already read, by Orbax's own function: Orbax's `metadata()` opens
    every array (measured 2.5 s of a 10,001-leaf untargeted restore)."""
    known = _check_plain_untargeted(meta, args.fallback_sharding)
    if args.item is not None or not known or not args.strict or 'pytree_metadata_options' in self._options:
      return self._std.restore(directory, args=args)
    restore_args = compat.standard_restore_args(None, meta.leaves.tree_metadata, args.fallback_sharding,
                                                args.support_layout)
    return self._pytree.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  # -- the rest ---------------------------------------------------------------

  @listing.looking_once
  def metadata(self, directory: epath.Path):
    return self._pytree.metadata(directory)

  def finalize(self, directory: epath.Path) -> None:
    self._pytree.finalize(epath.Path(directory))

  def close(self) -> None:
    if self._standard is not None:
      self._standard.close()
      self._standard = None


ocp.args.register_with_handler(NNXCheckpointHandler, for_save=True)(NNXSave)
ocp.args.register_with_handler(NNXCheckpointHandler, for_restore=True)(NNXRestore)


def _flat_args(tree: PyTree, exclude, name: str, kind: type):
  """`(path, Orbax args)` pairs of a `save_args`/`restore_args` tree shaped like the item."""
  for path, leaf in nnx_tree.flatten(tree, exclude):
    value = nnx_tree.value_of(leaf)
    if not isinstance(value, kind):
      raise errors.OptionError(f'{name} at {nnx_tree.path_str(path)} is a {type(value).__name__}, expected'
                               f' {kind.__name__} (a tree shaped like the item).')
    yield path, value


def _disk_tree(item: PyTree, args_tree: PyTree, flavour, exclude, name: str, kind: type) -> dict:
  """An Orbax args tree keyed like the tree we write for `item` (defaults where not given)."""
  given = dict(_flat_args(args_tree, exclude, name, kind))
  known = set()
  out: dict = {}
  for path, leaf in nnx_tree.flatten(item, exclude, keep_empty=True):
    known.add(path)
    disk = nnx_tree.disk_path(path, isinstance(leaf, nnx.Variable), flavour)
    empty = nnx_tree.is_empty(leaf)  # no data: Orbax wants the same empty node in both trees
    value = nnx_tree.value_of(leaf) if empty else given.get(path, kind())
    nnx_tree.set_path(out, disk, value)
  unknown = sorted(nnx_tree.path_str(p) for p in set(given) - known)
  if unknown:
    raise errors.StructureMismatchError([], unknown, where=f'{name} (paths that are not in the item)')
  return out


def _drop_false_warnings(record) -> bool:
  """absl filter: Orbax warns that items "could not be restored" when the registry routes them by
  args type alone (item None), as `nnx_registry` does; those items do restore, so the warning goes."""
  if 'was found in the checkpoint, but could not' not in str(record.msg):
    return True
  registry = compat.composite_registry_in_flight(depth=24)
  try:
    routed = registry is not None and isinstance(registry.get(None, ocp.args.StandardRestore), NNXCheckpointHandler)
  except Exception:  # no general entry
    routed = False
  return not routed


logging.getLogger('absl').addFilter(_drop_false_warnings)


def _check_plain_untargeted(meta, default_sharding: jax.sharding.Sharding | None = None) -> bool:
  """An untargeted plain restore (`meta`: its item's metadata; None when targeted) allocates by stored shapes:
  they must fit, or a forged `.zarray` would abort the process. Returns whether its leaves were read."""
  if meta is None:
    return False
  try:
    len(meta.leaves)  # read now: what we cannot read (Orbax's older formats) is left to Orbax
  except errors.NotACheckpointError:
    return False
  restoring.check_untargeted_fits(meta, default_sharding)
  return hasattr(meta.leaves, 'tree_metadata')


def _legacy_save_args(item: Any, save_args: Any, args: Any) -> ocp.args.CheckpointArgs:
  """The args of a save called in any of Orbax's forms: `args=`, `(directory, args)`, or the older
  `(directory, item, save_args)`."""
  if isinstance(item, ocp.args.CheckpointArgs) and args is None:
    return item
  if args is None:
    if item is None:
      raise errors.OptionError('save needs args= (e.g. orbax_nnx.NNXSave(state)) or an item.')
    return ocp.args.PyTreeSave(item=item, save_args=save_args)
  if item is not None or save_args is not None:
    raise errors.OptionError('save takes args= or the older (item, save_args), not both.')
  return args


def to_save_tree(item: PyTree, flavour: nnx_tree.Flavour = 'raw', exclude=nnx_tree.DEFAULT_EXCLUDE):
  """(nested dict of arrays as Orbax will write it, our custom metadata block)."""
  tree: dict = {}
  records = []
  names: dict[str, Any] = {}
  for path, leaf in nnx_tree.flatten(item, exclude, keep_empty=True):
    is_var = isinstance(leaf, nnx.Variable)
    value = leaf.get_value() if is_var else leaf
    if is_var:
      records.append(nnx_tree.record_for(path, leaf).to_json())
    disk = nnx_tree.disk_path(path, is_var, flavour)
    bad = [k for k in disk if '/' in k or k in ('', '.', '..')]
    if bad:
      raise errors.OrbaxNNXError(f'Cannot save {nnx_tree.path_str(path)!r}: key {bad[0]!r} is not a valid'
                                 ' checkpoint key (no "/", ".", ".." or empty keys); rename it.')
    if getattr(value, 'size', 1) == 0:
      raise errors.OrbaxNNXError(f'Cannot save {nnx_tree.path_str(path)!r}: it has zero size {value.shape}, which'
                                 ' Orbax cannot store; drop it from the item or give it at least one element.')
    if not disk:
      raise errors.OrbaxNNXError('Cannot save a single Variable or array as an item; wrap it in a dict.')
    name = '.'.join(disk)  # Orbax stores each array under its keys joined by '.'
    if name in names:
      raise errors.OrbaxNNXError(
          f'Cannot save {nnx_tree.path_str(path)!r} and {nnx_tree.path_str(names[name])!r}: Orbax stores both as'
          f' {name!r}, so one would overwrite the other; rename one of them.')
    names[name] = path
    nnx_tree.set_path(tree, disk, value)
  ours = {'version': version.__version__, 'flavour': flavour, 'variables': records}
  return tree, ours


def _merge_custom(user: Any, ours: Mapping[str, Any]) -> dict:
  if user is None:
    return {CUSTOM_KEY: dict(ours)}
  if not isinstance(user, Mapping):
    raise errors.OrbaxNNXError('custom_metadata must be a JSON-able dict for NNX items.')
  if CUSTOM_KEY in user:
    raise errors.OrbaxNNXError(f'custom_metadata key {CUSTOM_KEY!r} is reserved by orbax_nnx.')
  return {**user, CUSTOM_KEY: dict(ours)}


class _FreshHandlerRegistry(ocp.handlers.DefaultCheckpointHandlerRegistry):
  """A registry that hands each copy (each CheckpointManager) its own handler.

  CompositeCheckpointHandler copies the registry it is given and later closes
  the handlers it holds; a fresh NNXCheckpointHandler per copy keeps managers
  independent of one another.
  """

  def get_all_entries(self):
    fresh = NNXCheckpointHandler()
    return {
        key: fresh if isinstance(handler, NNXCheckpointHandler) else handler
        for key, handler in super().get_all_entries().items()
    }


def _build_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = _FreshHandlerRegistry()
  add_to_registry(registry)
  return registry


def add_to_registry(registry, item: str | None = None, handler: NNXCheckpointHandler | None = None) -> None:
  """Routes NNX, Standard and PyTree save/restore args of `item` (None: any item) to one handler.

  Use it to add NNX support to a registry you build yourself:

      registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
      orbax_nnx.add_to_registry(registry)          # or for one item: item='model'
      registry.add('metrics', ocp.args.JsonSave)   # your own entries

  Args:
    registry: an Orbax `CheckpointHandlerRegistry` (e.g. `DefaultCheckpointHandlerRegistry`).
    item: the item name to route, or None for every item.
    handler: the handler to route to (default: a new `NNXCheckpointHandler`).

  Raises:
    ValueError: from Orbax, when the registry already routes one of these args for `item`.
  """
  handler = handler or NNXCheckpointHandler()
  for args_type in (NNXSave, NNXRestore, ocp.args.StandardSave, ocp.args.StandardRestore,
                    ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
    registry.add(item, args_type, handler)


nnx_registry = _build_registry()
