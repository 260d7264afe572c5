"""What the model knows it doesn't know: OKS AP, confidence calibration and
presence, from one evaluation's predictions (issue 16).

`UncertaintyAccumulator` collects a batch at a time what `evaluate.py` has
(image-pixel predictions, confidences, presence, ground truth); `result`
turns it into the three report sections:

* ``oks``: OKS AP/AR by pycocotools (`oks.evaluate_oks`), per category with
  its sigmas (the data set's ``oks_sigmas``, COCO's for the COCO person
  layout, else ``config.evals.oks_default_sigma``), averaged over categories.
  Each instance's score is mmpose's ``bbox_keypoint`` rescoring of its
  keypoint confidences (the box score is 1: boxes are the ground truth's).
  Instance protocol only: CAPE episodes show the same query several times.
* ``calibration``: for every labelled keypoint, "hit" = within 0.2 x the
  PCK normaliser (MP-100's PCK@0.2, `metrics.correct_keypoints`);
  reliability table, expected calibration error and AUROC of the
  confidence at ``config.decode.confidence_radius_bins``, and ECE/AUROC at every
  radius of `vocab.CONFIDENCE_RADII_BINS` to compare them. Also the same
  at the stricter hit thresholds 0.05 and 0.025 (`HIT_ALPHAS`; PCK@0.2
  saturates on lab data).
* ``presence`` (models with ``<absent>``): precision, recall, F1 and
  accuracy of "present" and "absent" per keypoint name and overall, over
  the keypoints whose truth is known: labelled (v > 0) = present; v = 0 in
  a data set whose v = 0 means absent = absent; others are unknown.
"""

import dataclasses
from typing import Any

import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.evaluation import calibration
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import oks
from kpseq_jax.inference import results
from kpseq_jax.sequence import vocab as vocab_lib

# Hit thresholds (fractions of the PCK normaliser) calibration is scored at:
# MP-100's 0.2, and two strict ones for lab data where 0.2 saturates. With
# the crop = 1.25 x max(w, h) split in num_bins bins, alpha a is about
# a * num_bins / 1.25 bins: 0.025 ~ 2.6 and 0.05 ~ 5 bins at 128 bins, the
# scale of the confidence's radius.
HIT_ALPHAS = (0.2, 0.05, 0.025)


@dataclasses.dataclass(frozen=True)
class UncertaintyResult:
  """The report sections (JSON-ready dicts; None when not computed)."""
  oks: dict[str, Any] | None
  calibration: dict[str, Any] | None
  presence: dict[str, Any] | None


