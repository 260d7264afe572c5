"""PCK (percentage of correct keypoints) for top-down keypoint predictions.

A labelled keypoint (v > 0) is correct when its prediction lies within
``alpha * max(bbox_w, bbox_h)`` pixels of the ground truth (PCK@alpha,
bbox-normalised as in MP-100 / POMNet, Xu et al. 2022). A missing
prediction (NaN) is wrong. Per-category PCK pools the keypoints of all that
category's instances; the reported PCK is the mean over categories.
"""

import collections
import dataclasses

import numpy as np


def correct_keypoints(pred_xy: np.ndarray, gt_keypoints: np.ndarray,
                      bbox: np.ndarray, alpha: float = 0.2
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-keypoint correctness of one batch.

  Args:
    pred_xy: float [N, K, 2] predicted (x, y) in image pixels (NaN = none).
    gt_keypoints: float [N, K, 3] ground truth (x, y, v) in pixels.
    bbox: float [N, 4] (x, y, w, h) in pixels.
    alpha: threshold as a fraction of max(w, h).

  Returns:
    (correct bool [N, K], labelled bool [N, K], error float [N, K] in
    pixels, NaN where no prediction).
  """
  pred_xy = np.asarray(pred_xy, np.float64)
  gt = np.asarray(gt_keypoints, np.float64)
  err = np.linalg.norm(pred_xy - gt[..., :2], axis=-1)  # [N, K]
  thr = alpha * np.max(np.asarray(bbox, np.float64)[:, 2:4], axis=1)  # [N]
  labelled = gt[..., 2] > 0
  correct = labelled & np.nan_to_num(err <= thr[:, None], nan=False)
  return correct, labelled, err


@dataclasses.dataclass
class PCKAccumulator:
  """Accumulates PCK and mean pixel error per category over batches."""

  alpha: float = 0.2
  _correct: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(int))
  _labelled: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(int))
  _err_sum: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))
  _err_count: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(int))

  def update(self, category_ids: np.ndarray, pred_xy: np.ndarray,
             gt_keypoints: np.ndarray, bbox: np.ndarray) -> None:
    """Adds a batch; arguments as in `correct_keypoints`, ids int [N]."""
    correct, labelled, err = correct_keypoints(pred_xy, gt_keypoints, bbox,
                                               self.alpha)
    has_err = labelled & np.isfinite(err)
    for i, cid in enumerate(np.asarray(category_ids).tolist()):
      self._correct[cid] += int(correct[i].sum())
      self._labelled[cid] += int(labelled[i].sum())
      self._err_sum[cid] += float(err[i][has_err[i]].sum())
      self._err_count[cid] += int(has_err[i].sum())

  def result(self) -> dict:
    """Returns {'pck': mean over categories, 'per_category': {id: pck},
    'mean_error_px': mean pixel error over predicted labelled keypoints,
    'num_keypoints': labelled keypoints counted}."""
    per_cat = {c: self._correct[c] / self._labelled[c]
               for c in sorted(self._labelled) if self._labelled[c]}
    n_err = sum(self._err_count.values())
    return dict(
        pck=float(np.mean(list(per_cat.values()))) if per_cat else float('nan'),
        per_category=per_cat,
        mean_error_px=(sum(self._err_sum.values()) / n_err
                       if n_err else float('nan')),
        num_keypoints=int(sum(self._labelled.values())))
