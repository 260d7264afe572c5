"""SIGTERM (preemption) as a request to save and stop after a step."""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Preemption:
  """Turns SIGTERM into a request to save and stop after the current step.

  One process: a SIGTERM handler sets a flag (installed while the context
  is open, on the main thread). Several processes: JAX's preemption sync
  point, so all hosts stop at the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'Preemption':
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after the current step, '
                    'then stopping.')
    self.requested = True

  def reached(self, step: int) -> bool:
    """True if training should save and stop after ``step``."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
