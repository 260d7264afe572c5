"""The predictions themselves: COCO results, CAPE episodes, drawn crops.

`PredictionsEvaluator` yields, for the report ``<name>``:
  ``predictions_<name>.json``: COCO keypoint results
    (`kpseq_jax.inference.results`) in image pixels, one per sample, in the
    category's keypoint order, with per-keypoint confidence (and presence);
  ``episodes_<name>.jsonl`` (CAPE): the episodes evaluated, one line
    ``[support annotation ids..., query annotation id]`` per query sample;
  TensorBoard ``eval_<name>/truth_vs_prediction/<i>``: a few crops of the
    first batch with ground truth | prediction drawn.
"""

import json
from typing import Any, Iterator

import numpy as np
from PIL import Image

from data_prep import episodes as episodes_lib
from kpseq_jax.data import dataset
from kpseq_jax.data import transforms
from kpseq_jax.data import visualize
from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import protocols
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import results as results_lib

# Eval crops drawn to TensorBoard (ground truth | prediction), from batch 1.
NUM_OVERLAYS = 4
OVERLAY_SIZE_PX = 192


class PredictionsEvaluator:
  """Writes what was predicted (module docstring); yields no figure.

  Args:
    protocol: what is evaluated (`protocols.Instances` / `Episodes`).
    info: the data set's categories.
    name: the report (file names, TensorBoard tags).
    image_size_px: S, the crop side of ``crop_from_image``.
  """

  def __init__(self, protocol, info: dataset.DatasetInfo, name: str,
               image_size_px: int):
    self.protocol, self.info, self.report = protocol, info, name
    self.image_size_px = image_size_px

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    d = inputs.decoded(self.protocol)
    calibrated = None  # With a map: the likelihood written (`results`).
    if inputs.calibration is not None and d.num_samples:
      far = (None if inputs.box_range is None else
             inputs.box_range.out_of_range(d.batch['bbox']))  # [N]
      calibrated = likelihood.calibrate(
          inputs.calibration,
          likelihood.raw_likelihood(d.confidence, d.presence), far)
    results = [] if not d.num_samples else _coco_results(
        d.pred_px, d.batch, self.info, d.confidence, d.presence, calibrated)

    def write(path):
      with open(path, 'w') as f:
        json.dump(results, f)
    yield f'predictions_{self.report}.json', common.File(write)
    if isinstance(self.protocol, protocols.Episodes):
      yield f'episodes_{self.report}.jsonl', common.File(
          lambda path: episodes_lib.write_jsonl_atomically(
              self.protocol.samples, path))
    if d.first:
      yield f'eval_{self.report}/truth_vs_prediction', common.Images(
          _overlays(d.first['local'], d.first['keypoints'], self.info,
                    d.first['absent'], self.image_size_px))


def _coco_results(pred_px: np.ndarray, batch: dict,
                  info: dataset.DatasetInfo, confidence: np.ndarray,
                  presence: np.ndarray | None,
                  calibrated: np.ndarray | None = None) -> list[dict]:
  """COCO results of a batch in each category's keypoint order.

  Args:
    pred_px: float [N, Kmax, 2] image pixels, in the batch's keypoint order.
    batch: the evaluated samples (``category_id``, ``image_id``, and for
      episodes ``keypoint_order``, ``num_keypoints``).
    info: the category table.
    confidence: float [N, Kmax] per-keypoint confidence.
    presence: float [N, Kmax] or None.
    calibrated: float [N, Kmax] calibrated likelihood or None
      (`results.coco_results`' ``likelihood``).

  An episode's groups are in its ``keypoint_order`` (a permuted or
  subsampled episode asks for the category's keypoints in another order);
  they are put back at their category index, keypoints not asked for are
  (0, 0, 0).
  """
  ks = np.array([info.categories[int(c)].num_keypoints
                 for c in batch['category_id']])
  if 'keypoint_order' in batch:
    def reorder(a):
      if a is None:
        return None
      out = np.full((len(a), max(ks, default=0)) + a.shape[2:], np.nan)
      for i, order in enumerate(batch['keypoint_order']):
        n = int(batch['num_keypoints'][i])
        out[i, order[:n]] = a[i, :n]
      return out
    pred_px, confidence, presence, calibrated = (
        reorder(pred_px), reorder(confidence), reorder(presence),
        reorder(calibrated))
  return results_lib.coco_results(pred_px, ks, batch['image_id'],
                                  batch['category_id'],
                                  keypoint_scores=confidence,
                                  presence=presence, likelihood=calibrated)


def _overlays(local: dict, keypoints_norm: np.ndarray,
              info: dataset.DatasetInfo,
              absent: np.ndarray, image_size_px: int
              ) -> dict[str, np.ndarray]:
  """Up to NUM_OVERLAYS crops, index -> uint8 [S', 2 S', 3]: truth |
  prediction.

  Args:
    local: this process's batch (crop ``image`` etc.; or whole-image
      canvases and ``memory_from_crop``, whose crops are warped out).
    keypoints_norm: float [B, Kmax, 2] predictions of the global batch;
      process 0's local rows are its first rows (only process 0 writes).
    info: category table.
    absent: bool [B, Kmax] predicted not visible (drawn hollow).
    image_size_px: S, the crop side of ``crop_from_image``.
  """
  out = {}
  size = OVERLAY_SIZE_PX
  for i in range(min(NUM_OVERLAYS, len(local['image']))):
    if local['valid'][i] <= 0:
      continue
    k = int(local['num_keypoints'][i])
    cat = info.categories.get(int(local['category_id'][i]))
    if 'keypoint_order' in local:  # An episode's order: no names, skeleton.
      cat = None
    if 'memory_from_crop' in local:  # A canvas: warp the crop out of it.
      h, w = local['image'].shape[1:3]
      m = np.concatenate([local['memory_from_crop'][i].astype(np.float64),
                          [[0.0, 0.0, 1.0]]])
      # Overlay pixels -> canvas pixels, as Pillow's AFFINE wants them.
      a = (np.diag([w, h, 1.0]) @ m @ np.diag([1 / size, 1 / size, 1.0]))[:2]
      crop = Image.fromarray(local['image'][i]).transform(
          (size, size), Image.Transform.AFFINE, data=tuple(a.reshape(-1)),
          resample=Image.Resampling.BILINEAR)
    else:
      crop = Image.fromarray(local['image'][i]).resize(
          (size, size), Image.Resampling.BILINEAR)
    scale = size / image_size_px
    gt = local['keypoints'][i, :k]
    gt_xy = transforms.apply_affine(local['crop_from_image'][i], gt[:, :2])
    truth = np.concatenate([gt_xy * scale, gt[:, 2:]], axis=1)
    xy = keypoints_norm[i, :k] * size
    pred = np.concatenate([xy, np.isfinite(xy[:, :1]).astype(float)], axis=1)
    out[str(i)] = np.concatenate(
        [np.asarray(visualize.draw_pose(crop, truth, cat)),
         np.asarray(visualize.draw_pose(crop, pred, cat,
                                        absent=absent[i, :k]))], axis=1)
  return out
