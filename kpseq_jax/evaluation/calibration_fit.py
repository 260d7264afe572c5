"""Fits the likelihood map on the validation frames (issue 36).

Event: a keypoint is a *hit* when it is labelled and its prediction lies
within ``hit_alpha`` x max(box w, h) of the truth (`metrics.correct_keypoints`,
PCK's rule and normaliser); a keypoint known to be absent (v = 0 in a data
set whose v = 0 means absent) is a miss, since there is nothing to be near.
Keypoints whose truth is unknown are left out. The raw likelihood
(`likelihood.raw_likelihood`, 0 where the model generated nothing) is
mapped to P(hit) by isotonic regression (scikit-learn's
``IsotonicRegression``: the monotone least-squares fit, Zadrozny & Elkan,
KDD 2002), whose knots become a `likelihood.CalibrationMap`.

The probabilities are clipped to [1 / (n + 2), (n + 1) / (n + 2)] for n
fitted keypoints (Laplace's rule of succession): a frequency seen on n
keypoints is never a certainty. When every validation keypoint is a hit
(or every one a miss) the map is that constant and a warning says that the
likelihood then carries no ranking (a smaller ``hit_alpha`` has misses).

Default radius: ``calibration.hit_alpha = 0.05`` (configs/default.py),
not PCK@0.2's 0.2: on the lab data sets every test keypoint is within 0.2
x the box (PCK@0.2 1.000, docs/uncertainty.md), so a map fitted at 0.2 is
the constant ~1 and no ``pcutoff`` hides a wrong point; at 0.05 (about
10 px on the open-field mouse, 5 bins of a 128-bin crop) dlc_reaching has
misses (accuracy 0.865) and the likelihood keeps its ranking.
"""

from __future__ import annotations

from absl import logging
import numpy as np

from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import metrics
from kpseq_jax.inference import likelihood


def hits(batch: dict[str, np.ndarray], pred_px: np.ndarray,
         size: np.ndarray | None, hit_alpha: float
         ) -> tuple[np.ndarray, np.ndarray]:
  """(bool [N, Kmax] hit, bool [N, Kmax] known) of N evaluated samples.

  Args:
    batch: ``keypoints`` float [N, Kmax, 3] image pixels (x, y, v),
      ``bbox`` [N, 4] pixels, ``num_keypoints`` [N], optional
      ``keypoint_absent`` [N, Kmax] (1 = known absent).
    pred_px: float [N, Kmax, 2] predicted image pixels (NaN: none).
    size: float [N] PCK normaliser (pixels), or None for max(w, h).
    hit_alpha: the radius as a fraction of the normaliser.

  Returns:
    hit: within the radius (labelled keypoints only); known: labelled or
    known absent, inside the category's K.
  """
  hit, labelled, _ = metrics.correct_keypoints(
      pred_px, batch['keypoints'], batch['bbox'], hit_alpha, size)
  kmax = batch['keypoints'].shape[1]
  valid = np.arange(kmax)[None] < np.asarray(batch['num_keypoints'])[:, None]
  absent = batch.get('keypoint_absent', np.zeros(batch['keypoints'].shape[:2]))
  known = (labelled | (np.asarray(absent) > 0)) & valid
  return np.asarray(hit, bool) & labelled & valid, known


def raw_of(decoded: common.Decoded) -> np.ndarray:
  """float64 [N, Kmax] raw likelihood of a decoding, 0 where not generated."""
  return np.nan_to_num(likelihood.raw_likelihood(decoded.confidence,
                                                 decoded.presence), nan=0.0)


def fit(raw: np.ndarray, hit: np.ndarray, hit_alpha: float, step: int,
        split: str, presence: bool) -> likelihood.CalibrationMap:
  """Isotonic map of raw likelihoods to P(hit) (module docstring).

  Args:
    raw: float [n] raw likelihoods in [0, 1].
    hit: bool [n].
    hit_alpha: the radius of the hits.
    step, split: what it was fitted on (recorded in the map).
    presence: the raw value includes presence (an ``<absent>`` model).

  Raises:
    ValueError: no keypoint, shapes differ, or raw values outside [0, 1].
  """
  raw = np.asarray(raw, np.float64).reshape(-1)
  hit = np.asarray(hit, bool).reshape(-1)
  if raw.shape != hit.shape or not raw.size:
    raise ValueError(f'calibration needs raw and hit of one length >= 1, got '
                     f'{raw.shape} and {hit.shape}')
  if np.any(~np.isfinite(raw)) or raw.min() < 0 or raw.max() > 1:
    raise ValueError('raw likelihoods must be finite and in [0, 1]')
  n = raw.size
  from sklearn import isotonic  # Here: 1-3 s of import every CLI start skips.
  model = isotonic.IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True,
                                      out_of_bounds='clip')
  model.fit(raw, hit.astype(np.float64))
  y = np.clip(model.y_thresholds_, 1.0 / (n + 2), (n + 1.0) / (n + 2))
  if hit.all() or not hit.any():
    logging.warning(
        'Calibration on %d %r keypoints: all %s at hit_alpha %.3f, so the '
        'calibrated likelihood is the constant %.3f and ranks nothing; a '
        'smaller --config.calibration.hit_alpha gives misses to learn from.',
        n, split, 'hits' if hit.all() else 'misses', hit_alpha, y[0])
  event = (f'{"visible and " if presence else ""}within {hit_alpha:g} x '
           'max(box w, h) of the truth')
  return likelihood.CalibrationMap(
      raw_knots=tuple(float(v) for v in model.X_thresholds_),
      probability_knots=tuple(float(v) for v in y), hit_alpha=float(hit_alpha),
      event=event, checkpoint_step=int(step), split=split,
      num_keypoints=int(n), num_hits=int(hit.sum()))


def fit_decoded(decoded: common.Decoded, hit_alpha: float,
                min_keypoints: int, step: int, split: str
                ) -> likelihood.CalibrationMap | None:
  """`fit` on a decoded split's known keypoints; None (with a warning) when
  it has fewer than ``min_keypoints`` of them."""
  hit, known = hits(decoded.batch, decoded.pred_px, decoded.size, hit_alpha)
  n = int(known.sum())
  if n < max(1, min_keypoints):
    logging.warning('Only %d known keypoints on %r (calibration.min_keypoints '
                    '%d): no likelihood calibration; likelihoods stay raw.',
                    n, split, min_keypoints)
    return None
  cmap = fit(raw_of(decoded)[known], hit[known], hit_alpha, step, split,
             decoded.presence is not None)
  logging.info('Likelihood calibration on %d %r keypoints (%d hits within '
               '%g x box), step %d: %d knots.', n, split, cmap.num_hits,
               hit_alpha, step, len(cmap.raw_knots))
  return cmap
