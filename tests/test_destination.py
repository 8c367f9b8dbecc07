"""Every writer's DST goes through one check: sources, protected folders, links and non-checkpoints are never
replaced. Run in a sandbox whose sentinel files must survive; "root" and "home" are patched into the sandbox."""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import orbax_nnx
from orbax_nnx import errors
from orbax_nnx.io import destination

RULES = [('kernel', 'w.weight'), ('bias', 'w.bias')]


def _model():
  return nnx.Linear(4, 3, rngs=nnx.Rngs(0))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """tmp/fake_root/{home/me, runs/src (an NNX item), data/keep.txt}; fake_root and home are protected."""
  root = tmp_path / 'fake_root'
  home = root / 'home' / 'me'
  home.mkdir(parents=True)
  (home / 'notes.txt').write_text('mine')
  (root / 'data').mkdir()
  (root / 'data' / 'keep.txt').write_text('precious')
  monkeypatch.setattr(destination, 'protected_paths', lambda: {str(root), str(root / 'home'), str(home)})
  import orbax.checkpoint as ocp
  with ocp.Checkpointer(orbax_nnx.NNXCheckpointHandler()) as ckptr:
    ckptr.save(root / 'runs' / 'src', args=orbax_nnx.NNXSave(_model()))
  return root


def _sentinels(root: pathlib.Path) -> dict:
  return {p.relative_to(root): p.read_bytes() for p in root.rglob('*') if p.is_file()}


WRITERS = {
    'convert': lambda src, dst, **kw: orbax_nnx.convert(src, dst, to='nnx', **kw),
    'export-nnx': lambda src, dst, **kw: orbax_nnx.export_params(src, dst, **kw),
    'export-linen': lambda src, dst, **kw: orbax_nnx.export_params(src, dst, format='linen', **kw),
    'export-safetensors': lambda src, dst, **kw: orbax_nnx.export_params(
        src, dst, format='safetensors', target=_model(), export_rules=RULES, **kw),
}


@pytest.mark.parametrize('writer', sorted(WRITERS))
@pytest.mark.parametrize('where', ['root', 'home', 'parent-of-home', 'parent-of-src', 'grandparent-of-src',
                                   'src', 'inside-src', 'data-folder', 'file'])
def test_overwrite_never_deletes_what_is_not_a_replaceable_checkpoint(sandbox, writer, where):
  (sandbox / 'afile').write_text('x')
  dst = {'root': sandbox, 'home': sandbox / 'home' / 'me', 'parent-of-home': sandbox / 'home',
         'parent-of-src': sandbox / 'runs', 'grandparent-of-src': sandbox, 'src': sandbox / 'runs' / 'src',
         'inside-src': sandbox / 'runs' / 'src' / 'sub', 'data-folder': sandbox / 'data',
         'file': sandbox / 'afile'}[where]
  before = _sentinels(sandbox)
  with pytest.raises(errors.DestinationError, match='Refusing to write DST'):
    WRITERS[writer](sandbox / 'runs' / 'src', dst, overwrite=True)
  assert _sentinels(sandbox) == before
  assert sorted(p.name for p in sandbox.iterdir()) == sorted(['home', 'data', 'runs', 'afile'])  # no tmp dir left


def test_a_data_folder_is_refused_naming_what_would_be_lost(sandbox):
  with pytest.raises(errors.DestinationError, match=r'not a checkpoint.*keep\.txt'):
    orbax_nnx.convert(sandbox / 'runs' / 'src', sandbox / 'data', to='nnx', overwrite=True)


@pytest.mark.parametrize('writer', sorted(WRITERS))
def test_a_symlinked_dst_is_refused_and_its_target_kept(sandbox, writer):
  WRITERS[writer](sandbox / 'runs' / 'src', sandbox / 'out')  # a real checkpoint behind the link
  (sandbox / 'link').symlink_to(sandbox / 'out', target_is_directory=True)
  before = _sentinels(sandbox)
  with pytest.raises(errors.DestinationError, match='symbolic link'):
    WRITERS[writer](sandbox / 'runs' / 'src', sandbox / 'link', overwrite=True)
  assert _sentinels(sandbox) == before and (sandbox / 'link').is_symlink()


