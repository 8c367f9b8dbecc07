"""orbax-nnx: first-class Flax NNX support for Orbax checkpointing.

    mngr = ocp.CheckpointManager(path, handler_registry=orbax_nnx.nnx_registry)
    mngr.save(step, args=ocp.args.StandardSave(nnx.state(model)))
    mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

Importing this package registers `NNXCheckpointHandler` with Orbax.
"""

from orbax_nnx import errors
from orbax_nnx.handlers import (
    NNXCheckpointHandler,
    NNXRestore,
    NNXSave,
    add_to_registry,
    nnx_registry,
)
from orbax_nnx.metadata import read_item_metadata
from orbax_nnx.version import __version__

__all__ = [
    'NNXCheckpointHandler',
    'NNXRestore',
    'NNXSave',
    'add_to_registry',
    'errors',
    'nnx_registry',
    'read_item_metadata',
    '__version__',
]
