"""`orbax-nnx` command line: thin wrappers over the library. Flags are the Python keywords in kebab-case.

    orbax-nnx plan SRC [--to nnx|linen] [--scan-layers|--no-scan-layers] [--scan-axis [REGEX=]AXIS ...]
    orbax-nnx convert SRC DST [same layout options] [--flavour raw|pure] [--include params] [--overwrite]
    orbax-nnx export-params SRC DST [--dtype bfloat16] [--scan-layers|--no-scan-layers] [--format nnx|linen|safetensors]
                            [--filter Param|LoRAParam] [--merge-lora] [--linen-style maxtext|flax]
    orbax-nnx compare A B [--values] [--atol X --rtol Y] [--only params|optimizer|all] [--json]
    orbax-nnx inspect SRC [--json] [--depth N] [--pattern REGEX]
    orbax-nnx presets

Mapping options (as `orbax_nnx.Mapping`): --rules REGEX=REPL[@VIEW] (repeatable; VIEW as plan prints it, e.g.
@view.T), --layout PRESET forces the layout preset, --groups NAME declares a layer group, --scan-axis,
--param-scan-axis. --model llama --config config.json brings a Hugging Face model's rules.
--memory-budget SIZE (512MiB, 2GB; a bare number is MiB) bounds what convert / export-params / compare hold.
Old spellings still accepted: --format raw|pure (convert, plan), --rename, --group, --preset, --buffer-mib,
--filter (inspect), --max-shard-mib.

Exit codes: 0 success, 1 a negative answer (plan with missing leaves, compare finding differences), 2 usage or
read errors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from typing import NoReturn

from orbax_nnx import sizes

_USAGE_ERROR = 2


def _setup_env() -> None:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  try:  # few malloc arenas: RSS otherwise creeps with checkpoint size on many-threaded reads
    import ctypes
    ctypes.CDLL('libc.so.6').mallopt(-8, 2)  # M_ARENA_MAX
  except (OSError, AttributeError):
    pass


def _scan_axis(values):
  """`--scan-axis 1` or `--scan-axis 'model/layers/.*=1'` (repeatable)."""
  if not values:
    return None
  if len(values) == 1 and re.fullmatch(r'-?\d+', values[0]):
    return int(values[0])
  table = {}
  for value in values:
    pattern, sep, axis = value.rpartition('=')
    if not sep or not re.fullmatch(r'-?\d+', axis):
      raise SystemExit(f'--scan-axis expects REGEX=AXIS or AXIS, got {value!r}')
    table[pattern] = int(axis)
  return table


def _rules(values):
  """`--rules REGEX=REPL` or `REGEX=REPL@VIEW` (a view as `plan` prints it, e.g. `@view[0].T`)."""
  from orbax_nnx.mapping.views import parse_view

  rules = []
  for value in values or ():
    pattern, sep, repl = value.partition('=')
    if not sep:
      raise SystemExit(f'--rules expects REGEX=REPLACEMENT[@VIEW], got {value!r}')
    target, at, view_text = repl.rpartition('@view')
    rules.append((pattern, {target: parse_view('view' + view_text)} if at else repl))
  return rules


def _add_source(p: argparse.ArgumentParser) -> None:
  p.add_argument('src', help='item dir, step dir, CheckpointManager root, or Hugging Face safetensors')
  p.add_argument('--step', type=int, default=None, help='step of a manager root (default: latest)')
  p.add_argument('--item', default=None, help='item name inside a step dir with several items')


def _add_layout_options(p: argparse.ArgumentParser) -> None:
  p.add_argument('--to', choices=['auto', 'nnx', 'linen'], default='auto',
                 help='target framework (auto: the other one)')
  scan = p.add_mutually_exclusive_group()
  scan.add_argument('--scan-layers', dest='scan_layers', action='store_true', default=None,
                    help='stack unrolled layer groups')
  scan.add_argument('--no-scan-layers', dest='scan_layers', action='store_false',
                    help='unroll stacked layer groups')
  p.add_argument('--flavour', '--format', dest='flavour', choices=['raw', 'pure'], default='raw',
                 help='NNX tree to write: raw (.../kernel/value) or pure (.../kernel)')
  _add_linen_style(p)


def _add_linen_style(p: argparse.ArgumentParser) -> None:
  """The `orbax_nnx.LinenOutput` flags."""
  p.add_argument('--linen-style', choices=['maxtext', 'flax'], default=None,
                 help='Linen tree to write: maxtext (params/params, params/batch_stats, nnx_aux) or flax (params,'
                 ' batch_stats); default: as the conversion that made SRC, else maxtext')
  p.add_argument('--template', default=None, metavar='CHECKPOINT',
                 help='a checkpoint whose tree the Linen output must have (e.g. your TrainState saved at step 0:'
                 ' its optax EmptyState entries and sequences are written too)')


def _layout_names() -> list[str]:
  from orbax_nnx.mapping.presets import BY_NAME

  return sorted(BY_NAME) + ['safetensors']


def _add_mapping(p: argparse.ArgumentParser, *, rules: bool = True, layout: bool = True) -> None:
  """The `orbax_nnx.Mapping` flags: --rules, --layout, --groups (and the layer axes where they apply)."""
  if layout:
    p.add_argument('--layout', choices=_layout_names(), default=None,
                   help='force the source layout preset instead of detecting it (see `orbax-nnx presets`)')
  p.add_argument('--groups', '--group', dest='groups', action='append', default=None, metavar='NAME_OR_REGEX',
                 help='declare a layer-group name beside the built-in ones (layers, blocks, h, ...); repeatable')
  if rules:
    p.add_argument('--rules', '--rename', dest='rules', action='append', metavar='REGEX=REPL[@VIEW]',
                   help='map stored paths onto target paths first, optionally through a view (e.g. @view.T)')
    p.add_argument('--scan-axis', action='append', metavar='[REGEX=]AXIS',
                   help='layer axis of stacked source arrays (per canonical path regex)')
    p.add_argument('--param-scan-axis', type=int, default=1, help='layer axis of Linen/MaxText Params (MaxText: 1)')


def _add_budget(p: argparse.ArgumentParser) -> None:
  p.add_argument('--memory-budget', '--buffer-mib', dest='memory_budget', default=None, metavar='SIZE',
                 help='bound the bytes held besides the writer\'s own: decoded chunks kept + arrays in flight'
                 ' (512MiB, 2GB, ...; a bare number is MiB)')


def _size(value, flag: str) -> int | None:
  """A size flag's bytes: units as in Python (`sizes.parse_bytes`), a bare number in MiB."""
  return sizes.parse_bytes(value, flag, bare_unit='MiB')


