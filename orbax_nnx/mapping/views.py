"""Views: a small lazy numpy-like algebra over one stored array, for the right side of rules.

    rules = [(r'model/transformer/layer_(\\d+)/mlp/gating_einsum', {
        r'model/layers/\\1/mlp/gate/kernel': orbax_nnx.view[0].T,
        r'model/layers/\\1/mlp/up/kernel': orbax_nnx.view[1].T})]

A view is data (the operations it applies); the planner compiles it into lazy expressions
(`take`, `slice`, `reshape`, `transpose`, `cast`) that are still read per target shard, region by region.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from orbax_nnx import errors


@dataclasses.dataclass(frozen=True)
class View:
  """A view of one stored array, for the right side of rules: build it from `orbax_nnx.view`.

      orbax_nnx.view[0].T, orbax_nnx.view.reshape(16, 64, -1), orbax_nnx.view.astype('bfloat16')

  Attributes:
    ops: the operations, applied in order: ('take', i), ('slice', axis, start, stop), ('reshape', shape),
      ('transpose', perm), ('swapaxes', a, b), ('astype', dtype), and ('concat', other stored names, axis),
      which fuses other stored arrays onto it.
  """

  ops: tuple[tuple[Any, ...], ...] = ()

  def __getitem__(self, key: Any) -> 'View':
    """Integers drop an axis (`view[1]`: the second sub-array); slices keep part of one (`view[:, 0:64]`)."""
    keys = key if isinstance(key, tuple) else (key,)
    ops, axis = [], 0
    for k in keys:
      if isinstance(k, slice):
        if k.step not in (None, 1) or not all(b is None or isinstance(b, (int, np.integer)) for b in (k.start, k.stop)):
          raise errors.OptionError(f'view[{key!r}]: slices take integer bounds and no step.')
        if (k.start, k.stop) != (None, None):
          ops.append(('slice', axis, k.start, k.stop))
        axis += 1
      elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        if axis:
          raise errors.OptionError(f'view[{key!r}]: an integer index must come first (it takes a sub-array'
                                   ' along axis 0); use .swapaxes to bring another axis first.')
        ops.append(('take', int(k)))
      else:
        raise errors.OptionError(f'view[{key!r}]: views take integers and slices (no arrays, no Ellipsis).')
    return View(self.ops + tuple(ops))

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
    """Row-major reshape as `numpy.reshape` (one `-1` allowed): splits or merges axes, e.g.
    flattened attention heads `(heads * head_dim, d)` into `(heads, head_dim, d)`."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
      shape = tuple(shape[0])
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and (n >= 0 or n == -1) for n in shape) \
        or list(shape).count(-1) > 1:
      raise errors.OptionError(f'view.reshape{shape}: sizes must be non-negative integers (one may be -1).')
    return View(self.ops + (('reshape', tuple(int(n) for n in shape)),))

  def concat(self, *others: str, axis: int = 0) -> 'View':
    """This array with other stored arrays appended along `axis`, in order: one target fused from
    several (e.g. `view.concat(r'...k_proj.weight', r'...v_proj.weight')` for a qkv kernel). `others`
    name stored leaves as rules match them and may use the rule's groups (`\\1`)."""
    if not others or not all(isinstance(o, str) for o in others):
      raise errors.OptionError(f'view.concat{others}: name the other stored arrays (strings, as rules match them).')
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
      raise errors.OptionError(f'view.concat(axis={axis!r}): axis must be an integer.')
    return View(self.ops + (('concat', tuple(others), int(axis)),))

  def resolve(self, expand) -> 'View':
    """The view with the names in its `concat`s expanded by `expand` (a rule's backreferences)."""
    return View(tuple(('concat', tuple(expand(o) for o in op[1]), op[2]) if op[0] == 'concat' else op
                      for op in self.ops))

  def __str__(self) -> str:
    text = 'view'
    for op in self.ops:
      if op[0] == 'take':
        text += f'[{op[1]}]'
      elif op[0] == 'transpose':
        text += '.T' if op[1] is None else f'.transpose{op[1]}'
      elif op[0] == 'swapaxes':
        text += f'.swapaxes({op[1]}, {op[2]})'
      elif op[0] == 'slice':
        text += '[' + ':, ' * op[1] + f'{"" if op[2] is None else op[2]}:{"" if op[3] is None else op[3]}]'
      elif op[0] == 'reshape':
        text += f'.reshape{op[1]}'
      elif op[0] == 'concat':
        text += f'.concat({", ".join(map(repr, op[1]))}, axis={op[2]})'
      else:
        text += f'.astype({op[1].name})'
    return text


view = View()
"""The identity view; index and chain it: `view[0].T`, `view[1].astype('bfloat16')`."""


def compile_rules(rules: Any) -> list:
  """`check_rules`, with each pattern compiled; a pattern that is not a regex is an OptionError."""
  compiled = []
  for pattern, repl in check_rules(rules):
    try:
      compiled.append((re.compile(pattern), repl))
    except re.error as e:
      raise errors.OptionError(f'rule pattern {pattern!r} is not a regular expression: {e}.') from e
  return compiled


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


_METHODS = ('transpose', 'swapaxes', 'astype', 'reshape', 'concat')


def parse_view(text: str) -> View:
  """The view `text` spells as `str(View)` prints it (`view[0].T`, `view.astype(bfloat16)`), parsed, never run.

  Raises:
    OptionError: anything but `view` with indexing, `.T` and the View methods on literal arguments.
  """
  def literal(node):
    if isinstance(node, ast.Name):  # a dtype written bare: astype(bfloat16)
      return node.id
    if isinstance(node, ast.Slice):
      if node.step is not None:
        raise ValueError('a slice step')
      return slice(*(None if n is None else ast.literal_eval(n) for n in (node.lower, node.upper)))
    if isinstance(node, ast.Tuple):
      return tuple(literal(n) for n in node.elts)
    return ast.literal_eval(node)

  def build(node) -> View:
    if isinstance(node, ast.Name) and node.id == 'view':
      return view
    if isinstance(node, ast.Attribute) and node.attr == 'T':
      return build(node.value).T
    if isinstance(node, ast.Subscript):
      return build(node.value)[literal(node.slice)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _METHODS:
      method = getattr(build(node.func.value), node.func.attr)
      return method(*(literal(a) for a in node.args), **{k.arg: literal(k.value) for k in node.keywords})
    raise ValueError(ast.dump(node)[:60])

  try:
    return build(ast.parse(text.strip(), mode='eval').body)
  except (SyntaxError, ValueError, TypeError) as e:
    raise errors.OptionError(f'{text!r} is not a view: write it as plan prints views, e.g. view.T, view[0].T,'
                             f' view.reshape(8, 64, -1), view.astype(bfloat16) ({e}).') from None
