"""The files ``--mode predict`` writes (see `predict`'s module docstring):
``predictions.json``, ``images.json``, ``captions.txt``, ``overlays/``
and ``predict_report.json``."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kpseq_jax.data import dataset
from kpseq_jax.data import visualize
from kpseq_jax.inference import box_range as box_range_lib
from kpseq_jax.inference import captions as captions_lib
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import results as results_lib


def overlay_path(out_dir: str, rel_path: str) -> Path:
  """``OUT/overlays/<rel_path with suffix .png>``."""
  return Path(out_dir, 'overlays', rel_path).with_suffix('.png')


class PredictionWriter:
  """Collects the predictions of images as they finish and writes them.

  Args:
    out_dir: OUT (created).
    info: the model's data set (category names, skeletons, K).
    calibration: the checkpoint's likelihood map: the results' likelihood
      is then the calibrated probability (`results.coco_results`); None:
      raw confidences.
    box_range: the training boxes' range: each result says whether its
      box is out of it (``box_out_of_range``), and such a box's calibrated
      likelihood is 0 (`likelihood.calibrate`); None: not checked.
  """

  def __init__(self, out_dir: str, info: dataset.DatasetInfo,
               calibration: likelihood.CalibrationMap | None = None,
               box_range: box_range_lib.BoxRange | None = None):
    self.out_dir = out_dir
    self.info = info
    self.calibration = calibration
    self.box_range = box_range
    self.num_out_of_range = 0  # Boxes written out of ``box_range``.
    self.results: list[dict] = []  # COCO keypoint results.
    self.images: list[dict] = []  # COCO images table.
    self.captions: list[str] = []  # '<file>\t<caption>' lines.
    os.makedirs(out_dir, exist_ok=True)

  def add_image(self, entry: image_inputs.ImageEntry, height: int,
                width: int) -> None:
    """Lists an image read (``images.json``)."""
    self.images.append(dict(id=entry.image_id, file_name=entry.rel_path,
                            width=width, height=height))

  def add_poses(self, entry: image_inputs.ImageEntry, image: np.ndarray,
                poses: dict[int, dict]) -> None:
    """Adds an image's COCO results and caption lines, saves its overlay.

    Args:
      entry: the image and its boxes.
      image: uint8 [H, W, 3] RGB.
      poses: box index -> crop example with ``pred_px`` float [Kmax, 2]
        image pixels, ``confidence`` float [Kmax] and ``presence`` float
        [Kmax] or None (`batchers.CropBatcher.run`).
    """
    order = sorted(poses)
    boxes = [entry.boxes[j] for j in order]
    pred = np.stack([poses[j]['pred_px'] for j in order])  # [N, Kmax, 2]
    confidence = np.stack([poses[j]['confidence'] for j in order])
    presence = None
    if poses[order[0]]['presence'] is not None:
      presence = np.stack([poses[j]['presence'] for j in order])  # [N, Kmax]
    categories = [self.info.categories[b.category_id] for b in boxes]
    h, w = image.shape[:2]
    far = None  # bool [N]: box out of the training range.
    if self.box_range is not None:
      far = self.box_range.out_of_range(
          [b.bbox if b.bbox is not None else (0.0, 0.0, w, h) for b in boxes])
      self.num_out_of_range += int(far.sum())
    calibrated = None
    if self.calibration is not None:
      calibrated = likelihood.calibrate(
          self.calibration, likelihood.raw_likelihood(confidence, presence),
          far)
    entries = results_lib.coco_results(
        pred, [c.num_keypoints for c in categories],
        [entry.image_id] * len(boxes), [b.category_id for b in boxes],
        [b.score for b in boxes], keypoint_scores=confidence,
        presence=presence, likelihood=calibrated)
    if far is not None:
      for r, f in zip(entries, far):
        r['box_out_of_range'] = bool(f)
    self.results.extend(entries)
    for cat, p in zip(categories, pred):
      self.captions.append(f'{entry.rel_path}\t' + captions_lib.caption(
          p[:cat.num_keypoints], cat.keypoint_names))
    canvas = Image.fromarray(image)
    for i, (cat, r) in enumerate(zip(categories, entries)):
      kps = np.reshape(r['keypoints'], [-1, 3])
      kps[:, 2] = np.isfinite(pred[i, :len(kps), 0])  # Drawn if generated.
      absent = None
      if presence is not None:
        absent = presence[i, :len(kps)] < 0.5  # Hollow.
      canvas = visualize.draw_pose(canvas, kps, cat, absent=absent)
    path = overlay_path(self.out_dir, entry.rel_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

  def write(self, summary) -> None:
    """Writes the collected tables and ``summary`` (a dataclass) as
    ``predict_report.json``."""
    out = self.out_dir
    with open(os.path.join(out, 'predictions.json'), 'w') as f:
      json.dump(self.results, f)
    with open(os.path.join(out, 'images.json'), 'w') as f:
      json.dump({'images': self.images}, f, indent=1)
    with open(os.path.join(out, 'captions.txt'), 'w') as f:
      f.writelines(line + '\n' for line in self.captions)
    with open(os.path.join(out, 'predict_report.json'), 'w') as f:
      json.dump(dataclasses.asdict(summary), f, indent=2)
