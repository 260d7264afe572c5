"""Prediction files: the COCO keypoint results format.

``[{image_id, category_id, keypoints: [x, y, v] * K, score}]`` in image
pixels, as pycocotools' ``COCO.loadRes`` reads it
(cocodataset.org/#format-results), plus, when the model gives them,
``keypoint_scores`` (K per-keypoint confidences in [0, 1]) and
``keypoint_presence`` (K probabilities of being visible). v is 1 for a
keypoint predicted visible and 0 for one predicted absent (its x, y stay the
model's best guess) or not generated. With a calibrated ``likelihood``
(`likelihood.CalibrationMap`), the third value of each generated keypoint and
``keypoint_scores`` are that probability instead (where mmpose writes its
score), and the raw confidence is kept as ``keypoint_confidence_raw``.
"""

import numpy as np

# mmpose CocoMetric: keypoint_score_thr=0.2 for score_mode='bbox_keypoint'.
KEYPOINT_SCORE_THRESHOLD = 0.2

def bbox_keypoint_score(box_score: float, keypoint_scores: np.ndarray,
                        threshold: float = KEYPOINT_SCORE_THRESHOLD) -> float:
  """Instance score = box score x mean keypoint score (mmpose's rescoring).

  mmpose ``CocoMetric`` with ``score_mode='bbox_keypoint'``
  (``mmpose/evaluation/metrics/coco_metric.py``): the mean is over the
  keypoints whose score is > ``threshold`` (``keypoint_score_thr``, 0.2
  there); with none above it the mean is 0.

  Args:
    box_score: the detection's score.
    keypoint_scores: float [K] per-keypoint scores.
    threshold: keypoint scores at or below it are left out of the mean.

  Returns:
    the rescored instance score (float).
  """
  s = np.asarray(keypoint_scores, np.float64).reshape(-1)
  above = s[s > threshold]
  return float(box_score) * (float(above.mean()) if above.size else 0.0)



def coco_results(pred_px: np.ndarray, num_keypoints: np.ndarray,
                 image_ids: np.ndarray, category_ids: np.ndarray,
                 scores: np.ndarray | None = None,
                 keypoint_scores: np.ndarray | None = None,
                 presence: np.ndarray | None = None,
                 likelihood: np.ndarray | None = None) -> list[dict]:
  """COCO keypoint results entries for N predicted instances.

  Args:
    pred_px: float [N, Kmax, 2] image pixels, NaN where not generated.
    num_keypoints: int [N], the category's K of each instance.
    image_ids: int [N].
    category_ids: int [N].
    scores: float [N] box scores (1.0 for given boxes); default 1.0.
    keypoint_scores: float [N, Kmax] per-keypoint confidence in [0, 1].
    presence: float [N, Kmax] probability that the keypoint is visible; a
      keypoint with presence < 0.5 gets v = 0.
    likelihood: float [N, Kmax] calibrated probability in [0, 1]: becomes
      each generated keypoint's third value and ``keypoint_scores``
      (``keypoint_scores`` given is then written as
      ``keypoint_confidence_raw``).

  Returns:
    N dicts ``image_id, category_id, keypoints`` ([x, y, v] * K, rounded
    to 3 decimals; (0, 0, 0) for a keypoint not generated), ``score`` (with
    ``keypoint_scores``, `bbox_keypoint_score` of the box score and the
    visible keypoints' scores), and the
    optional per-keypoint lists.
  """
  out = []
  for i in range(len(pred_px)):
    k = int(num_keypoints[i])
    xy = pred_px[i, :k]
    ok = np.all(np.isfinite(xy), axis=1)
    visible = ok.copy()
    if presence is not None:
      visible &= presence[i, :k] >= 0.5
    third = visible.astype(np.float64)
    lk = None
    if likelihood is not None:
      lk = np.nan_to_num(np.asarray(likelihood[i, :k], np.float64), nan=0.0)
      third = np.where(ok, lk, 0.0)
    kp = np.concatenate([np.where(ok[:, None], xy, 0.0), third[:, None]],
                        axis=1)
    score = 1.0 if scores is None else float(scores[i])
    entry = dict(image_id=int(image_ids[i]), category_id=int(category_ids[i]),
                 keypoints=[round(float(v), 3) for v in kp.reshape(-1)])
    if keypoint_scores is not None:
      ks = np.nan_to_num(keypoint_scores[i, :k].astype(np.float64), nan=0.0)
      if lk is not None:
        entry['keypoint_confidence_raw'] = [round(float(v), 4) for v in ks]
        ks = lk
      entry['keypoint_scores'] = [round(float(v), 4) for v in ks]
      score = bbox_keypoint_score(score, ks[visible])
    if presence is not None:
      entry['keypoint_presence'] = [
          round(float(v), 4) for v in np.nan_to_num(presence[i, :k], nan=0.0)]
    entry['score'] = score
    out.append(entry)
  return out
