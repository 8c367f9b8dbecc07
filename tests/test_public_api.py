"""The public API, pinned: a change to an exported name or signature is a visible decision (edit this file),
and every public object documents itself (Args / Returns / Raises, or Attributes)."""

import dataclasses
import inspect
import re

import pytest

import orbax_nnx
import orbax_nnx.errors
import orbax_nnx.llama
import orbax_nnx.testing
import orbax_nnx.v1

SIGNATURES = {
    'LayerGroup': 'path, style, length, indices=()',
    'Layout': "kind, flavour, params_root, opt_root, step_path, aux_roots, groups, canonical, leaves, meta, preset='',"
              ' group_names=GroupNames(declared=())',
    'LinenOutput': 'linen_style=None, template=None',
    'Mapping': 'rules=(), layout=None, groups=None, scan_axis=None, param_scan_axis=1',
    'NNXCheckpointHandler': '**options',
    'NNXRestore': "target=None, missing='error', extra='error', default_sharding=None, exclude=(nnx.Cache, nnx.Intermediate),"
                  ' rules=(), scan_axis=None, param_scan_axis=1, strict=True, support_layout=False, restore_args=None,'
                  ' memory_budget=None, layout=None, groups=(), item=None, transforms=None',
    'NNXSave': "item=None, custom_metadata=None, flavour='raw', exclude=(nnx.Cache, nnx.Intermediate), save_args=None,"
               ' ocdbt_target_data_file_size=None',
    'Plan': 'source, entries, leaves, missing, unused, inferred=<factory>',
    'View': 'ops=()',
    'add_to_registry': 'registry, item=None, handler=None',
    'compare': "a, b, *, values=False, atol=0.0, rtol=0.0, only='all', mapping=None, layout_a=None, layout_b=None,"
               ' memory_budget=None, step_a=None, step_b=None, item_a=None, item_b=None',
    'convert': "src, dst, *, to='auto', scan_layers=None, flavour='raw', include='all', dtype=None, target=None,"
               ' mapping=None, linen=None, memory_budget=None, overwrite=False, step=None, item=None, progress=None',
    'detect_layout': 'path, *, layout=None, groups=None, step=None, item=None',
    'export_params': "src, dst, *, format='nnx', dtype='bfloat16', scan_layers=None, filter='Param', merge_lora=False,"
                     ' target=None, export_rules=None, mapping=None, linen=None, max_shard_size=5368709120,'
                     ' memory_budget=None, overwrite=False, step=None, item=None, progress=None',
    'inspect': 'path, *, depth=None, pattern=None, layout=None, groups=None, step=None, item=None',
    'load_params': "path, target, *, dtype=None, filter=None, mesh=None, mapping=None, missing='error',"
                   " extra='ignore', memory_budget=None, step=None, item=None",
    'plan': 'source, target, *, mapping=None, exclude=(nnx.Cache, nnx.Intermediate), step=None, item=None',
    'read_item_metadata': 'directory, handler=None',
    'resolve_item': 'path, *, step=None, item=None',
    'restore': "path, target=None, *, missing='error', extra='error', mapping=None, memory_budget=None,"
               ' default_sharding=None, exclude=(nnx.Cache, nnx.Intermediate), strict=True, support_layout=False,'
               ' restore_args=None, step=None, item=None',
}
NOT_CALLABLE = {'errors', 'llama', 'nnx_registry', 'testing', 'v1', 'view', '__version__'}
MAX_KEYWORDS = 17  # export_params; most take 10 or fewer (see the README's "One vocabulary")


def _default(value) -> str:
  if inspect.isclass(value):
    return value.__name__
  if isinstance(value, tuple) and value and all(inspect.isclass(v) for v in value):
    return '(' + ', '.join(v.__name__ for v in value) + ')'
  return repr(value)


def spelled(obj) -> str:
  """A signature as names, kinds and defaults (annotations left out: they are documentation)."""
  parts, star = [], False
  for p in inspect.signature(obj).parameters.values():
    if p.kind == p.VAR_KEYWORD:
      parts.append('**' + p.name)
      continue
    if p.kind == p.KEYWORD_ONLY and not star:
      parts.append('*')
      star = True
    parts.append(p.name if p.default is p.empty else f'{p.name}={_default(p.default)}')
  return ', '.join(parts)


def test_exported_names_are_pinned():
  assert sorted(orbax_nnx.__all__) == sorted(set(SIGNATURES) | NOT_CALLABLE)


@pytest.mark.parametrize('name', sorted(SIGNATURES))
def test_signatures_are_pinned(name):
  assert spelled(getattr(orbax_nnx, name)) == SIGNATURES[name]


@pytest.mark.parametrize('name', [n for n in sorted(SIGNATURES) if not inspect.isclass(getattr(orbax_nnx, n))])
def test_small_signatures(name):
  params = inspect.signature(getattr(orbax_nnx, name)).parameters.values()
  assert sum(p.kind == p.KEYWORD_ONLY for p in params) <= MAX_KEYWORDS


def _public(module, names=None):
  names = names if names is not None else [n for n, o in vars(module).items() if not n.startswith('_')
                                           and (inspect.isfunction(o) or inspect.isclass(o))
                                           and o.__module__ == module.__name__]
  return [(f'{module.__name__}.{n}', getattr(module, n)) for n in names]


DOCUMENTED = (_public(orbax_nnx, sorted(SIGNATURES)) + _public(orbax_nnx.v1) + _public(orbax_nnx.testing)
              + _public(orbax_nnx.llama, ['LlamaConfig', 'Llama', 'hf_rules', 'hf_export_rules', 'hf_preset',
                                          'HFPreset']))


@pytest.mark.parametrize('name,obj', DOCUMENTED, ids=[n for n, _ in DOCUMENTED])
def test_public_objects_document_args_returns_raises(name, obj):
  doc = inspect.getdoc(obj) or ''
  assert doc.strip(), f'{name} has no docstring'
  if inspect.isclass(obj):
    if dataclasses.is_dataclass(obj):  # each field under Attributes:
      assert 'Attributes:' in doc, name
      body = doc.split('Attributes:', 1)[1]
      missing = [f.name for f in dataclasses.fields(obj) if not re.search(rf'^\s+{f.name}:', body, re.M)]
      assert not missing, f'{name} documents no {missing}'
    else:
      params = [p for p in inspect.signature(obj).parameters if p != 'self']
      assert not params or 'Args:' in doc, name
    return
  params = list(inspect.signature(obj).parameters)
  if params:
    assert 'Args:' in doc, name
    section = doc.split('Args:', 1)[1]
    missing = [p for p in params if not re.search(rf'^\s+(\*\*)?{p}:', section, re.M)]
    assert not missing, f'{name} documents no {missing}'
  if inspect.signature(obj).return_annotation not in (None, 'None'):
    assert 'Returns:' in doc, name
  assert 'Raises:' in doc, name


@pytest.mark.parametrize('name', [n for n in vars(orbax_nnx.errors) if n.endswith('Error')])
def test_every_error_says_when_it_is_raised(name):
  assert (inspect.getdoc(getattr(orbax_nnx.errors, name)) or '').strip(), name
