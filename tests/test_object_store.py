"""Every operation on `gs://` paths, against a real GCS API server (fake-gcs-server; see object_store.py).

Object stores have no atomic rename: Orbax commits there with `commit_success.txt`, written last, and our
readers and writers follow the same rule (`sources.metadata.commits_by_marker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from etils import epath
from flax import nnx
from helpers import assert_same_state, host, sds

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.sources import chunk_stream

L, D, F = 3, 4, 6
RNG = np.random.default_rng(0)
W = RNG.standard_normal((D, L, F)).astype(np.float32)  # Linen: layers stacked on axis 1
HEAD = RNG.standard_normal((D, 5)).astype(np.float32)
MU = RNG.standard_normal((D, L, F)).astype(np.float32)
MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE


def linen_state() -> dict:
  params = {'layers': {'w': W}, 'head': {'kernel': HEAD}}
  return {'step': np.int32(7), 'params': {'params': params},
          'opt_state': [{'count': np.int32(7), 'mu': {'params': {'layers': {'w': MU}, 'head': {'kernel': HEAD}}}}]}


def save_linen(path) -> epath.Path:
  path = epath.Path(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, linen_state())
  return path


def unrolled_target(dtype=jnp.float32) -> nnx.State:
  return nnx.State({**{f'layers_{i}': {'w': nnx.Param(sds((D, F), dtype))} for i in range(L)},
                    'head': {'kernel': nnx.Param(sds((D, 5), dtype))}})


def check_unrolled(state, dtype=np.float32) -> None:
  for i in range(L):
    np.testing.assert_array_equal(host(state[f'layers_{i}']['w']), W[:, i].astype(dtype))
  np.testing.assert_array_equal(host(state['head']['kernel']), HEAD.astype(dtype))


def test_manager_save_and_restore_through_the_registry(gcs):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  root = epath.Path(gcs) / 'run'
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:  # async by default
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.state(model))))
    mngr.wait_until_finished()
  assert (root / '1' / MARKER).exists()  # Orbax's commit on a store without rename
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(1))))
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    assert mngr.all_steps() == [1]
    back = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
  assert_same_state(back, nnx.state(model))
  assert_same_state(orbax_nnx.restore(root), nnx.state(model))  # untargeted, from the manager root


def test_restore_targeted_untargeted_and_params_only(gcs):
  src = save_linen(epath.Path(gcs) / 'linen')
  check_unrolled(orbax_nnx.restore(src, unrolled_target()))
  whole = orbax_nnx.restore(src)
  np.testing.assert_array_equal(np.asarray(whole['params']['params']['layers']['w']), W)
  params = orbax_nnx.load_params(src, unrolled_target(), dtype='bfloat16')
  assert params['layers_0']['w'].get_value().dtype == jnp.bfloat16
  check_unrolled(params, jnp.bfloat16)


def test_inspect_detect_and_plan_on_item_step_and_root(gcs):
  root = epath.Path(gcs) / 'mngr'
  with ocp.CheckpointManager(root) as mngr:
    mngr.save(5, args=ocp.args.Composite(items=ocp.args.StandardSave(linen_state())))
    mngr.wait_until_finished()
  for path in (root, root / '5', root / '5' / 'items'):
    layout = orbax_nnx.detect_layout(path)
    assert layout.kind == 'linen' and [str(g) for g in layout.groups] == ['model/layers: stacked, 3 layers'], path
    report = orbax_nnx.inspect(path)
    assert report['step'] == 5 and report['totals']['params'] == W.nbytes + HEAD.nbytes, path
    the_plan = orbax_nnx.plan(path, unrolled_target())
    assert not the_plan.missing and 'layers_2' in str(the_plan), path


def test_convert_between_stores(gcs, tmp_path):
  local_src = save_linen(tmp_path / 'linen')
  gs_src = save_linen(epath.Path(gcs) / 'linen')
  for src, dst in [(gs_src, epath.Path(gcs) / 'nnx'), (gs_src, tmp_path / 'nnx'),
                   (local_src, epath.Path(gcs) / 'from_local')]:
    orbax_nnx.convert(src, dst, scan_layers=False)
    assert (dst / MARKER).exists() or not str(dst).startswith('gs://')
    report = orbax_nnx.compare(src, dst, values=True)
    assert report.equal, report.summary()
    check_unrolled(orbax_nnx.load_params(dst, unrolled_target()))
  orbax_nnx.convert(gs_src, epath.Path(gcs) / 'nnx', scan_layers=True, overwrite=True)  # replaces a checkpoint
  assert orbax_nnx.detect_layout(epath.Path(gcs) / 'nnx').groups[0].style == 'stacked'


def test_a_zarr3_checkpoint_stays_zarr3_its_unchanged_arrays_copied_on_the_store(gcs, monkeypatch):
  """MaxText saves zarr v3: a convert on the store writes zarr v3, the arrays it writes unchanged (the heads of
  the params and of the moment, the Adam count) copied shard by shard through the store (each checked), the
  moved stacked ones and the cast step rewritten; every value equal."""
  src = epath.Path(gcs) / 'linen_zarr3'
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as ckptr:
    ckptr.save(src, args=ocp.args.PyTreeSave(linen_state()))
  checked = []
  check = chunk_stream.check_stored
  monkeypatch.setattr(chunk_stream, 'check_stored', lambda data, fmt, key: (checked.append(key), check(data, fmt, key)))
  dst = epath.Path(gcs) / 'nnx_zarr3'
  orbax_nnx.convert(src, dst, to='nnx')
  assert sorted(checked) == ['c', 'c/0/0', 'c/0/0']  # the Adam count (a scalar's one chunk: `c`), two heads
  assert json.loads((dst / '_METADATA').read_text())['use_zarr3'] is True
  report = orbax_nnx.compare(src, dst, values=True)
  assert report.equal, report.summary()


def test_export_params_to_orbax_and_to_safetensors(gcs):
  src = save_linen(epath.Path(gcs) / 'linen')
  decode = epath.Path(gcs) / 'decode'
  orbax_nnx.export_params(src, decode, scan_layers=False, dtype='bfloat16')
  stored = ocp.StandardCheckpointer().restore(decode)
  np.testing.assert_array_equal(np.asarray(stored['layers_1']['w']['value']), W[:, 1].astype(jnp.bfloat16))
  hf = epath.Path(gcs) / 'hf'
  rules = [(r'layers/(\d+)/w', {r'model.layers.\1.weight': orbax_nnx.view.T}), ('head/kernel', 'lm_head.weight')]
  target = nnx.State({'layers': {i: {'w': nnx.Param(sds((D, F)))} for i in range(L)},
                      'head': {'kernel': nnx.Param(sds((D, 5)))}})
  orbax_nnx.export_params(src, hf, format='safetensors', target=target, export_rules=rules, dtype=None,
                          max_shard_size=W[:, 0].nbytes)  # several shards and an index
  names = sorted(p.name for p in hf.iterdir())
  assert 'model.safetensors.index.json' in names and len(names) > 2, names
  index = json.loads((hf / 'model.safetensors.index.json').read_text())
  tensors = {}
  for shard in set(index['weight_map'].values()):
    tensors.update(safetensors.numpy.load((hf / shard).read_bytes()))
  for i in range(L):
    np.testing.assert_array_equal(tensors[f'model.layers.{i}.weight'], W[:, i].T)
  # and read back from the store, through the same rules reversed
  back = orbax_nnx.restore(hf, unrolled_target(), rules=[(r'model\.layers\.(\d+)\.weight', {r'layers_\1/w': orbax_nnx.view.T}),
                                                        (r'lm_head\.weight', 'head/kernel')])
  check_unrolled(back)
  # overwrite replaces the export in place (no rename on this store)
  orbax_nnx.export_params(src, hf, format='safetensors', target=target, export_rules=rules, dtype=None, overwrite=True)
  assert sorted(p.name for p in hf.iterdir()) == ['model.safetensors']


def test_a_hugging_face_folder_on_the_store(gcs):
  hf = epath.Path(gcs) / 'hub'
  hf.mkdir(parents=True, exist_ok=True)
  parts = [{f'model.layers.{i}.weight': np.ascontiguousarray(W[:, i].T)} for i in range(L)]
  parts[-1]['lm_head.weight'] = HEAD
  weight_map = {}
  for k, part in enumerate(parts):
    name = f'model-{k + 1:05d}-of-{L:05d}.safetensors'
    (hf / name).write_bytes(safetensors.numpy.save(part, metadata={'format': 'pt'}))
    weight_map.update(dict.fromkeys(part, name))
  (hf / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
  rules = [(r'model\.layers\.(\d+)\.weight', {r'layers_\1/w': orbax_nnx.view.T}), (r'lm_head\.weight', 'head/kernel')]
  check_unrolled(orbax_nnx.restore(hf, unrolled_target(), rules=rules))
  assert orbax_nnx.inspect(hf)['layout'] == 'safetensors'


def test_cli_on_the_store(gcs):
  src = save_linen(epath.Path(gcs) / 'linen')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  env.pop('XLA_FLAGS', None)

  def cli(*args):
    done = subprocess.run([sys.executable, '-m', 'orbax_nnx', *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

  assert 'linen layout' in cli('inspect', str(src))
  cli('convert', str(src), f'{gcs}/cli_nnx', '--no-scan-layers', '--quiet')
  assert 'EQUAL' in cli('compare', str(src), f'{gcs}/cli_nnx', '--values')


# -- commits on a store without rename ------------------------------------------------------------------

def test_an_item_without_its_commit_marker_is_refused(gcs):
  """What a writer killed mid-save leaves on gs://: the item at its final name, without commit_success.txt."""
  item = save_linen(epath.Path(gcs) / 'linen')
  (item / MARKER).unlink()
  for op in (lambda: orbax_nnx.restore(item), lambda: orbax_nnx.restore(item, unrolled_target()),
             lambda: orbax_nnx.inspect(item), lambda: orbax_nnx.detect_layout(item),
             lambda: orbax_nnx.convert(item, epath.Path(gcs) / 'out')):
    with pytest.raises(errors.NotACheckpointError, match='incomplete.*commit_success.txt'):
      op()
  assert not (epath.Path(gcs) / 'out').exists()


