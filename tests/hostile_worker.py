"""Hypothesis mutations of real checkpoint metadata; run by test_hostile_input.py in a subprocess (where an
abort or a hang shows as such). The property: every operation on a mutated checkpoint either works or raises an
`orbax_nnx` error, never a raw exception.

Run alone: `python -m pytest -q tests/hostile_worker.py` (HOSTILE_EXAMPLES sets examples per strategy).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import pkgutil
import shutil
import struct
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import tensorstore as ts  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st
from safetensors.numpy import save_file  # noqa: E402

import orbax_nnx  # noqa: E402
from orbax_nnx import errors  # noqa: E402

# Hypothesis draws some values from the constants of the local modules loaded so far, so a module first imported
# inside an operation (orbax_nnx imports some lazily) changed that pool between a failing example and its replay,
# and the failure came out as a FlakyFailure without its cause. Every orbax_nnx module is loaded first.
for _module in pkgutil.walk_packages(orbax_nnx.__path__, 'orbax_nnx.'):
  if not _module.name.endswith('__main__'):
    importlib.import_module(_module.name)

EXAMPLES = int(os.environ.get('HOSTILE_EXAMPLES', '40'))
# `make test` replays one fixed seed; setting HOSTILE_EXAMPLES explores fresh examples each run
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize='HOSTILE_EXAMPLES' not in os.environ, suppress_health_check=list(HealthCheck))
WORK = pathlib.Path(tempfile.mkdtemp(prefix='hostile-'))

# values a forger writes into any JSON field
HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 2**31, 2**63, 2**64]) |
    st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(['..', '/', '/dev/stdin', '.', 'F32', 'BF16']),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def _sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _attempt(fn) -> None:
  try:
    fn()
  except errors.OrbaxNNXError:
    pass


def _mutate_json(data, path: list, value):
  """`data` with the node at `path` (indices into dicts/lists, taken modulo their size) replaced by `value`."""
  if not path or not isinstance(data, (dict, list)) or not data:
    return value
  keys = list(data) if isinstance(data, dict) else list(range(len(data)))
  key = keys[path[0] % len(keys)]
  out = dict(data) if isinstance(data, dict) else list(data)
  out[key] = _mutate_json(data[key], path[1:], value)
  return out


# -- safetensors --------------------------------------------------------------

ST_TARGET = lambda: nnx.State({'w': nnx.Param(jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=_sharding())),  # noqa: E731
                               'b': nnx.Param(jax.ShapeDtypeStruct((3,), jnp.float32, sharding=_sharding()))})
ST_RULES = [(r'model\.w', 'w'), (r'model\.b', 'b')]


def _safetensors_folder(name: str) -> pathlib.Path:
  folder = WORK / name
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir()
  save_file({'model.w': np.arange(6, dtype=np.float32).reshape(2, 3)}, str(folder / 'model-00001-of-00002.safetensors'))
  save_file({'model.b': np.ones(3, np.float32)}, str(folder / 'model-00002-of-00002.safetensors'))
  (folder / 'model.safetensors.index.json').write_text(json.dumps({
      'metadata': {'total_size': 36}, 'weight_map': {'model.w': 'model-00001-of-00002.safetensors',
                                                     'model.b': 'model-00002-of-00002.safetensors'}}))
  return folder


def _safetensors_ops(folder: pathlib.Path) -> None:
  _attempt(lambda: orbax_nnx.inspect(folder))
  _attempt(lambda: orbax_nnx.restore(folder, ST_TARGET(), rules=ST_RULES))


@SETTINGS
@given(path=st.lists(st.integers(0, 10), max_size=4), value=HOSTILE)
def test_safetensors_header_fields(path, value):
  folder = _safetensors_folder('header')
  file = folder / 'model-00001-of-00002.safetensors'
  raw = file.read_bytes()
  size = int.from_bytes(raw[:8], 'little')
  header = _mutate_json(json.loads(raw[8:8 + size]), path, value)
  body = json.dumps(header).encode()
  file.write_bytes(struct.pack('<Q', len(body)) + body + raw[8 + size:])
  _safetensors_ops(folder)


@SETTINGS
@given(path=st.lists(st.integers(0, 10), max_size=3), value=HOSTILE)
def test_safetensors_index_fields(path, value):
  folder = _safetensors_folder('index')
  index = folder / 'model.safetensors.index.json'
  index.write_text(json.dumps(_mutate_json(json.loads(index.read_text()), path, value)))
  _safetensors_ops(folder)


@SETTINGS
@given(data=st.data())
def test_safetensors_bytes(data):
  folder = _safetensors_folder('bytes')
  file = folder / 'model-00001-of-00002.safetensors'
  raw = bytearray(file.read_bytes())
  for _ in range(data.draw(st.integers(1, 4))):
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))
  cut = data.draw(st.none() | st.integers(0, len(raw)))
  file.write_bytes(bytes(raw[:cut]))
  _safetensors_ops(folder)


# -- Orbax items --------------------------------------------------------------

def _orbax_item(name: str) -> pathlib.Path:
  item = WORK / name
  template = WORK / 'orbax-template'
  if not template.exists():
    state = {'layers': {'w': nnx.Param(jnp.arange(24.0).reshape(4, 6))}, 'b': nnx.Param(jnp.ones((6,)))}
    with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
      ckptr.save(template, args=orbax_nnx.NNXSave(state))
  shutil.rmtree(item, ignore_errors=True)
  shutil.copytree(template, item)
  return item


def _orbax_ops(item: pathlib.Path) -> None:
  target = nnx.State({'layers': {'w': nnx.Param(jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=_sharding()))},
                      'b': nnx.Param(jax.ShapeDtypeStruct((6,), jnp.float32, sharding=_sharding()))})
  _attempt(lambda: orbax_nnx.inspect(item))
  _attempt(lambda: orbax_nnx.restore(item))
  _attempt(lambda: orbax_nnx.restore(item, target))


@SETTINGS
@given(which=st.sampled_from(['_METADATA', '_sharding']), path=st.lists(st.integers(0, 10), max_size=6),
       value=HOSTILE)
def test_orbax_metadata_fields(which, path, value):
  item = _orbax_item('fields')
  file = item / which
  file.write_text(json.dumps(_mutate_json(json.loads(file.read_text()), path, value)))
  _orbax_ops(item)


@SETTINGS
@given(path=st.lists(st.integers(0, 10), max_size=3), value=HOSTILE)
def test_zarr_header_fields(path, value):
  item = _orbax_item('zarray')
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{item}'}).result()
  key = b'b.value/.zarray'
  header = json.loads(kv.read(key).result().value)
  kv.write(key, json.dumps(_mutate_json(header, path, value)).encode()).result()
  del kv
  _orbax_ops(item)
