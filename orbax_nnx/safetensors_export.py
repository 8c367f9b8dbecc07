"""Export to Hugging Face-style sharded safetensors, streaming, through rules with views.

    orbax_nnx.export_params(ckpt, 'out/', format='safetensors', target=abstract_model,
                            rules=orbax_nnx.llama.hf_export_rules(cfg), dtype='bfloat16')

Two steps, both plans (metadata only) before any byte moves:
1. the checkpoint is planned into `target` (any layout we read; stacked layer groups of the
   model are seen per layer as `layers/N/...`);
2. export `rules` map each model path to tensor names with views (`view.T`, `.reshape`, ...).
The files are then written one after another, each tensor evaluated block by block (reads per
region, bounded memory) into a temporary directory that is renamed into place at the end (on object stores,
which cannot rename atomically: in place, the index last).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from orbax_nnx import errors, nnx_tree, sizes
from orbax_nnx.io.destination import check_destination
from orbax_nnx.io.regions import evaluate, row_blocks
from orbax_nnx.io.source_arrays import SourceArrays
from orbax_nnx.mapping.axes import Evidence, layer_axis
from orbax_nnx.mapping.rules import apply_view, expand
from orbax_nnx.mapping.views import View, check_rules, compile_rules
from orbax_nnx.planning.expressions import Cast, Expr, Take, cast
from orbax_nnx.planning.planner import build, lookup_axis, target_leaves
from orbax_nnx.sources.metadata import commits_by_marker, read_item_metadata, resolve_item
from orbax_nnx.sources.safetensors import DTYPE_NAMES, INDEX_FILE

DEFAULT_SHARD_BYTES = 5 * 2**30  # what `save_pretrained` writes by default
DEFAULT_EXPORT_BUDGET = 512 * 2**20  # bytes held: half decoded chunks, half row blocks evaluated ahead
BLOCK_BYTES = 64 * 2**20  # one tensor is evaluated and written this much at a time


def _per_layer(path: tuple, expr: Expr, leaf, scan_axis, counts: dict, names) -> list[tuple[str, Expr]]:
  """`layers/attn/...` of a stacked group as `layers/0/attn/...`, `layers/1/...`: Takes on its layer axis.

  Only names that mark a stacked group (`layers`, `blocks`, ... and declared `groups=`) are split: a single
  submodule called `layer` is not. The axis is decided by `mapping.axes.layer_axis`: `scan_axis`, then the
  leaf's `out_sharding` names, then nnx.vmap's 0. Every leaf of a group must give the same layer count
  (`counts`: group -> (count, first leaf)), so a wrong axis is an error, not a wrong tensor."""
  name = nnx_tree.path_str(path)
  keys = [str(k) for k in path]
  for k in range(len(keys)):
    if names.stacked_at(tuple(keys), k) and expr.shape:
      rank = len(expr.shape)
      axis = layer_axis(name, expr.shape, range(rank), Evidence(
          explicit=lookup_axis(scan_axis, leaf.canon), names=names.names_axis(leaf.out_sharding), convention=0),
          what='exporting each layer')
      n = expr.shape[axis]
      group = '/'.join(keys[: k + 1])
      seen, first = counts.setdefault(group, (n, name))
      if seen != n:
        raise errors.PlanError(f'{name}: {n} layers on axis {axis}, but {first} has {seen}: the stacked layers of'
                               f' {group} are not all on axis {axis}. Pass scan_axis={{REGEX: AXIS}} for them.')
      return [('/'.join(keys[: k + 1] + [str(i)] + keys[k + 1:]), Take(expr, i, axis)) for i in range(n)]
  return [(name, expr)]


def _per_slot(name: str, expr: Expr, first_rule) -> list[tuple[str, Expr]]:
  """A model leaf that no export rule names whole, but whose sub-arrays along axis 0 a rule names as
  `name[i]` (e.g. the experts of a stacked projection, `layers/0/mlp/gate_proj[7]`): one piece per index, each a
  Take on axis 0. Any other leaf: itself."""
  if first_rule(name) is not None or not expr.shape:
    return [(name, expr)]
  pieces = [(f'{name}[{i}]', Take(expr, i, 0)) for i in range(expr.shape[0])]
  return pieces if any(first_rule(piece) is not None for piece, _ in pieces) else [(name, expr)]


def export_plan(meta, target: Any, rules: Sequence, *, dtype: Any = None, mapping: Any = None,
                merge_lora: bool = False) -> dict[str, Expr]:
  """Tensor name -> expression over the stored leaves `meta` describes (metadata only).

  The source is planned into `target` through `mapping` (an `orbax_nnx.Mapping`), then `rules` name each
  model leaf's tensor. `merge_lora` folds each `nnx.LoRALinear` adapter into its kernel (`W + A @ B`, in
  float32) first.
  """
  from orbax_nnx import options
  from orbax_nnx.conversion import apply_lora  # local: conversion imports the writer this module shares
  from orbax_nnx.mapping.layout import detect

  rules = check_rules(rules)
  mapping = mapping if mapping is not None else options.Mapping()
  scan_axis = mapping.scan_axis
  source = detect(meta, layout=mapping.layout, groups=mapping.groups)
  src_item = meta.directory
  leaves = target_leaves(target)
  plan = build(source, leaves, rules=mapping.rules, scan_axis=scan_axis, param_scan_axis=mapping.param_scan_axis)
  if plan.missing:
    raise errors.StructureMismatchError(plan.missing, [], where=f'at {src_item} (exporting into the target model)')
  if merge_lora:
    plan = apply_lora(plan, None, 'merge')
  compiled = compile_rules(rules)
  out: dict[str, Expr] = {}
  unmatched, used = [], set()
  cast_to = np.dtype(jax.numpy.dtype(dtype)) if dtype is not None else None
  counts: dict = {}

  def first_rule(name: str):
    return next(((i, m, repl) for i, (pattern, repl) in enumerate(compiled) if (m := pattern.fullmatch(name))), None)

  for path, expr in plan.entries.items():
    for whole_name, whole_expr in _per_layer(path, expr, plan.leaves[path], scan_axis, counts, source.group_names):
      for name, layer_expr in _per_slot(whole_name, whole_expr, first_rule):
        hit = first_rule(name)
        if hit is None:
          unmatched.append(name)
          continue
        i, match, repl = hit
        used.add(i)
        views = repl if isinstance(repl, Mapping) else {repl: View()}
        for out_name, v in views.items():
          tensor = expand(match, out_name)
          if tensor in out:
            raise errors.PlanError(f'two model leaves export to the tensor {tensor!r} (the second: {name}); fix the rules.')
          e = apply_view(v, layer_expr, f'{name} -> {tensor}')
          own_dtype = any(op[0] == 'astype' for op in v.ops)
          if cast_to is not None and not own_dtype and np.issubdtype(e.dtype, np.floating) and e.dtype != cast_to:
            e = cast(e.expr if isinstance(e, Cast) else e, cast_to)
          out[tensor] = e
  if unmatched:
    raise errors.PlanError(f'model leaves that no export rule names: {unmatched[:10]}{" ..." if len(unmatched) > 10 else ""}'
                           '. Add a rule for them (rules fullmatch the model path, e.g. layers/0/mlp/up_proj/kernel, or one'
                           ' sub-array of it along axis 0, e.g. layers/0/mlp/gate_proj[7]).')
  idle = [rules[i][0] for i in range(len(rules)) if i not in used]
  if idle:
    raise errors.PlanError(f'export rules that match no model leaf: {idle}; fix the pattern or drop the rule.')
  for tensor, e in out.items():
    if np.dtype(e.dtype) not in DTYPE_NAMES:
      raise errors.PlanError(f'{tensor}: dtype {np.dtype(e.dtype).name} has no safetensors name; pass dtype=.')
  return out


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _files(tensors: dict[str, Expr], max_shard_size: int) -> list[list[str]]:
  """Tensors in natural name order, cut into files of at most `max_shard_size` bytes (one tensor may exceed it)."""
  files, size = [[]], 0
  for name in sorted(tensors, key=_natural):
    nbytes = _nbytes(tensors[name])
    if files[-1] and size + nbytes > max_shard_size:
      files.append([])
      size = 0
    files[-1].append(name)
    size += nbytes
  return files


def _nbytes(expr: Expr) -> int:
  return math.prod(expr.shape) * np.dtype(expr.dtype).itemsize


def _header(names: list[str], tensors: dict[str, Expr]) -> bytes:
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name in names:
    e = tensors[name]
    header[name] = {'dtype': DTYPE_NAMES[np.dtype(e.dtype)], 'shape': list(e.shape),
                    'data_offsets': [offset, offset + _nbytes(e)]}
    offset += _nbytes(e)
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors library writes it
  return len(raw).to_bytes(8, 'little') + raw


def _evaluate_block(expr: Expr, index: tuple, source: SourceArrays) -> np.ndarray:
  return np.ascontiguousarray(evaluate(expr, index, source), dtype=expr.dtype)


def _write_blocks(f, jobs: list[tuple[Expr, tuple]], source: SourceArrays, pool, ahead_bytes: int) -> None:
  """Appends the bytes of each (expression, block) in order; blocks are evaluated on `pool` ahead of
  the writer while the bytes in flight stay within `ahead_bytes` (at least one block)."""
  pending: collections.deque = collections.deque()
  inflight, position = 0, 0
  for _ in jobs:
    while position < len(jobs) and (not pending or inflight + _block_bytes(*jobs[position]) <= ahead_bytes):
      expr, index = jobs[position]
      pending.append((_block_bytes(expr, index), pool.submit(_evaluate_block, expr, index, source)))
      inflight += pending[-1][0]
      position += 1
    nbytes, future = pending.popleft()
    block = future.result()
    f.write(memoryview(block.reshape(-1).view(np.uint8)))
    inflight -= nbytes
    del block


def _block_bytes(expr: Expr, index: tuple) -> int:
  return math.prod(s.stop - s.start for s in index) * np.dtype(expr.dtype).itemsize


def write_safetensors(dst: epath.Path, tensors: dict[str, Expr], source: SourceArrays, *,
                      max_shard_size: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                      ahead_bytes: int = 2 * BLOCK_BYTES, sources: Sequence[epath.PathLike] = ()) -> int:
  """Writes `tensors` as `model.safetensors` or `model-0000K-of-0000N.safetensors` + index (atomic).

  Row blocks are evaluated ahead of the file writes within `ahead_bytes` (two blocks of at most
  `BLOCK_BYTES`). `dst` is checked against `sources` first (`io.destination.check_destination`).
  Returns the bytes written. Under `jax.distributed`, process 0 writes, the others wait.
  """
  block_bytes = max(1, min(BLOCK_BYTES, ahead_bytes // 2))
  dst = check_destination(dst, sources=sources, overwrite=overwrite)
  total = sum(_nbytes(e) for e in tensors.values())
  if jax.process_count() > 1:  # every process has looked at DST before process 0 creates it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('orbax_nnx_safetensors_export_start')
  if jax.process_index() == 0:
    files = _files(tensors, max_shard_size)
    names = (['model.safetensors'] if len(files) == 1 else
             [f'model-{k + 1:05d}-of-{len(files):05d}.safetensors' for k in range(len(files))])
    index_text = None
    if len(files) > 1:
      weight_map = {n: name for name, members in zip(names, files) for n in members}
      index_text = json.dumps({'metadata': {'total_size': total},
                               'weight_map': dict(sorted(weight_map.items(), key=lambda kv: _natural(kv[0])))}, indent=2)

    def write_into(folder: epath.Path) -> None:
      with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for file_name, members in zip(names, files):
          with (folder / file_name).open('wb') as f:  # on an object store: one object, there once complete
            f.write(_header(members, tensors))
            jobs = [(tensors[n], index) for n in members
                    for index in row_blocks(tensors[n].shape, np.dtype(tensors[n].dtype).itemsize, block_bytes)]
            _write_blocks(f, jobs, source, pool, ahead_bytes=ahead_bytes)
      if index_text is not None:  # last: a reader finds every shard it names
        (folder / INDEX_FILE).write_text(index_text)

    if commits_by_marker(dst):
      _write_in_place(dst, write_into)
    else:
      _write_and_rename(dst, write_into)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('orbax_nnx_safetensors_export')
  return total


def _write_and_rename(dst: epath.Path, write_into) -> None:
  """Where rename is atomic: written into a temporary sibling, renamed into place (an existing checkpoint is
  moved aside first and deleted last)."""
  tmp = dst.parent / f'.{dst.name}.orbax-nnx-tmp-{uuid.uuid4().hex[:8]}'
  tmp.mkdir(parents=True)
  try:
    write_into(tmp)
    if dst.exists():  # a checkpoint (check_destination): moved aside, replaced, then deleted
      old = dst.parent / f'.{dst.name}.orbax-nnx-old-{uuid.uuid4().hex[:8]}'
      dst.rename(old)
      tmp.rename(dst)
      old.rmtree()
    else:
      tmp.rename(dst)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.rmtree()
    raise


def _write_in_place(dst: epath.Path, write_into) -> None:
  """Where there is no atomic rename (object stores; Orbax commits there by marker): each file is one object,
  there only once complete, and the index comes last, so a reader never takes an unfinished export for a whole
  one (a folder of numbered shards without its index is refused as incomplete). An existing checkpoint is
  deleted first, its index before its shards."""
  if dst.exists():
    if (dst / INDEX_FILE).exists():
      (dst / INDEX_FILE).unlink()
    dst.rmtree()
  dst.mkdir(parents=True, exist_ok=True)
  write_into(dst)


def export_safetensors(src: epath.PathLike, dst: epath.PathLike, *, target: Any, rules: Sequence,
                       mapping: Any = None, dtype: Any = 'bfloat16', max_shard_size: int = DEFAULT_SHARD_BYTES,
                       overwrite: bool = False, step: int | None = None, item: str | None = None,
                       memory_budget: int = DEFAULT_EXPORT_BUDGET, merge_lora: bool = False) -> tuple[int, int, int]:
  """`export_params(..., format='safetensors')`: returns (tensors, bytes read, bytes written).

  `src` is a checkpoint path or a live model (Module, Optimizer-free `nnx.State`): its Params export.
  `rules` name the tensors (model path -> tensor name); `mapping` plans `src` into `target`.
  """
  from flax import nnx
  max_shard_size = sizes.parse_bytes(max_shard_size, 'max_shard_size', allow_none=False)
  buffer_bytes = sizes.parse_bytes(memory_budget, 'memory_budget', allow_none=False)
  live = nnx_tree.is_graph_node(src) or isinstance(src, nnx.State)
  target = src if target is None and live else target
  if target is None or not rules:
    raise errors.OptionError("format='safetensors' needs target= (the model, abstract) and export_rules= (model"
                             ' path -> tensor name, e.g. orbax_nnx.llama.hf_export_rules(cfg)).')
  dst = epath.Path(dst)
  sources = ()
  if live:  # a live model: its Params, read from memory
    from orbax_nnx.sources.live import live_metadata
    meta = live_metadata(nnx.state(src, nnx.Param) if nnx_tree.is_graph_node(src) else src)
  else:
    src_item = resolve_item(src, step=step, item=item)
    sources = (src, src_item)
    meta = read_item_metadata(src_item)
  state = nnx.state(target, nnx.Param) if nnx_tree.is_graph_node(target) else target
  tensors = export_plan(meta, state, rules, dtype=dtype, mapping=mapping, merge_lora=merge_lora)
  source = SourceArrays(meta, cache_bytes=max(1, buffer_bytes // 2))  # half decoded chunks, half blocks ahead
  written = write_safetensors(dst, tensors, source, max_shard_size=max_shard_size, overwrite=overwrite,
                              ahead_bytes=max(1, buffer_bytes - buffer_bytes // 2), sources=sources)
  return len(tensors), source.bytes_read, written
