"""XLA flags the project sets by default (each measured; docs/benchmark.md).

XLA reads ``XLA_FLAGS`` once, when JAX first initialises a backend, so
`set_defaults` must run before that (``main.py`` and ``benchmark.py`` call
it first thing). A flag the user already names in ``XLA_FLAGS`` is left as
the user set it.

`DEFAULTS`:

* ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA:CPU's
  default scheduler orders the train step's operations to run independent
  ones concurrently, which keeps more buffers alive at once. Measured on
  2026-11-30 (paper config, K = 17, 512 px, batch 2; this machine, runs
  alternating default / off / default / off): the step's temporary buffer
  868 -> 680 MB and the process's resident memory 2,284 -> 2,071 MB, step
  time 4.03 / 4.28 s (default) against 4.04 / 4.06 s (off), and the same
  loss to the bit. A CPU-only flag: GPU and TPU compilers ignore it.
"""

from __future__ import annotations

import os

DEFAULTS = (('xla_cpu_enable_concurrency_optimized_scheduler', 'false'),)


def with_defaults(xla_flags: str) -> str:
  """``xla_flags`` with every `DEFAULTS` flag it does not name appended.

  Args:
    xla_flags: an ``XLA_FLAGS`` value ('' for none).

  Returns:
    The new value; flags already in ``xla_flags`` keep their values.
  """
  named = {f.split('=', 1)[0].lstrip('-') for f in xla_flags.split()}
  extra = [f'--{name}={value}' for name, value in DEFAULTS
           if name not in named]
  return ' '.join([xla_flags.strip()] + extra).strip()


def set_defaults() -> str:
  """Puts `DEFAULTS` into ``os.environ['XLA_FLAGS']`` (see `with_defaults`).

  Returns:
    The ``XLA_FLAGS`` value, or a note that JAX's backends were already
    initialised (then nothing changes: XLA has read its flags).
  """
  import jax._src.xla_bridge as xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return ('skipped: JAX backends already initialised, XLA_FLAGS='
            f'{os.environ.get("XLA_FLAGS", "")!r}')
  os.environ['XLA_FLAGS'] = with_defaults(os.environ.get('XLA_FLAGS', ''))
  return os.environ['XLA_FLAGS']
