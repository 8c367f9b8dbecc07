"""Test set-up: 8 simulated CPU devices, set before jax is imported."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, 'tests need 8 simulated devices'


@pytest.fixture
def ckpt_dir(tmp_path):
  return tmp_path / 'ckpt'


@pytest.fixture(scope='session')
def gcs_server():
  """One fake-gcs-server for the whole session (started on first use)."""
  from object_store import FakeGCS

  server = FakeGCS()
  yield server
  server.stop()


@pytest.fixture
def gcs(gcs_server):
  """A fresh, empty `gs://` bucket on the session's GCS API server (its root, as a string)."""
  return gcs_server.bucket()


@pytest.fixture
def gcs_proxy(gcs_server):
  """The proxy every gs:// request goes through: add latency or faults; cleared after the test."""
  yield gcs_server.proxy
  gcs_server.proxy.clear()
  gcs_server.proxy.delay = 0.0
