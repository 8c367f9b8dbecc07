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