def _budget(args) -> dict:
  return {} if args.memory_budget is None else {'memory_budget': _size(args.memory_budget, '--memory-budget')}


def _mapping(args, preset=None):
  """The `orbax_nnx.Mapping` the flags spell: a model preset's rules first, then --rules."""
  from orbax_nnx.options import Mapping

  rules = list(preset.rules if preset is not None else ()) + _rules(getattr(args, 'rules', None))
  scan_axis = _scan_axis(getattr(args, 'scan_axis', None))
  if scan_axis is None and preset is not None:
    scan_axis = preset.scan_axis
  return Mapping(rules=rules, layout=getattr(args, 'layout', None), groups=tuple(args.groups or ()),
                 scan_axis=scan_axis, param_scan_axis=getattr(args, 'param_scan_axis', 1))


PRESETS = ('llama',)  # Hugging Face Llama family (Llama 2/3, Mistral, Qwen2/3) <-> orbax_nnx.llama.Llama


def _add_preset(p: argparse.ArgumentParser) -> None:
  p.add_argument('--model', '--preset', dest='preset', choices=PRESETS, default=None,
                 help='a Hugging Face model family and its rules: llama = Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral'
                 ' <-> orbax_nnx.llama.Llama (not a layout preset: see --layout)')
  p.add_argument('--config', default=None, metavar='CONFIG_JSON',
                 help='the Hugging Face config.json for --model (default: SRC/config.json)')


