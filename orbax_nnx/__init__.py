"""orbax-nnx: first-class Flax NNX support for Orbax checkpointing.

    mngr = ocp.CheckpointManager(path, handler_registry=orbax_nnx.nnx_registry)
    mngr.save(step, args=ocp.args.StandardSave(nnx.state(model)))
    mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

Importing this package registers `NNXCheckpointHandler` with Orbax.
"""

import importlib
from typing import TYPE_CHECKING, Any

from orbax_nnx import errors, v1
from orbax_nnx.api import restore
from orbax_nnx.compare import compare
from orbax_nnx.conversion import convert
from orbax_nnx.handlers import (
    NNXCheckpointHandler,
    NNXRestore,
    NNXSave,
    add_to_registry,
    nnx_registry,
)
from orbax_nnx.inspection import inspect_checkpoint as inspect
from orbax_nnx.mapping.layout import LayerGroup, Layout, detect_layout
from orbax_nnx.mapping.views import View, view
from orbax_nnx.options import LinenOutput, Mapping
from orbax_nnx.planning.planner import Plan, plan
from orbax_nnx.serving import export_params, load_params
from orbax_nnx.sources.metadata import read_item_metadata, resolve_item
from orbax_nnx.version import __version__

if TYPE_CHECKING:
  from orbax_nnx import llama, testing

v1.register()  # Orbax v1: NNX objects saved and loaded by orbax_nnx.v1.NNXHandler

_ON_FIRST_USE = ('llama', 'testing')  # they define NNX Modules, so importing them imports flax.nnx


def __getattr__(name: str) -> Any:
  if name in _ON_FIRST_USE:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_ON_FIRST_USE))


__all__ = [
    'LayerGroup',
    'Layout',
    'LinenOutput',
    'Mapping',
    'NNXCheckpointHandler',
    'Plan',
    'NNXRestore',
    'NNXSave',
    'add_to_registry',
    'compare',
    'inspect',
    'llama',
    'testing',
    'v1',
    'convert',
    'export_params',
    'load_params',
    'detect_layout',
    'errors',
    'nnx_registry',
    'plan',
    'read_item_metadata',
    'resolve_item',
    'restore',
    'View',
    'view',
    '__version__',
]
