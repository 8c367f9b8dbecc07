"""Byte sizes as users write them: ints (bytes) or strings with a unit, the one parser every option uses.

    parse_bytes(5 * 2**30, 'max_shard_size')  # 5368709120
    parse_bytes('5GB', 'max_shard_size')      # 5000000000 (decimal, as Hugging Face's `max_shard_size`)
    parse_bytes('500MiB', 'memory_budget')    # 524288000 (binary)

Units (case-insensitive, optional space): B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024).
A bare number in a string is bytes, unless the caller names another default unit (the CLI's MiB flags).
"""

from __future__ import annotations

import numbers
import re
from fractions import Fraction
from typing import Any

from orbax_nnx import errors

_UNITS = {'b': 1, 'kb': 10**3, 'mb': 10**6, 'gb': 10**9, 'tb': 10**12,
          'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}
_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$')


def parse_bytes(value: Any, name: str, *, bare_unit: str = 'B', allow_none: bool = True) -> int | None:
  """A positive byte count from an int (bytes) or a string such as `'5GB'` or `'500MiB'`.

  Args:
    value: the size as given: an int, a string with a unit, or None (left to the caller's default).
    name: the option's name, as the user spelled it (`memory_budget`, `--memory-budget`), for errors.
    bare_unit: the unit of a number without one in a string (the CLI's older `...-mib` flags: 'MiB').
    allow_none: whether None is accepted (and returned).

  Returns:
    The size in bytes (None for None, where allowed).

  Raises:
    OptionError: not a size, not positive, or an unknown unit; the message quotes the value as typed.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
    raise errors.OptionError(f'{name}={value!r} is not a size: pass bytes as an int, or a string such as'
                             " '512MiB' or '5GB'.")
  if not isinstance(value, str):
    value = int(value)
    if value <= 0:
      raise errors.OptionError(f'{name}={value} must be positive (a number of bytes).')
    return value
  match = _SIZE.match(value)
  unit = (match.group(2) or bare_unit) if match else ''
  if match is None or unit.lower() not in _UNITS:
    raise errors.OptionError(f'{name}={value!r} is not a size: write a number with one of the units B, KB, MB,'
                             ' GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 5GB or 512MiB.')
  nbytes = int(Fraction(match.group(1)) * _UNITS[unit.lower()])  # exact: float makes '2.01KB' 2009 bytes
  if nbytes <= 0:
    raise errors.OptionError(f'{name}={value!r} must be positive.')
  return nbytes

