"""Flattening NNX objects to the trees Orbax writes, and rebuilding them.

An NNX item (an `nnx.State`, a Module or Optimizer, or nested dicts of these) is
flattened to `(path, leaf)` pairs where `leaf` is an `nnx.Variable` or a plain
array. On disk a Variable at `path` lives at `path + ('value',)` (the raw
`nnx.State` flavour that `StandardCheckpointer().save(dir, nnx.state(x))` writes)
or at `path` (the pure-dict flavour of `nnx.to_pure_dict`). Keys on disk are
strings; integer keys (optax chain indices) are restored from our records.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import jax

from orbax_nnx import compat
from orbax_nnx.lazy_flax import flax, nnx, nnx_loaded

Key = str | int
Path = tuple[Key, ...]
DiskPath = tuple[str, ...]
Flavour = Literal['raw', 'pure']


class _CacheOrIntermediate:
  """The NNX filter of Variables left out of checkpoints by default: `nnx.Cache` and `nnx.Intermediate` (a
  predicate, so that defining it imports no Flax)."""

  def __call__(self, path: Any, value: Any) -> bool:
    return isinstance(value, (nnx.Cache, nnx.Intermediate))

  def __repr__(self) -> str:
    return '(nnx.Cache, nnx.Intermediate)'


DEFAULT_EXCLUDE = _CacheOrIntermediate()
VALUE_KEY = 'value'


def path_str(path: Path) -> str:
  """`('model', 'layers', 0, 'kernel')` -> `'model/layers/0/kernel'`."""
  return '/'.join(str(k) for k in path)


def disk_path(path: Path, is_variable: bool, flavour: Flavour) -> DiskPath:
  keys = tuple(str(k) for k in path)
  return keys + (VALUE_KEY,) if is_variable and flavour == 'raw' else keys


def is_graph_node(x: Any) -> bool:
  """A Module, Optimizer or other NNX object (not a Variable, State or container)."""
  return compat.is_graph_node(x) and not isinstance(x, (Mapping, list, tuple, nnx.Variable))


def contains_nnx(item: Any) -> bool:
  """Whether `item` holds any NNX object (State, Variable, Module, Optimizer)."""
  if not nnx_loaded():  # then nothing can be one: Orbax v1 asks this of every plain pytree it saves
    return False
  found = False

  def visit(x):
    nonlocal found
    if isinstance(x, (nnx.State, nnx.Variable)) or is_graph_node(x):
      found = True
    return x

  jax.tree.map(visit, item, is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)) or is_graph_node(x))
  return found


def item_state(node: Any, exclude=DEFAULT_EXCLUDE) -> nnx.State:
  """The state of a Module/Optimizer without the excluded Variable kinds."""
  state = nnx.state(node)
  return _filter_state(state, exclude)


def _filter_state(state: nnx.State, exclude) -> nnx.State:
  if not exclude:
    return state
  drop = nnx.filterlib.to_predicate(exclude)
  flat = [(p, v) for p, v in nnx.to_flat_state(state) if not drop(p, v)]
  return nnx.from_flat_state(flat)


def flatten(item: Any, exclude=DEFAULT_EXCLUDE, prefix: Path = (), *, keep_empty: bool = False
            ) -> Iterator[tuple[Path, Any]]:
  """Yields `(path, leaf)` for an NNX item; leaves are Variables or array-likes.

  Variables that hold an empty pytree (optax `MaskedNode`, `EmptyState`, `None`) carry no
  data, and `ocp.PLACEHOLDER` leaves ask for no data: both are skipped unless `keep_empty`
  (saving writes empty nodes as Orbax would).
  """
  for path, leaf in _flatten(item, exclude, prefix):
    if keep_empty or not (is_empty(leaf) or is_placeholder(leaf)):
      yield path, leaf


def value_of(leaf: Any) -> Any:
  """A Variable's value, or the leaf itself."""
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def is_placeholder(leaf: Any) -> bool:
  """A target leaf set to `ocp.PLACEHOLDER` (`...`): skipped by a restore, returned as is."""
  value = value_of(leaf)
  return value is Ellipsis


def is_empty(leaf: Any) -> bool:
  """A leaf with no array data: a Variable or value that is an empty pytree (MaskedNode, None)."""
  value = value_of(leaf)
  return not _is_leaf_value(value) and not jax.tree.leaves(value)


