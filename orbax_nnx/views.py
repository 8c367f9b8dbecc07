"""Views: a small lazy numpy-like algebra over one stored array, for the right side of rules.

    rules = [(r'model/transformer/layer_(\\d+)/mlp/gating_einsum', {
        r'model/layers/\\1/mlp/gate/kernel': orbax_nnx.view[0].T,
        r'model/layers/\\1/mlp/up/kernel': orbax_nnx.view[1].T})]

A view is data (the operations it applies); the planner compiles it into lazy expressions
(`take`, `transpose`, `cast`) that are still read per target shard, region by region.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from orbax_nnx import errors


@dataclasses.dataclass(frozen=True)
class View:
  """Operations on one stored array, applied in order: ('take', i), ('transpose', perm), ('astype', dtype)."""

  ops: tuple[tuple[Any, ...], ...] = ()

  def __getitem__(self, key: Any) -> 'View':
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
      if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise errors.OptionError(f'view[{key!r}]: views take integer indices (one sub-array along the first'
                                 ' axis); slices and arrays are not supported yet.')
    return View(self.ops + tuple(('take', int(k)) for k in keys))

  @property
  def T(self) -> 'View':  # noqa: N802 (numpy's name)
    """All axes reversed."""
    return View(self.ops + (('transpose', None),))

  def transpose(self, *perm: Any) -> 'View':
    """Axes permuted as `numpy.transpose(x, perm)`."""
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
      perm = tuple(perm[0])
    if not perm:
      return self.T
    if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in perm):
      raise errors.OptionError(f'view.transpose{perm}: axes must be integers.')
    return View(self.ops + (('transpose', tuple(int(p) for p in perm)),))

  def swapaxes(self, a: int, b: int) -> 'View':
    """Two axes exchanged, as `numpy.swapaxes`."""
    return View(self.ops + (('swapaxes', int(a), int(b)),))

  def astype(self, dtype: Any) -> 'View':
    """Values cast to `dtype` while reading."""
    return View(self.ops + (('astype', np.dtype(dtype)),))

  def reshape(self, *shape: Any) -> 'View':
    raise errors.OptionError('view.reshape is not supported yet: reshape the target, or split heads after'
                             ' loading. (Index, .T, .transpose, .swapaxes and .astype are.)')

  def __str__(self) -> str:
    text = 'view'
    for op in self.ops:
      if op[0] == 'take':
        text += f'[{op[1]}]'
      elif op[0] == 'transpose':
        text += '.T' if op[1] is None else f'.transpose{op[1]}'
      elif op[0] == 'swapaxes':
        text += f'.swapaxes({op[1]}, {op[2]})'
      else:
        text += f'.astype({op[1].name})'
    return text


view = View()
"""The identity view; index and chain it: `view[0].T`, `view[1].astype('bfloat16')`."""


def check_rules(rules: Any) -> tuple:
  """Rules as a tuple of `(pattern, replacement)` or `(pattern, {target replacement: view})` pairs."""
  out = []
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    rhs = rule[1] if ok else None
    ok = ok and (isinstance(rhs, str) or (isinstance(rhs, Mapping) and bool(rhs) and all(
        isinstance(k, str) and isinstance(v, View) for k, v in rhs.items())))
    if not ok:
      raise errors.OptionError(f'rule {rule!r}: use (pattern, replacement) or (pattern, {{replacement: view}})'
                               ' with views built from orbax_nnx.view (e.g. view[0].T).')
    out.append((rule[0], dict(rhs) if isinstance(rhs, Mapping) else rhs))
  return tuple(out)
