"""``python -m kpseq_jax.main`` with the suite's settings (not a test).

``python tests/main_with_test_settings.py ARGS`` runs the command-line
program ``python -m kpseq_jax.main ARGS`` (as ``__main__``: flags, signals
and exit codes the same) in a process that first imports conftest.py, so
its Grain iterators prefetch the few batches a test reads
(`conftest.TEST_READ_OPTIONS`) instead of decoding hundreds nobody reads
beside the compiler. The XLA flags and the compilation cache reach it
through the environment either way.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # pylint: disable=g-import-not-at-top,unused-import

if __name__ == '__main__':
  runpy.run_module('kpseq_jax.main', run_name='__main__', alter_sys=True)
