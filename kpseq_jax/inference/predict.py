"""Keypoints on new images with a trained workdir (``--mode predict``).

  python -m kpseq_jax.main --mode predict --config configs/dlc_openfield.py \
      --workdir DIR --images IMAGES [--boxes BOXES.json] [--category ID] \
      --out OUT

``IMAGES``: an image file or a folder (searched recursively). Boxes
(`image_inputs.plan_boxes`): none = each whole image, of ``--category``
(default: the data set's only one); ``--boxes`` = a COCO detections list
or annotations file (`image_inputs.read_boxes`); ``--detector_config`` and
``--detector_workdir`` = a trained detector's boxes above its threshold
(PRTR's two-stage variant). Boxes are decoded by `batchers` and written by
`predict_outputs` to ``OUT``: ``predictions.json`` (COCO keypoint results,
pixels; with the workdir's ``calibration.json`` each keypoint's score is its
calibrated likelihood, `likelihood`; ``box_out_of_range`` per result),
``images.json``, ``captions.txt``, ``overlays/<file>.png`` and
``predict_report.json`` (`Summary`). Unreadable images are reported and
skipped; the rest are processed. Boxes far outside the training boxes'
scale (`box_range`; e.g. a whole frame when the animal was trained on
tight boxes) are counted, warned about once, and get calibrated likelihood
0 (`likelihood.calibrate`).

Pipeline: `image_inputs.plan_boxes` -> `predictor.restore_variables` ->
`_decode_images` (read, box, queue in the batcher, write when an image's
boxes are decoded) -> `predict_outputs.PredictionWriter.write`.
"""

import dataclasses

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from data_prep import images as image_io
from kpseq_jax.data import dataset
from kpseq_jax.inference import batchers
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import box_range
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import predict_outputs


@dataclasses.dataclass
class Summary:
  """What `predict` did (also written to ``predict_report.json``)."""

  out_dir: str
  checkpoint_step: int
  num_images: int = 0  # Images read and drawn.
  num_boxes: int = 0  # Predictions written.
  unreadable: list[dict] = dataclasses.field(default_factory=list)
  boxes_without_image: list[str] = dataclasses.field(default_factory=list)
  skipped_boxes: list[dict] = dataclasses.field(default_factory=list)
  # With a detector: images on which nothing scored above the threshold
  # (read, no prediction, no overlay).
  images_without_detection: list[str] = dataclasses.field(
      default_factory=list)
  # Predictions whose box is out of the training boxes' range, and that
  # range (`box_range.BoxRange.to_json`; None: not checked).
  boxes_out_of_range: int = 0
  box_range: dict | None = None


def predict(config: ml_collections.ConfigDict, workdir: str, images: str,
            out_dir: str, boxes_file: str | None = None,
            category_id: int | None = None,
            detector: box_predictor.ImageDetector | None = None) -> Summary:
  """Predicts keypoints for every box of every image; see module docstring.

  With ``detector`` (and no ``boxes_file``) the boxes of each image are
  the detector's above its score threshold (PRTR's two-stage variant); an
  image with none is counted in ``images_without_detection``.

  Raises:
    FileNotFoundError: no checkpoint, data set, or images.
    ValueError: bad --boxes file or category choice; a boxes file none of
      whose boxes is under --images.
    NotImplementedError: on more than one process.
  """
  if jax.process_count() > 1:
    raise NotImplementedError('--mode predict runs on one process; start it '
                              'on a single host.')
  detector = None if boxes_file else detector
  info = dataset.load_info(config.input.dataset_dir)
  root, rels = image_inputs.list_images(images)
  plan = image_inputs.plan_boxes(root, rels, info, boxes_file, category_id,
                                 detected=detector is not None)
  if boxes_file:
    logging.info('%d boxes on %d of %d images under %s; %d boxes skipped.',
                 sum(len(e.boxes) for e in plan.entries), len(plan.entries),
                 len(rels), images, len(plan.skipped_boxes))
  batcher, step = batchers.restore_batcher(
      config, workdir, info.category_index(), detector=detector)
  summary = Summary(out_dir=out_dir, checkpoint_step=int(step),
                    boxes_without_image=plan.boxes_without_image,
                    skipped_boxes=plan.skipped_boxes)
  writer = predict_outputs.PredictionWriter(
      out_dir, info, batcher.calibration, batcher.box_range)
  _decode_images(plan.entries, batcher, writer, summary,
                 _BoxSource(detector, info, category_id))
  summary.num_boxes = len(writer.results)
  summary.boxes_out_of_range = writer.num_out_of_range
  if batcher.box_range is not None:
    summary.box_range = batcher.box_range.to_json()
  writer.write(summary)
  _log_summary(summary)
  if batcher.box_range is not None:
    if warning := box_range.warning(
        batcher.box_range, summary.boxes_out_of_range, summary.num_boxes,
        '--mode predict', batcher.calibration is not None,
        whole_frame=not boxes_file and detector is None):
      logging.warning('%s', warning)
  return summary



