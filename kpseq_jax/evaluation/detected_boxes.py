"""Keypoints from detected boxes next to keypoints from ground-truth boxes.

PRTR's two-stage variant (issue 18): the keypoint stage crops the boxes a
detector found (`box_predictor.ImageDetector`) instead of the annotated
ones. `DetectedBoxesEvaluator` measures what that costs on a split: every
image is detected once; detections are matched one-to-one to the ground
truth instances by IoU (pycocotools ``maskUtils.iou`` and
`scipy.optimize.linear_sum_assignment`, pairs with IoU >= ``iou_threshold``);
each ground-truth instance is then decoded twice by the same compiled
keypoint decoder (`batchers.CropBatcher`): from its own box and from its
matched detection. Both are scored by MP-100's PCK (normaliser: the
ground-truth box, `metrics.PCKAccumulator`) and mean pixel error; an
instance no detection matched counts as wrong at every keypoint (PCK 0)
and has no pixel error. Multi-instance OKS AP (pycocotools, `oks.py`) is
computed from every detection's pose (not only the matched ones; score:
box score x mean keypoint confidence, mmpose's ``bbox_keypoint``) against
every labelled instance, next to the same from the ground-truth boxes.
With ``config.decode.pose_box_passes`` the detections' poses are decoded
from boxes cut again from their first pose (`pose_boxes`); matching uses
the detector's boxes.

It yields (`common.py`) the `DetectedBoxesReport` of the report
``<split>_detected_boxes``: ``eval_<split>_detected_boxes.json``
(``--mode eval`` with ``--detector_config`` and ``--detector_workdir``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils
from scipy import optimize
import tqdm

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.data import transforms
from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import oks
from kpseq_jax.inference import batchers
from kpseq_jax.inference import pose_boxes
from kpseq_jax.inference import results


@dataclasses.dataclass(frozen=True)
class DetectedBoxesReport:
  """Keypoints from detected boxes against ground-truth boxes, one split.

  Attributes:
    split: the evaluated split.
    num_images / num_instances: images and ground-truth instances.
    num_detections: detections at or above the score threshold.
    num_matched: instances matched to a detection (IoU >= iou_threshold);
      num_missed = num_instances - num_matched.
    num_unmatched_detections: detections matched to no instance.
    iou_threshold, score_threshold: the matching and detection thresholds.
    pck_gt_boxes / mean_error_px_gt_boxes: PCK@``pck_alpha`` (MP-100) and
      mean error in pixels, keypoints decoded from the ground-truth boxes.
    pck_detected_boxes / mean_error_px_detected_boxes: the same from the
      matched detections (missed instances: PCK 0, no error).
    seconds_per_image_detection / seconds_per_image_keypoints: wall time
      per image of the detector and of the keypoint stage on the detected
      boxes (after the first image, which compiles).
    median_error_px_gt_boxes / median_error_px_detected_boxes: median over
      instances of each instance's mean error (pixels; matched instances
      with a labelled keypoint), robust to the one frame that fails.
    oks_gt_boxes / oks_detected_boxes: pycocotools' OKS AP/AR summary
      (`oks.OKSResult.to_dict`) of the poses from the ground-truth boxes
      and from every detection (the figure a user without labelled boxes
      gets).
    instances: per ground-truth instance, in evaluation order:
      ``image_id``, ``annotation_id``, ``iou`` of its matched detection
      (None when missed), ``width_ratio`` / ``height_ratio`` (detected /
      annotated box), ``error_px_gt_box`` / ``error_px_detected_box``
      (mean over its labelled keypoints; None when missed or unlabelled):
      where the detector's boxes cost keypoint accuracy.
  """
  split: str
  num_images: int
  num_instances: int
  num_detections: int
  num_matched: int
  num_missed: int
  num_unmatched_detections: int
  iou_threshold: float
  score_threshold: float
  pck_alpha: float
  pck_gt_boxes: float
  mean_error_px_gt_boxes: float
  pck_detected_boxes: float
  mean_error_px_detected_boxes: float
  seconds_per_image_detection: float
  seconds_per_image_keypoints: float
  median_error_px_gt_boxes: float | None = None
  median_error_px_detected_boxes: float | None = None
  oks_gt_boxes: dict | None = None
  oks_detected_boxes: dict | None = None
  instances: list[dict] = dataclasses.field(default_factory=list)


def match_by_iou(detected_xywh: np.ndarray, truth_xywh: np.ndarray,
                 iou_threshold: float) -> dict[int, tuple[int, float]]:
  """One-to-one matching of detections to ground-truth boxes by IoU.

  Args:
    detected_xywh: float [D, 4] (x, y, w, h) pixels.
    truth_xywh: float [G, 4] (x, y, w, h) pixels.
    iou_threshold: pairs below it are not matched.

  Returns:
    ground-truth index -> (detection index, their IoU), maximising the
    summed IoU (`scipy.optimize.linear_sum_assignment`); IoU as
    `pycocotools.mask.iou` computes it.
  """
  if not len(detected_xywh) or not len(truth_xywh):
    return {}
  iou = np.asarray(mask_utils.iou(
      np.asarray(detected_xywh, np.float64).tolist(),
      np.asarray(truth_xywh, np.float64).tolist(),
      [0] * len(truth_xywh)))  # [D, G]
  rows, cols = optimize.linear_sum_assignment(-iou)
  return {int(g): (int(d), float(iou[d, g])) for d, g in zip(rows, cols)
          if iou[d, g] >= iou_threshold}


class DetectedBoxesEvaluator:
  """Keypoint figures from detected and from ground-truth boxes (module
  docstring) of the state `common.Inputs` holds (its keypoint predictor).

  Args:
    config: the keypoint run's config.
    info: the data set's `DatasetInfo`.
    split: the split; its first ``config.evals.num_examples`` images when
      that is > 0.
    detector: the detection stage (``detect(image)`` and ``threshold`` of
      `box_predictor.ImageDetector`).
    iou_threshold: detection-to-instance matching threshold.
    pck_alpha: the PCK threshold (MP-100: 0.2).

  Raises:
    ValueError: no detector.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo, split: str, detector,
               iou_threshold: float = 0.5, pck_alpha: float = 0.2):
    if detector is None:
      raise ValueError('The detected_boxes evaluator needs a detector '
                       '(--detector_config and --detector_workdir).')
    self.config, self.info, self.split = config, info, split
    self.detector = detector
    self.iou_threshold, self.pck_alpha = iou_threshold, pck_alpha
    self.report = f'{split}_detected_boxes'

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    """Yields the `DetectedBoxesReport` fields.

    Raises:
      NotImplementedError: on more than one process.
    """
    if jax.process_count() > 1:
      raise NotImplementedError('Evaluation from detected boxes runs on one '
                                'process.')
    batcher = batchers.make_batcher(
        self.config, inputs.predictor, self.info.category_index(),
        detector=self.detector)
    source = dataset.data_source(self.config.input.dataset_dir, self.split)
    groups = detection.image_groups(source)
    meta = dataset.records_without_images(source)
    if self.config.evals.num_examples > 0:
      groups = groups[:self.config.evals.num_examples]
    acc = {'gt': metrics.PCKAccumulator(alpha=self.pck_alpha),
           'detected': metrics.PCKAccumulator(alpha=self.pck_alpha)}
    images = []
    for group in tqdm.tqdm(groups, desc=f'eval {self.split} detected boxes',
                           unit='image'):
      records = [source[group[0]]] + [meta[j] for j in group[1:]]
      images.append(self._image(batcher, records))
      for key in ('gt', 'detected'):
        acc[key].update(images[-1]['category_ids'], images[-1][key],
                        images[-1]['keypoints'], images[-1]['truth'])
    report = self._report(images, acc['gt'].result(),
                          acc['detected'].result())
    _log(report)
    yield from dataclasses.asdict(report).items()
    yield 'table', common.Markdown(markdown(report))

  def _image(self, batcher: batchers.CropBatcher, records: list[dict]
             ) -> dict[str, Any]:
    """One image: its instances' keypoints [G, Kmax, 2] pixels decoded from
    their boxes (``gt``) and from their matched detections (``detected``,
    NaN when missed), ``keypoints`` [G, Kmax, 3], ``truth`` boxes [G, 4],
    ``category_ids`` [G], ``instances`` (per-instance rows), counts and
    wall times."""
    image = transforms.DecodeImage().map(dict(records[0]))['image']
    truth = np.stack([np.asarray(r['bbox'], np.float64) for r in records])
    cids = np.asarray([int(r['category_id']) for r in records])
    t0 = time.perf_counter()
    found = self.detector.detect(image)
    t1 = time.perf_counter()
    match = match_by_iou(np.asarray([b for _, b, _ in found]).reshape(-1, 4),
                         truth, self.iou_threshold)
    gt, _ = pose_boxes.predict(batcher, [image] * len(truth), truth,
                               list(cids), 0)  # The labelled boxes as given.
    gt_px, gt_conf = gt.keypoints_px, gt.confidence
    t2 = time.perf_counter()
    det_px = np.full_like(gt_px, np.nan)
    poses = []  # Every detection's pose, for OKS AP.
    if found:  # Cut again from the pose (`pose_boxes`) when configured.
      pred, _ = pose_boxes.predict(
          batcher, [image] * len(found),
          np.asarray([b for _, b, _ in found]), [c for c, _, _ in found],
          batcher.pose_box_passes)
      all_px, all_conf = pred.keypoints_px, pred.confidence
      for g, (d, _) in match.items():
        det_px[g] = all_px[d]
      poses = [(c, all_px[d], s, all_conf[d])
               for d, (c, _, s) in enumerate(found)]
    t3 = time.perf_counter()
    kps = np.stack([_pad(np.asarray(r['keypoints'], np.float32),
                         gt_px.shape[1]) for r in records])
    image_id = int(records[0]['image_id'])
    k_of = lambda c: self.info.categories[int(c)].num_keypoints
    ground_truth = [oks.GroundTruth(image_id, int(c), kp[:k_of(c)], box)
                    for c, kp, box in zip(cids, kps, truth)]
    from_gt = [oks.Prediction(image_id, int(c), px[:k_of(c)],
                              results.bbox_keypoint_score(1.0, cf[:k_of(c)]))
               for c, px, cf in zip(cids, gt_px, gt_conf)]
    from_det = [oks.Prediction(image_id, int(c), px[:k_of(c)],
                               results.bbox_keypoint_score(s, cf[:k_of(c)]))
                for c, px, s, cf in poses]
    instances = []
    for g, r in enumerate(records):
      d, iou = match.get(g, (None, None))
      box = None if d is None else np.asarray(found[d][1], np.float64)
      instances.append(dict(
          image_id=int(r['image_id']), annotation_id=int(r['annotation_id']),
          iou=iou,
          width_ratio=None if d is None else float(box[2] / truth[g][2]),
          height_ratio=None if d is None else float(box[3] / truth[g][3]),
          error_px_gt_box=_instance_error(gt_px[g], kps[g]),
          error_px_detected_box=_instance_error(det_px[g], kps[g])))
    return dict(gt=gt_px, detected=det_px, keypoints=kps, truth=truth,
                category_ids=cids, instances=instances,
                ground_truth=ground_truth, from_gt=from_gt,
                from_detected=from_det,
                detections=len(found), matched=len(match),
                seconds_detection=t1 - t0, seconds_keypoints=t3 - t2)

  def _report(self, images: list[dict], gt: metrics.PCKResult,
              det: metrics.PCKResult) -> 'DetectedBoxesReport':
    """The report of every image's `_image`."""
    instances = [i for im in images for i in im['instances']]
    detections = sum(im['detections'] for im in images)
    matched = sum(im['matched'] for im in images)
    after_first = lambda v: float(np.mean(v[1:] if len(v) > 1 else v))
    seconds = lambda key: after_first([im[key] for im in images])
    return DetectedBoxesReport(
        split=self.split, num_images=len(images),
        num_instances=len(instances), num_detections=detections,
        num_matched=matched, num_missed=len(instances) - matched,
        num_unmatched_detections=detections - matched,
        iou_threshold=self.iou_threshold,
        score_threshold=self.detector.threshold, pck_alpha=self.pck_alpha,
        pck_gt_boxes=gt.pck, mean_error_px_gt_boxes=gt.mean_error_px,
        pck_detected_boxes=det.pck,
        mean_error_px_detected_boxes=det.mean_error_px,
        seconds_per_image_detection=seconds('seconds_detection'),
        seconds_per_image_keypoints=seconds('seconds_keypoints'),
        median_error_px_gt_boxes=_median(instances, 'error_px_gt_box'),
        median_error_px_detected_boxes=_median(instances,
                                               'error_px_detected_box'),
        oks_gt_boxes=self._oks(images, 'from_gt'),
        oks_detected_boxes=self._oks(images, 'from_detected'),
        instances=instances)

  def _oks(self, images: list[dict], key: str) -> dict:
    """pycocotools' OKS summary of every image's ``key`` predictions."""
    sigmas = {c.id: c.oks_sigmas for c in self.info.categories.values()
              if c.oks_sigmas}
    return oks.evaluate_oks(
        [g for im in images for g in im['ground_truth']],
        [p for im in images for p in im[key]], self.info.categories, sigmas,
        self.config.evals.oks_default_sigma or None).to_dict()