def _preset(args, scan_layers: bool | None):
  """The preset the flags name (None without --preset); the model is built scanned with --scan-layers."""
  if getattr(args, 'preset', None) is None:
    return None
  from etils import epath

  from orbax_nnx import llama

  config = epath.Path(args.config) if args.config else epath.Path(args.src) / 'config.json'
  if not config.exists():
    raise SystemExit(f'--model {args.preset} needs the model config: {config} does not exist; pass --config PATH.')
  return llama.hf_preset(config, scan_layers=bool(scan_layers))


def cmd_plan(args) -> int:
  """The plan `convert` would run with the same flags (the same function builds both)."""
  from orbax_nnx.conversion import describe_output, output_options, plan_conversion
  from orbax_nnx.sources.metadata import resolve_item

  src_item = resolve_item(args.src, step=args.step, item=args.item)
  preset = _preset(args, args.scan_layers)
  if preset is not None:
    from orbax_nnx.planning.planner import plan

    the_plan = plan(src_item, preset.target, mapping=_mapping(args, preset))
    print(the_plan)
    return 0 if not the_plan.missing else 1
  layout, target, the_plan, options = plan_conversion(
      src_item, to=args.to, scan_layers=args.scan_layers, flavour=args.flavour,
      include=getattr(args, 'include', 'all'), mapping=_mapping(args), linen=_linen(args))
  print(layout.summary())
  print(f'# to {options["to"]}: target path  <-  expression   [shape dtype, bytes]   => stored at')
  for path, expr in the_plan.entries.items():
    leaf = the_plan.leaves[path]
    print(f'{"/".join(path)}  <-  {expr}   [{leaf.shape} {leaf.dtype.name}]   => {"/".join(target.disk[path])}')
  for m in the_plan.missing:
    print(f'MISSING {m}')
  print(f'# {len(the_plan.entries)} leaves, {the_plan.bytes_read() / 2**20:.1f} MiB to read')
  print(_memory_line(args, the_plan.bytes_read()))
  print(describe_output(output_options(layout)))
  return 0 if not the_plan.missing else 1


def _memory_line(args, read_bytes: int) -> str:
  """What convert would hold with the same flags: the budget given, or the default sized from what it reads."""
  given = _budget(args).get('memory_budget')
  if given is not None:
    return f'# memory: --memory-budget {given / 2**20:.0f} MiB (half decoded chunks, half arrays in flight)'
  from orbax_nnx.io import budget

  bounds = f'{budget.MIN_DEFAULT_IN_FLIGHT >> 20}-{budget.MAX_DEFAULT_IN_FLIGHT >> 20} MiB'
  return (f'# memory: default: {budget.default_in_flight(read_bytes) / 2**20:.0f} MiB of arrays in flight (1/'
          f'{budget.IN_FLIGHT_SHARE} of what is read, {bounds}), chunks kept until their last reader; more where'
          ' one stored chunk feeds many targets. --memory-budget SIZE bounds both.')


class _Progress:
  """A progress bar on a terminal, log lines otherwise, nothing with --quiet."""

  def __init__(self, quiet: bool):
    self.quiet = quiet
    self.total_leaves = self.total_bytes = self.leaves = self.bytes = 0
    self.tty = sys.stderr.isatty()
    self.last_log = 0.0

  def planned(self, leaves: int, nbytes: int) -> None:
    """The totals, from the plan `convert` runs (called once, before the first array)."""
    self.total_leaves, self.total_bytes = leaves, nbytes

  def __call__(self, lazy) -> None:
    import time

    self.leaves += 1
    self.bytes += lazy.nbytes
    if self.quiet:
      return
    frac = self.bytes / max(self.total_bytes, 1)
    if self.tty:
      bar = '#' * int(30 * frac)
      sys.stderr.write(f'\r[{bar:<30}] {self.leaves}/{self.total_leaves} leaves'
                       f' {self.bytes / 2**20:.0f}/{self.total_bytes / 2**20:.0f} MiB')
      if self.leaves == self.total_leaves:
        sys.stderr.write('\n')
    elif time.monotonic() - self.last_log > 5 or self.leaves == self.total_leaves:
      self.last_log = time.monotonic()
      print(f'progress: {self.leaves}/{self.total_leaves} leaves, {self.bytes / 2**20:.0f}/'
            f'{self.total_bytes / 2**20:.0f} MiB', file=sys.stderr)


