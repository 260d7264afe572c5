"""Boxes cut again from a first pose (``config.decode.pose_box_passes``).

A detector's box is not the box the keypoint stage was trained on. The
SLEAP and multi-animal DeepLabCut imports box each animal by its labelled
keypoints' extent, padded (`data_prep.multi_animal.labelled_box`: 25% of
the extent + 16 px a side). With ``pose_box_passes`` = n > 0 each box is
decoded, replaced by that same rule applied to its decoded keypoints (those
not predicted absent), and decoded again, n times; the last pose and box
are the ones reported. Boxes from predicted keypoints are what top-down
video pipelines track with (Xiao et al. 2018, "Simple Baselines for Human
Pose Estimation and Tracking", boxes from the previous frame's pose).
"""

from __future__ import annotations

import numpy as np

from data_prep import multi_animal
from kpseq_jax.inference import batchers
from kpseq_jax.inference import predictor as predictor_lib

# Fewer decoded (present, finite) keypoints than this keep the first box.
MIN_KEYPOINTS = 2


def pose_box(keypoints_px: np.ndarray, absent: np.ndarray, width: int,
             height: int) -> np.ndarray | None:
  """The labelled-box rule applied to one decoded pose.

  Args:
    keypoints_px: float [K, 2] image pixels; NaN rows (beyond the
      category's keypoints) are ignored.
    absent: bool [K], keypoints predicted absent (ignored).
    width, height: image size in pixels.

  Returns:
    float64 [4] (x, y, w, h) pixels inside the image, or None when fewer
    than `MIN_KEYPOINTS` keypoints are present or the box is empty.
  """
  xy = np.where((np.isfinite(keypoints_px).all(axis=1) & ~absent)[:, None],
                keypoints_px, np.nan)
  if np.isfinite(xy).all(axis=1).sum() < MIN_KEYPOINTS:
    return None
  box = np.asarray(multi_animal.labelled_box(xy, width, height), np.float64)
  return box if box[2] > 0 and box[3] > 0 else None


def predict(batcher: batchers.CropBatcher, images: list[np.ndarray],
            boxes: np.ndarray, category_ids: list[int], passes: int,
            crops: list[dict] | None = None
            ) -> tuple[predictor_lib.Prediction, np.ndarray]:
  """Decodes N boxes, then cuts each again from its pose ``passes`` times.

  Args:
    batcher: crops and decodes (`batchers.CropBatcher` or its canvas form).
    images: N uint8 [H, W, 3] images, the image of each box (one array may
      repeat for boxes of one image).
    boxes: float [N, 4] (x, y, w, h) pixels.
    category_ids: N category ids.
    passes: re-cuts after the first decode (0: the boxes as given).
    crops: the boxes' crops (``batcher.crop``), when already cut.

  Returns:
    (the last pass's `Prediction`, N rows; float64 [N, 4] the boxes it
    decoded). A box whose pose gives no box (`pose_box`) keeps its last
    box.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  crop = lambda bs: [batcher.crop(im, b, c)
                     for im, b, c in zip(images, bs, category_ids)]
  pred = batchers.predict_all(batcher,
                              crop(boxes) if crops is None else crops)
  for _ in range(passes):
    new = [pose_box(kp, a, im.shape[1], im.shape[0]) for kp, a, im in
           zip(pred.keypoints_px, pred.absent, images)]
    if all(b is None for b in new):
      break
    boxes = np.stack([old if b is None else b for b, old in zip(new, boxes)])
    pred = batchers.predict_all(batcher, crop(boxes))
  return pred, boxes

