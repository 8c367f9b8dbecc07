"""On-disk conversion between layouts: streaming, atomic, never touching the source.

    orbax_nnx.convert(src, dst, to='auto', scan_layers=None, ...)

Plans from metadata, then streams: each target array is read lazily (per region, each
stored chunk decoded once) and written by Orbax as soon as it is produced, so memory is
bounded by `buffer_bytes` (and the largest stored chunk), not by the checkpoint. DST is
written by Orbax's atomic commit (tmp dir + rename). Our custom metadata in DST records
the source layout, the layer axes and the library version, so converting back needs no
flags and reproduces the source bit-exactly.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_nnx import errors, nnx_tree, version
from orbax_nnx.layout import Layout, detect
from orbax_nnx.metadata import CUSTOM_KEY, read_item_metadata, resolve_item
from orbax_nnx.planner import Plan, build
from orbax_nnx.reader import SourceArrays
from orbax_nnx.targets import LayoutTarget, layout_target
from orbax_nnx.writer import LazyArray, WriteSession, layer_chunk_args, streaming_pytree_handler

DEFAULT_BUFFER_BYTES = 256 * 2**20


@dataclasses.dataclass
class ConvertReport:
  """What a conversion did."""

  src: str
  dst: str
  source_kind: str
  framework: str
  leaves: int
  bytes_read: int
  bytes_written: int
  seconds: float
  peak_rss_bytes: int

  def summary(self) -> str:
    return (f'converted {self.src} ({self.source_kind}) -> {self.dst} ({self.framework}): {self.leaves} leaves,'
            f' read {self.bytes_read / 2**20:.1f} MiB, wrote {self.bytes_written / 2**20:.1f} MiB,'
            f' {self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB')


def _check_paths(src: epath.Path, dst: epath.Path, overwrite: bool) -> None:
  s, d = str(src.resolve()), str(dst.resolve()) if dst.exists() or dst.parent.exists() else str(dst)
  if s == d:
    raise errors.OrbaxNNXError(f'DST {dst} is SRC; write the conversion somewhere else.')
  if d.startswith(s.rstrip('/') + '/'):
    raise errors.OrbaxNNXError(f'DST {dst} is inside SRC {src}; write it outside the source checkpoint.')
  if s.startswith(d.rstrip('/') + '/'):
    raise errors.OrbaxNNXError(f'SRC {src} is inside DST {dst}; overwriting DST would destroy the source.')
  if dst.exists() and not overwrite:
    raise errors.OrbaxNNXError(f'DST {dst} exists; pass overwrite=True (--overwrite) to replace it.')


def _default_sharding(leaf) -> jax.sharding.Sharding:
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # every process writes its share: split the first axis the device count divides
  mesh = jax.sharding.Mesh(jax.devices(), ('x',))
  n = jax.device_count()
  spec = [None] * len(leaf.shape)
  for axis, size in enumerate(leaf.shape):
    if size % n == 0:
      spec[axis] = 'x'
      break
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _reverse_defaults(layout: Layout) -> dict[str, Any]:
  """Flags recorded by a previous conversion, to convert straight back."""
  record = layout.meta.ours.get('conversion') if layout.meta.ours else None
  if not isinstance(record, Mapping):
    return {}
  out = {'to': record.get('from_framework')}
  if record.get('scan_layers') is not None:
    out['scan_layers'] = not record['scan_layers']
  return out


def plan_conversion(src_item: epath.Path, *, to: str = 'auto', scan_layers: bool | None = None,
                    scan_axis=None, param_scan_axis: int = 1, flavour: str = 'raw',
                    rules: Sequence[tuple[str, str]] = (), include: str = 'all') -> tuple[Layout, LayoutTarget, Plan, dict]:
  """Layout, target and plan of a conversion (metadata only)."""
  layout = detect(read_item_metadata(src_item))
  reverse = _reverse_defaults(layout)
  if to == 'auto':
    to = reverse.get('to') or ('linen' if layout.framework == 'nnx' else 'nnx')
  if scan_layers is None:
    scan_layers = reverse.get('scan_layers')
  record = layout.meta.ours.get('conversion') if layout.meta.ours else None
  original = record if isinstance(record, Mapping) and record.get('from_framework') == to else None
  target = layout_target(layout, to=to, scan_layers=scan_layers, scan_axis=scan_axis,
                         param_scan_axis=param_scan_axis, flavour=flavour, include=include,
                         original=original)
  axes = {re.escape(k): v for k, v in target.scan_axes.items()}
  the_plan = build(layout, target.leaves, rules=rules, scan_axis=axes or scan_axis,
                   param_scan_axis=param_scan_axis)
  if the_plan.missing:
    raise errors.StructureMismatchError(the_plan.missing, [], where=f'at {src_item}')
  options = {'to': to, 'scan_layers': scan_layers}
  return layout, target, the_plan, options


def write_plan(dst: epath.Path, layout: Layout, target: LayoutTarget, the_plan: Plan, custom: dict, *,
               overwrite: bool, buffer_bytes: int, progress: Callable | None = None) -> tuple[int, int]:
  """Streams the plan into an Orbax item at `dst` (atomic). Returns (bytes read, bytes written)."""
  source = SourceArrays(layout.meta, cache_bytes=max(buffer_bytes, 1))
  session = WriteSession(source, buffer_bytes, progress=progress)
  tree: dict = {}
  save_args: dict = {}
  try:
    for path, expr in the_plan.entries.items():
      leaf = the_plan.leaves[path]
      disk = target.disk[path]
      nnx_tree.set_path(tree, disk, LazyArray(expr, leaf, _default_sharding(leaf), session))
      nnx_tree.set_path(save_args, disk, layer_chunk_args(leaf, target.stacked.get(path)) or ocp.SaveArgs())
    handler = streaming_pytree_handler()
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(dst, args=ocp.args.PyTreeSave(item=tree, save_args=save_args, custom_metadata=custom),
                 force=overwrite)
  finally:
    session.close()
  return source.bytes_read, session.bytes_written


def convert(src: epath.PathLike, dst: epath.PathLike, *, to: Literal['auto', 'nnx', 'linen'] = 'auto',
            scan_layers: bool | None = None, scan_axis=None, param_scan_axis: int = 1,
            format: Literal['raw', 'pure'] = 'raw', rules: Sequence[tuple[str, str]] = (),
            include: Literal['all', 'params'] = 'all', overwrite: bool = False,
            buffer_bytes: int = DEFAULT_BUFFER_BYTES, step: int | None = None, item: str | None = None,
            progress: Callable | None = None) -> ConvertReport:
  """Converts the checkpoint at `src` to another layout at `dst` (an Orbax item directory).

  `to='auto'` converts to the other framework (or back to the original one after a
  conversion). `scan_layers=False` unrolls stacked layer groups, `True` stacks unrolled
  ones, `None` keeps them. Optimizer moments follow their params; the step is cast
  (int32 Linen <-> uint32 NNX). DST restores with `orbax_nnx.restore(dst, target)`, with
  `ocp.StandardCheckpointer().restore(dst, abstract_tree)`, or through a manager as an item.
  """
  t0 = time.perf_counter()
  src_item = resolve_item(src, step=step, item=item)
  dst = epath.Path(dst)
  _check_paths(src_item, dst, overwrite)
  layout, target, the_plan, options = plan_conversion(
      src_item, to=to, scan_layers=scan_layers, scan_axis=scan_axis, param_scan_axis=param_scan_axis,
      flavour=format, rules=rules, include=include)
  custom = {CUSTOM_KEY: {
      'version': version.__version__,
      'flavour': format,
      'variables': [{'path': list(p), 'type': target.types[p], 'metadata': {}} for p in the_plan.entries]
      if options['to'] == 'nnx' else [],
      'scan_axes': dict(target.scan_axes),
      'conversion': {
          'from_kind': layout.kind, 'from_framework': layout.framework, 'scan_layers': options['scan_layers'],
          'paths': {'/'.join(c): '/'.join(d) for c, d in layout.canonical.items()},
          'dtypes': {'/'.join(c): str(layout.leaves[d].dtype) for c, d in layout.canonical.items()},
      },
  }}
  bytes_read, bytes_written = write_plan(dst, layout, target, the_plan, custom, overwrite=overwrite,
                                         buffer_bytes=buffer_bytes, progress=progress)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)
  return ConvertReport(str(src_item), str(dst), layout.kind, options['to'], len(the_plan.entries), bytes_read,
                       bytes_written, time.perf_counter() - t0, rss)
