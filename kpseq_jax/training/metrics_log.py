"""Training metrics: checked every step, logged every ``log_every_steps``.

`MetricsLog` keeps the train step's device metrics until a log point, so
dispatch stays asynchronous, then fetches them all: every step's scalars go
to ``WORKDIR/metrics.jsonl`` (`scalar_log`) and every step's loss and
gradient norm are checked, so a non-finite one is reported with its exact
step (`NonFiniteLossError`).
"""

import time

from absl import logging
import jax
import numpy as np

from kpseq_jax.runtime import metric_writer
from kpseq_jax.runtime import scalar_log


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or gradient."""


class MetricsLog:
  """Keeps device metrics until the next log point, then checks and prints.

  Fetching metrics only every ``log_every_steps`` keeps dispatch
  asynchronous; every step's loss and gradient norm are still checked, so a
  non-finite one is reported with the exact step (or, when updates with one
  are skipped, counted in ``skipped_updates``), and every step's scalars are
  appended to ``jsonl``.
  """

  def __init__(self, total_steps: int, jsonl: scalar_log.JsonlWriter,
               skip_nonfinite: bool = False,
               writer: metric_writer.MetricWriter | None = None,
               max_consecutive_skipped: int = 0):
    self.total_steps = total_steps
    self.jsonl = jsonl
    self.writer = writer  # TensorBoard: means over the log interval.
    self.skip_nonfinite = skip_nonfinite
    self.max_consecutive_skipped = max_consecutive_skipped  # <= 0: no cap.
    self.skipped_updates = 0
    self.consecutive_skipped = 0
    self.pending: list[tuple[int, dict]] = []
    self.t0, self.step0 = None, None  # Time and step of the last log.

  def add(self, step: int, metrics: dict) -> None:
    if self.step0 is None:  # Rates start after the first (compiling) step.
      self.t0, self.step0 = time.time(), step
    self.pending.append((step, metrics))

  def flush(self, log: bool) -> None:
    """Fetches pending metrics; raises NonFiniteLossError naming the step."""
    fetched = jax.device_get(self.pending)
    self.pending = []
    for step, m in fetched:
      self.jsonl.write_scalars(step, m)
    self.jsonl.flush()
    for step, m in fetched:
      skipped = int(m['update_skipped'])
      self.skipped_updates += skipped
      self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
      if 0 < self.max_consecutive_skipped <= self.consecutive_skipped:
        raise NonFiniteLossError(
            f'{self.consecutive_skipped} consecutive updates up to step '
            f'{step} had a non-finite loss or gradient and were skipped '
            f'(loss={m["loss"]}, grad_norm={m["grad_norm"]}); training is '
            'not progressing, stopping. The last checkpoint is intact; see '
            'config.optim.max_consecutive_skipped_updates.')
      if not self.skip_nonfinite and not (np.isfinite(m['loss']) and
                                          np.isfinite(m['grad_norm'])):
        raise NonFiniteLossError(
            f'Non-finite loss or gradient at step {step} (loss={m["loss"]}, '
            f'{_parts(m, "{}={}")}, grad_norm={m["grad_norm"]}); '
            'stopping. The last checkpoint before it is intact; '
            '--config.optim.skip_nonfinite_updates=True skips such updates.')
    if not (log and fetched):
      return
    step, m = fetched[-1]
    now = time.time()
    rate = (step - self.step0) / max(now - self.t0, 1e-9)
    self.t0, self.step0 = now, step
    eta = (self.total_steps - step) / max(rate, 1e-9)
    mean = {k: float(np.mean([f[1][k] for f in fetched])) for k in m}
    logging.info(
        'step %d/%d  loss %.4f (%s)  grad_norm %.3f  '
        'lr %.2e  %.2f steps/s  ETA %s%s', step, self.total_steps,
        mean['loss'], _parts(mean, '{} {:.4f}'), mean['grad_norm'],
        m['learning_rate'], rate, time.strftime('%H:%M:%S', time.gmtime(eta)),
        f'  skipped updates {self.skipped_updates}'
        if self.skipped_updates else '')
    if self.writer is not None:
      self.writer.write_scalars(step, {
          **{f'train/{k}': v for k, v in mean.items()},
          'train/learning_rate': m['learning_rate'],
          'train/steps_per_sec': rate})


# Metrics of every train step that are not terms of the loss.
_NOT_PARTS = ('loss', 'grad_norm', 'learning_rate', 'update_skipped')


def _parts(metrics: dict, fmt: str) -> str:
  """The loss terms of a step's metrics (``ce``, ``l1``, ... or the
  detector's ``class``, ``l1``, ``giou``, ``aux``), formatted."""
  return ', '.join(fmt.format(k, v) for k, v in metrics.items()
                   if k not in _NOT_PARTS)