def _linen(args):
  from orbax_nnx.options import LinenOutput

  return LinenOutput(linen_style=getattr(args, 'linen_style', None), template=getattr(args, 'template', None))


def cmd_convert(args) -> int:
  from orbax_nnx.conversion import convert
  from orbax_nnx.sources.metadata import resolve_item

  src_item = resolve_item(args.src, step=args.step, item=args.item)
  preset = _preset(args, args.scan_layers)
  model = dict(target=preset.target, scan_layers=None) if preset else dict(scan_layers=args.scan_layers)
  report = convert(src_item, args.dst, to=args.to, flavour=args.flavour, include=args.include,
                   mapping=_mapping(args, preset), linen=_linen(args), overwrite=args.overwrite,
                   progress=_Progress(args.quiet), **model, **_budget(args))
  if not args.quiet:
    print(report.summary())
  return 0


def cmd_export_params(args) -> int:
  from orbax_nnx.serving import export_params

  preset = _preset(args, False)
  dtype = None if args.dtype == 'keep' else args.dtype
  if args.format == 'safetensors':
    if preset is None:
      raise SystemExit('--format safetensors needs --model (the model and its export rules) and --config.')
    report = export_params(args.src, args.dst, format='safetensors', dtype=dtype, target=preset.target,
                           export_rules=preset.export_rules, mapping=_mapping(args), overwrite=args.overwrite,
                           max_shard_size=_size(args.max_shard_size, '--max-shard-size'), step=args.step,
                           item=args.item, **_budget(args))
  else:
    if preset is not None:
      raise SystemExit('--model applies to --format safetensors here (convert takes it for other formats).')
    report = export_params(args.src, args.dst, format=args.format, dtype=dtype, scan_layers=args.scan_layers,
                           filter=args.filter, merge_lora=args.merge_lora, mapping=_mapping(args), linen=_linen(args),
                           overwrite=args.overwrite, step=args.step, item=args.item, **_budget(args))
  if not args.quiet:
    print(report.summary())
  return 0


def cmd_compare(args) -> int:
  from orbax_nnx.compare import compare

  preset = None
  if args.preset is not None:
    args.src = args.a  # the model's config defaults to A's config.json
    preset = _preset(args, False)
  report = compare(args.a, args.b, values=args.values, atol=args.atol, rtol=args.rtol, only=args.only,
                   mapping=_mapping(args, preset), layout_a=args.layout_a, layout_b=args.layout_b,
                   step_a=args.step_a, step_b=args.step_b, item_a=args.item_a, item_b=args.item_b, **_budget(args))
  print(json.dumps(report.to_json()) if args.json else report.summary())
  return 0 if report.equal else 1


