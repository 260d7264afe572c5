"""Prediction files: the COCO keypoint results format.

``[{image_id, category_id, keypoints: [x, y, v] * K, score}]`` in image
pixels, as pycocotools' ``COCO.loadRes`` reads it
(cocodataset.org/#format-results).
"""

import numpy as np


def coco_results(pred_px: np.ndarray, num_keypoints: np.ndarray,
                 image_ids: np.ndarray, category_ids: np.ndarray,
                 scores: np.ndarray | None = None) -> list[dict]:
  """COCO keypoint results entries for N predicted instances.

  Args:
    pred_px: float [N, Kmax, 2] image pixels, NaN where not generated.
    num_keypoints: int [N], the category's K of each instance.
    image_ids: int [N].
    category_ids: int [N].
    scores: float [N] instance scores (e.g. the box score); default 1.0.

  Returns:
    N dicts ``image_id, category_id, keypoints`` ([x, y, 1] * K, rounded to
    3 decimals; (0, 0, 0) for a keypoint not generated), ``score``.
  """
  out = []
  for i in range(len(pred_px)):
    k = int(num_keypoints[i])
    xy = pred_px[i, :k]
    ok = np.all(np.isfinite(xy), axis=1)
    kp = np.concatenate([np.where(ok[:, None], xy, 0.0),
                         ok[:, None].astype(np.float64)], axis=1)
    out.append(dict(image_id=int(image_ids[i]),
                    category_id=int(category_ids[i]),
                    keypoints=[round(float(v), 3) for v in kp.reshape(-1)],
                    score=1.0 if scores is None else float(scores[i])))
  return out
