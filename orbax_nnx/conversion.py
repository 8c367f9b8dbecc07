"""On-disk conversion between layouts: streaming, atomic, never touching the source.

    orbax_nnx.convert(src, dst, to='auto', scan_layers=None, ...)

Plans from metadata, then streams: each target array is read lazily (per region, each
stored chunk decoded once) and written by Orbax as soon as it is produced, so memory is
bounded by `memory_budget` (and the largest stored chunk), not by the checkpoint. DST is
written by Orbax's atomic commit (tmp dir + rename). Our custom metadata in DST records
the source layout, the layer axes and the library version, so converting back needs no
flags and reproduces the source bit-exactly.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_nnx import errors, nnx_tree, options, sizes, version
from orbax_nnx.io import budget, operation
from orbax_nnx.io.destination import check_destination
from orbax_nnx.io.reader import layer_of
from orbax_nnx.io.source_arrays import SourceArrays
from orbax_nnx.io.writer import (
  MAX_BATCH_BYTES,
  MIN_WRITE_BLOCK_BYTES,
  LazyArray,
  WriteSession,
  layer_chunk_args,
  lockstep_align,
  streaming_pytree_handler,
  unit_aligned,
)
from orbax_nnx.mapping.layout import Layout, detect
from orbax_nnx.mapping.layout import linen_style as choose_linen_style
from orbax_nnx.planning.expressions import Cast, LoraMerge, cast, reads
from orbax_nnx.planning.planner import Plan, build
from orbax_nnx.planning.targets import LayoutTarget, layout_target, model_target
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import CUSTOM_KEY, ItemMetadata, read_item_metadata, resolve_item
from orbax_nnx.sources.zarr_headers import storage_format

OCDBT_FILE_BYTES = 64 * 2**20  # OCDBT buffers a data file in memory until it is this big


@dataclasses.dataclass
class ConvertReport:
  """What a conversion did.

  Attributes:
    src: the source item.
    dst: the output.
    source_kind: the source's layout kind.
    framework: what was written ('nnx', 'linen', 'safetensors').
    leaves: arrays written.
    bytes_read: stored bytes read.
    bytes_written: bytes written.
    seconds: wall time.
    peak_rss_bytes: this process's peak resident memory so far.
    in_flight_bytes: the bound on converted arrays in flight (`memory_budget`'s half, or the default sized
      from what was read: `orbax_nnx.io.budget.default_in_flight`); 0 where not reported.
    cache_bytes: the bound on decoded source chunks kept for other regions; 0 where not reported.
  """

  src: str
  dst: str
  source_kind: str
  framework: str
  leaves: int
  bytes_read: int
  bytes_written: int
  seconds: float
  peak_rss_bytes: int
  in_flight_bytes: int = 0
  cache_bytes: int = 0

  def summary(self) -> str:
    held = (f', held {self.in_flight_bytes / 2**20:.0f} MiB in flight + {self.cache_bytes / 2**20:.0f} MiB of'
            ' decoded chunks at most' if self.in_flight_bytes else '')
    return (f'converted {self.src} ({self.source_kind}) -> {self.dst} ({self.framework}): {self.leaves} leaves,'
            f' read {self.bytes_read / 2**20:.1f} MiB, wrote {self.bytes_written / 2**20:.1f} MiB,'
            f' {self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB{held}')


def _default_sharding(leaf) -> jax.sharding.Sharding:
  if jax.process_count() == 1:
    return _single_device_sharding(jax.local_devices()[0])
  # every process writes its share: split the first axis the device count divides
  mesh = jax.sharding.Mesh(jax.devices(), ('x',))
  n = jax.device_count()
  spec = [None] * len(leaf.shape)
  for axis, size in enumerate(leaf.shape):
    if size % n == 0:
      spec[axis] = 'x'
      break
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


@functools.lru_cache(maxsize=8)
def _single_device_sharding(device) -> jax.sharding.Sharding:
  """One sharding object for every leaf of a single-process write (jax caches per sharding object)."""
  return jax.sharding.SingleDeviceSharding(device)


def _reverse_defaults(layout: Layout) -> dict[str, Any]:
  """Flags recorded by a previous conversion, to convert straight back."""
  record = layout.meta.ours.get('conversion') if layout.meta.ours else None
  if not isinstance(record, Mapping):
    return {}
  out = {'to': record.get('from_framework')}
  if record.get('scan_layers') is not None:
    out['scan_layers'] = not record['scan_layers']
  return out


def check_conversion_options(*, to, scan_layers, flavour, include, lora) -> None:
  """Raises OptionError for any conversion option outside its accepted values."""
  errors.check_choice('to', to, ('auto', 'nnx', 'linen'))
  errors.check_choice('scan_layers', scan_layers, (None, True, False))
  errors.check_choice('flavour', flavour, ('raw', 'pure'))
  errors.check_choice('include', include, ('all', 'params'))
  errors.check_choice('lora', lora, (None, 'only', 'merge'))


def plan_conversion(src_item: epath.Path, *, to: str = 'auto', scan_layers: bool | None = None,
                    flavour: str = 'raw', include: str = 'all', dtype: Any = None, lora: str | None = None,
                    target: Any = None, mapping: options.Mapping = options.Mapping(),
                    linen: options.LinenOutput = options.LinenOutput()) -> tuple[Layout, LayoutTarget, Plan, dict]:
  """Layout, target and plan of a conversion (metadata only).

  `target` (an NNX model or abstract state) replaces the layout-derived target: the result is
  that model's checkpoint, mapped from the source by `mapping.rules` (e.g. Hugging Face weights). The Linen
  style is decided by `orbax_nnx.mapping.layout.linen_style` (`linen.linen_style` > `linen.template`'s structure > the
  source's record); a Linen tree that differs from `linen.template` is a StructureMismatchError.
  """
  check_conversion_options(to=to, scan_layers=scan_layers, flavour=flavour, include=include, lora=lora)
  rules, scan_axis, param_scan_axis = mapping.rules, mapping.scan_axis, mapping.param_scan_axis
  template = linen.template
  source = detect(read_item_metadata(src_item), layout=mapping.layout, groups=mapping.groups)
  if target is None and source.kind == 'safetensors':
    raise errors.OptionError(f'{src_item} is a safetensors checkpoint: it converts into a model. Pass target= (an'
                             ' abstract NNX model) and rules= (e.g. orbax_nnx.llama.hf_rules(cfg)).')
  if target is not None:
    if to == 'linen' or scan_layers is not None or linen.given:
      raise errors.OptionError('target= writes the target model\'s own NNX tree: to=, scan_layers= and the Linen'
                               ' options do not apply (build the model scanned or unrolled instead).')
    model = model_target(source, target, flavour=flavour, include=include, dtype=dtype)
    the_plan = build(source, model.leaves, rules=rules, scan_axis=scan_axis, param_scan_axis=param_scan_axis)
    if the_plan.missing:
      raise errors.StructureMismatchError(the_plan.missing, [], where=f'at {src_item}')
    if lora is not None:
      the_plan = apply_lora(the_plan, model, lora)
    return source, model, the_plan, {'to': 'nnx', 'scan_layers': None}
  reverse = _reverse_defaults(source)
  if to == 'auto':  # convert back to the original layout when DST records one
    to = reverse.get('to') or ('linen' if source.framework == 'nnx' else 'nnx')
    if scan_layers is None and include == 'all':
      scan_layers = reverse.get('scan_layers')
  record = source.meta.ours.get('conversion') if source.meta.ours else None
  original = record if isinstance(record, Mapping) and record.get('from_framework') == to else None
  structure = template_structure(template) if template is not None else None
  template_paths = structure['leaves'] if structure is not None else []
  style = choose_linen_style(linen.linen_style, template_paths, source)
  target = layout_target(source, to=to, scan_layers=scan_layers, scan_axis=scan_axis,
                         param_scan_axis=param_scan_axis, flavour=flavour, include=include,
                         original=original if include == 'all' else None, dtype=dtype,
                         linen_params='single' if style == 'flax' else 'double')
  if template is not None and to == 'linen':
    written = {'/'.join(target.disk[leaf.path]) for leaf in target.leaves}
    wanted = set(template_paths)
    if written != wanted:
      raise errors.StructureMismatchError(
          sorted(wanted - written), sorted(written - wanted),
          where=f'written from {src_item} in the {style} Linen style (as the template)',
          advice="  The converted tree must be the template's: pass linen_style= if the style was guessed wrong,"
          ' or a template that matches the model and optimizer of this checkpoint.')
  axes = target.planner_axes()
  the_plan = build(source, target.leaves, rules=rules, scan_axis=axes or scan_axis,
                   param_scan_axis=param_scan_axis)
  if the_plan.missing:
    raise errors.StructureMismatchError(the_plan.missing, [], where=f'at {src_item}')
  if lora is not None:
    the_plan = apply_lora(the_plan, target, lora)
  # record what actually changed, so converting back reverses exactly that
  changed = scan_layers is not None and any((g.style == 'stacked') != scan_layers for g in source.groups)
  chosen = {'to': to, 'scan_layers': scan_layers if changed else None, 'template_structure': structure}
  return source, target, the_plan, chosen


def source_structure(meta: ItemMetadata) -> dict[str, Any]:
  """Container facts of an Orbax tree that leaves alone do not tell: sequence nodes and None leaves
  (from the item's `_METADATA`, as read once by `read_item_metadata`; entries of other shapes are skipped)."""
  raw = meta.flags.get('tree_metadata')
  sequences, nones = set(), []
  for entry in raw.values() if isinstance(raw, Mapping) else ():
    key_metadata = entry.get('key_metadata') if isinstance(entry, Mapping) else None
    if not isinstance(key_metadata, list) or not all(isinstance(k, Mapping) for k in key_metadata):
      continue
    keys = [str(k.get('key')) for k in key_metadata]
    for depth, k in enumerate(key_metadata):
      if k.get('key_type') == 1:
        sequences.add('/'.join(keys[:depth]))
    value = entry.get('value_metadata')
    if isinstance(value, Mapping) and value.get('value_type') == 'None':
      nones.append('/'.join(keys))
  return {'sequences': sorted(sequences), 'nones': sorted(nones)}


def template_structure(template: Any) -> dict[str, Any]:
  """Container facts of `LinenOutput.template`: a pytree (`structure_from_template`), or the path of a checkpoint
  whose stored tree has the wanted structure (from its metadata alone: sequences, None leaves, leaf paths).

  Raises:
    NotACheckpointError: a template path with no checkpoint.
  """
  if isinstance(template, (str, os.PathLike)):
    meta = read_item_metadata(resolve_item(template))
    return {**source_structure(meta), 'leaves': sorted('/'.join(p) for p in meta.leaves)}
  return structure_from_template(template)


def structure_from_template(template: Any) -> dict[str, Any]:
  """Container facts of a pytree (e.g. a Linen TrainState): its sequence nodes, empty entries and value leaves.

  NNX keeps no optax EmptyState entries; a Linen TrainState has them (as None on disk).
  Passing the Linen state as `template` to `convert` writes them, so the result restores
  into that TrainState with plain Orbax. `leaves` are the paths of its values (arrays and scalars such as a
  TrainState's step), which the converted Linen tree must have exactly.
  """
  def empty(x):
    return x is None or (isinstance(x, tuple) and len(x) == 0)

  sequences, nones, leaves = set(), [], []
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(template, is_leaf=empty)[0]:
    names = []
    for k in keypath:
      if isinstance(k, jax.tree_util.SequenceKey):
        sequences.add('/'.join(names))
        names.append(str(k.idx))
      else:
        names.append(str(getattr(k, 'key', getattr(k, 'name', k))))
    if empty(leaf):
      nones.append('/'.join(names))
    elif hasattr(leaf, 'shape') or isinstance(leaf, (int, float)):
      leaves.append('/'.join(names))
  return {'sequences': sorted(sequences), 'nones': sorted(nones), 'leaves': sorted(leaves)}


def _shape_containers(tree: dict, structure: Mapping[str, Any] | None, framework: str) -> Any:
  """Inserts None leaves and turns digit-keyed dicts into lists, as the original tree had them.

  Without a record (a first conversion to Linen), digit-keyed nodes under `opt_state`
  become lists (optax chains are tuples), EmptyState gaps become None.
  """
  sequences = set(structure.get('sequences', ())) if structure else set()
  for path in (structure.get('nones', ()) if structure else ()):
    keys = tuple(path.split('/'))
    parent = tree
    try:
      for key in keys[:-1]:
        parent = parent.setdefault(key, {})
    except AttributeError:
      continue
    if isinstance(parent, dict):
      parent.setdefault(keys[-1], None)

  def walk(node, path):
    if not isinstance(node, dict):
      return node
    node = {k: walk(v, path + (k,)) for k, v in node.items()}
    joined = '/'.join(path)
    digit = bool(node) and all(k.isdigit() for k in node)
    if digit and (joined in sequences or (not structure and framework == 'linen' and 'opt_state' in path)):
      size = max(int(k) for k in node) + 1
      return [node.get(str(i)) for i in range(size)]
    return node

  return walk(tree, ())


_LORA = ('lora', 'lora_a'), ('lora', 'lora_b')


def _is_lora(layout: Layout, path: tuple, expr) -> bool:
  for read in reads(expr):
    record = layout.meta.record_of(read.source)
    if record is not None:
      return record.type_name.rsplit('.', 1)[-1] == 'LoRAParam'
  return path[-1] in ('lora_a', 'lora_b')


def _strip_cast(expr):
  return expr.expr if isinstance(expr, Cast) else expr


def apply_lora(the_plan: Plan, target: LayoutTarget, mode: str) -> Plan:
  """`mode='only'`: keep just the LoRA adapters; `'merge'`: fold `lora_a @ lora_b` into each kernel.

  Adapters are found next to their kernel as `<module>/lora/lora_a|lora_b` (nnx.LoRALinear)
  or by our recorded Variable type (nnx.LoRAParam).
  """
  layout = the_plan.source
  entries, leaves = dict(the_plan.entries), dict(the_plan.leaves)
  if mode == 'only':
    keep = {p for p, e in entries.items() if _is_lora(layout, p, e)}
    return dataclasses.replace(the_plan, entries={p: entries[p] for p in keep},
                               leaves={p: leaves[p] for p in keep})
  if mode != 'merge':
    raise errors.OrbaxNNXError(f"lora must be 'only' or 'merge', not {mode!r}")
  merged = 0
  for path in list(entries):
    if path[-1] != 'kernel':
      continue
    a_path, b_path = path[:-1] + _LORA[0], path[:-1] + _LORA[1]
    if a_path not in entries or b_path not in entries:
      continue
    base = LoraMerge(_strip_cast(entries[path]), _strip_cast(entries.pop(a_path)), _strip_cast(entries.pop(b_path)))
    leaf = leaves[path]
    entries[path] = cast(base, leaf.dtype)
    leaves.pop(a_path), leaves.pop(b_path)
    merged += 1
  if not merged:
    raise errors.OrbaxNNXError(f'{layout.meta.directory}: no LoRA adapters (<module>/lora/lora_a, lora_b) to merge.')
  return dataclasses.replace(the_plan, entries=entries, leaves=leaves)


def _size_units(the_plan: Plan, source: SourceArrays) -> None:
  """Large streamed chunks read by layer targets are decoded in units that hold a block of 1 MiB or more
  of every layer in them, so the layers can be written in lockstep (`writer.lockstep_align`)."""
  for path, expr in the_plan.entries.items():
    hit = layer_of(expr)
    store = source.store(hit[0].source) if hit is not None else None
    if store is None or not hasattr(store, 'unit_bytes'):
      continue
    per_layer = MIN_WRITE_BLOCK_BYTES * store.dtype.itemsize // the_plan.leaves[path].dtype.itemsize
    store.unit_bytes = max(store.unit_bytes, store.chunk[hit[2]] * per_layer)


def _lockstep_sources(the_plan: Plan, source: SourceArrays) -> frozenset:
  """Stored arrays whose layer targets are written together, source chunk by source chunk (see
  `writer.lockstep_align`): two targets or more, every one of them aligned."""
  aligned: dict = collections.defaultdict(int)
  others: set = set()
  for path, expr in the_plan.entries.items():
    leaf = the_plan.leaves[path]
    hit = lockstep_align(expr, leaf, _default_sharding(leaf), source)
    if hit is None:
      others.update(r.source for r in reads(expr))
    else:
      aligned[hit[0]] += 1
  return frozenset(p for p, n in aligned.items() if n > 1 and p not in others)


def _unit_aligned_sources(values) -> frozenset:
  """Stored arrays read only by arrays written block by block, each block inside one decode unit
  (`writer.unit_aligned`)."""
  aligned, others = set(), set()
  for value in values:
    (aligned if unit_aligned(value) is not None else others).update(r.source for r in reads(value.expr))
  return frozenset(aligned - others)


def _default_buffer_bytes(the_plan: Plan, source: SourceArrays, lockstep: frozenset) -> int:
  """`budget.default_in_flight` of what the plan reads, or room for every target one stored chunk feeds (a
  stacked array unrolled from chunks that span its layers, not written in lockstep): they are copied out of
  it at once, so the chunk is dropped and the next one decoded while they are written (measured: 2.8 GiB
  stacked->unrolled from 512 MiB chunks 16.5 s -> 11.2 s). At most a quarter of the memory this process can
  get."""
  sized = budget.default_in_flight(the_plan.bytes_read())
  readers = collections.Counter(r.source for e in the_plan.entries.values() for r in reads(e))
  shared = 0
  for path, count in readers.items():
    if count < 2 or path in lockstep:  # only chunks that several targets read can need the room
      continue
    store = source.store(path)
    if not getattr(store, 'exact', False) and store.shape:
      shared = max(shared, store.dtype.itemsize * math.prod(source.unit(path)))
  if not shared:
    return sized
  return max(sized, min(shared + 2 * MAX_BATCH_BYTES, budget.available_bytes() // 4))


def write_plan(dst: epath.Path, layout: Layout, target: LayoutTarget, the_plan: Plan, custom: dict, *,
               overwrite: bool, buffer_bytes: int | None, progress: Callable | None = None,
               structure: Mapping[str, Any] | None = None, cache_bytes: int | None = None) -> tuple[int, int, int, int]:
  """Streams the plan into an Orbax item at `dst` (atomic). Returns (bytes read, bytes written, bytes in flight
  allowed, chunk cache allowed).

  `buffer_bytes` bounds converted arrays in flight to the writer (default: `_default_buffer_bytes`),
  `cache_bytes` decoded source chunks kept for other regions (default: the larger of `buffer_bytes` and
  the largest stored array read).
  """
  budget.check_fits(layout.meta.directory, [('/'.join(target.disk[p]), leaf.shape, leaf.dtype,
                                               _default_sharding(leaf)) for p, leaf in the_plan.leaves.items()
                                              if p in the_plan.entries],
                    what='writing the largest converted array', at_once=False,
                    advice='run the conversion as several jax.distributed processes (each writes its shards)')
  source = SourceArrays(layout.meta) if cache_bytes is None else SourceArrays(layout.meta, cache_bytes)
  source.open_ahead(r.source for e in the_plan.entries.values() for r in reads(e))
  _size_units(the_plan, source)
  lockstep = _lockstep_sources(the_plan, source)
  if buffer_bytes is None:
    buffer_bytes = _default_buffer_bytes(the_plan, source, lockstep)
  session = WriteSession(source, buffer_bytes, progress=progress, lockstep=lockstep)
  tree: dict = {}
  save_args: dict = {}
  try:
    values = {}
    for path, expr in the_plan.entries.items():
      leaf = the_plan.leaves[path]
      disk = target.disk[path]
      values[path] = LazyArray(expr, leaf, _default_sharding(leaf), session)
      nnx_tree.set_path(tree, disk, values[path])
      nnx_tree.set_path(save_args, disk, layer_chunk_args(leaf, target.stacked.get(path)) or ocp.SaveArgs())
    if cache_bytes is None:
      # the chunks a group of layers is sliced from, kept until its last layer is read (at least the largest
      # array read); arrays written in lockstep, or block by block unit by unit, need only two of their chunks
      # or units (one used, one ahead)
      by_unit = lockstep | _unit_aligned_sources(values.values())
      read = {r.source for e in the_plan.entries.values() for r in reads(e)}
      cache_bytes = max([buffer_bytes] + [layout.leaves[p].nbytes for p in read - by_unit] +
                        [2 * source.store(p).dtype.itemsize * math.prod(source.unit(p)) for p in by_unit])
    source.cache_bytes = cache_bytes
    tree = _shape_containers(tree, structure, target.framework)
    save_args = _shape_containers(save_args, structure, target.framework)
    session.prime([leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, LazyArray)])
    handler = streaming_pytree_handler(**output_options(layout))
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(dst, args=ocp.args.PyTreeSave(item=tree, save_args=save_args, custom_metadata=custom,
                                               ocdbt_target_data_file_size=_ocdbt_file_bytes(the_plan)),
                 force=overwrite)
  finally:
    session.close()
  return source.bytes_read, session.bytes_written, buffer_bytes, cache_bytes


def output_options(layout: Layout) -> dict[str, Any]:
  """Orbax handler options of a conversion's output: the zarr version its source is stored in (a MaxText
  checkpoint, zarr v3 by default, stays zarr v3; arrays written unchanged can then be copied as stored:
  `chunk_copy`), zarr v2 (Orbax's default) for a source that records none (Hugging Face files, older saves).
  OCDBT always (Orbax's default: one set of data files whatever the leaf count)."""
  return {'use_zarr3': storage_format(layout.meta.flags)[1]}


def describe_output(options: Mapping[str, Any]) -> str:
  """One line saying what `output_options` chose and why (for `plan`)."""
  version = 'v3' if options['use_zarr3'] else 'v2'
  return f'# output: Orbax OCDBT, zarr {version} (the zarr version of the source; v2 where it records none)'


def _ocdbt_file_bytes(the_plan: Plan) -> int | None:
  """OCDBT's target data file size for writing `the_plan`: `OCDBT_FILE_BYTES` where the output is larger (it
  bounds what OCDBT buffers), else None (Orbax's default: the output is buffered whole either way, and a target
  measured 9 commits instead of 4 for 1,000 small arrays, 1.9 s more at 100 ms a request)."""
  total = _written_bytes(the_plan)
  return OCDBT_FILE_BYTES if total > OCDBT_FILE_BYTES else None


def _written_bytes(the_plan: Plan) -> int:
  """The bytes of the arrays `the_plan` writes."""
  return sum(the_plan.leaves[p].dtype.itemsize * math.prod(the_plan.leaves[p].shape) for p in the_plan.entries)


def _record_path(path: tuple, disk: tuple[str, ...], flavour: str) -> tuple:
  """The path a Variable record names: where the leaf is stored (without `value`), int keys kept."""
  stored = disk[:-1] if flavour == 'raw' and disk and disk[-1] == nnx_tree.VALUE_KEY else disk
  tail = path[len(path) - len(stored):] if len(stored) <= len(path) else ()
  return tuple(tail) if tuple(str(k) for k in tail) == tuple(stored) else tuple(stored)


@options.takes_options('mapping', 'linen', renamed={'format': 'flavour', 'buffer_bytes': 'memory_budget'})
@listing.looking_once
@operation.moves_bytes
def convert(src: epath.PathLike, dst: epath.PathLike, *, to: Literal['auto', 'nnx', 'linen'] = 'auto',
            scan_layers: bool | None = None, flavour: Literal['raw', 'pure'] = 'raw',
            include: Literal['all', 'params'] = 'all', dtype: Any = None, target: Any = None,
            mapping: options.Mapping | None = None, linen: options.LinenOutput | None = None,
            memory_budget: int | str | None = None, overwrite: bool = False, step: int | None = None,
            item: str | None = None, progress: Callable | None = None) -> ConvertReport:
  """Converts the checkpoint at `src` to another layout at `dst` (an Orbax item directory, written atomically).

  Optimizer moments follow their params; the step is cast (int32 Linen <-> uint32 NNX). DST restores with
  `orbax_nnx.restore(dst, target)`, with `ocp.StandardCheckpointer().restore(dst, abstract_tree)`, or through a
  manager as an item. Its metadata records the conversion, so `convert(dst, back)` reverses it bit-exactly.

      orbax_nnx.convert('ckpt/100/default', 'nnx_ckpt', to='nnx', scan_layers=False)

  Args:
    src: an item dir, step dir or CheckpointManager root (latest step unless `step`).
    dst: the output item directory; it must not exist unless `overwrite`.
    to: 'nnx', 'linen', or 'auto': the other framework, or back to the one a previous conversion came from.
    scan_layers: False unrolls stacked layer groups, True stacks unrolled ones, None keeps them.
    flavour: the NNX tree to write: 'raw' (`.../kernel/value`, as `nnx.state`) or 'pure' (`.../kernel`, as
      `nnx.to_pure_dict`). (`format=` is its old name.)
    include: 'params' writes a param-only (decode) checkpoint; see `orbax_nnx.export_params`.
    dtype: casts floating leaves (None keeps them).
    target: the NNX model (e.g. from `nnx.eval_shape`) the data lands in: DST is then that model's own tree,
      each leaf mapped from SRC by `mapping.rules` (how Hugging Face safetensors become an NNX Orbax
      checkpoint). None derives the target from SRC's layout.
    mapping: how SRC's leaves map onto the target (`orbax_nnx.Mapping`: rules, layout, groups, scan_axis,
      param_scan_axis); its fields may also be passed as keywords.
    linen: which Linen tree to write (`orbax_nnx.LinenOutput`: linen_style 'maxtext' | 'flax', template); its
      fields may also be passed as keywords.
    memory_budget: the bytes held (an int, or '512MiB', '5GB'): half for decoded source chunks kept for other
      regions (at least one chunk), half for converted arrays in flight; arrays of three quarters of that half
      or more are written block by block, and the output's B-tree node cache is a sixteenth of it (1 MiB at
      least: `io.writer.node_cache_bytes`; Orbax's is 100 MB). None: arrays in flight sized from what is read
      (`io.budget.default_in_flight`: 1/96 of it, 64-256 MiB; more when one stored chunk feeds many targets) and
      a chunk cache up to the largest stored array read, so that each chunk is decoded once; the report says
      what was chosen.
      (`buffer_bytes=` is its old name.)
    overwrite: replace an existing checkpoint at DST (never anything else).
    step: the step of a manager root.
    item: the item inside a step dir with several items.
    progress: called with each array as it is written (it has `.nbytes`). If it has a `planned` method, that is
      called first, once, with the number of arrays and their bytes.

  Returns:
    A `ConvertReport` (leaves, bytes read and written, seconds, peak RSS).

  Raises:
    NotACheckpointError: SRC holds no checkpoint.
    DestinationError: DST is SRC, inside it, or exists and is not a checkpoint to overwrite.
    LayoutError, PlanError, StructureMismatchError: SRC's layout cannot be mapped as asked.
    OptionError: an option outside its accepted values, or options that exclude each other.
  """
  return run_conversion(src, dst, to=to, scan_layers=scan_layers, flavour=flavour, include=include, dtype=dtype,
                        target=target, mapping=mapping, linen=linen, memory_budget=memory_budget,
                        overwrite=overwrite, step=step, item=item, progress=progress)


def run_conversion(src: epath.PathLike, dst: epath.PathLike, *, to: str, scan_layers: bool | None, flavour: str,
                   include: str, dtype: Any, target: Any, mapping: options.Mapping, linen: options.LinenOutput,
                   memory_budget: int | str | None, overwrite: bool, step: int | None, item: str | None,
                   progress: Callable | None, lora: str | None = None) -> ConvertReport:
  """`convert`, with `lora` ('only' | 'merge', for `export_params`)."""
  t0 = time.perf_counter()
  check_conversion_options(to=to, scan_layers=scan_layers, flavour=flavour, include=include, lora=lora)
  memory_budget = sizes.parse_bytes(memory_budget, 'memory_budget')
  cache_bytes = buffer_bytes = None  # defaults: see `write_plan`
  if memory_budget is not None:
    cache_bytes = max(1, memory_budget // 2)
    buffer_bytes = max(1, memory_budget - cache_bytes)
  src_item = resolve_item(src, step=step, item=item)
  # DST is checked while SRC is planned (on an object store each is a few round trips), and before anything
  # is written; when both fail, DST's error is raised, as if it had been checked first
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    checked = pool.submit(check_destination, dst, sources=(src, src_item), overwrite=overwrite)
    try:
      source, written, the_plan, chosen = plan_conversion(
          src_item, to=to, scan_layers=scan_layers, flavour=flavour, include=include, dtype=dtype, lora=lora,
          target=target, mapping=mapping, linen=linen)
    finally:
      dst = checked.result()
  if progress is not None and callable(getattr(progress, 'planned', None)):
    progress.planned(len(the_plan.entries), _written_bytes(the_plan))
  records = [written.records.get(p) or {'path': list(_record_path(p, written.disk[p], flavour)),
                                        'type': written.types[p], 'metadata': {}}
             for p in the_plan.entries] if chosen['to'] == 'nnx' else []
  custom = {CUSTOM_KEY: {'version': version.__version__, 'flavour': flavour, 'variables': records,
                         'scan_axes': dict(written.scan_axes)}}
  if target is None:  # a layout conversion records how to convert back
    custom[CUSTOM_KEY]['conversion'] = {
        'from_kind': source.kind, 'from_preset': source.preset, 'from_framework': source.framework,
        'scan_layers': chosen['scan_layers'],
        'source_scan_axes': {**dict(source.meta.ours.get('scan_axes', {}) if source.meta.ours else {}),
                             **dict(written.source_axes)},
        'paths': {'/'.join(c): '/'.join(d) for c, d in source.canonical.items()},
        'dtypes': {'/'.join(c): str(source.leaves[d].dtype) for c, d in source.canonical.items()},
        'structure': source_structure(source.meta),
    }
  record = source.meta.ours.get('conversion') if source.meta.ours else None
  structure = (record.get('structure') if isinstance(record, Mapping) and record.get('from_framework') ==
               chosen['to'] else None)
  if chosen.get('template_structure') is not None:
    structure = chosen['template_structure']
  bytes_read, bytes_written, in_flight, cache = write_plan(dst, source, written, the_plan, custom, overwrite=overwrite,
                                         buffer_bytes=buffer_bytes, progress=progress, structure=structure,
                                         cache_bytes=cache_bytes)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)
  return ConvertReport(str(src_item), str(dst), source.kind, chosen['to'], len(the_plan.entries), bytes_read,
                       bytes_written, time.perf_counter() - t0, rss, in_flight, cache)