def cmd_inspect(args) -> int:
  from orbax_nnx.inspection import inspect_checkpoint

  facts = inspect_checkpoint(args.src, step=args.step, item=args.item, depth=args.depth, pattern=args.pattern,
                             layout=args.layout, groups=tuple(args.groups or ()))
  if args.json:
    print(json.dumps(facts, default=str))
    return 0
  print(f'{facts["path"]}: {facts["layout"]} layout ({facts["flavour"]} flavour), preset {facts["preset"]}'
        + (f', step {facts["step"]}' if facts['step'] is not None else ''))
  for label, root in facts['roots'].items():
    print(f'  {label:9} at {root or "<root>"}')
  for root in facts['aux']:
    print(f'  aux       at {root}')
  for group in facts['groups']:
    print(f'  group     {group}')
  rows = facts['leaves']
  width = max((len(r['path']) for r in rows), default=10)
  for r in rows:
    if 'shape' in r:
      print(f'{r["path"]:<{width}}  {str(tuple(r["shape"])):>18}  {r["dtype"]:>10}  {r["bytes"]:>14,}')
    else:
      print(f'{r["path"]:<{width}}  {r["leaves"]:>12} leaves  {r["bytes"]:>14,}')
  for category, nbytes in sorted(facts['totals'].items()):
    print(f'total {category:<10} {nbytes:>14,} B ({nbytes / 2**20:.1f} MiB)')
  print(f'total {"":<10} {facts["total_bytes"]:>14,} B ({facts["total_bytes"] / 2**20:.1f} MiB)')
  if facts['orbax_nnx']:
    print(f'orbax-nnx metadata: version {facts["orbax_nnx"].get("version")}'
          + (', converted from ' + str(facts['orbax_nnx']['conversion'].get('from_kind'))
             if facts['orbax_nnx'].get('conversion') else ''))
  return 0


def cmd_presets(args) -> int:
  """Every built-in layout preset and its rules (stored path as `inspect` prints it -> canonical path)."""
  from orbax_nnx.mapping.presets import PRESETS as LAYOUTS

  print('\n\n'.join(str(p) for p in LAYOUTS))
  print('\npreset safetensors: Hugging Face safetensors (model.safetensors, or shards plus'
        ' model.safetensors.index.json); detected from the files, not from Orbax metadata\n'
        '  <tensor name>  ->  model/<tensor name split on ".">   (map it onto a model with --rules or --model)')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='orbax-nnx', description='Flax NNX tools for Orbax checkpoints. Exit codes: 0'
                                   ' success, 1 a negative answer (plan with missing leaves, compare finding'
                                   ' differences), 2 usage or read errors.')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('plan', help='print the conversion plan (reads metadata only)')
  _add_source(p)
  _add_layout_options(p)
  p.add_argument('--include', choices=['all', 'params'], default='all', help="'params': Params only")
  _add_preset(p)
  _add_mapping(p)
  _add_budget(p)
  p.set_defaults(fn=cmd_plan)
  p = sub.add_parser('convert', help='convert a checkpoint to another layout (streaming, atomic)')
  _add_source(p)
  p.add_argument('dst', help='output item directory (written atomically)')
  _add_layout_options(p)
  p.add_argument('--include', choices=['all', 'params'], default='all', help="'params': Params only")
  p.add_argument('--overwrite', action='store_true', help='replace an existing DST')
  _add_budget(p)
  p.add_argument('--quiet', action='store_true')
  _add_preset(p)
  _add_mapping(p)
  p.set_defaults(fn=cmd_convert)
  p = sub.add_parser('export-params', help='write a param-only (decode) checkpoint')
  _add_source(p)
  p.add_argument('dst')
  p.add_argument('--dtype', default='bfloat16', help="cast floating params (default bfloat16; 'keep')")
  scan = p.add_mutually_exclusive_group()
  scan.add_argument('--scan-layers', dest='scan_layers', action='store_true', default=None,
                    help='stack unrolled layer groups')
  scan.add_argument('--no-scan-layers', '--unroll', dest='scan_layers', action='store_false',
                    help='unroll stacked layer groups (for decoding)')
  scan.add_argument('--keep-scan', dest='scan_layers', action='store_const', const=None,
                    help='keep layer groups as stored (default)')
  p.add_argument('--format', choices=['nnx', 'linen', 'safetensors'], default='nnx',
                 help='output format; safetensors: Hugging Face files, with --model and --config')
  _add_linen_style(p)
  p.add_argument('--max-shard-size', '--max-shard-mib', dest='max_shard_size', default='5GiB', metavar='SIZE',
                 help='safetensors file size (default 5GiB; 5GB, 500MiB, ...; a bare number is MiB)')
  _add_preset(p)
  p.add_argument('--filter', choices=['Param', 'LoRAParam'], default='Param', help='LoRAParam: adapters only')
  p.add_argument('--merge-lora', action='store_true', help='fold LoRA adapters into their kernels')
  p.add_argument('--overwrite', action='store_true')
  p.add_argument('--quiet', action='store_true')
  _add_mapping(p)
  _add_budget(p)
  p.set_defaults(fn=cmd_export_params)
  p = sub.add_parser('compare', help='compare two checkpoints across layouts (exit 0 equal, 1 different, 2 error)',
                     description='Compare two checkpoints across layouts. Exit codes: 0 equal, 1 different, 2 usage'
                     ' or read error.')
  p.add_argument('a')
  p.add_argument('b')
  p.add_argument('--values', action='store_true', help='compare values too (streamed leaf by leaf)')
  p.add_argument('--atol', type=float, default=0.0)
  p.add_argument('--rtol', type=float, default=0.0)
  p.add_argument('--only', choices=['params', 'optimizer', 'all'], default='all')
  p.add_argument('--json', action='store_true')
  _add_preset(p)
  for side in ('a', 'b'):
    p.add_argument(f'--layout-{side}', choices=_layout_names(), default=None,
                   help=f'force the layout preset of {side.upper()}')
    p.add_argument(f'--step-{side}', type=int, default=None, help=f'step of {side.upper()}, a manager root')
    p.add_argument(f'--item-{side}', default=None, help=f'item of {side.upper()}, a step dir with several')
  _add_mapping(p, layout=False)
  _add_budget(p)
  p.set_defaults(fn=cmd_compare)
  p = sub.add_parser('inspect', help='what a checkpoint holds (metadata only)')
  _add_source(p)
  p.add_argument('--json', action='store_true')
  p.add_argument('--depth', type=int, default=None, help='aggregate leaves to this path depth')
  p.add_argument('--pattern', '--filter', dest='pattern', default=None, metavar='REGEX',
                 help='only stored paths REGEX searches')
  _add_mapping(p, rules=False)
  p.set_defaults(fn=cmd_inspect)
  p = sub.add_parser('presets', help='list the layout presets (--layout) and their rules')
  p.set_defaults(fn=cmd_presets)
  return parser


