"""Option groups shared by the public functions, each validated once, where it is built.

    orbax_nnx.load_params(path, model, mapping=orbax_nnx.Mapping(rules=hf_rules(cfg), scan_axis=0))
    orbax_nnx.load_params(path, model, rules=hf_rules(cfg), scan_axis=0)   # the same call

`Mapping` says how a source checkpoint's stored paths map onto the target (rules, layout preset, layer
groups and axes); `LinenOutput` says which Linen tree a conversion writes. A function that takes a group
also takes its fields as keywords (`takes_options`): they are gathered into the group, and passing both
the group and one of its fields is an `OptionError`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any, Callable

from orbax_nnx import errors
from orbax_nnx.mapping import presets
from orbax_nnx.mapping.groups import group_names
from orbax_nnx.mapping.layout import LINEN_STYLES
from orbax_nnx.mapping.views import check_rules


def _check_scan_axis(scan_axis: Any) -> Any:
  """`scan_axis` as given (None, an int, or {regex over canonical paths: int}), or an OptionError."""
  if scan_axis is None or (isinstance(scan_axis, int) and not isinstance(scan_axis, bool)):
    return scan_axis
  if isinstance(scan_axis, AbcMapping):
    table = {}
    for pattern, axis in scan_axis.items():
      if not isinstance(pattern, str) or not isinstance(axis, int) or isinstance(axis, bool):
        raise errors.OptionError(f'scan_axis={{{pattern!r}: {axis!r}}}: use {{regex over canonical paths: int axis}}.')
      try:
        re.compile(pattern)
      except re.error as e:
        raise errors.OptionError(f'scan_axis: {pattern!r} is not a regular expression ({e}).') from None
      table[pattern] = axis
    return table
  raise errors.OptionError(f'scan_axis={scan_axis!r}: pass an int layer axis, or {{regex over canonical paths: axis}}.')


@dataclasses.dataclass(frozen=True)
class Mapping:
  """How a source checkpoint's stored leaves map onto the target, for every function that reads one.

  Attributes:
    rules: `(pattern, replacement)` regex rules, applied before the layout's own mapping. A pattern
      fullmatches a stored path as `orbax-nnx inspect` prints it, or its canonical form as `plan`
      prints it. The replacement names a target path (`r'layers/\\1/attn/q/kernel'`, a slot
      `r'w[\\2]'`), or is `{replacement: view}` with views from `orbax_nnx.view` (e.g. `view.T`).
    layout: a layout preset that replaces detection (`orbax-nnx presets` lists them, e.g.
      'linen-flax'; 'safetensors' for Hugging Face files). None detects it from the metadata.
    groups: layer-group names or regexes, beside the built-in ones (layers, blocks, h, ...).
    scan_axis: the layer axis of stacked source arrays where shapes leave it open: an int, or
      `{regex over canonical paths: axis}`.
    param_scan_axis: for Linen and MaxText sources, the layer axis of Params when nothing else
      decides it (MaxText: 1). From NNX sources an undecided axis is an error (pass `scan_axis`).

  Raises:
    OptionError: a rule, preset name, group regex or axis that is not valid.
  """

  rules: Sequence[Any] = ()
  layout: str | None = None
  groups: Sequence[str] | None = None
  scan_axis: Any = None
  param_scan_axis: int = 1

  def __post_init__(self):
    object.__setattr__(self, 'rules', check_rules(self.rules))
    if self.layout is not None and self.layout != 'safetensors':
      presets.get(self.layout)
    object.__setattr__(self, 'groups', tuple(group_names(self.groups).declared))
    object.__setattr__(self, 'scan_axis', _check_scan_axis(self.scan_axis))
    errors.check_int('param_scan_axis', self.param_scan_axis)

  def as_kwargs(self) -> dict[str, Any]:
    """The fields as keywords of the internal functions (`rules=`, `layout=`, ...)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class LinenOutput:
  """Which Linen tree a conversion to Linen writes.

  Attributes:
    linen_style: 'maxtext' (`params/params/<model>`, `params/batch_stats/<model>`, NNX-only state under
      `nnx_aux`) or 'flax' (flax's own `TrainState`: `params/<model>`, `batch_stats/<model>`). None decides
      from `template`, then from the record of the conversion that made the source, else 'maxtext'.
    template: the container structure of the foreign output, e.g. the Linen `TrainState` the result must
      restore into with plain Orbax (its sequences and optax `EmptyState` entries are written as it has
      them), or the path of a checkpoint of that structure (e.g. the TrainState saved at step 0; read from
      its metadata alone). A converted tree that differs from it is a `StructureMismatchError`.

  Raises:
    OptionError: an unknown `linen_style`.
  """

  linen_style: str | None = None
  template: Any = None

  def __post_init__(self):
    if self.linen_style is not None:
      errors.check_choice('linen_style', self.linen_style, LINEN_STYLES)

  @property
  def given(self) -> bool:
    return self.linen_style is not None or self.template is not None


_GROUPS = {'mapping': Mapping, 'linen': LinenOutput}


def _gather(name: str, cls: type, kwargs: dict[str, Any]) -> Any:
  """`kwargs[name]`, or a `cls` built from the loose fields in `kwargs` (popped), never both."""
  loose = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}
  given = kwargs.pop(name, None)
  if given is None:
    return cls(**loose)
  if not isinstance(given, cls):
    raise errors.OptionError(f'{name}= takes an orbax_nnx.{cls.__name__}, not {type(given).__name__}.')
  if loose:
    raise errors.OptionError(f'{", ".join(f"{k}=" for k in loose)} and {name}= both given: put them inside'
                             f' {name}=orbax_nnx.{cls.__name__}(...), or pass them only as keywords.')
  return given


def takes_options(*groups: str, renamed: AbcMapping[str, str] | None = None) -> Callable:
  """Lets a function take each option group (`'mapping'`, `'linen'`) whole or as its fields.

  Args:
    *groups: the group parameters of the function, each a name in `_GROUPS`.
    renamed: old keyword -> new keyword; the old one still works, with a DeprecationWarning.

  Returns:
    A decorator that keeps the function's own signature (what `help()` shows).
  """
  renamed = dict(renamed or {})

  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
      for old, new in renamed.items():
        if old in kwargs:
          if new in kwargs:
            raise errors.OptionError(f'{old}= is the old name of {new}=: pass only {new}=.')
          warnings.warn(f'{fn.__name__}({old}=...) is renamed {new}=; {old}= will be removed.',
                        DeprecationWarning, stacklevel=2)
          kwargs[new] = kwargs.pop(old)
      for name in groups:
        kwargs[name] = _gather(name, _GROUPS[name], kwargs)
      return fn(*args, **kwargs)

    return call

  return wrap
