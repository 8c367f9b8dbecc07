"""io.heap: objects alive before an operation are frozen out of GC during it, and handed back after it."""

import gc
import threading

import pytest

import orbax_nnx
from orbax_nnx.errors import NotACheckpointError
from orbax_nnx.io import heap


@pytest.fixture(autouse=True)
def _unfrozen():
  gc.unfreeze()
  yield
  gc.unfreeze()


def test_frozen_during_and_handed_back_after():
  before = object()
  with heap.older_objects_frozen():
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked([before])  # (frozen objects stay tracked: only skipped by collections)
  assert gc.get_freeze_count() == 0


def test_nested_blocks_unfreeze_once_at_the_outermost_end():
  with heap.older_objects_frozen():
    with heap.older_objects_frozen():
      assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() > 0  # (the inner block's end handed nothing back)
  assert gc.get_freeze_count() == 0


def test_an_error_inside_still_unfreezes():
  with pytest.raises(ValueError, match='inside'):
    with heap.older_objects_frozen():
      raise ValueError('inside')
  assert gc.get_freeze_count() == 0


def test_a_heap_the_caller_froze_stays_frozen():
  gc.freeze()
  with heap.older_objects_frozen():
    pass
  assert gc.get_freeze_count() > 0  # (still frozen: the caller unfreezes it, not us)


def test_concurrent_blocks_unfreeze_when_the_last_ends():
  inside, release = threading.Event(), threading.Event()

  def other():
    with heap.older_objects_frozen():
      inside.set()
      release.wait(10)

  thread = threading.Thread(target=other)
  thread.start()
  assert inside.wait(10)
  with heap.older_objects_frozen():
    pass
  assert gc.get_freeze_count() > 0  # (the other thread's block is still running)
  release.set()
  thread.join(10)
  assert gc.get_freeze_count() == 0


def test_public_operations_hand_the_heap_back_after_an_error(tmp_path):
  with pytest.raises(NotACheckpointError):
    orbax_nnx.restore(tmp_path / 'missing')
  assert gc.get_freeze_count() == 0
