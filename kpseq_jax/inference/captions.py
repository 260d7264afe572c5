"""Poses as text: one caption line per instance.

  snout (312.4, 188.0); leftear (301.2, 176.5); rightear (n/a); tailbase (250.0, 260.3)

Body parts in the category's order, ``name (x, y)`` in image pixels with
one decimal, ``name (n/a)`` where the model generated no keypoint, joined
by ``'; '``; a keypoint without a name is called ``kp<k>`` (0-based).
`parse_caption` reads a line back (the round trip is exact to 0.05 px).
This is the text form of keypoints the "pose as text" / captioning papers
score with accuracy within 1, 5 and 25 px and mean absolute error
(`kpseq_jax.evaluation.metrics.pixel_accuracy`).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

NOT_GENERATED = 'n/a'
_ITEM = re.compile(r'^\s*(.+?)\s*\((?:\s*(n/a)\s*|\s*([-+0-9.eE]+|nan)\s*,'
                   r'\s*([-+0-9.eE]+|nan)\s*)\)\s*$')


def keypoint_names(names: Sequence[str], num_keypoints: int) -> list[str]:
  """``names`` padded with ``kp<k>`` to ``num_keypoints``."""
  return [names[k] if k < len(names) else f'kp{k}' for k in range(num_keypoints)]


def caption(keypoints_px: np.ndarray, names: Sequence[str]) -> str:
  """One instance as a caption line.

  Args:
    keypoints_px: float [K, 2] image pixels; a row with a non-finite value
      was not generated.
    names: the category's keypoint names (padded with ``kp<k>``).

  Returns:
    The line, without a newline.
  """
  names = keypoint_names(names, len(keypoints_px))
  parts = []
  for name, (x, y) in zip(names, np.asarray(keypoints_px, np.float64)):
    parts.append(f'{name} ({x:.1f}, {y:.1f})' if np.isfinite(x) and np.isfinite(y)
                 else f'{name} ({NOT_GENERATED})')
  return '; '.join(parts)


def parse_caption(line: str, names: Sequence[str]) -> np.ndarray:
  """Reads a `caption` line back.

  Args:
    line: the caption.
    names: the K keypoint names expected, in order.

  Returns:
    float64 [K, 2] pixels, NaN for ``(n/a)``.

  Raises:
    ValueError: a part is malformed or the names differ from ``names``.
  """
  parts = [p for p in line.strip().split(';') if p.strip()]
  found = []
  for p in parts:
    m = _ITEM.match(p)
    if not m:
      raise ValueError(f'caption part {p!r} is not "name (x, y)" or "name (n/a)"')
    found.append((m.group(1), np.nan if m.group(2) else float(m.group(3)),
                  np.nan if m.group(2) else float(m.group(4))))
  if [f[0] for f in found] != list(names):
    raise ValueError(f'caption names {[f[0] for f in found]} are not {list(names)}')
  return np.array([f[1:] for f in found], np.float64).reshape(len(names), 2)
