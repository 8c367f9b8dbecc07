"""Work that touches no NNX object imports no Flax: `import orbax_nnx`, conversions, inspection and the CLI."""

import subprocess
import sys
import textwrap

import orbax_nnx
from orbax_nnx import lazy_flax

SCRIPT = textwrap.dedent('''
    import sys

    class NoFlax:
      def find_spec(self, name, path=None, target=None):
        if name == 'flax' or name.startswith('flax.'):
          raise ImportError(f'imported {name}')

    sys.meta_path.insert(0, NoFlax())
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    layers = {n: {'kernel': np.arange(24, dtype=np.float32).reshape(2, 3, 4) + i} for i, n in enumerate('qk')}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(sys.argv[1] + '/src', {'params': {'params': {'layers': layers}}, 'step': np.int32(1)})

    import orbax_nnx
    from orbax_nnx import cli
    orbax_nnx.convert(sys.argv[1] + '/src', sys.argv[1] + '/scanned')
    orbax_nnx.convert(sys.argv[1] + '/src', sys.argv[1] + '/unrolled', scan_layers=False)
    orbax_nnx.inspect(sys.argv[1] + '/unrolled')
    assert orbax_nnx.compare(sys.argv[1] + '/scanned', sys.argv[1] + '/unrolled', values=True).equal
    assert cli.main(['plan', sys.argv[1] + '/src', '--no-scan-layers']) == 0
    out = ocp.PyTreeCheckpointHandler().restore(epath.Path(sys.argv[1]) / 'unrolled')
    np.testing.assert_array_equal(out['model']['layers_1']['k']['kernel']['value'], layers['k']['kernel'][:, 1])
    print('no flax:', 'flax' not in sys.modules)
''')


def test_conversions_inspection_and_the_cli_import_no_flax(tmp_path):
  out = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == 'no flax: True'


def test_modules_that_define_nnx_modules_load_on_first_use():
  assert {'llama', 'testing', 'convert'} <= set(dir(orbax_nnx))
  assert orbax_nnx.llama.Llama.__module__ == 'orbax_nnx.llama'
  assert orbax_nnx.testing.__name__ == 'orbax_nnx.testing'
  assert lazy_flax.nnx.Param is __import__('flax.nnx', fromlist=['Param']).Param
