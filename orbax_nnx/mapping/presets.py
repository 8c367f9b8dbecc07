"""Presets: the built-in layouts as named rule sets over stored paths.

A preset's rules map each stored path, exactly as `orbax-nnx inspect` prints it (an Orbax tree
path joined with `/`), to a *canonical* path in one NNX-like namespace:

    model/<module path>                          params and model-mirroring state
    optimizer/step                               the step
    optimizer/opt_state/<chain>/<field>/<path>   optax state; moments mirror the model path

The first rule that fullmatches wins; a path no rule matches is kept under `other/`. `/`-joined
flat keys (`transformer/layer_0/mlp/w` stored as one key) split into components on the way.
`detect_layout` picks the one preset whose `applies` holds; `layout=NAME` forces one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Literal

from orbax_nnx import errors
from orbax_nnx.mapping.groups import is_train_state

Kind = Literal['nnx', 'linen', 'maxtext', 'params', 'safetensors']
Role = Literal['params', 'aux', 'opt', 'step']
DiskPath = tuple[str, ...]
LINEN_STATE_COLLECTIONS = ('batch_stats',)  # Linen collections NNX keeps inside the model in train states
_V = '(?:/value)?'  # NNX raw-flavour `value` wrappers


@dataclasses.dataclass(frozen=True)
class PresetRule:
  """Stored path (regex, fullmatch) -> canonical path (replacement), and what the leaf is."""

  pattern: str
  target: str
  role: Role

  def __post_init__(self):
    object.__setattr__(self, 'compiled', re.compile(self.pattern))


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named layout: when it applies (from top-level keys and stored paths) and its rules."""

  name: str
  kind: Kind
  description: str
  applies: Callable[[frozenset, Sequence[DiskPath]], bool]
  rules: tuple[PresetRule, ...]

  def canonical(self, stored: DiskPath) -> tuple[tuple[str, ...], Role | None]:
    """The canonical path of one stored path, and the matching rule's role (None: `other/`)."""
    joined = '/'.join(stored)
    for rule in self.rules:
      m = rule.compiled.fullmatch(joined)
      if m:
        return tuple(m.expand(rule.target).split('/')), rule.role
    return ('other',) + tuple(stored), None

  def __str__(self) -> str:
    lines = [f'preset {self.name}: {self.description}']
    lines += [f'  {r.pattern}  ->  {r.target}   ({r.role})' for r in self.rules]
    return '\n'.join(lines)


def _double_params(paths: Sequence[DiskPath]) -> bool:
  """MaxText / Linen `params/params/...`: every params leaf one level deeper, under `params` or a
  state collection."""
  under = [p for p in paths if p[0] == 'params']
  second = {p[1] for p in under if len(p) > 2}
  return ('params' in second and all(len(p) > 2 for p in under)
          and second <= {'params'} | set(LINEN_STATE_COLLECTIONS))


def _linen(top: frozenset) -> bool:
  return 'params' in top and not is_train_state(top)


_LINEN_STATE = (
    PresetRule(f'nnx_aux/model/(.+?){_V}', r'model/\1', 'aux'),
    PresetRule(f'batch_stats/(.+?){_V}', r'model/\1', 'aux'),
    PresetRule(f'step{_V}', 'optimizer/step', 'step'),
)

PRESETS: tuple[Preset, ...] = (
    Preset('nnx', 'nnx', 'NNX train state or module: model/..., optimizer/{step,opt_state}/... (raw or pure)',
           lambda top, paths: is_train_state(top),
           (PresetRule(f'model/(.+?){_V}', r'model/\1', 'params'),
            PresetRule(f'optimizer/step{_V}', 'optimizer/step', 'step'),
            PresetRule(f'optimizer/opt_state/(.+?){_V}', r'optimizer/opt_state/\1', 'opt'))),
    Preset('nnx-optimizer', 'nnx', 'an nnx.Optimizer saved alone: opt_state/..., step',
           lambda top, paths: {'opt_state', 'step'} <= top and 'params' not in top and not is_train_state(top),
           (PresetRule(f'step{_V}', 'optimizer/step', 'step'),
            PresetRule(f'opt_state/(.+?){_V}', r'optimizer/opt_state/\1', 'opt'))),
    Preset('linen-maxtext', 'linen',
           'MaxText / Linen `params/params/...` (train state with opt_state/step, or a decode checkpoint);'
           ' batch stats at params/batch_stats; MaxText NNX extras under nnx_aux/model',
           lambda top, paths: _linen(top) and _double_params(paths),
           (PresetRule(f'params/params/(.+?){_V}', r'model/\1', 'params'),
            PresetRule(f'params/batch_stats/(.+?){_V}', r'model/\1', 'aux'),
            *_LINEN_STATE,
            PresetRule(f'opt_state/(.+?)/params/(.+?){_V}', r'optimizer/opt_state/\1/\2', 'opt'),
            PresetRule(f'opt_state/(.+?){_V}', r'optimizer/opt_state/\1', 'opt'))),
    Preset('linen-flax', 'linen',
           'flax.training TrainState: params/<module>, batch_stats/<module>, opt_state mirroring params, step',
           lambda top, paths: _linen(top) and bool(top & {'step', 'opt_state'}) and not _double_params(paths),
           (PresetRule(f'params/(.+?){_V}', r'model/\1', 'params'),
            *_LINEN_STATE,
            PresetRule(f'opt_state/(.+?){_V}', r'optimizer/opt_state/\1', 'opt'))),
    Preset('linen-variables', 'linen',
           'a Linen variables dict {params, batch_stats, <any collection>}: every collection mirrors the module tree',
           lambda top, paths: _linen(top) and not top & {'step', 'opt_state'} and not _double_params(paths),
           (PresetRule(f'params/(.+?){_V}', r'model/\1', 'params'),
            PresetRule(f'nnx_aux/model/(.+?){_V}', r'model/\1', 'aux'),
            PresetRule(f'(?!nnx_aux/)[^/]+/(.+?){_V}', r'model/\1', 'aux'))),
    Preset('params-base', 'params', 'a module tree under `base/`',
           lambda top, paths: top == {'base'},
           (PresetRule(f'base/(.+?){_V}', r'model/\1', 'params'),)),
    Preset('params', 'params', 'a bare module tree: a decode checkpoint, an NNX pure dict, any pytree of arrays',
           lambda top, paths: not is_train_state(top) and 'params' not in top and not {'opt_state', 'step'} <= top
           and top != {'base'},
           (PresetRule(f'(.+?){_V}', r'model/\1', 'params'),)),
)
BY_NAME = {p.name: p for p in PRESETS}


def get(name: str) -> Preset:
  """The preset called `name` (`layout=` / `--layout`)."""
  if name not in BY_NAME:
    raise errors.OptionError(f'layout={name!r} names no preset; choose one of {sorted(BY_NAME)} (or omit it'
                             ' to detect).')
  return BY_NAME[name]


def choose(paths: Sequence[DiskPath], where: str) -> Preset:
  """The one preset that applies to these stored paths."""
  top = frozenset(p[0] for p in paths if p)
  fits = [p for p in PRESETS if p.applies(top, paths)]
  if len(fits) != 1:
    raise errors.LayoutError(
        f'{where}: {"no preset" if not fits else "presets " + ", ".join(p.name for p in fits)} fit the top-level'
        f' keys {sorted(top)}; pass layout=NAME (CLI --layout) with one of {sorted(BY_NAME)}.')
  return fits[0]
