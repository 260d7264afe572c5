"""How far per-keypoint confidences can be trusted: calibration and presence.

Two questions about a model's per-keypoint outputs:

* Confidence vs correctness. Given a confidence in [0, 1] per predicted
  keypoint and whether it was a hit (MP-100's PCK rule,
  `metrics.correct_keypoints`: within 0.2 x max(w, h) of the ground truth),
  `calibration` gives the reliability table (equal-width bins: count, mean
  confidence, accuracy), the expected calibration error (ECE) and the AUROC
  of the confidence for separating hits from misses.
* Presence. Given a predicted probability that a keypoint is present, the
  true presence, and which entries have a known truth, `presence_metrics`
  gives precision, recall, F1 and accuracy for both classes (present and
  absent), per keypoint and overall.

Sources: ECE and reliability diagrams as in Guo, Pleiss, Sun & Weinberger,
"On Calibration of Modern Neural Networks", ICML 2017 (Sec. 2, Eq. 3):
M bins ``I_m = ((m-1)/M, m/M]``, ``ECE = sum_m |B_m|/n |acc(B_m) -
conf(B_m)|``. AUROC as the Mann-Whitney U statistic divided by
``n_pos * n_neg`` (Hanley & McNeil, Radiology 1982; Mason & Graham, QJRMS
2002), ties counted one half through average ranks (``scipy.stats.rankdata``;
scikit-learn is not a dependency). F1 = 2 TP / (2 TP + FP + FN) (van
Rijsbergen's F with beta 1), which is 0 for a class that exists but is
never predicted.

All results are frozen dataclasses whose ``to_dict()`` is JSON-ready:
floats, ints, and None where a figure is undefined (an empty bin, 0/0).
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

# Guo et al. 2017 use M = 15 bins; 10 is the common choice for reliability
# diagrams (e.g. Niculescu-Mizil & Caruana 2005) and gives fuller bins on
# small evaluation sets.
NUM_BINS = 10
# A keypoint is predicted present when its probability is >= this.
PRESENCE_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class ReliabilityTable:
  """Confidence against accuracy in equal-width bins.

  Bin m (0-based) holds confidences in ``(edges[m], edges[m + 1]]``; bin 0
  also holds 0.

  Attributes:
    edges: the M + 1 bin edges, 0 ... 1.
    count: M ints, entries per bin.
    mean_confidence: M mean confidences (None for an empty bin).
    accuracy: M fractions of hits (None for an empty bin).
  """
  edges: list[float]
  count: list[int]
  mean_confidence: list[float | None]
  accuracy: list[float | None]

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
  """Calibration of per-keypoint confidences against hits.

  Attributes:
    num: entries evaluated.
    accuracy: fraction of hits (None if ``num`` is 0).
    mean_confidence: mean confidence (None if ``num`` is 0).
    ece: expected calibration error, in [0, 1] (None if ``num`` is 0).
    auroc: AUROC of the confidence for hits vs misses, in [0, 1]; None when
      all are hits or all misses (undefined).
    table: the `ReliabilityTable`.
  """
  num: int
  accuracy: float | None
  mean_confidence: float | None
  ece: float | None
  auroc: float | None
  table: ReliabilityTable

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ClassScores:
  """One class (present or absent) of a binary decision.

  Attributes:
    support: entries truly of the class.
    predicted: entries predicted as the class.
    precision: TP / predicted (None if nothing was predicted as the class).
    recall: TP / support (None if the class never occurs).
    f1: 2 TP / (2 TP + FP + FN) (None if the class neither occurs nor is
      predicted).
  """
  support: int
  predicted: int
  precision: float | None
  recall: float | None
  f1: float | None


@dataclasses.dataclass(frozen=True)
class PresenceScores:
  """Presence decisions over a set of entries with a known truth.

  Attributes:
    num: entries with a known truth.
    accuracy: fraction decided right (None if ``num`` is 0).
    present: `ClassScores` of the class "present".
    absent: `ClassScores` of the class "absent".
  """
  num: int
  accuracy: float | None
  present: ClassScores
  absent: ClassScores


@dataclasses.dataclass(frozen=True)
class PresenceMetrics:
  """Presence precision/recall/F1 per keypoint and overall.

  Attributes:
    threshold: present when the probability is >= it.
    overall: `PresenceScores` over every known entry.
    per_keypoint: keypoint name -> `PresenceScores` of its column.
  """
  threshold: float
  overall: PresenceScores
  per_keypoint: dict[str, PresenceScores]

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict."""
    return dataclasses.asdict(self)