def test_a_manager_step_without_its_commit_marker_is_skipped(gcs):
  root = epath.Path(gcs) / 'run'
  with ocp.CheckpointManager(root) as mngr:
    for step in (1, 2):
      mngr.save(step, args=ocp.args.Composite(items=ocp.args.StandardSave(linen_state())))
    mngr.wait_until_finished()
  (root / '2' / MARKER).unlink()
  assert orbax_nnx.inspect(root)['path'].endswith('/1/items')  # the latest complete step
  with pytest.raises(errors.NotACheckpointError):
    orbax_nnx.restore(root, step=2)


def test_numbered_shards_without_their_index_are_refused(gcs):
  """What an unfinished safetensors export (index written last) or download leaves."""
  hf = epath.Path(gcs) / 'partial'
  hf.mkdir(parents=True, exist_ok=True)
  (hf / 'model-00001-of-00002.safetensors').write_bytes(safetensors.numpy.save({'a': np.ones(3, np.float32)}))
  with pytest.raises(errors.CorruptCheckpointError, match=r"1 of the 2 numbered shards.*model-00002-of-00002"):
    orbax_nnx.inspect(hf)


# -- faults: a proxy in front of the server (object_store.Proxy) --------------------------------------

DATA = r'%2Fd%2F'  # an OCDBT data file (tensorstore's ranged GETs)
META = r'_METADATA\?alt=media'  # the item's metadata file (read through gcsfs)