def markdown(report: 'DetectedBoxesReport') -> str:
  """``eval_<split>_detected_boxes.md``: the figures from detected boxes
  next to those from the ground-truth boxes."""
  r, f = report, lambda v: 'n/a' if v is None else f'{v:.4f}'
  o_gt, o_det = r.oks_gt_boxes or {}, r.oks_detected_boxes or {}
  return '\n'.join([
      f'## Keypoints from detected boxes ({r.split})', '',
      f'{r.num_matched} of {r.num_instances} instances matched by a '
      f'detection (IoU >= {r.iou_threshold:g}), {r.num_detections} '
      f'detections (score >= {r.score_threshold:g}) on {r.num_images} '
      'images.', '',
      '| boxes | OKS AP | AP50 | AP75 | AR | PCK@' f'{r.pck_alpha:g} '
      '| mean error (px) |', '|---|---:|---:|---:|---:|---:|---:|',
      f'| detected | {f(o_det.get("ap"))} | {f(o_det.get("ap50"))} | '
      f'{f(o_det.get("ap75"))} | {f(o_det.get("ar"))} | '
      f'{f(r.pck_detected_boxes)} | {f(r.mean_error_px_detected_boxes)} |',
      f'| ground truth | {f(o_gt.get("ap"))} | {f(o_gt.get("ap50"))} | '
      f'{f(o_gt.get("ap75"))} | {f(o_gt.get("ar"))} | '
      f'{f(r.pck_gt_boxes)} | {f(r.mean_error_px_gt_boxes)} |'])