class UncertaintyAccumulator:
  """Collects predictions and truth batch by batch.

  Args:
    info: the data set (categories, sigmas, what v = 0 means).
    radius_bins: the reported confidence's radius
      (``config.decode.confidence_radius_bins``).
    default_sigma: OKS sigma for categories with none
      (``config.evals.oks_default_sigma``; 0 = none, then such a category is an
      error).
    with_oks: compute OKS AP (instance protocol).
  """

  def __init__(self, info: dataset.DatasetInfo, radius_bins: int,
               default_sigma: float, with_oks: bool = True):
    self.info = info
    self.radius = vocab_lib.CONFIDENCE_RADII_BINS.index(radius_bins)
    self.default_sigma = default_sigma if default_sigma > 0 else None
    self.with_oks = with_oks
    self._parts: list[dict[str, np.ndarray]] = []

  def update(self, batch: dict[str, np.ndarray], pred_px: np.ndarray,
             confidence_by_radius: np.ndarray,
             presence: np.ndarray | None, size: np.ndarray) -> None:
    """Adds N evaluated samples.

    Args:
      batch: the samples' ``keypoints`` float [N, Kmax, 3] (pixels, v),
        ``bbox`` [N, 4], ``category_id``, ``image_id``, ``num_keypoints``
        [N] and ``keypoint_absent`` float [N, Kmax] (1 = known absent).
      pred_px: float [N, Kmax, 2] predicted image pixels, in the same
        keypoint order as ``batch['keypoints']``.
      confidence_by_radius: float [N, Kmax, R] (`Prediction`).
      presence: float [N, Kmax] or None.
      size: float [N] the PCK normaliser, or None for
        `metrics.bbox_size` of the boxes.
    """
    if size is None:
      size = metrics.bbox_size(batch['bbox'])
    part = dict(keypoints=batch['keypoints'], bbox=batch['bbox'],
                category_id=batch['category_id'],
                image_id=batch['image_id'],
                num_keypoints=batch['num_keypoints'],
                absent=batch.get('keypoint_absent',
                                 np.zeros(batch['keypoints'].shape[:2])),
                pred_px=pred_px, conf=confidence_by_radius, size=size)
    if presence is not None:
      part['presence'] = presence
    self._parts.append(part)

  def result(self) -> UncertaintyResult:
    """The three sections over everything added.

    Raises:
      ValueError: from `oks.evaluate_oks` when a category's sigmas do not
        fit (names the category and field).
    """
    if not self._parts:
      return UncertaintyResult(None, None, None)
    d = {k: np.concatenate([p[k] for p in self._parts])
         for k in self._parts[0]}
    return UncertaintyResult(
        oks=self._oks(d) if self.with_oks else None,
        calibration=self._calibration(d),
        presence=self._presence(d) if 'presence' in d else None)

  def _oks(self, d) -> dict[str, Any]:
    k = d['num_keypoints']
    kmax = d['keypoints'].shape[1]
    valid = np.arange(kmax)[None] < k[:, None]
    conf = np.where(valid, d['conf'][..., self.radius], np.nan)
    visible = valid
    if 'presence' in d:
      visible = valid & (d['presence'] >= 0.5)
    scores = np.array([
        results.bbox_keypoint_score(1.0, c[v]) for c, v in zip(conf, visible)])
    gts = oks.ground_truth_from_arrays(d['image_id'], d['category_id'],
                                       d['keypoints'], d['bbox'], k)
    dts = oks.predictions_from_arrays(d['image_id'], d['category_id'],
                                      d['pred_px'], k, scores=scores,
                                      keypoint_scores=conf)
    sigmas = {c.id: c.oks_sigmas for c in self.info.categories.values()
              if c.oks_sigmas}
    return oks.evaluate_oks(gts, dts, self.info.categories, sigmas,
                            self.default_sigma).to_dict()

  def _calibration(self, d) -> dict[str, Any]:
    out = {'radius_bins': vocab_lib.CONFIDENCE_RADII_BINS[self.radius],
           'hit_alphas': list(HIT_ALPHAS)}
    # A labelled keypoint the model did not generate (it emitted <eos>
    # early) is a miss with confidence 0, not a NaN to skip.
    conf = np.nan_to_num(d['conf'], nan=0.0)
    for alpha in HIT_ALPHAS:
      hit, labelled, _ = metrics.correct_keypoints(
          d['pred_px'], d['keypoints'], d['bbox'], alpha, d['size'])
      chosen = calibration.calibration(conf[..., self.radius], hit, labelled)
      by_radius = {}
      for j, r in enumerate(vocab_lib.CONFIDENCE_RADII_BINS):
        c = calibration.calibration(conf[..., j], hit, labelled)
        by_radius[str(r)] = dict(ece=c.ece, auroc=c.auroc,
                                 mean_confidence=c.mean_confidence)
      out[f'alpha_{alpha}'] = dict(chosen.to_dict(), by_radius=by_radius)
    return out

  def _presence(self, d) -> dict[str, Any]:
    present = d['keypoints'][..., 2] > 0
    absent = (d['absent'] > 0) & ~present
    kmax = present.shape[1]
    valid = np.arange(kmax)[None] < d['num_keypoints'][:, None]
    known = (present | absent) & valid
    names = None
    probability = np.nan_to_num(d['presence'], nan=0.0)
    if len(self.info.categories) == 1:  # Per keypoint name.
      cat = next(iter(self.info.categories.values()))
      k = cat.num_keypoints
      probability, present, known = (probability[:, :k], present[:, :k],
                                     known[:, :k])
      names = (list(cat.keypoint_names) if len(cat.keypoint_names) == k
               else [f'keypoint {i}' for i in range(k)])
    out = calibration.presence_metrics(probability, present, known,
                                       names).to_dict()
    out['truth'] = (f'present = labelled (v > 0); absent = v = 0 where the '
                    f'data set says v = 0 means absent (unlabelled_means='
                    f'{self.info.unlabelled_means!r})')
    return out