def reliability_table(confidence: np.ndarray, hit: np.ndarray,
                      mask: np.ndarray | None = None,
                      num_bins: int = NUM_BINS) -> ReliabilityTable:
  """Equal-width reliability table (Guo et al. 2017, Sec. 2).

  Args:
    confidence: float [...] confidences in [0, 1].
    hit: bool [...] same shape: the prediction was correct.
    mask: optional bool [...] same shape: entries to count (e.g. the
      ``labelled`` of `metrics.correct_keypoints`); default all.
    num_bins: M >= 1.

  Returns:
    `ReliabilityTable`.

  Raises:
    ValueError: shapes differ, a counted confidence is outside [0, 1] or
      NaN, or ``num_bins`` < 1.
  """
  conf, hit = _flatten(confidence, hit, mask, 'confidence')
  if num_bins < 1:
    raise ValueError(f'num_bins must be >= 1, got {num_bins}')
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bin m holds (edges[m], edges[m+1]]; 0 goes to bin 0.
  index = np.searchsorted(edges[1:-1], conf, side='left')  # [n] in [0, M)
  count = np.bincount(index, minlength=num_bins)
  conf_sum = np.bincount(index, weights=conf, minlength=num_bins)
  hit_sum = np.bincount(index, weights=hit.astype(np.float64),
                        minlength=num_bins)
  mean = lambda s, n: float(s / n) if n else None
  return ReliabilityTable(
      edges=edges.tolist(), count=count.tolist(),
      mean_confidence=[mean(s, n) for s, n in zip(conf_sum, count)],
      accuracy=[mean(s, n) for s, n in zip(hit_sum, count)])


def expected_calibration_error(table: ReliabilityTable) -> float | None:
  """ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)| (Guo et al. 2017, Eq. 3).

  Args:
    table: a `reliability_table`.

  Returns:
    the ECE in [0, 1]; None if the table is empty.
  """
  n = sum(table.count)
  if not n:
    return None
  return float(sum(c / n * abs(a - m) for c, a, m in zip(
      table.count, table.accuracy, table.mean_confidence) if c))


def auroc(score: np.ndarray, label: np.ndarray,
          mask: np.ndarray | None = None) -> float | None:
  """Area under the ROC curve of ``score`` for ``label``, by Mann-Whitney U.

  AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of
  the positives' ranks among all scores, tied scores given their average
  rank (``scipy.stats.rankdata``), so a tie between a positive and a
  negative counts one half (Hanley & McNeil 1982). 1.0: every positive
  scores above every negative; 0.5: no better than chance.

  Args:
    score: float [...] scores (higher = more likely positive).
    label: bool [...] same shape.
    mask: optional bool [...] entries to use.

  Returns:
    the AUROC in [0, 1]; None if there is no positive or no negative
    (undefined).

  Raises:
    ValueError: shapes differ or a used score is NaN.
  """
  s, y = _flatten(score, label, mask, 'score', unit_interval=False)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return None
  from scipy import stats  # Here: scipy.stats costs 1-2 s to import.
  ranks = stats.rankdata(s)  # Average ranks, 1-based.
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def calibration(confidence: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None,
                num_bins: int = NUM_BINS) -> CalibrationResult:
  """Reliability table, ECE and AUROC of per-keypoint confidences.

  Args:
    confidence: float [...] (e.g. [N, K]) confidences in [0, 1].
    hit: bool [...] the keypoint was correct (e.g. the ``correct`` of
      `metrics.correct_keypoints`, within 0.2 x max(w, h)).
    mask: optional bool [...] entries to evaluate (e.g. its ``labelled``).
    num_bins: bins of the table and the ECE.

  Returns:
    `CalibrationResult`.

  Raises:
    ValueError: as `reliability_table`.
  """
  table = reliability_table(confidence, hit, mask, num_bins)
  conf, h = _flatten(confidence, hit, mask, 'confidence')
  return CalibrationResult(
      num=int(conf.size),
      accuracy=float(h.mean()) if h.size else None,
      mean_confidence=float(conf.mean()) if conf.size else None,
      ece=expected_calibration_error(table),
      auroc=auroc(conf, h),
      table=table)


