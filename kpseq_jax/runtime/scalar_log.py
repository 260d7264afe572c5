"""Every training step's scalars as JSON lines in ``WORKDIR/metrics.jsonl``.

TensorBoard (`metric_writer`) shows curves; this file is the exact record a
program can read: one line per step, ``{"step": 7, "loss": ..., ...}``, with
float32 values written as their exact float64 widening (a resumed run can be
compared bitwise with an uninterrupted one). Lines are appended at every log
flush, so a run killed between flushes loses only unflushed lines, and a
resumed run appends the steps after its checkpoint again: readers keep the
last line of each step (`read_steps`). Same method names as clu's
``MetricWriter``; only process 0 writes.
"""

import json
import math
import os
from typing import Mapping

import jax

FILE_NAME = 'metrics.jsonl'


class JsonlWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, FILE_NAME)
    self._file = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, 'a', encoding='utf-8')
      if self._file.tell() and not _ends_with_newline(self.path):
        self._file.write('\n')  # End a line torn by a killed run.

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One line; NaN/inf become the strings "nan", "inf", "-inf"."""
    if self._file is None:
      return
    row = {'step': int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
    self._file.write(json.dumps(row) + '\n')

  def flush(self) -> None:
    """Makes written lines durable (flush + fsync)."""
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def read_steps(workdir: str) -> dict[int, dict[str, float]]:
  """step -> scalars from ``workdir/metrics.jsonl``, the last line per step.

  A torn last line (process killed mid-write) is ignored.
  """
  out = {}
  with open(os.path.join(workdir, FILE_NAME), encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      step = row.pop('step')
      out[step] = {k: float(v) for k, v in row.items()}
  return out
