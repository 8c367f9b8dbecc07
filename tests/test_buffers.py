"""io.buffers: aligned host buffers (zero-copy device_put), large ones mapped from the OS."""

import mmap

import jax
import numpy as np
import pytest

from orbax_nnx.io import buffers


def _base_chain(array):
  while array is not None:
    yield array
    array = array.obj if isinstance(array, memoryview) else getattr(array, 'base', None)


@pytest.mark.parametrize('shape,dtype,mapped', [
    ((3, 5), np.float32, False), ((), np.int8, False), ((0, 7), np.float32, False),
    ((buffers.MAPPED_BYTES // 2 - 1,), np.uint16, False), ((buffers.MAPPED_BYTES // 2,), np.uint16, True),
    ((512, 1024), jax.numpy.bfloat16, True)])
def test_aligned_writable_and_mapped_from_the_threshold(shape, dtype, mapped):
  out = buffers.aligned_empty(shape, dtype)
  assert out.shape == shape and out.dtype == np.dtype(dtype) and out.flags.c_contiguous and out.flags.writeable
  assert out.ctypes.data % 64 == 0 or not out.size
  assert any(isinstance(b, mmap.mmap) for b in _base_chain(out)) is mapped
  out[...] = 1
  placed = jax.device_put(out, jax.devices()[0], may_alias=True)
  if out.size:
    assert placed.unsafe_buffer_pointer() == out.ctypes.data  # aliased, not copied
  np.testing.assert_array_equal(np.asarray(placed), np.ones(shape, dtype))
