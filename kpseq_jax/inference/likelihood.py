"""The keypoint likelihood: raw model scores, and their calibration map.

The raw likelihood of a keypoint is its confidence (the classifier's
probability mass around the decoded bins, `decoding.coordinate_mass`)
times its presence (1 - P(``<absent>``)) for a model with an ``<absent>``
token. It ranks keypoints but is not a probability of anything a user can
name (docs/uncertainty.md).

A `CalibrationMap`, fitted on the validation frames
(`kpseq_jax.evaluation.calibration_fit`), maps it to the probability that
the keypoint is visible and within ``hit_alpha`` x max(box w, h) of the
truth: a monotone piecewise-linear function through the knots of the
isotonic or Platt fit, applied with ``np.interp`` (constant beyond the end
knots). It is saved as JSON (no pickle) in ``WORKDIR/calibration.json``
with the checkpoint step it was fitted for; `load` returns it only for
that step. ``--mode eval``, ``predict`` and ``analyze`` write the
calibrated value as the likelihood and keep the raw one under its own
name; without a map (old workdirs) they say so once and write raw values.

A box far outside the training boxes' scale (`box_range`) gets calibrated
likelihood 0 for all its keypoints (`calibrate`): the map was fitted on
boxes of the training scale and says nothing of another, and there the
raw confidence is as high for wrong keypoints as for right ones (issue 36:
a whole 640 px frame of the open-field video, training boxes 143-239 px,
gave raw likelihoods 0.59-0.66 to keypoints 60-337 px off).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

FILE = 'calibration.json'
FORMAT = 'kpseq_jax isotonic likelihood map v1'


def raw_likelihood(confidence: np.ndarray,
                   presence: np.ndarray | None) -> np.ndarray:
  """float64 [...] in [0, 1], NaN where not generated: ``confidence``
  (float [...], `predictor.Prediction.confidence`) times ``presence``
  (same shape, or None without an ``<absent>`` token)."""
  out = np.asarray(confidence, np.float64)
  if presence is not None:
    out = out * np.asarray(presence, np.float64)
  return out


def calibrate(cmap: 'CalibrationMap', raw: np.ndarray,
              box_out_of_range: np.ndarray | None = None) -> np.ndarray:
  """float64 [N, ...] calibrated likelihood of the float [N, ...] raw
  likelihoods of N boxes: ``cmap(raw)``, but 0 for every keypoint of a box
  whose ``box_out_of_range`` (bool [N], `box_range.BoxRange.out_of_range`;
  None: no box checked) is True (module docstring). NaN (not generated)
  stays NaN."""
  out = cmap(raw)
  if box_out_of_range is None:
    return out
  far = np.asarray(box_out_of_range, bool).reshape(
      (-1,) + (1,) * (out.ndim - 1))  # [N, 1, ...]
  return np.where(far & ~np.isnan(out), 0.0, out)


@dataclasses.dataclass(frozen=True)
class CalibrationMap:
  """Raw likelihood -> probability of a hit (module docstring).

  Attributes:
    raw_knots: increasing raw likelihoods in [0, 1] (x of the knots).
    probability_knots: non-decreasing probabilities in [0, 1] (y).
    hit_alpha: the hit radius, a fraction of max(box w, h) (PCK's
      normaliser).
    event: the event the probability is of, in words.
    checkpoint_step: the checkpoint whose predictions it was fitted on.
    split: the data set split it was fitted on ('val').
    num_keypoints: keypoints it was fitted on.
    num_hits: of them, hits.
    method: the fit whose knots these are, 'isotonic' or 'platt'
      (`calibration_fit`).
  """
  raw_knots: tuple[float, ...]
  probability_knots: tuple[float, ...]
  hit_alpha: float
  event: str
  checkpoint_step: int
  split: str
  num_keypoints: int
  num_hits: int
  method: str = 'isotonic'

  def __post_init__(self):
    x = np.asarray(self.raw_knots, np.float64)
    y = np.asarray(self.probability_knots, np.float64)
    if x.ndim != 1 or x.shape != y.shape or not x.size:
      raise ValueError('raw_knots and probability_knots must be two lists of '
                       f'one length >= 1, got {x.shape} and {y.shape}')
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
      raise ValueError('calibration knots must be finite')
    if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
      raise ValueError('raw_knots must increase and probability_knots must '
                       'not decrease (a monotone map)')
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 1:
      raise ValueError('calibration knots must lie in [0, 1]')

  def __call__(self, raw: np.ndarray) -> np.ndarray:
    """float64 [...] calibrated probabilities of float [...] raw
    likelihoods; NaN stays NaN."""
    raw = np.asarray(raw, np.float64)
    out = np.interp(np.nan_to_num(raw, nan=0.0), self.raw_knots,
                    self.probability_knots)
    return np.where(np.isnan(raw), np.nan, out)

  def to_json(self) -> dict[str, Any]:
    return dict(format=FORMAT, **dataclasses.asdict(self))

  @classmethod
  def from_json(cls, data: dict[str, Any], source: str = FILE
                ) -> 'CalibrationMap':
    """Raises ValueError naming ``source`` and the field on bad content."""
    if not isinstance(data, dict) or data.get('format') != FORMAT:
      raise ValueError(f'{source}: not a likelihood map (format must be '
                       f'{FORMAT!r}).')
    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING]
    if missing := [n for n in required if n not in data]:
      raise ValueError(f'{source}: missing field(s) {missing}.')
    try:
      return cls(**{n: (tuple(data[n]) if n.endswith('_knots') else data[n])
                    for n in names if n in data})
    except (TypeError, ValueError) as e:
      raise ValueError(f'{source}: {e}') from e


def save(cmap: CalibrationMap, workdir: str) -> str:
  """Writes ``WORKDIR/calibration.json`` (atomically); returns its path."""
  path = os.path.join(workdir, FILE)
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(cmap.to_json(), f, indent=1)
  os.replace(path + '.tmp', path)
  return path


def load(workdir: str, step: int) -> CalibrationMap | None:
  """The map of ``workdir`` fitted for checkpoint ``step``; None (logged
  once: likelihoods stay raw) when there is none or it belongs to another
  step.

  Raises:
    ValueError: the file exists but is not a valid map (names the file).
  """
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    logging.warning('No %s in %s: likelihoods are the raw confidence, not '
                    'calibrated probabilities (fit one with --mode '
                    'calibrate; docs/uncertainty.md).', FILE, workdir)
    return None
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not JSON ({e}).') from e
  cmap = CalibrationMap.from_json(data, path)
  if cmap.checkpoint_step != int(step):
    logging.warning('%s was fitted for checkpoint step %d, not step %d: '
                    'likelihoods are raw (refit with --mode calibrate).',
                    path, cmap.checkpoint_step, step)
    return None
  logging.info('Likelihoods calibrated by %s: P(%s), fitted on %d %r '
               'keypoints.', path, cmap.event, cmap.num_keypoints, cmap.split)
  return cmap