def _flatten(item: Any, exclude, prefix: Path) -> Iterator[tuple[Path, Any]]:
  if isinstance(item, nnx.State):
    for path, leaf in nnx.to_flat_state(_filter_state(item, exclude)):
      yield prefix + tuple(path), leaf
  elif is_graph_node(item):
    yield from _flatten(item_state(item, exclude), (), prefix)
  elif isinstance(item, Mapping):
    for key in item:
      yield from _flatten(item[key], exclude, prefix + (key,))
  elif isinstance(item, (list, tuple)) and not _is_leaf_value(item):
    for i, value in enumerate(item):
      yield from _flatten(value, exclude, prefix + (i,))
  elif item is None:
    return
  else:
    yield prefix, item


def _is_leaf_value(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def rebuild(item: Any, values: Mapping[Path, Any], exclude=DEFAULT_EXCLUDE, prefix: Path = ()) -> Any:
  """Rebuilds `item`'s structure with leaves taken from `values` (by path).

  Variables are copied with their metadata and the new value; Modules and
  Optimizers are updated in place and returned.
  """
  if isinstance(item, nnx.State):
    flat = []
    for path, leaf in nnx.to_flat_state(_filter_state(item, exclude)):
      full = prefix + tuple(path)
      if full in values:
        flat.append((path, _with_value(leaf, values[full])))
      else:
        flat.append((path, leaf))
    return nnx.from_flat_state(flat, cls=type(item))
  if is_graph_node(item):
    state = rebuild(item_state(item, exclude), values, (), prefix)
    nnx.update(item, state)
    return item
  if isinstance(item, Mapping):
    return {k: rebuild(v, values, exclude, prefix + (k,)) for k, v in item.items()}
  if isinstance(item, (list, tuple)) and not _is_leaf_value(item):
    return type(item)(rebuild(v, values, exclude, prefix + (i,)) for i, v in enumerate(item))
  return values.get(prefix, item)


def set_path(tree: dict, path: tuple, value: Any) -> None:
  """Sets `tree[path[0]][path[1]]... = value`, creating dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _with_value(leaf: Any, value: Any) -> Any:
  if isinstance(leaf, nnx.Variable):
    return leaf.copy(value)
  return value


# ---------------------------------------------------------------------------
# Variable records: what we keep in Orbax custom metadata to rebuild Variables.


@dataclasses.dataclass(frozen=True)
class VariableRecord:
  """How to rebuild one Variable: its path (int keys kept), class and metadata."""

  path: Path
  type_name: str
  metadata: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    return {'path': list(self.path), 'type': self.type_name, 'metadata': self.metadata}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'VariableRecord':
    path = tuple(k if isinstance(k, int) else str(k) for k in data['path'])
    return cls(path, str(data['type']), dict(data.get('metadata') or {}))


def qualified_name(cls: type) -> str:
  return f'{cls.__module__}.{cls.__qualname__}'


def record_for(path: Path, variable: nnx.Variable) -> VariableRecord:
  meta = {}
  for name, value in variable.get_metadata().items():
    converted = _to_json(value)
    if converted is not _UNSERIALIZABLE:
      meta[name] = converted
  return VariableRecord(tuple(path), qualified_name(type(variable)), meta)


_UNSERIALIZABLE = object()


def _to_json(value: Any) -> Any:
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (tuple, list, jax.sharding.PartitionSpec)):
    items = [_to_json(v) for v in value]
    return _UNSERIALIZABLE if any(v is _UNSERIALIZABLE for v in items) else items
  return _UNSERIALIZABLE


def _from_json(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  return value


def resolve_variable_type(type_name: str) -> type[nnx.Variable]:
  """Finds a Variable class by qualified name among already-imported modules.

  Nothing is imported or evaluated on behalf of checkpoint content: a class
  whose module the program has not imported falls back to `nnx.Variable`.
  """
  base = nnx.Variable  # imports flax.nnx (on first use here): Flax's own Variable types always resolve
  module_name, _, qualname = type_name.rpartition('.')
  while module_name:
    module = sys.modules.get(module_name)
    if module is not None:
      obj: Any = module
      for part in qualname.split('.'):
        obj = getattr(obj, part, None)
        if obj is None:
          break
      if isinstance(obj, type) and issubclass(obj, base):
        return obj
      break
    module_name, _, head = module_name.rpartition('.')
    qualname = f'{head}.{qualname}'
  return base


_DEFAULT_ATTRS = {'hijax': False, 'ref': False}


def make_variable(record: VariableRecord, value: Any) -> nnx.Variable:
  cls = resolve_variable_type(record.type_name)
  attrs = dict(_DEFAULT_ATTRS)
  attrs["eager_sharding"] = flax.config.flax_always_shard_variable
  attrs.update({k: _from_json(v) for k, v in record.metadata.items()})
  attrs['hijax'] = False  # restored values are plain arrays
  attrs['ref'] = False
  return cls.from_metadata(value, attrs)