def presence_metrics(probability: np.ndarray, present: np.ndarray,
                     known: np.ndarray | None = None,
                     keypoint_names: Sequence[str] | None = None,
                     threshold: float = PRESENCE_THRESHOLD
                     ) -> PresenceMetrics:
  """Precision/recall/F1/accuracy of presence decisions, both classes.

  A keypoint is predicted present when ``probability >= threshold``.

  Args:
    probability: float [N, K] predicted presence probabilities in [0, 1].
    present: bool [N, K] true presence.
    known: optional bool [N, K]: the truth of the entry is known (e.g. in
      MP-100 v = 0 means "not labelled", not "absent"); default all.
    keypoint_names: K names for ``per_keypoint`` (default "0" ... "K-1").
    threshold: the decision threshold.

  Returns:
    `PresenceMetrics`; its ``overall`` pools every known entry.

  Raises:
    ValueError: shapes differ or are not [N, K], a known probability is
      NaN or outside [0, 1], or ``keypoint_names`` is not K names.
  """
  prob = np.asarray(probability, np.float64)
  truth = np.asarray(present, bool)
  known = np.ones(prob.shape, bool) if known is None else np.asarray(known,
                                                                     bool)
  if prob.ndim != 2 or truth.shape != prob.shape or known.shape != prob.shape:
    raise ValueError(
        'probability, present and known must have one shape [N, K], got '
        f'{prob.shape}, {truth.shape}, {known.shape}')
  _flatten(prob, truth, known, 'probability')  # Validates the values.
  k = prob.shape[1]
  names = ([str(i) for i in range(k)] if keypoint_names is None
           else [str(n) for n in keypoint_names])
  if len(names) != k:
    raise ValueError(f'keypoint_names has {len(names)} names for {k} '
                     'keypoints')
  if len(set(names)) != k:
    raise ValueError(f'keypoint_names must be unique, got {names}')
  said = prob >= threshold  # NaN only where unknown: compares False.
  return PresenceMetrics(
      threshold=float(threshold),
      overall=_presence_scores(said[known], truth[known]),
      per_keypoint={name: _presence_scores(said[known[:, j], j],
                                           truth[known[:, j], j])
                    for j, name in enumerate(names)})


def _presence_scores(said: np.ndarray, truth: np.ndarray) -> PresenceScores:
  """`PresenceScores` of 1-D bool decisions against 1-D bool truth."""
  n = int(truth.size)
  return PresenceScores(
      num=n, accuracy=float(np.mean(said == truth)) if n else None,
      present=_class_scores(said, truth), absent=_class_scores(~said, ~truth))


def _class_scores(said: np.ndarray, truth: np.ndarray) -> ClassScores:
  """`ClassScores` of the class marked True."""
  tp = int(np.sum(said & truth))
  fp = int(np.sum(said & ~truth))
  fn = int(np.sum(~said & truth))
  ratio = lambda a, b: a / b if b else None
  return ClassScores(support=tp + fn, predicted=tp + fp,
                     precision=ratio(tp, tp + fp), recall=ratio(tp, tp + fn),
                     f1=ratio(2 * tp, 2 * tp + fp + fn))


def _flatten(values: np.ndarray, labels: np.ndarray,
             mask: np.ndarray | None, name: str,
             unit_interval: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(float64 [n] values, bool [n] labels) of the masked entries.

  Raises:
    ValueError: shapes differ, or a kept value is NaN (or, with
      ``unit_interval``, outside [0, 1]).
  """
  v = np.asarray(values, np.float64)
  y = np.asarray(labels)
  m = np.ones(v.shape, bool) if mask is None else np.asarray(mask, bool)
  if y.shape != v.shape or m.shape != v.shape:
    raise ValueError(f'{name}, labels and mask must have one shape, got '
                     f'{v.shape}, {y.shape}, {m.shape}')
  v, y = v[m], y[m].astype(bool)
  if np.any(np.isnan(v)):
    raise ValueError(f'{name} has NaN entries (mask them out)')
  if unit_interval and np.any((v < 0) | (v > 1)):
    raise ValueError(f'{name} must lie in [0, 1], got values in '
                     f'[{v.min()}, {v.max()}]')
  return v, y
