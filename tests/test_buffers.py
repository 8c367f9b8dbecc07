"""io.buffers: aligned host buffers (zero-copy device_put), large ones mapped from the OS."""

import ctypes

import jax
import numpy as np
import pytest

from orbax_nnx.io import buffers


def _mapped(array):
  while isinstance(array, np.ndarray):
    array = array.base
  return isinstance(array, ctypes.Array)  # the exporter of a mapped buffer


@pytest.mark.parametrize('shape,dtype,mapped', [
    ((3, 5), np.float32, False), ((), np.int8, False), ((0, 7), np.float32, False),
    ((buffers.MAPPED_BYTES // 2 - 1,), np.uint16, False), ((buffers.MAPPED_BYTES // 2,), np.uint16, True),
    ((512, 1024), jax.numpy.bfloat16, True)])
def test_aligned_writable_and_mapped_from_the_threshold(shape, dtype, mapped):
  out = buffers.aligned_empty(shape, dtype)
  assert out.shape == shape and out.dtype == np.dtype(dtype) and out.flags.c_contiguous and out.flags.writeable
  assert out.ctypes.data % 64 == 0 or not out.size
  assert _mapped(out) is mapped
  out[...] = 1
  placed = jax.device_put(out, jax.devices()[0], may_alias=True)
  if out.size:
    assert placed.unsafe_buffer_pointer() == out.ctypes.data  # aliased, not copied
  np.testing.assert_array_equal(np.asarray(placed), np.ones(shape, dtype))


MIB = 1 << 20


def test_recycled_mappings_are_reused_only_once_nothing_holds_them():
  with buffers.recycling():
    first = buffers.aligned_empty((MIB,), np.uint8)
    address = first.ctypes.data
    del first
    second = buffers.aligned_empty((MIB // 4,), np.float32)  # same bytes, another shape: the same mapping
    assert second.ctypes.data == address
    view = second[10:20]  # a view keeps the mapping as the array would
    view[...] = 7
    del second
    third = buffers.aligned_empty((MIB,), np.uint8)
    assert third.ctypes.data != address
    third[...] = 1
    np.testing.assert_array_equal(view, np.full(10, 7, np.float32))
    other_size = buffers.aligned_empty((2 * MIB,), np.uint8)
    assert other_size.ctypes.data != address


def test_an_aliased_device_array_keeps_its_mapping():
  with buffers.recycling():
    host = buffers.aligned_empty((MIB // 4,), np.float32)
    host[...] = np.arange(host.size, dtype=np.float32)
    placed = jax.device_put(host, jax.devices()[0], may_alias=True)
    address = host.ctypes.data
    assert placed.unsafe_buffer_pointer() == address
    del host
    later = buffers.aligned_empty((MIB // 4,), np.float32)
    assert later.ctypes.data != address
    later[...] = -1
    np.testing.assert_array_equal(np.asarray(placed), np.arange(MIB // 4, dtype=np.float32))


def test_mappings_are_kept_only_inside_the_block():
  def kept():
    return buffers._recycler._bytes

  dropped = buffers.aligned_empty((MIB,), np.uint8)
  del dropped
  assert kept() == 0
  with buffers.recycling():
    with buffers.recycling():  # nested blocks share the pool
      arrays = [buffers.aligned_empty((MIB,), np.uint8) for _ in range(40)]  # (no fixed cap: 40 MiB kept)
      del arrays
      assert kept() == 40 * MIB
    assert kept() == 40 * MIB
  assert kept() == 0


@pytest.mark.parametrize('scan_layers', [True, False])
def test_conversions_through_recycled_buffers_are_bit_exact(tmp_path, monkeypatch, scan_layers):
  """A scanned checkpoint of 2 MiB arrays (a chunk each) converted with a 4 MiB budget: every read and block
  buffer is a mapping (reused or not: which, depends on thread timing), each filled with garbage as it is
  handed out, and the values written are the stored ones moved, bit for bit."""
  import orbax.checkpoint as ocp

  import orbax_nnx

  rng = np.random.default_rng(0)
  layers = {f'w{i}': {'kernel': rng.standard_normal((256, 4, 512), np.float32)} for i in range(6)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'params': {'params': {'layers': layers}}, 'step': np.int32(3)})
  taken = []
  take = buffers._recycler.take

  def poisoned(nbytes):
    exporter = take(nbytes)
    np.frombuffer(exporter, np.uint8).fill(0xA5)
    taken.append(nbytes)
    return exporter

  monkeypatch.setattr(buffers._recycler, 'take', poisoned)
  orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', scan_layers=scan_layers, memory_budget=4 * MIB)
  monkeypatch.undo()
  assert len(taken) >= 6  # at least each stored chunk
  out = ocp.PyTreeCheckpointHandler().restore(tmp_path / 'dst')['model']
  for name, leaf in layers.items():
    moved = np.moveaxis(leaf['kernel'], 1, 0)
    if scan_layers:
      np.testing.assert_array_equal(out['layers'][name]['kernel']['value'], moved)
    else:
      for i in range(4):
        np.testing.assert_array_equal(out[f'layers_{i}'][name]['kernel']['value'], moved[i])


def test_a_fresh_mapping_first_lets_kept_ones_of_its_size_go():
  """Kept + live bytes grow only while nothing is kept: the peak is never above what no keeping would hold."""
  with buffers.recycling():
    small = [buffers.aligned_empty((MIB,), np.uint8) for _ in range(4)]
    del small
    assert buffers._recycler._bytes == 4 * MIB
    larger = buffers.aligned_empty((2 * MIB + 1,), np.uint8)  # no kept mapping of its size: 3 MiB let go
    assert buffers._recycler._bytes == MIB and larger.nbytes == 2 * MIB + 1
    again = buffers.aligned_empty((MIB,), np.uint8)  # the one left is reused
    assert buffers._recycler._bytes == 0 and again.nbytes == MIB


def test_live_and_kept_bytes_stay_within_the_peak_and_the_smallest_kept_go_first():
  """Kept mappings of other sizes are let go only as far as the peak bound needs, the smallest first: a
  32 MiB stream unit kept between two uses is not given up for a 1 MiB buffer while smaller ones can go."""
  recycler = buffers._recycler
  base = recycler._live  # (mapped buffers other tests left alive count as live when the block begins)

  def state():
    return recycler._live - base, recycler._bytes, sorted((size, len(kept)) for size, kept in recycler._free.items() if kept)

  with buffers.recycling():
    small = [buffers.aligned_empty((MIB,), np.uint8) for _ in range(2)]
    large = buffers.aligned_empty((4 * MIB,), np.uint8)  # peak: 6 MiB live
    large_address = large.ctypes.data
    del small, large
    assert state() == (0, 6 * MIB, [(MIB, 2), (4 * MIB, 1)])
    middle = buffers.aligned_empty((2 * MIB,), np.uint8)  # 0 + 6 + 2 > 6: the two 1 MiB ones go, not the 4 MiB
    assert state() == (2 * MIB, 4 * MIB, [(4 * MIB, 1)])
    again = buffers.aligned_empty((4 * MIB,), np.uint8)  # the kept 4 MiB mapping, reused
    assert again.ctypes.data == large_address and state() == (6 * MIB, 0, [])
    del middle
    more = buffers.aligned_empty((3 * MIB,), np.uint8)  # 4 + 2 + 3 > 6: a new peak, so nothing stays kept
    assert state() == (7 * MIB, 0, [])
    del again, more
    assert state() == (0, 7 * MIB, [(3 * MIB, 1), (4 * MIB, 1)])
  assert recycler._bytes == 0 and recycler._live == base
