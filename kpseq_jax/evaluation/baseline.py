"""The mean-pose floor that every reported PCK is compared with.

A "model" that ignores the image: each keypoint of a category at its mean
position in the training crops. Computed once per run (`mean_pose`) and
mapped into each evaluated crop like a prediction.
"""

import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import transforms


def mean_pose(config: ml_collections.ConfigDict) -> dict[int, np.ndarray]:
  """Mean normalised keypoint positions per category in the training crops.

  Each training instance is cropped deterministically (the evaluation crop:
  ``bbox_scale``, no augmentation) and its labelled keypoints averaged per
  (category, keypoint). Reads every training record once (images are not
  decoded).

  Args:
    config: ``dataset_dir``, ``train_split``, ``bbox_scale``.

  Returns:
    category id -> float32 [K, 2], normalised [0, 1] crop coordinates (the
    crop centre 0.5 where a keypoint is never labelled).
  """
  source = dataset.records_without_images(
      dataset.data_source(config.input.dataset_dir, config.input.train_split))
  sums: dict[int, np.ndarray] = {}
  counts: dict[int, np.ndarray] = {}
  for i in range(len(source)):
    r = source[i]
    cid = int(r['category_id'])
    kps = np.asarray(r['keypoints'], np.float64)
    m = transforms.crop_matrix(r['bbox'], 1, config.input.bbox_scale)
    xy = transforms.apply_affine(m, kps[:, :2])
    lab = (kps[:, 2] > 0)[:, None]
    sums[cid] = sums.get(cid, 0) + np.where(lab, xy, 0)
    counts[cid] = counts.get(cid, 0) + lab
  return {c: np.where(counts[c] > 0, sums[c] / np.maximum(counts[c], 1),
                      0.5).astype(np.float32) for c in sums}


def padded(mean_xy: np.ndarray | None, max_num_keypoints: int) -> np.ndarray:
  """float [K, 2] -> float32 [Kmax, 2] with NaN rows after K (all NaN when
  ``mean_xy`` is None: a category never seen in training)."""
  out = np.full([max_num_keypoints, 2], np.nan, np.float32)
  if mean_xy is not None:
    out[:len(mean_xy)] = mean_xy
  return out