def _log(report: 'DetectedBoxesReport') -> None:
  logging.info(
      'Eval %s from detected boxes: %d/%d instances matched (IoU >= %.2f), '
      '%d unmatched detections; PCK@%.2f %.4f vs %.4f from ground-truth '
      'boxes; mean error %.2f vs %.2f px (median per instance %s vs %s); '
      '%.3f s detection + %.3f s keypoints per image', report.split,
      report.num_matched, report.num_instances, report.iou_threshold,
      report.num_unmatched_detections, report.pck_alpha,
      report.pck_detected_boxes, report.pck_gt_boxes,
      report.mean_error_px_detected_boxes, report.mean_error_px_gt_boxes,
      _px(report.median_error_px_detected_boxes),
      _px(report.median_error_px_gt_boxes),
      report.seconds_per_image_detection, report.seconds_per_image_keypoints)


def _instance_error(px: np.ndarray, keypoints: np.ndarray) -> float | None:
  """Mean Euclidean error (pixels) of one instance's decoded keypoints
  [Kmax, 2] over its labelled ones (``keypoints`` [Kmax, 3], v > 0); None
  when none is labelled or decoded (a missed instance is all NaN)."""
  labelled = keypoints[:, 2] > 0
  err = np.linalg.norm(px[:, :2] - keypoints[:, :2], axis=-1)[labelled]
  err = err[np.isfinite(err)]
  return float(err.mean()) if len(err) else None


def _px(value: float | None) -> str:
  return 'none' if value is None else f'{value:.2f} px'


def _median(instances: list[dict], key: str) -> float | None:
  values = [i[key] for i in instances if i[key] is not None]
  return float(np.median(values)) if values else None


def _pad(keypoints: np.ndarray, kmax: int) -> np.ndarray:
  """[K, 3] -> [Kmax, 3] with v = 0 rows."""
  out = np.zeros([kmax, 3], np.float32)
  out[:len(keypoints)] = keypoints
  return out
