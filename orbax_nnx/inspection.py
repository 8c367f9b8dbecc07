"""What a checkpoint holds, from metadata alone (no array bytes are read)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from orbax_nnx.mapping.layout import MODEL, OPTIMIZER, Layout, detect
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item
from orbax_nnx.sources import listing

_RNG_TYPES = ('RngKey', 'RngCount', 'RngState')
_RNG_NAMES = {'rngs', 'rng'}


def _category(layout: Layout, canon: tuple, disk: tuple) -> str:
  if canon[0] == OPTIMIZER:
    return 'optimizer'
  if canon[0] != MODEL:
    return 'other'
  record = layout.meta.record_of(disk)
  if record is not None:
    return 'rng' if record.type_name.rsplit('.', 1)[-1] in _RNG_TYPES else 'params'
  return 'rng' if set(canon) & _RNG_NAMES else 'params'


@listing.looking_once
def inspect_checkpoint(path, *, step: int | None = None, item: str | None = None, depth: int | None = None,
                       filter: str | None = None, layout: str | None = None, groups=None) -> dict[str, Any]:
  """Layout, layer groups, per-leaf (or per-subtree at `depth`) shape/dtype/bytes, and totals.

  Totals are split into params / optimizer / rng / other. `filter` keeps paths matching the
  regex. `layout` forces a preset, `groups` declares layer-group names. Reads metadata only.
  """
  directory = resolve_item(path, step=step, item=item)
  found = detect(read_item_metadata(directory), layout=layout, groups=groups)
  by_disk = {disk: canon for canon, disk in found.canonical.items()}
  pattern = re.compile(filter) if filter else None
  rows, totals = [], defaultdict(int)
  for disk, info in sorted(found.leaves.items()):
    name = '/'.join(disk)
    if pattern and not pattern.search(name):
      continue
    category = _category(found, by_disk[disk], disk)
    totals[category] += info.nbytes
    rows.append({'path': name, 'shape': list(info.shape), 'dtype': str(info.dtype), 'bytes': info.nbytes,
                 'category': category})
  if depth is not None:
    grouped: dict[str, dict] = {}
    for row in rows:
      sep = '.' if found.kind == 'safetensors' else '/'
      key = sep.join(row['path'].split(sep)[:depth])
      entry = grouped.setdefault(key, {'path': key, 'leaves': 0, 'bytes': 0})
      entry['leaves'] += 1
      entry['bytes'] += row['bytes']
    rows = list(grouped.values())
  step_dir = directory.parent.name if directory.parent.name.isdigit() else None
  return {
      'path': str(directory), 'layout': found.kind, 'preset': found.preset, 'flavour': found.flavour,
      'step': int(step_dir) if step_dir is not None else None,
      'roots': {k: '/'.join(v) for k, v in (('params', found.params_root), ('optimizer', found.opt_root),
                                            ('step', found.step_path)) if v is not None},
      'aux': ['/'.join(r) for r in found.aux_roots],
      'groups': [str(g) for g in found.groups],
      'leaves': rows, 'totals': dict(totals), 'total_bytes': sum(totals.values()),
      'orbax_nnx': dict(found.meta.ours) if found.meta.ours else None,
  }
