"""Fits the likelihood map on the validation frames (issue 36).

Event: a keypoint is a *hit* when it is labelled and its prediction lies
within ``hit_alpha`` x max(box w, h) of the truth (`metrics.correct_keypoints`,
PCK's rule and normaliser); a keypoint known to be absent (v = 0 in a data
set whose v = 0 means absent) is a miss, since there is nothing to be near.
Keypoints whose truth is unknown are left out. The raw likelihood
(`likelihood.raw_likelihood`, 0 where the model generated nothing) is
mapped to P(hit) by one of two monotone fits, whose knots become a
`likelihood.CalibrationMap`:

- ``isotonic``: centred isotonic regression (Oron & Flournoy, 2017):
  scikit-learn's ``IsotonicRegression`` (the monotone least-squares step
  function, Zadrozny & Elkan, KDD 2002), then a line through each step's
  mean raw value and level, and to (0, 0) and (1, 1) at the ends (a step
  at level 0 or 1 moves its knot there; a constant when every keypoint is
  a hit, or every one a miss). The steps alone would tie every keypoint
  on one step, and on a few dozen keypoints (a handful of steps) lose much
  of the raw ranking (AUROC); the centred map is strictly increasing.
- ``platt``: Platt scaling on logit(raw), P = sigmoid(a logit(raw) + b),
  fitted by scipy's BFGS on the log loss with Platt's smoothed targets
  ((N+ + 1) / (N+ + 2) and 1 / (N- + 2); Platt, 1999). Two parameters,
  strictly increasing for a > 0, so it keeps the raw ranking exactly.
- ``auto`` (default): the one of the two with the lower 5-fold
  cross-validated Brier score on the same validation keypoints (folds
  seeded), so the choice, like the fit, uses validation frames only.

Neither map gives a certainty from n keypoints: the isotonic levels are
squeezed linearly into [1 / (n + 2), (n + 1) / (n + 2)], (1 + n p) / (n + 2)
(Laplace's rule of succession; unlike clipping, the squeeze ties no two raw
values), and Platt's smoothed targets do the same for his fit. When every
validation keypoint is a hit (or every one a miss) the map is that constant
and a warning says that the likelihood then carries no ranking (a smaller
``hit_alpha`` has misses).

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


METHODS = ('auto', 'isotonic', 'platt')
# Raw values are clipped to [_EPS, 1 - _EPS] before the logit.
_EPS = 1e-6
# Knots of a Platt map: its curve sampled at these raw values.
_PLATT_GRID = np.concatenate([[0.0], np.logspace(-6, -1, 26)[:-1],
                              np.linspace(0.1, 0.9, 81),
                              1 - np.logspace(-1, -6, 26)[1:], [1.0]])


def _logit(raw: np.ndarray) -> np.ndarray:
  raw = np.clip(np.asarray(raw, np.float64), _EPS, 1 - _EPS)
  return np.log(raw) - np.log1p(-raw)


def _platt(raw: np.ndarray, hit: np.ndarray) -> tuple[float, float]:
  """(a, b) of P = sigmoid(a logit(raw) + b), Platt's smoothed-target log
  loss minimised by scipy's BFGS from (1, 0); a < 0 (anti-ranking) is
  refitted with a = 0 (the base rate)."""
  from scipy import optimize, special  # Lazy, as sklearn below.
  x = _logit(raw)
  n_pos, n_neg = hit.sum(), (~hit).sum()
  t = np.where(hit, (n_pos + 1.0) / (n_pos + 2), 1.0 / (n_neg + 2))

  def loss(ab):
    z = ab[0] * x + ab[1]
    return np.sum(np.logaddexp(0, z) - t * z)

  a, b = optimize.minimize(loss, np.array([1.0, 0.0]), method='BFGS').x
  if a < 0:
    a, b = 0.0, float(special.logit(t.mean()))
  return float(a), float(b)


def _knots(raw: np.ndarray, hit: np.ndarray, method: str
           ) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) knots of ``method``'s fit: increasing x in [0, 1], y in
  [0, 1] (isotonic levels squeezed, Platt's curve on `_PLATT_GRID`)."""
  if method == 'platt':
    from scipy import special
    a, b = _platt(raw, hit)
    return _PLATT_GRID, special.expit(a * _logit(_PLATT_GRID) + b)
  from sklearn import isotonic  # Here: 1-3 s of import every CLI start skips.
  fitted = isotonic.IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(
      raw, hit.astype(np.float64))
  levels = np.unique(fitted)  # One per step, increasing.
  centres = np.array([raw[fitted == y].mean() for y in levels])
  if levels.size == 1:  # All hits or all misses: the constant.
    return centres, (1.0 + raw.size * levels) / (raw.size + 2)
  # A step at level 0 (1) moves its knot to raw 0 (1): flat otherwise.
  centres[0] = 0.0 if levels[0] == 0 else centres[0]
  centres[-1] = 1.0 if levels[-1] == 1 else centres[-1]
  head = [0.0] if centres[0] > 0 else []  # No end knot on a centre.
  tail = [1.0] if centres[-1] < 1 else []
  n = raw.size
  return (np.concatenate([head, centres, tail]),
          (1.0 + n * np.concatenate([head, levels, tail])) / (n + 2))


