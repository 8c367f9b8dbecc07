"""Refusing allocations that cannot fit, before making them.

Array shapes come from checkpoint metadata, which may be damaged or forged. Wherever we
allocate by a *stored* shape (untargeted restores, conversions, `compare` values), the
bytes this process would hold are checked against the memory it can get first, so a bad
`.zarray` raises a typed error instead of an OOM kill. Targeted restores allocate by the
target's shapes, which are checked against the stored ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from orbax_nnx import errors

# (tree path, shape, dtype, sharding or None for "whole array in this process")
Allocation = tuple[str, tuple[int, ...], Any, Any]


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def available_bytes() -> int:
  """Memory this process can still get: MemAvailable, capped by a cgroup limit if any."""
  avail = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          avail = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if avail is None:
    try:
      avail = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
      return 2**62  # unknown platform: do not refuse
  limit, used = _read_int('/sys/fs/cgroup/memory.max'), _read_int('/sys/fs/cgroup/memory.current')
  if limit is not None and used is not None:
    avail = min(avail, max(0, limit - used))
  return avail


MIN_DEFAULT_IN_FLIGHT = 64 * 2**20
MIN_DEFAULT_LOAD_IN_FLIGHT = 32 * 2**20
MAX_DEFAULT_IN_FLIGHT = 256 * 2**20
IN_FLIGHT_SHARE = 96  # a conversion without a budget keeps 1/96 of what it reads in flight (within the bounds)


def default_in_flight(read_bytes: int, *, writes: bool = True) -> int:
  """The bytes an operation without a `memory_budget` keeps in flight: 1/96 of what it reads, within 64-256 MiB
  (32-256 MiB for a load, `writes=False`), and at most an eighth of the memory this process can get.

  A load's buffers in flight only wait to become the loaded arrays, so its floor is lower: a 336 MiB bf16
  Hugging Face load into a Llama grew peak RSS by 1.07x the loaded bytes at 32 MiB, 1.19x at 64 MiB, in the
  same time (0.50-0.56 s against 0.44-0.50 s).

  This, not the chunk cache, sets the peak: arrays under three quarters of it are written whole, in batches,
  while the next ones are read; larger ones block by block. Measured on a 2.8 GiB MaxText-like train state (4
  and 16 MiB arrays, in-process): 64 MiB in flight peaked at 0.60 GiB (0.21x the checkpoint) in 11.6-11.8 s,
  128 MiB at 0.69 GiB (0.25x) in 10.3-10.6 s; 32 MiB, which writes the 16 MiB arrays block by block, at
  0.49-0.52 GiB in 14.1-15.5 s. Small checkpoints get the floor, which their many small leaves fill anyway.
  """
  floor = MIN_DEFAULT_IN_FLIGHT if writes else MIN_DEFAULT_LOAD_IN_FLIGHT
  sized = min(max(read_bytes // IN_FLIGHT_SHARE, floor), MAX_DEFAULT_IN_FLIGHT)
  return max(1, min(sized, available_bytes() // 8))


def local_bytes(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> int:
  """Bytes this process holds for an array of `shape` placed with `sharding`."""
  itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
  if sharding is None:
    return math.prod(shape) * itemsize
  shard = sharding.shard_shape(tuple(shape))
  devices = sharding.addressable_devices
  if all(d.platform == 'cpu' for d in devices):
    copies = len(devices)  # every device buffer lives in host memory
  else:  # accelerators: host memory holds each distinct shard once, while it is read
    indices = sharding.addressable_devices_indices_map(tuple(shape)).values()
    copies = len({tuple((s.start, s.stop) for s in index) for index in indices})
  return math.prod(shard) * itemsize * copies


def _dtype_name(dtype: Any) -> str:
  return 'key' if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).name


def _human(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
    if n < 1024 or unit == 'PiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{n} B'
    n /= 1024
  return f'{n} B'


def check_fits(where: Any, allocations: Iterable[Allocation], *, what: str, advice: str, at_once: bool = True,
               factor: float = 1.0) -> None:
  """Raises ResourceError if the allocations cannot fit in this process's memory.

  `at_once`: all arrays are alive together (a restore), else one at a time (streaming).
  `factor`: working copies per array (e.g. 2 when two sides are compared).
  `advice`: what to do instead when the shapes are real.
  """
  sizes = [(path, tuple(shape), dtype, local_bytes(shape, dtype, sharding) * factor)
           for path, shape, dtype, sharding in allocations]
  if not sizes:
    return
  need = sum(s[3] for s in sizes) if at_once else max(s[3] for s in sizes)
  avail = available_bytes()
  if need <= avail:
    return
  path, shape, dtype, nbytes = max(sizes, key=lambda s: s[3])
  raise errors.ResourceError(
      f'{where}: {what} needs {_human(int(need))} of memory in this process but {_human(avail)} is available;'
      f' the largest array is {path}, shape {shape} {_dtype_name(dtype)} ({_human(int(nbytes))}), as the'
      ' checkpoint metadata declares. Nothing was allocated. If that shape is wrong, the metadata is damaged:'
      f' use an earlier step. Otherwise {advice}.'
  )