def test_src_reached_through_a_symlinked_parent_is_still_the_source(sandbox):
  (sandbox / 'alias').symlink_to(sandbox / 'runs', target_is_directory=True)
  for dst in (sandbox / 'alias', sandbox / 'alias' / 'src', sandbox / 'runs'):
    with pytest.raises(errors.DestinationError):
      orbax_nnx.convert(sandbox / 'alias' / 'src', dst, to='nnx', overwrite=True)
  assert (sandbox / 'runs' / 'src' / '_METADATA').exists()


@pytest.mark.parametrize('writer', sorted(WRITERS))
def test_without_overwrite_an_existing_dst_is_refused(sandbox, writer):
  (sandbox / 'empty').mkdir()
  with pytest.raises(errors.DestinationError, match='exists; pass overwrite=True'):
    WRITERS[writer](sandbox / 'runs' / 'src', sandbox / 'empty')


@pytest.mark.parametrize('writer', sorted(WRITERS))
@pytest.mark.parametrize('existing', ['empty', 'orbax-item', 'safetensors', 'manager-root'])
def test_overwrite_replaces_an_empty_dir_or_a_checkpoint(sandbox, writer, existing):
  dst = sandbox / 'out'
  if existing == 'empty':
    dst.mkdir()
  elif existing == 'orbax-item':
    orbax_nnx.convert(sandbox / 'runs' / 'src', dst, to='nnx')
  elif existing == 'safetensors':
    WRITERS['export-safetensors'](sandbox / 'runs' / 'src', dst)
  else:
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(dst, handler_registry=orbax_nnx.nnx_registry) as mngr:
      mngr.save(3, args=ocp.args.Composite(model=orbax_nnx.NNXSave(_model())))
  WRITERS[writer](sandbox / 'runs' / 'src', dst, overwrite=True)
  names = sorted(p.name for p in dst.iterdir())
  assert ('model.safetensors' in names) if writer == 'export-safetensors' else ('_METADATA' in names), names
  assert not [p for p in sandbox.iterdir() if 'tmp' in p.name or 'old' in p.name]


def test_relative_dst_is_written_where_it_says(sandbox, monkeypatch):
  monkeypatch.chdir(sandbox / 'data')
  orbax_nnx.convert(sandbox / 'runs' / 'src', 'rel/out', to='nnx')
  restored = orbax_nnx.restore(sandbox / 'data' / 'rel' / 'out', nnx.state(_model()))
  np.testing.assert_array_equal(np.asarray(restored['kernel'].get_value()),
                                np.asarray(_model().kernel.get_value()))
  with pytest.raises(errors.DestinationError, match='inside the source'):
    monkeypatch.chdir(sandbox / 'runs')
    orbax_nnx.convert('src', 'src/../src/x', to='nnx')


def test_bucket_roots_are_protected_and_gs_paths_normalised():
  assert str(destination.normalized('gs://bucket/a/../b/')) == 'gs://bucket/b'
  with pytest.raises(errors.DestinationError, match='bucket root'):
    destination.check_destination('gs://bucket', overwrite=True)
  with pytest.raises(errors.DestinationError, match='inside the source'):
    destination.check_destination('gs://bucket/run/1/x', sources=['gs://bucket/run/1'])


def test_live_model_export_checks_dst_too(sandbox):
  before = _sentinels(sandbox)
  with pytest.raises(errors.DestinationError):
    orbax_nnx.export_params(_model(), sandbox / 'data', format='safetensors', export_rules=RULES, overwrite=True)
  assert _sentinels(sandbox) == before
  orbax_nnx.export_params(_model(), sandbox / 'st', format='safetensors', export_rules=RULES, dtype=jnp.float32)
  assert os.path.exists(sandbox / 'st' / 'model.safetensors')
