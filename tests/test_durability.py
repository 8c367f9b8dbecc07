"""A conversion's writes are synced once, at their end, before Orbax commits the checkpoint."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

import orbax_nnx
from orbax_nnx import compat
from orbax_nnx.io import durability, orbax_writes, writer


def test_a_convert_syncs_every_file_it_wrote_before_the_checkpoint_is_committed(tmp_path, monkeypatch):
  """Its writes (blocked and batched) skip tensorstore's per-file fsync; passes start in the background as it
  writes, and at its end every file and folder it wrote is fsynced from the temporary folder, before Orbax
  renames it into place; the values are the source's."""
  rng = np.random.default_rng(0)
  layers = [rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(3)]  # 1 MiB each: blocked
  small = {f'b{i}': rng.standard_normal(64).astype(np.float32) for i in range(5)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'src', {'model': {**{f'layers_{i}': {'w': {'value': w}} for i, w in enumerate(layers)},
                                            **{k: {'value': v} for k, v in small.items()}}})
  synced, syncs = [], []
  fsync = durability._fsync
  monkeypatch.setattr(durability, '_fsync', lambda path, early=None: (early is None and synced.append(path),
                                                                       fsync(path, early)))
  sync_tree = durability.sync_tree
  monkeypatch.setattr(durability, 'sync_tree', lambda folders, early=None: (
      syncs.append((early is None, os.path.exists(tmp_path / 'dst'))), sync_tree(folders, early)))
  monkeypatch.setattr(durability, 'EARLY_SYNC_BYTES', 2**20)
  contexts = []
  start_open = orbax_writes.start_open
  monkeypatch.setattr(orbax_writes, 'start_open', lambda spec, info, *a: (
      contexts.append(info.ts_context), start_open(spec, info, *a))[1])

  orbax_nnx.convert(tmp_path / 'src', tmp_path / 'dst', to='linen', scan_layers=True, memory_budget=2**20)

  # early passes while it wrote, then the last one; all before the checkpoint was in place
  assert syncs[-1] == (True, False) and (False, False) in syncs[:-1] and set(syncs) == {(False, False), (True, False)}
  # one context for every write (one OCDBT writer): no per-file sync, and a node cache of a sixteenth of the
  # bytes in flight (at least 1 MiB), not Orbax's 100 MB
  assert contexts and len({id(c) for c in contexts}) == 1
  assert contexts[0]['file_io_sync'].to_json() is False
  assert contexts[0]['cache_pool#ocdbt'].to_json() == {'total_bytes_limit': writer.node_cache_bytes(2**19)} == {
      'total_bytes_limit': 2**20}
  assert writer.node_cache_bytes(2**40) == compat.orbax_node_cache_bytes() == 100_000_000  # (Orbax's, pinned)
  tmp_item = synced[-1]  # (the last pass's) folders last, the deepest first: the item folder is the last
  written = {os.path.relpath(p, tmp_item) for p in synced}
  ours = {os.path.relpath(os.path.join(root, name), tmp_path / 'dst')
          for root, dirs, files in os.walk(tmp_path / 'dst' / 'ocdbt.process_0') for name in files + dirs}
  assert ours and ours <= written, ours - written
  assert {'_sharding', 'ocdbt.process_0', 'ocdbt.process_0/d'} <= written
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'dst')['params']['params']
  np.testing.assert_array_equal(np.asarray(restored['layers']['w']), np.stack(layers, axis=1))
  for k, v in small.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), v)


def test_object_store_writes_sync_nothing_and_resources_go_into_one_child_per_context():
  context = ts.Context()
  remote = [compat.ParamInfo(name=n, parent_dir=epath.Path('gs://bucket/ckpt'), ts_context=context) for n in 'ab']
  deferred = durability.Deferred(remote)
  assert deferred.folders == [] and [i.ts_context for i in deferred.infos] == [context, context]
  local = durability.Deferred([compat.ParamInfo(name='a', parent_dir=epath.Path('/tmp/x'), ts_context=context)])
  assert local.folders == ['/tmp/x'] and local.infos[0].ts_context['file_io_sync'].to_json() is False
  assert local.infos[0].ts_context.parent is context and context['file_io_sync'].to_json() is True
  # resources go into a child of each of Orbax's contexts, on any store, shared by the infos that shared one
  other = ts.Context()
  cache = {'cache_pool#ocdbt': {'total_bytes_limit': 12345}}
  mixed = [*remote, compat.ParamInfo(name='c', parent_dir=epath.Path('gs://bucket/ckpt'), ts_context=other)]
  limited = durability.Deferred(mixed, cache).infos
  assert limited[0].ts_context is limited[1].ts_context is not limited[2].ts_context
  assert [i.ts_context.parent for i in limited] == [context, context, other]
  assert {i.ts_context['cache_pool#ocdbt'].to_json()['total_bytes_limit'] for i in limited} == {12345}
  assert limited[0].ts_context['file_io_sync'].to_json() is True  # (an object store: nothing deferred)


def test_a_file_removed_while_syncing_is_skipped_and_other_errors_raise(tmp_path, monkeypatch):
  (tmp_path / 'kept').write_bytes(b'x')
  walk = os.walk
  monkeypatch.setattr(os, 'walk', lambda folder, onerror: (
      (root, dirs, files + (['gone'] if root == str(tmp_path) else [])) for root, dirs, files in walk(
          folder, onerror=onerror)))
  synced = []
  fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(fd), fsync(fd)))
  durability.sync_tree([str(tmp_path)])
  assert len(synced) == 2  # the file kept and the folder
  with pytest.raises(NotADirectoryError):
    durability.sync_tree([str(tmp_path / 'kept' / 'not-a-folder')])


def test_an_early_pass_skips_files_unchanged_since_the_last_and_the_last_pass_syncs_all(tmp_path, monkeypatch):
  for name in 'abc':
    (tmp_path / name).write_bytes(b'x')
  fsyncs = []
  fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (fsyncs.append(os.fstat(fd).st_ino), fsync(fd)))
  early: dict = {}
  durability.sync_tree([str(tmp_path)], early)
  assert len(fsyncs) == 4 and sorted(early) == [str(tmp_path / n) for n in 'abc']
  (tmp_path / 'b').write_bytes(b'xy')  # changed
  (tmp_path / 'd').write_bytes(b'x')  # new
  fsyncs.clear()
  durability.sync_tree([str(tmp_path)], early)
  assert sorted(fsyncs) == sorted([(tmp_path / 'b').stat().st_ino, (tmp_path / 'd').stat().st_ino,
                                   tmp_path.stat().st_ino])
  fsyncs.clear()
  durability.sync_tree([str(tmp_path)])
  assert len(fsyncs) == 5


def test_a_folder_its_filesystem_cannot_sync_is_skipped_but_a_file_is_not(tmp_path, monkeypatch):
  import errno
  import stat

  (tmp_path / 'f').write_bytes(b'x')
  fsync = os.fsync
  refuse = {'folders'}

  def fake(fd):
    folder = stat.S_ISDIR(os.fstat(fd).st_mode)
    if ('folders' if folder else 'files') in refuse:
      raise OSError(errno.EINVAL, 'Invalid argument')
    fsync(fd)

  monkeypatch.setattr(os, 'fsync', fake)
  durability.sync_tree([str(tmp_path)])
  refuse = {'files'}
  with pytest.raises(OSError, match='Invalid argument'):
    durability.sync_tree([str(tmp_path)])
