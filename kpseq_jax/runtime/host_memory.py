"""Keep freed host memory in the process (glibc malloc settings).

XLA:CPU allocates each execution's temporary buffer (2.3 GB for the paper
config's train step) with ``malloc`` from one of its worker threads. glibc
serves such a request from a thread arena by ``mmap`` and returns it with
``munmap`` when freed, so every step touches 2.3 GB of fresh pages: about
570,000 minor page faults and 0.9 s of kernel time per step on this
project's benchmark machine (``resource.getrusage``), a third of the step.

`keep_freed_memory` sets, through ``mallopt(3)``:

* ``M_ARENA_MAX = 1``: all threads allocate from the main arena, which
  grows with ``brk`` (a thread arena falls back to ``mmap`` for requests
  larger than its 64 MB heap whatever ``M_MMAP_MAX`` says);
* ``M_MMAP_MAX = 0``: no ``mmap`` for large requests;
* ``M_TRIM_THRESHOLD = -1``: never give the top of the heap back.

Freed memory is then reused by the next step, as with tcmalloc (which TPU VM
images preload for the same reason). The cost: the process keeps its peak
host memory until it exits, and threads share one arena lock.

What XLA's compiler and one-off computations (the state's initialisation)
free is kept as well, and a train step cannot reuse most of it (it is
fragmented). `release_free_memory` hands it back (``malloc_trim(3)``); call
it once the state is built and the train step compiled, before the first
step, and the process's peak stays near what the steps need.

It must run before JAX starts its thread pools (before the first
``jax.devices()`` or computation); later, existing thread arenas keep their
behaviour. It does nothing on a C library other than glibc, or when
``KPSEQ_KEEP_FREED_MEMORY=0``, or when another allocator (``LD_PRELOAD``
tcmalloc/jemalloc) replaces ``malloc``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV_VAR = 'KPSEQ_KEEP_FREED_MEMORY'


def preloaded_allocator() -> str | None:
  """The ``LD_PRELOAD`` library that replaces malloc (tcmalloc/jemalloc/
  mimalloc), or None."""
  for lib in os.environ.get('LD_PRELOAD', '').replace(':', ' ').split():
    name = os.path.basename(lib)
    if any(a in name for a in ('tcmalloc', 'jemalloc', 'mimalloc')):
      return name
  return None


def _glibc() -> ctypes.CDLL | str:
  """The C library if the settings of this module apply to it, else why
  not ('skipped: ...')."""
  if os.environ.get(ENV_VAR, '1') == '0':
    return f'skipped: {ENV_VAR}=0'
  allocator = preloaded_allocator()
  if allocator:
    return f'skipped: malloc is {allocator} (LD_PRELOAD)'
  libc_name, _ = platform.libc_ver()
  if platform.system() != 'Linux' or libc_name != 'glibc':
    return f'skipped: C library is {libc_name or platform.system()}, not glibc'
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


def keep_freed_memory() -> str:
  """Applies the module docstring's glibc settings if they apply.

  Returns:
    What was done, for the log: 'glibc: ...', 'skipped: ...'.

  Raises:
    Nothing: a failing ``mallopt`` is reported in the returned string.
  """
  libc = _glibc()
  if isinstance(libc, str):
    return libc
  settings = {'M_ARENA_MAX': (_M_ARENA_MAX, 1), 'M_MMAP_MAX': (_M_MMAP_MAX, 0),
              'M_TRIM_THRESHOLD': (_M_TRIM_THRESHOLD, -1)}
  failed = [name for name, (param, value) in settings.items()
            if libc.mallopt(param, value) != 1]
  if failed:
    return f'glibc: mallopt failed for {failed}'
  return 'glibc: freed memory kept (M_ARENA_MAX=1, M_MMAP_MAX=0, no trim)'


def release_free_memory() -> str:
  """Returns the heap's free pages to the kernel (glibc ``malloc_trim(0)``,
  which also releases free pages inside the heap, not only at its top).

  Freed memory is kept by `keep_freed_memory`; after compiling (XLA's
  compiler frees hundreds of MB) and before the first train step, this keeps
  that memory out of the process's peak. Measured on the paper config
  (docs/benchmark.md, 2026-11-30): about 300 MB after the state's
  initialisation.

  Returns:
    What was done, for the log: 'glibc: ...', 'skipped: ...'.
  """
  libc = _glibc()
  if isinstance(libc, str):
    return libc
  released = libc.malloc_trim(0)
  return f'glibc: malloc_trim {"released memory" if released else "had nothing to release"}'
