"""Detection evaluation: box AP by pycocotools ``COCOeval(iouType='bbox')``.

`box_ap` builds in-memory COCO ground truth and results and returns
pycocotools' own summary (AP averaged over IoU 0.50:0.05:0.95, AP50,
AP75, AR with up to 100 detections; COCO detection evaluation,
cocodataset.org/#detection-eval). `BoxAPEvaluator` (`common.py`) runs a
`box_predictor.BoxPredictor` over a split's whole images
(`kpseq_jax/data/detection.py`) and yields, for the report
``<split>_boxes``:

  ``eval_<split>_boxes.json``: the `BoxReport` (TensorBoard
    ``eval_<split>_boxes/ap``, ``ap50``, ``ap75``, ``ar100``);
  ``detections_<split>.json``: COCO detection results in image pixels
    (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``),
    the top ``detector.max_detections`` per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
import tqdm

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.evaluation import common
from kpseq_jax.inference import box_predictor as box_predictor_lib
from kpseq_jax.models import box_ops
from kpseq_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class BoxReport:
  """Box AP of one evaluation.

  Attributes:
    split: the evaluated split.
    step: the state's train step (None if unknown).
    num_images: images evaluated.
    num_instances: ground-truth boxes.
    ap: COCO AP, IoU 0.50:0.05:0.95 (pycocotools ``stats[0]``); -1 when
      there is no ground truth.
    ap50: AP at IoU 0.5 (``stats[1]``).
    ap75: AP at IoU 0.75 (``stats[2]``).
    ar100: recall with up to 100 detections per image (``stats[8]``).
    num_images_without_detection: images whose best score is below
      ``detector.score_threshold`` (their result is empty where boxes are
      used).
    score_threshold: that threshold.
  """
  split: str
  step: int | None
  num_images: int
  num_instances: int
  ap: float
  ap50: float
  ap75: float
  ar100: float
  num_images_without_detection: int
  score_threshold: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def box_ap(images: Sequence[dict], ground_truth: Sequence[dict],
           results: Sequence[dict], category_ids: Sequence[int]
           ) -> dict[str, float]:
  """pycocotools' box AP of ``results`` against ``ground_truth``.

  Args:
    images: COCO ``images`` entries (``id``, ``width``, ``height``).
    ground_truth: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h]
      pixels (``id``, ``area`` = w h and ``iscrowd`` = 0 are added).
    results: COCO detection results (``image_id``, ``category_id``,
      ``bbox`` [x, y, w, h] pixels, ``score``).
    category_ids: every category id of the data set.

  Returns:
    ap, ap50, ap75, ar100 (pycocotools ``COCOeval.stats`` 0, 1, 2, 8); 0
    for all when there are no results; -1 (pycocotools' "undefined") when
    there is no ground truth.
  """
  if not results:
    undefined = -1.0 if not ground_truth else 0.0
    return dict(ap=undefined, ap50=undefined, ap75=undefined,
                ar100=undefined)
  gt = coco_lib.COCO()
  gt.dataset = {
      'images': [dict(im) for im in images],
      'annotations': [dict(g, id=i + 1, area=float(g['bbox'][2] *
                                                   g['bbox'][3]), iscrowd=0)
                      for i, g in enumerate(ground_truth)],
      'categories': [{'id': int(c)} for c in category_ids]}
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints.
    gt.createIndex()
    dt = gt.loadRes([dict(r) for r in results])
    ev = cocoeval.COCOeval(gt, dt, iouType='bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  s = ev.stats
  return dict(ap=float(s[0]), ap50=float(s[1]), ap75=float(s[2]),
              ar100=float(s[8]))


class BoxAPEvaluator:
  """Box AP of the detector's states on one split (module docstring).

  Args:
    config: the run's config (the detection eval batches).
    info: the data set's `DatasetInfo`.
    split: the split to evaluate.
    score_threshold: an image whose best score is below it counts as
      ``num_images_without_detection``.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo, split: str, score_threshold: float):
    self.config, self.info, self.split = config, info, split
    self.score_threshold = score_threshold
    self.report = f'{split}_boxes'
    self._category_ids = sorted(info.categories)

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    """Detects on every image of the split; yields the `BoxReport` fields
    and ``detections_<split>.json``."""
    images, truth, results, without = self._detect(inputs)
    stats = box_ap(images, truth, results, self._category_ids)
    report = BoxReport(split=self.split, step=inputs.step,
                       num_images=len(images), num_instances=len(truth),
                       num_images_without_detection=without,
                       score_threshold=self.score_threshold, **stats)
    logging.info('Eval %s boxes (step %s, %d images, %d boxes): AP %.4f, '
                 'AP50 %.4f, AP75 %.4f, AR@100 %.4f; %d images without a '
                 'detection >= %.2f', self.split, inputs.step,
                 report.num_images, report.num_instances, report.ap,
                 report.ap50, report.ap75, report.ar100, without,
                 self.score_threshold)
    yield from report.to_dict().items()
    yield f'detections_{self.split}.json', common.File(
        lambda path: common.write_json(path, results, indent=1))

  def _detect(self, inputs: common.Inputs
              ) -> tuple[list[dict], list[dict], list[dict], int]:
    """(COCO images, ground-truth boxes, detections, images without a
    detection above the threshold), image pixels."""
    predictor = inputs.predictor
    images, truth, results = [], [], []
    without = 0
    bar = tqdm.tqdm(desc=f'eval {self.split} boxes', unit='image',
                    disable=jax.process_index() != 0)
    for local in detection.create_eval_batches(self.config, self.info,
                                               self.split):
      det = predictor.predict(local, inputs.variables)
      batch = sharding.gather(sharding.global_batch(
          {k: local[k] for k in ('valid', 'image_id', 'image_size', 'boxes',
                                 'labels', 'box_valid',
                                 'canvas_from_image')}, predictor.mesh))
      gt_px = box_predictor_lib.canvas_to_image(
          np.asarray(box_ops.cxcywh_to_xyxy(batch['boxes'])),
          predictor.canvas_hw,
          batch['canvas_from_image'], batch['image_size'])
      for i in np.flatnonzero(batch['valid'] > 0):
        image_id = int(batch['image_id'][i])
        w, h = batch['image_size'][i]
        images.append({'id': image_id, 'width': float(w), 'height': float(h)})
        valid = batch['box_valid'][i]
        truth += [{'image_id': image_id, 'bbox': _xywh(b),
                   'category_id': self._category_ids[int(c)]}
                  for b, c in zip(gt_px[i][valid], batch['labels'][i][valid])]
        results += [{'image_id': image_id,
                     'category_id': self._category_ids[int(c)],
                     'bbox': _xywh(b), 'score': float(s)}
                    for b, c, s in zip(det.boxes_px[i], det.labels[i],
                                       det.scores[i])]
        without += int(det.scores[i].max(initial=0.0) < self.score_threshold)
        bar.update(1)
    bar.close()
    return images, truth, results, without


def _xywh(xyxy: np.ndarray) -> list[float]:
  x0, y0, x1, y1 = (float(v) for v in xyxy)
  return [x0, y0, x1 - x0, y1 - y0]