@pytest.mark.parametrize('pattern, kind', [(DATA, 'status:503'), (DATA, 'reset'), (META, 'status:503'),
                                           (META, 'reset')])
def test_transient_failures_are_retried(gcs, gcs_proxy, pattern, kind):
  src = save_linen(epath.Path(gcs) / 'linen')
  gcs_proxy.fail(pattern, kind, times=1)
  check_unrolled(orbax_nnx.restore(src, unrolled_target()))
  whole = orbax_nnx.restore(src)
  np.testing.assert_array_equal(np.asarray(whole['params']['params']['layers']['w']), W)


@pytest.mark.parametrize('pattern', [r'_METADATA', DATA])
@pytest.mark.parametrize('targeted', [True, False])
def test_permission_denied_is_a_typed_error_not_corruption(gcs, gcs_proxy, pattern, targeted):
  src = save_linen(epath.Path(gcs) / 'linen')
  gcs_proxy.fail(pattern, 'status:403', times=10_000)
  with pytest.raises(errors.NotACheckpointError, match='permission denied.*credentials') as info:
    orbax_nnx.restore(src, unrolled_target() if targeted else None)
  assert src.name in str(info.value)


def test_a_missing_object_is_a_typed_error_naming_the_checkpoint(gcs, gcs_proxy):
  src = save_linen(epath.Path(gcs) / 'linen')
  gcs_proxy.fail(DATA, 'status:404', times=10_000)
  with pytest.raises(errors.MissingDataError, match=str(src)) as info:
    orbax_nnx.restore(src, unrolled_target())
  assert isinstance(info.value, (errors.CorruptCheckpointError, FileNotFoundError))