def _native_stdout_to_stderr() -> None:
  """Native libraries (gloo's connection lines) print on fd 1: point fd 1 at stderr, and keep the real stdout
  for Python's `print`, so stdout carries only the command's own output."""
  sys.stdout.flush()
  real_stdout = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(real_stdout, 'w', buffering=1)


def _maybe_distributed() -> None:
  """Joins a jax.distributed job when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are set."""
  address, count, index = (os.environ.get(k) for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                                                      'JAX_PROCESS_ID'))
  if address and count and index:
    _native_stdout_to_stderr()
    import jax
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))


def _version() -> str:
  from orbax_nnx.version import __version__
  return __version__


def main(argv=None) -> int:
  _setup_env()
  _maybe_distributed()
  from orbax_nnx import errors

  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.fn(args)
  except BrokenPipeError:  # e.g. piped into `head`
    sys.stderr.close()
    return 0
  except errors.OrbaxNNXError as e:
    print(f'orbax-nnx {args.command}: error: {e}', file=sys.stderr)
    return _USAGE_ERROR
  except Exception:  # not a checkpoint or usage problem we recognise: an internal error, shown in full
    import traceback
    traceback.print_exc()
    print(f'orbax-nnx {args.command}: internal error (a bug in orbax-nnx {_version()}); please report it with the'
          ' traceback above.', file=sys.stderr)
    return 1


def run(argv=None) -> NoReturn:
  """The `orbax-nnx` program: `main`, then exit with its status.

  The process ends next, so every object still alive is first moved out of the collector's reach (`gc.freeze`):
  the interpreter's last collections walk every object jax and Orbax created, and took 0.3-0.4 s of each run on
  2 cores. Atexit handlers, destructors of objects freed by reference counting and the flush of standard streams
  still run; what `main` wrote is committed before it returns.

  Raises:
    SystemExit: always, with `main`'s exit code.
  """
  code = main(argv)
  gc.freeze()
  sys.exit(code)


if __name__ == '__main__':
  run()
