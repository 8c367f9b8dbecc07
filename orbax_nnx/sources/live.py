"""A live NNX model (or state) as a source: the same plans and streaming writers as a checkpoint,
over arrays already in memory (e.g. exporting a fine-tuned model to Hugging Face files)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from etils import epath

from orbax_nnx import errors, nnx_tree
from orbax_nnx.io.buffers import aligned_empty, transposed
from orbax_nnx.lazy_flax import nnx
from orbax_nnx.nnx_tree import DiskPath
from orbax_nnx.sources.metadata import CUSTOM_KEY, ItemMetadata, LeafInfo

LIVE = epath.Path('<live model>')  # the "directory" errors name


def live_metadata(item: Any) -> ItemMetadata:
  """`item` (a Module, Optimizer or `nnx.State`) described as the NNX checkpoint `nnx.state(item)` would be."""
  state = nnx.state(item) if nnx_tree.is_graph_node(item) else item
  leaves: dict[DiskPath, LeafInfo] = {}
  records = []
  for path, leaf in nnx_tree.flatten(state):
    value = nnx_tree.value_of(leaf)
    if not isinstance(value, (jax.Array, np.ndarray)):
      raise errors.OptionError(f'{nnx_tree.path_str(path)}: a live source needs concrete arrays, not'
                               f' {type(value).__name__} (pass the model itself, not an abstract one).')
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      raise errors.OptionError(f'{nnx_tree.path_str(path)}: spans other processes; save the model and export'
                               ' the checkpoint instead (each process then reads its own shards).')
    is_variable = isinstance(leaf, nnx.Variable)
    disk = nnx_tree.disk_path(path, is_variable, 'raw')
    leaves[disk] = LeafInfo(tuple(value.shape), np.dtype(value.dtype), value)
    if is_variable:
      records.append(nnx_tree.record_for(path, leaf).to_json())
  return ItemMetadata(LIVE, leaves, {CUSTOM_KEY: {'variables': records, 'flavour': 'raw'}}, False, 'live')


class LiveArray:
  """One in-memory array: any region is copied out exactly (gathered from its devices)."""

  exact = True

  def __init__(self, value: Any):
    self.value = value
    self.shape, self.dtype = tuple(value.shape), np.dtype(value.dtype)
    self.chunk = self.shape

  def read(self, region: tuple, perm: tuple[int, ...] | None = None) -> np.ndarray:
    out = aligned_empty(tuple(r.stop - r.start for r in region), self.dtype)
    np.copyto(out, np.asarray(self.value[region]))
    return transposed(out, perm) if perm is not None else out


class LiveOpener:
  def __init__(self, meta: ItemMetadata):
    self.meta = meta

  def __call__(self, path: DiskPath) -> LiveArray:
    return LiveArray(self.meta.leaves[path].metadata)
