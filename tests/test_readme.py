"""Every code block of the README runs, in order, against small real checkpoints: drift fails CI.

Python blocks share one namespace, as a reader's session would; the names a block takes from its prose
(`model`, `cfg`, `path`, ...) are set up here. Shell blocks run each `orbax-nnx` line through the CLI and
expect exit 0 (`make` lines are what CI itself runs).
"""

import dataclasses
import pathlib
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hf_checkpoint import hf_config, hf_tensors, write_hf

import orbax_nnx
from orbax_nnx import cli, llama

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def blocks(lang: str) -> list[tuple[int, str]]:
  """(line number, text) of each fenced block in `lang`."""
  text = README.read_text()
  return [(text[:m.start()].count('\n') + 2, m.group(1))
          for m in re.finditer(rf'^```{lang}\n(.*?)^```', text, re.M | re.S)]


def _world(root: pathlib.Path) -> dict:
  """The checkpoints and objects the README's prose names, built small."""
  cfg = llama.LlamaConfig(scan_layers=True)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  orbax_nnx.testing.add_entropy(model, optimizer)
  with ocp.CheckpointManager(root / 'ckpts/run', handler_registry=orbax_nnx.nnx_registry) as mngr:
    mngr.save(10, args=ocp.args.Composite(state=orbax_nnx.NNXSave({'model': model, 'optimizer': optimizer})))
  orbax_nnx.convert(root / 'ckpts/run', root / 'ckpts/linen/100/state', to='linen')
  qwen = llama.LlamaConfig(qk_norm=True, num_layers=2)
  write_hf(root / 'Qwen3-0.6B', hf_tensors(qwen), hf_config(qwen, 'qwen3'))
  rng = np.random.default_rng(0)
  flax_state = {'params': {f'stack_{i}': {'kernel': rng.standard_normal((4, 8)).astype(np.float32)} for i in range(3)},
                'step': np.int32(7)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / 'ckpts/flax_run', flax_state)
    linen_tree = ckptr.restore(root / 'ckpts/linen/100/state')
  from orbax.checkpoint.experimental import v1
  v1.save(root / 'linen_v1', linen_tree)
  abstract_model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(llama.Llama(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3),
                                                      wrt=nnx.Param))
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), nnx.state(abstract_model, nnx.Param))
  return {
      'ocp': ocp, 'orbax_nnx': orbax_nnx, 'nnx': nnx, 'jnp': jnp, 'jax': jax,
      'cfg': cfg, 'Model': llama.Llama, 'model': model, 'optimizer': optimizer,
      'mesh': jax.make_mesh((4, 2), ('fsdp', 'tensor')), 'path': root / 'mngr', 'step': 1,
      'abstract_model_state': nnx.state(abstract_model), 'abstract_opt_state': nnx.state(abstract_opt),
      'v1_names': {'path': root / 'v1', 'root': root / 'v1_root', 'linen_path': root / 'linen_v1',
                   'bf16_params': bf16, 'state_path': root / 'v1_state'},
      'serving_cfg': dataclasses.replace(cfg, scan_layers=False),
  }


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('readme')
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(root)
    yield root, _world(root)


def test_python_blocks_run_in_order(world):
  root, names = world
  found = blocks('python')
  assert len(found) == 9, 'a README python block was added or removed: give it its names here'
  namespace = {k: v for k, v in names.items() if k not in ('v1_names', 'serving_cfg')}
  for index, (line, code) in enumerate(found):
    if 'load_checkpointables' in code:  # the v1 block: its own paths, and `ocp` is v1 there
      namespace.update(names['v1_names'])
    if 'DecodeModel' in code:
      namespace.update(cfg=names['serving_cfg'], DecodeModel=llama.Llama)
    if re.match(r'\s*\(r', code):  # rule excerpts: plain data
      namespace.update(view=orbax_nnx.view, n=4, h=8, d=32)
    try:
      exec(compile(code, f'README.md:{line}', 'exec'), namespace)  # noqa: S102 (our own README)
    except Exception as e:
      raise AssertionError(f'README.md python block {index + 1} (line {line}) fails: {e!r}') from e
    if 'linen_mngr' in code:  # the Linen train state restored into the NNX model (and its optimizer)
      want = nnx.to_pure_dict(nnx.state(names['model'], nnx.Param))
      restored = namespace['state'].state  # the Composite's item
      for got in (namespace['params'], restored['model']):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want,
                     nnx.to_pure_dict(nnx.filter_state(got, nnx.Param)))
      want_mu = nnx.to_pure_dict(nnx.state(names['optimizer']))['opt_state']
      got_mu = nnx.to_pure_dict(restored['optimizer'])['opt_state']
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want_mu, got_mu)
    if 'DecodeModel' in code:  # the unrolled server holds the stacked run's params
      stored = nnx.state(names['model'], nnx.Param)['layers']['mlp']['up_proj']['kernel'].get_value()
      served = nnx.state(namespace['server'], nnx.Param)['layers'][1]['mlp']['up_proj']['kernel'].get_value()
      np.testing.assert_array_equal(np.asarray(served), np.asarray(stored[1]).astype(jnp.bfloat16))
  assert isinstance(namespace['params'], nnx.State)


def test_shell_blocks_run(world, capsys):
  root, _ = world
  commands = [(line, cmd) for line, code in blocks('sh') for cmd in code.splitlines() if cmd.strip()]
  assert {cmd.split()[0] for _, cmd in commands} == {'make', 'orbax-nnx'}
  ran = 0
  for line, cmd in commands:
    argv = shlex.split(cmd, comments=True)
    if argv[0] == 'make':
      continue
    assert cli.main(argv[1:]) == 0, f'README.md line {line}: {cmd}\n{capsys.readouterr().err[-2000:]}'
    ran += 1
  assert ran >= 10
  assert 'EQUAL' in capsys.readouterr().out