# -- requests: one listing per checkpoint folder per operation (sources/listing.py) -------------------------------

def _metadata_requests(proxy, fn) -> int:
  """Requests `fn` sends that are not tensorstore's array reads (existence checks, listings, small files)."""
  proxy.clear()
  proxy.log = []
  try:
    fn()
    return sum('tensorstore=' not in request for request in proxy.log)
  finally:
    proxy.log = None


def _wide_state(layers: int) -> dict:
  return {'step': np.int32(1), 'params': {'params': {f'layers_{i}': {'w': np.full((2, 3), i, np.float32)}
                                                      for i in range(layers)}}}


def test_metadata_requests_do_not_grow_with_leaves_and_stay_under_orbax(gcs, gcs_proxy):
  bucket = epath.Path(gcs)
  counts = {}
  for layers in (2, 60):
    src = bucket / f'wide_{layers}'
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(src, _wide_state(layers))
    abstract = jax.tree.map(lambda x: sds(np.shape(x), x.dtype), _wide_state(layers))
    target = nnx.State({f'layers_{i}': {'w': nnx.Param(sds((2, 3), jnp.float32))} for i in range(layers)})
    counts[layers] = {
        'targeted': _metadata_requests(gcs_proxy, lambda: orbax_nnx.restore(src, abstract)),
        'untargeted': _metadata_requests(gcs_proxy, lambda: orbax_nnx.restore(src)),
        'load_params': _metadata_requests(gcs_proxy, lambda: orbax_nnx.load_params(src, target)),
        'inspect': _metadata_requests(gcs_proxy, lambda: orbax_nnx.inspect(src)),
        'orbax': _metadata_requests(gcs_proxy, lambda: ocp.StandardCheckpointer().restore(src, abstract)),
    }
  orbax = min(counts[2].pop('orbax'), counts[60].pop('orbax'))  # Orbax's own varies by a request or so
  assert counts[2] == counts[60], counts  # per operation, not per leaf
  assert max(counts[60].values()) < orbax / 3, (counts, orbax)


def test_an_operation_leaves_no_listing_behind(gcs):
  """gcsfs keeps listings per process and does not see tensorstore's writes: what an operation listed is
  dropped when it ends, so later Orbax calls in the same process never see a stale listing of ours."""
  from etils.epath import backend

  root = epath.Path(gcs) / 'run'
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(1, args=ocp.args.StandardSave(_wide_state(2)))
  fs = backend.fsspec_backend.fs(os.fspath(root))
  fs.invalidate_cache()
  orbax_nnx.restore(root)
  orbax_nnx.inspect(root, step=1)
  assert not [key for key in fs.dircache if key.startswith(os.fspath(root)[len('gs://'):])], list(fs.dircache)
  with ocp.CheckpointManager(root, handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(2, args=ocp.args.StandardSave(_wide_state(3)))
  np.testing.assert_array_equal(np.asarray(orbax_nnx.restore(root)['params']['params']['layers_2']['w']),
                                np.full((2, 3), 2, np.float32))