def cross_validated_brier(raw: np.ndarray, hit: np.ndarray, method: str,
                          folds: int = 5, seed: int = 0) -> float:
  """Mean squared error of ``method``'s held-out P(hit) over ``folds``
  stratified folds (scikit-learn's ``StratifiedKFold``, shuffled with
  ``seed``); NaN when a class has fewer than ``folds`` keypoints.

  Args:
    raw: float [n] raw likelihoods in [0, 1].
    hit: bool [n].
    method: 'isotonic' or 'platt'.
  """
  from sklearn import model_selection
  if min(hit.sum(), (~hit).sum()) < folds:
    return float('nan')
  held_out = np.empty(raw.shape)
  splits = model_selection.StratifiedKFold(folds, shuffle=True,
                                           random_state=seed)
  for fit_idx, out_idx in splits.split(raw, hit):
    x, y = _knots(raw[fit_idx], hit[fit_idx], method)
    held_out[out_idx] = np.interp(raw[out_idx], x, y)
  return float(np.mean((held_out - hit) ** 2))


def choose_method(raw: np.ndarray, hit: np.ndarray) -> str:
  """For float [n] raw likelihoods in [0, 1] and bool [n] hits: 'isotonic'
  or 'platt', whichever has the lower `cross_validated_brier`
  (isotonic on a tie; isotonic when the folds cannot be made: then every
  keypoint is, or nearly every one is, a hit or a miss, and both fits are
  about the base rate)."""
  scores = {m: cross_validated_brier(raw, hit, m) for m in ('isotonic',
                                                            'platt')}
  if np.isnan(scores['isotonic']):
    logging.info('Calibration method: isotonic (%d hits and %d misses: too '
                 'few of one for 5 folds).', hit.sum(), (~hit).sum())
    return 'isotonic'
  logging.info('Calibration method by 5-fold Brier score on %d keypoints: '
               'isotonic %.4f, platt %.4f.', raw.size, scores['isotonic'],
               scores['platt'])
  return 'platt' if scores['platt'] < scores['isotonic'] else 'isotonic'


def fit(raw: np.ndarray, hit: np.ndarray, hit_alpha: float, step: int,
        split: str, presence: bool, method: str = 'auto'
        ) -> likelihood.CalibrationMap:
  """Monotone map of raw likelihoods to P(hit) (module docstring).

  Args:
    raw: float [n] raw likelihoods in [0, 1].
    hit: bool [n].
    hit_alpha: the radius of the hits.
    step, split: what it was fitted on (recorded in the map).
    presence: the raw value includes presence (an ``<absent>`` model).
    method: one of `METHODS` (module docstring).

  Raises:
    ValueError: no keypoint, shapes differ, raw values outside [0, 1], or
      an unknown method.
  """
  raw = np.asarray(raw, np.float64).reshape(-1)
  hit = np.asarray(hit, bool).reshape(-1)
  if raw.shape != hit.shape or not raw.size:
    raise ValueError(f'calibration needs raw and hit of one length >= 1, got '
                     f'{raw.shape} and {hit.shape}')
  if np.any(~np.isfinite(raw)) or raw.min() < 0 or raw.max() > 1:
    raise ValueError('raw likelihoods must be finite and in [0, 1]')
  if method not in METHODS:
    raise ValueError(f'calibration method {method!r} is not one of {METHODS}')
  n = raw.size
  if method == 'auto':
    method = choose_method(raw, hit)
  x, y = _knots(raw, hit, method)
  if hit.all() or not hit.any():
    logging.warning(
        'Calibration on %d %r keypoints: all %s at hit_alpha %.3f, so the '
        'calibrated likelihood is the constant %.3f and ranks nothing; a '
        'smaller --config.calibration.hit_alpha gives misses to learn from.',
        n, split, 'hits' if hit.all() else 'misses', hit_alpha, y[0])
  event = (f'{"visible and " if presence else ""}within {hit_alpha:g} x '
           'max(box w, h) of the truth')
  return likelihood.CalibrationMap(
      raw_knots=tuple(float(v) for v in x),
      probability_knots=tuple(float(v) for v in y), hit_alpha=float(hit_alpha),
      event=event, checkpoint_step=int(step), split=split,
      num_keypoints=int(n), num_hits=int(hit.sum()), method=method)


def fit_decoded(decoded: common.Decoded, hit_alpha: float,
                min_keypoints: int, step: int, split: str,
                method: str = 'auto') -> likelihood.CalibrationMap | None:
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
             decoded.presence is not None, method)
  logging.info('Likelihood calibration (%s) on %d %r keypoints (%d hits '
               'within %g x box), step %d: %d knots.', cmap.method, n, split,
               cmap.num_hits, hit_alpha, step, len(cmap.raw_knots))
  return cmap
