"""Layer groups: which stored names are layers, stacked in one array or unrolled as `name_N` / `name/N`.

One `GroupNames` decides, everywhere (layout detection, the planner, conversion targets, export):
the names real models give their layer groups, plus whatever the user declares with `groups=`.
Linen's auto-named submodules (`Dense_0`, `Conv_1`, ...) are never layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from orbax_nnx import errors

CanonPath = tuple[str, ...]
MODEL, OPTIMIZER = 'model', 'optimizer'

UNROLLED_SUFFIX = re.compile(r'^(?P<name>.*[^\d_])_(?P<index>\d+)$')
# Names that hold a stacked group when they are not followed by a layer index.
STACK_HINT_NAMES = ('layers', 'layers_per_stage', 'circular_repeats', 'stage', 'blocks')
# Names whose `_N` / `/N` members are unrolled layers.
LAYER_GROUP_NAME = r'layers?|blocks?|h|stages?|layers_per_stage|circular_repeats|[a-z0-9_]*_(layers|blocks)'


def is_train_state(top_keys) -> bool:
  """Whether a tree with these top-level keys is a train state (`model` / `optimizer` and nothing else).

  A model with a submodule called `model` (the Hugging Face `.model` + `.lm_head` style) is a model."""
  top = {str(k) for k in top_keys}
  return bool(top) and top <= {MODEL, OPTIMIZER}


def model_start(canon: CanonPath) -> int:
  """Index where the model-mirroring part of a canonical path starts (after `model`, or after an
  optax state's chain indices and field name)."""
  if canon[:1] == (MODEL,):
    return 1
  if canon[:2] == (OPTIMIZER, 'opt_state'):
    i = 2
    while i < len(canon) and canon[i].isdigit():
      i += 1
    return i + 1  # skip the state field name ('mu', 'nu', 'count', ...)
  return len(canon)


@dataclasses.dataclass(frozen=True)
class GroupNames:
  """The layer-group names in force: the built-in ones plus `declared` (names or regexes)."""

  declared: tuple[str, ...] = ()

  def __post_init__(self):
    for name in self.declared:
      if not isinstance(name, str) or not name:
        raise errors.OptionError(f'groups={self.declared!r}: each entry is a non-empty group name or regex.')
      try:
        re.compile(name)
      except re.error as e:
        raise errors.OptionError(f'groups: {name!r} is not a valid regex: {e}') from None
    object.__setattr__(self, '_unrolled', re.compile('|'.join([LAYER_GROUP_NAME, *self.declared])))
    object.__setattr__(self, '_stacked', re.compile('|'.join([*map(re.escape, STACK_HINT_NAMES), *self.declared])))

  def is_group(self, name: str) -> bool:
    """Whether `name` names a group of layers (`layers`, `blocks`, `h`, `moe_layers`, declared names)."""
    return self._unrolled.fullmatch(name) is not None

  def is_stacked_name(self, name) -> bool:
    """Whether `name` (a key, or a sharding axis name) marks a stacked layer axis."""
    if isinstance(name, (tuple, list)):
      return any(self.is_stacked_name(n) for n in name)
    return isinstance(name, str) and self._stacked.fullmatch(name) is not None

  def unrolled_member(self, canon: CanonPath, k: int) -> tuple[CanonPath, str, int] | None:
    """`(group path, style, index)` when `canon[k]` is one layer of an unrolled group, else None:
    `layers_3` (suffix) or `layers/3` (index). Optax chain indices are never layers."""
    if canon[k].isdigit() and k <= model_start(canon):
      return None
    m = UNROLLED_SUFFIX.match(canon[k])
    if m and self.is_group(m['name']):
      return canon[:k] + (m['name'],), 'unrolled_suffix', int(m['index'])
    if canon[k].isdigit() and k > 0 and self.is_group(canon[k - 1]):
      return canon[:k], 'unrolled_index', int(canon[k])
    return None

  def stacked_at(self, canon: CanonPath, k: int) -> bool:
    """Whether `canon[k]` names a stacked group (a group name not followed by a layer index)."""
    return self.is_stacked_name(canon[k]) and not (k + 1 < len(canon) and canon[k + 1].isdigit())

  def names_axis(self, names: Sequence | None) -> int | None:
    """The axis a sharding-names tuple marks as the layer axis, if any."""
    for axis, name in enumerate(names or ()):
      if self.is_stacked_name(name):
        return axis
    return None

  def unrolled_groups(self, canons: Iterable[CanonPath]) -> dict[tuple[CanonPath, str], set[int]]:
    """Unrolled groups among paths: (group path, style) -> layer indices."""
    seen: dict[tuple[CanonPath, str], set[int]] = {}
    for canon in canons:
      for k in range(model_start(canon), len(canon)):
        member = self.unrolled_member(canon, k)
        if member is not None:
          seen.setdefault(member[:2], set()).add(member[2])
    return seen


DEFAULT_GROUPS = GroupNames()


def group_names(groups: GroupNames | Sequence[str] | None) -> GroupNames:
  """`groups=` as given by a user (names/regexes) or already a GroupNames."""
  if isinstance(groups, GroupNames):
    return groups
  if isinstance(groups, str):
    groups = (groups,)
  return GroupNames(tuple(groups or ()))
