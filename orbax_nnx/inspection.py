"""What a checkpoint holds, from metadata alone (no array bytes are read)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from orbax_nnx import errors
from orbax_nnx.mapping.layout import MODEL, OPTIMIZER, Layout, detect
from orbax_nnx.options import takes_options
from orbax_nnx.sources import listing
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item

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


@takes_options(renamed={'filter': 'pattern'})
@listing.looking_once
def inspect_checkpoint(path, *, depth: int | None = None, pattern: str | None = None, layout: str | None = None,
                       groups=None, step: int | None = None, item: str | None = None) -> dict[str, Any]:
  """What a checkpoint holds, from metadata alone: layout, layer groups, leaves and totals.

      facts = orbax_nnx.inspect('ckpt', depth=2)
      print(facts['layout'], facts['totals'])

  Args:
    path: an item dir, step dir, manager root (latest step unless `step`) or safetensors folder.
    depth: aggregate leaves into subtrees of this many path parts (None: every leaf).
    pattern: keep only stored paths this regex searches (`filter=` is its old name).
    layout: force a layout preset instead of detecting it.
    groups: layer-group names or regexes beside the built-in ones.
    step: the step of a manager root.
    item: the item inside a step dir with several items.

  Returns:
    A JSON-ready dict: `path`, `layout`, `preset`, `flavour`, `step`, `roots`, `aux`, `groups`, `leaves`
    (path, shape, dtype, bytes, category per leaf, or path, leaves, bytes per subtree), `totals` by category
    (params / optimizer / rng / other), `total_bytes`, and `orbax_nnx` (our metadata, if any).

  Raises:
    NotACheckpointError: nothing readable at `path`.
    LayoutError: no single preset fits (pass `layout`).
    OptionError: `pattern` is not a regex, or an unknown preset.
  """
  directory = resolve_item(path, step=step, item=item)
  found = detect(read_item_metadata(directory), layout=layout, groups=groups)
  by_disk = {disk: canon for canon, disk in found.canonical.items()}
  try:
    search = re.compile(pattern).search if pattern else None
  except re.error as e:
    raise errors.OptionError(f'pattern={pattern!r} is not a regular expression ({e}).') from None
  rows, totals = [], defaultdict(int)
  for disk, info in sorted(found.leaves.items()):
    name = '/'.join(disk)
    if search and not search(name):
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
