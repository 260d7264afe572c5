"""Tests for kpseq_jax.host_memory (each in a fresh process: mallopt is
process-wide and must run before other threads allocate)."""

import os
import subprocess
import sys

import pytest

from kpseq_jax.runtime import host_memory

# Allocates and frees 256 MB three times; prints the minor page faults of the
# last allocation (pages touched for the first time).
_PROBE = r'''
import resource, sys
import numpy as np
from kpseq_jax.runtime import host_memory
print(host_memory.keep_freed_memory(), file=sys.stderr)
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.ones(64 * 2**20, np.float32)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  del a
print(faults)
'''
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_allocation_faults(**env) -> int:
  out = subprocess.run(
      [sys.executable, '-c', _PROBE], cwd=_ROOT, check=True,
      capture_output=True, text=True,
      env={**os.environ, 'LD_PRELOAD': '', **env})
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc settings')
def test_freed_memory_is_reused_without_page_faults():
  if not (os.confstr('CS_GNU_LIBC_VERSION') or '').startswith('glibc'):
    pytest.skip('not glibc')
  # 256 MB = 65536 pages of 4 KiB: the default mmap/munmap touches them all
  # again (fewer with transparent huge pages); kept memory touches none.
  default = _last_allocation_faults(**{host_memory.ENV_VAR: '0'})
  kept = _last_allocation_faults()
  assert kept < 100, kept
  assert default > 10 * max(kept, 1), (default, kept)


def test_preloaded_allocator_is_detected(monkeypatch):
  monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libtcmalloc.so.4')
  assert host_memory.preloaded_allocator() == 'libtcmalloc.so.4'
  assert 'tcmalloc' in host_memory.keep_freed_memory()
  monkeypatch.setenv('LD_PRELOAD', '')
  monkeypatch.setenv(host_memory.ENV_VAR, '0')
  assert host_memory.keep_freed_memory().startswith('skipped')


# Keeps 256 MB freed in the heap behind a small live block, then releases it;
# prints the resident MB before and after `release_free_memory`.
_RELEASE_PROBE = r'''
import sys
import numpy as np
from kpseq_jax.runtime import host_memory
print(host_memory.keep_freed_memory(), file=sys.stderr)
def resident_mb():
  return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
big = [np.ones(2**20, np.float32) for _ in range(64)]  # 64 x 4 MB.
pin = np.ones(1000)  # Allocated after them: the heap's top stays in use.
del big
kept = resident_mb()
print(host_memory.release_free_memory(), file=sys.stderr)
print(kept, resident_mb())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc settings')
def test_release_free_memory_returns_kept_memory():
  if not (os.confstr('CS_GNU_LIBC_VERSION') or '').startswith('glibc'):
    pytest.skip('not glibc')
  out = subprocess.run(
      [sys.executable, '-c', _RELEASE_PROBE], cwd=_ROOT, check=True,
      capture_output=True, text=True, env={**os.environ, 'LD_PRELOAD': ''})
  kept, released = (float(v) for v in out.stdout.split()[-2:])
  assert 'malloc_trim released memory' in out.stderr
  assert kept - released > 200, (kept, released)  # Of the 256 MB freed.
