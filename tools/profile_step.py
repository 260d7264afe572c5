"""Where a train step's time goes: XLA:CPU op times summed by kind.

  python tools/profile_step.py --config configs/default.py \\
      --config.max_num_keypoints=17 --trace_dir /tmp/step_trace

Compiles the config's train step on synthetic batches (as
``kpseq_jax.benchmark`` does), runs one untimed step, then traces
``--num_steps`` (default 5) steps with ``jax.profiler.trace`` (XLA's per-op trace events
on: ``--xla_cpu_enable_xprof_traceme``) and prints seconds per step for
each kind of op: matmuls and convolutions (XLA:CPU's YNNPACK fusions or
plain dot/convolution thunks) split into backbone / decoder and forward /
backward by their JAX op names, and everything else (elementwise fusions,
copies, ...) by its HLO name. Not part of the package: a measuring tool for
docs/benchmark.md.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_enable_xprof_traceme=true')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax

from kpseq_jax import benchmark
from kpseq_jax.runtime import host_memory
from kpseq_jax.runtime import xla_flags

# --config and --num_steps (the traced steps) are kpseq_jax.benchmark's flags.
FLAGS = flags.FLAGS
flags.DEFINE_string('trace_dir', '/tmp/kpseq_step_trace', 'Trace output.')
flags.DEFINE_integer('top', 12, 'Also list this many single ops.')

_MATMUL = re.compile(
    r'^(ynn_fusion|dot|convolution|conv_general_dilated|custom-call)')


def _kind(name: str, op_name: str) -> str:
  """'matmul/conv <part> <fwd|bwd>' for matmuls and convolutions, else the
  HLO name without its number."""
  base = re.sub(r'\.\d+$', '', name)
  if not _MATMUL.match(base):
    return base
  part = ('backbone' if '/backbone/' in op_name else
          'decoder' if '/decoder' in op_name else 'heads and other')
  way = 'backward' if 'transpose(' in op_name else 'forward'
  what = 'conv' if 'conv_general_dilated' in op_name else 'matmul'
  return f'{what} {part} {way}'


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  xla_flags.set_defaults()
  compiled, _, state, batch = benchmark._compile_step(FLAGS.config)  # pylint: disable=protected-access
  op_names = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', line)
    if m:
      op_names[m.group(1)] = m.group(2)
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with jax.profiler.trace(FLAGS.trace_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.num_steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  path = sorted(glob.glob(f'{FLAGS.trace_dir}/**/perfetto_trace.json.gz',
                          recursive=True), key=os.path.getmtime)[-1]
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  by_kind, by_op = collections.Counter(), collections.Counter()
  skip = ('ThunkExecutor', '$', 'Slinky', 'PjitFunction', 'end: ',
          'CommonPjRt')
  for e in events:
    if e.get('ph') != 'X' or e['name'].startswith(skip):
      continue
    seconds = e.get('dur', 0) / 1e6 / FLAGS.num_steps
    by_kind[_kind(e['name'], op_names.get(e['name'], ''))] += seconds
    by_op[e['name']] += seconds
  print(f'{sum(by_kind.values()):.3f} s per step in XLA ops ({path})')
  for kind, seconds in by_kind.most_common():
    if seconds >= 0.005:
      print(f'{seconds:8.3f} s  {kind}')
  print(f'the {FLAGS.top} slowest single ops:')
  for name, seconds in by_op.most_common(FLAGS.top):
    print(f'{seconds:8.3f} s  {name}  {op_names.get(name, "")[-100:]}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