@dataclasses.dataclass
class _BoxSource:
  """The boxes of an image read: the planned ones, or the detector's that
  the keypoint model can take (the others go to ``skipped_boxes``)."""

  detector: box_predictor.ImageDetector | None
  info: dataset.DatasetInfo
  category_id: int | None

  def boxes(self, entry: image_inputs.ImageEntry, image: np.ndarray,
            summary: Summary) -> list[image_inputs.Box]:
    if self.detector is None:
      return entry.boxes
    keep = []
    for cid, bbox, score in self.detector.detect(image):
      why = image_inputs.skip_reason(cid, self.info, self.category_id)
      if why:
        summary.skipped_boxes.append(dict(file=entry.rel_path,
                                          bbox=list(bbox), reason=why))
      else:
        keep.append(image_inputs.Box(cid, bbox, score))
    if not keep:
      summary.images_without_detection.append(entry.rel_path)
    return keep


class _OpenImages:
  """Images whose boxes are queued in the batcher; an image is written
  (`predict_outputs.PredictionWriter.add_poses`) when its last box is
  decoded."""

  def __init__(self, writer: predict_outputs.PredictionWriter,
               summary: Summary, bar: tqdm.tqdm):
    self.writer, self.summary, self.bar = writer, summary, bar
    self.open: dict[int, tuple] = {}  # Index -> (entry, image, poses).

  def add(self, index: int, entry: image_inputs.ImageEntry,
          image: np.ndarray) -> None:
    self.open[index] = (entry, image, {})

  def finish(self, done: list[tuple[tuple[int, int], dict]]) -> None:
    """Takes decoded boxes ``((image index, box index), example)``."""
    for (index, box_index), ex in done:
      entry, image, poses = self.open[index]
      poses[box_index] = ex
      if len(poses) == len(entry.boxes):
        del self.open[index]
        self.writer.add_poses(entry, image, poses)
        self.summary.num_images += 1
        self.bar.update(1)


def _decode_images(entries: list[image_inputs.ImageEntry],
                   batcher: batchers.CropBatcher,
                   writer: predict_outputs.PredictionWriter,
                   summary: Summary, source: _BoxSource) -> None:
  """Reads each image, queues its boxes in ``batcher`` and hands decoded
  images to ``writer``; unreadable images go to ``summary.unreadable``."""
  with tqdm.tqdm(total=len(entries), desc='predict', unit='img') as bar:
    pending = _OpenImages(writer, summary, bar)
    for index, entry in enumerate(entries):
      try:
        image = image_io.load_rgb_array(entry.path)
      except (OSError, image_io.ImageDecodeError) as e:
        summary.unreadable.append(dict(file=entry.rel_path, error=str(e)))
        logging.warning('Cannot read %s: %s', entry.path, e)
        bar.update(1)
        continue
      h, w = image.shape[:2]
      writer.add_image(entry, h, w)
      entry.boxes = source.boxes(entry, image, summary)
      if not entry.boxes:
        bar.update(1)
        continue
      pending.add(index, entry, image)
      for j, box in enumerate(entry.boxes):
        bbox = box.bbox if box.bbox is not None else (0.0, 0.0, w, h)
        pending.finish(batcher.add((index, j), image, bbox, box.category_id))
    pending.finish(batcher.run())


def _log_summary(summary: Summary) -> None:
  logging.info('Predicted %d boxes on %d images (checkpoint step %d) -> %s',
               summary.num_boxes, summary.num_images,
               summary.checkpoint_step, summary.out_dir)
  for what, items in [('unreadable image', summary.unreadable),
                      ('image without detection',
                       summary.images_without_detection),
                      ('box without image', summary.boxes_without_image),
                      ('skipped box', summary.skipped_boxes)]:
    if items:
      logging.warning('%d %s(s):\n  %s', len(items), what,
                      '\n  '.join(str(i) for i in items))
