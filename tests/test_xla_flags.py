"""The project's default XLA flags: appended unless the user set them, and
only before JAX reads XLA_FLAGS."""

import os
import subprocess
import sys

from kpseq_jax.runtime import xla_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG = 'xla_cpu_enable_concurrency_optimized_scheduler'


def test_defaults_are_appended_and_user_values_kept():
  assert xla_flags.with_defaults('') == f'--{_FLAG}=false'
  assert xla_flags.with_defaults('--xla_force_host_platform_device_count=8') \
      == f'--xla_force_host_platform_device_count=8 --{_FLAG}=false'
  mine = f'--{_FLAG}=true'
  assert xla_flags.with_defaults(mine) == mine  # The user's value wins.
  assert xla_flags.with_defaults(f'{mine} --other=1') == f'{mine} --other=1'


def test_set_defaults_only_before_jax_reads_the_flags():
  probe = (
      'import os, jax\n'
      'from kpseq_jax.runtime import xla_flags\n'
      'print(xla_flags.set_defaults())\n'
      'jax.devices()\n'
      'print(xla_flags.set_defaults())\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', probe], cwd=_ROOT, env=env,
                       check=True, capture_output=True, text=True).stdout
  before, after = out.strip().splitlines()[-2:]
  assert before == f'--{_FLAG}=false'
  assert after.startswith('skipped: JAX backends already initialised')
