"""Byte sizes: one parser (orbax_nnx.sizes.parse_bytes) for every option, in Python and on the CLI."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.sizes import parse_bytes


@pytest.mark.parametrize('value, expected', [
    (1, 1), (np.int64(4096), 4096), ('5GB', 5 * 10**9), ('5 gb', 5 * 10**9), ('500MiB', 500 * 2**20),
    ('1.5GiB', 3 * 2**29), ('2KiB', 2048), ('3kb', 3000), ('7B', 7), ('123', 123), ('1TiB', 2**40),
    ('2.01KB', 2010), ('8.03KB', 8030),  # exact decimals (a float product gives 2009 and 8029)
])
def test_sizes_parse_as_hugging_face_and_iec_write_them(value, expected):
  assert parse_bytes(value, 'x') == expected


def test_a_bare_number_takes_the_callers_unit():
  assert parse_bytes('512', '--memory-budget', bare_unit='MiB') == 512 * 2**20
  assert parse_bytes('512KB', '--memory-budget', bare_unit='MiB') == 512_000


@pytest.mark.parametrize('value, message', [
    (0, r"memory_budget=0 must be positive"), (-5, 'must be positive'), ('0MiB', r"memory_budget='0MiB' must be"),
    ('5XB', r"memory_budget='5XB' is not a size.*KiB, MiB"), ('', 'is not a size'), ('GB', 'is not a size'),
    (1.5, r'memory_budget=1.5 is not a size'), (True, 'is not a size'), ('1e9', 'is not a size'),
])
def test_bad_sizes_are_option_errors_quoting_what_was_typed(value, message):
  with pytest.raises(errors.OptionError, match=message):
    parse_bytes(value, 'memory_budget')


def test_none_is_the_callers_default_only_where_allowed():
  assert parse_bytes(None, 'x') is None
  with pytest.raises(errors.OptionError, match='x=None is not a size'):
    parse_bytes(None, 'x', allow_none=False)


def test_every_option_takes_strings(tmp_path):
  src = tmp_path / 'src'
  tree = {'params': {'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4)}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(src, tree)
  orbax_nnx.convert(src, tmp_path / 'a', memory_budget='64MiB')
  with pytest.warns(DeprecationWarning, match=r'convert\(buffer_bytes=...\) is renamed memory_budget='):
    orbax_nnx.convert(src, tmp_path / 'b', buffer_bytes='1MB')
  orbax_nnx.export_params(src, tmp_path / 'c', memory_budget='32MiB')
  assert orbax_nnx.compare(tmp_path / 'a', tmp_path / 'b', values=True, memory_budget='8MiB').equal
  restored = orbax_nnx.restore(src, {'params': {'params': {'w': np.zeros((3, 4), np.float32)}}})
  np.testing.assert_array_equal(restored['params']['params']['w'], tree['params']['params']['w'])
  assert orbax_nnx.NNXRestore(memory_budget='1GiB').memory_budget == 2**30
  with pytest.raises(errors.OptionError, match=r"memory_budget='lots' is not a size"):
    orbax_nnx.convert(src, tmp_path / 'd', memory_budget='lots')
  with pytest.raises(errors.OptionError, match=r'memory_budget=0 must be positive'):
    orbax_nnx.NNXRestore(memory_budget=0)
