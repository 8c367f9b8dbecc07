"""`flax` and `flax.nnx`, imported on first use.

Importing `flax.nnx` costs about 0.3 s (it imports `flax.linen`, rich, optax, treescope, yaml): a quarter of
what `import orbax_nnx` took, and up to a fifth of a small conversion's wall time, for work that never touches
an NNX object (`convert`, `inspect`, `plan`, the CLI). The library's modules reach Flax through these names instead; the
first attribute read imports the real module. Modules that define NNX Modules (`llama`, `examples`,
`testing`) import Flax themselves and are loaded on first use (`orbax_nnx.__getattr__`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _OnFirstUse:
  """Stands for the module `name`, importing it at the first attribute read; each attribute read is then kept
  on this object (per-leaf `isinstance(x, nnx.Variable)` checks cost a plain attribute read)."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str) -> Any:
    value = getattr(importlib.import_module(self._name), attr)
    setattr(self, attr, value)
    return value

  def __repr__(self) -> str:
    return f'<{self._name}, imported on first use>'


flax = _OnFirstUse('flax')
nnx = _OnFirstUse('flax.nnx')
graphlib = _OnFirstUse('flax.nnx.graphlib')


def nnx_loaded() -> bool:
  """Whether the program imported `flax.nnx`: if not, no object in it can be an NNX one."""
  return 'flax.nnx' in sys.modules
