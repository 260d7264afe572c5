"""Boxes outside the training distribution (issue 36 item 4).

A box's size is its long side, max(w, h) in pixels: the top-down crop is
a square of ``bbox_scale`` x max(w, h) resized to ``image_size_px``
(`transforms.crop_matrix`), so the long side alone sets the scale at which
the model sees the animal; the area would also move with the aspect
ratio, which the crop does not see.

`BoxRange` is the range of the training boxes' sides, read once per data
set from the train split (at most `MAX_RECORDS` records, evenly spaced).
A box is out of range when its side is below min / ``factor`` or above
max x ``factor`` (``config.calibration.box_range_factor``, 2 by default:
training rescales crops by ``input.scale_range`` 0.75-1.25 only, so twice
the extremes is well beyond any scale trained on, with a margin for
detector boxes a little looser or tighter than the labelled ones). The
likelihood map has no data there: `likelihood.calibrate` sets the
calibrated likelihood of such a box's keypoints to 0 and keeps the raw one
under its raw name. ``--mode predict``, ``analyze`` and ``eval`` count such
boxes, mark them in their outputs and warn (`warning`).
"""

from __future__ import annotations

import dataclasses
import functools

from absl import logging
import ml_collections
import numpy as np

from kpseq_jax.data import dataset

# Training records read for the range (evenly spaced over the split).
MAX_RECORDS = 2000


@dataclasses.dataclass(frozen=True)
class BoxRange:
  """The training boxes' long sides and the out-of-range rule.

  Attributes:
    min_side_px: smallest max(w, h) of the training boxes read, pixels.
    max_side_px: largest one, pixels.
    factor: a box is out of range below ``min_side_px / factor`` or above
      ``max_side_px * factor`` (>= 1).
    num_boxes: training boxes read.
    split: the split they were read from.
  """
  min_side_px: float
  max_side_px: float
  factor: float
  num_boxes: int
  split: str = 'train'

  @property
  def low_px(self) -> float:
    """Sides below this are out of range (pixels)."""
    return self.min_side_px / self.factor

  @property
  def high_px(self) -> float:
    """Sides above this are out of range (pixels)."""
    return self.max_side_px * self.factor

  def out_of_range(self, bboxes) -> np.ndarray:
    """bool [N] of float [N, 4] (x, y, w, h) pixel boxes (module
    docstring's rule)."""
    b = np.asarray(bboxes, np.float64).reshape(-1, 4)
    side = np.max(b[:, 2:4], axis=1)  # [N] pixels.
    return (side < self.low_px) | (side > self.high_px)

  def describe(self) -> str:
    """One line for logs and warnings: the range and the rule."""
    return (f'training boxes {self.min_side_px:.0f}-{self.max_side_px:.0f} '
            f'px (max(w, h) of {self.num_boxes} {self.split!r} boxes); '
            f'out of range: < {self.low_px:.0f} or > {self.high_px:.0f} px '
            f'(factor {self.factor:g})')

  def to_json(self) -> dict:
    """The fields and ``low_px`` / ``high_px`` (pixels), for reports."""
    return dict(dataclasses.asdict(self), low_px=self.low_px,
                high_px=self.high_px)


@functools.lru_cache(maxsize=8)
def training_sides_px(dataset_dir: str, split: str,
                      max_records: int = MAX_RECORDS) -> tuple[float, ...]:
  """max(w, h) in pixels of at most ``max_records`` boxes of ``split``,
  evenly spaced over it (cached per process, data set and split: a run
  reads them once).

  Raises:
    FileNotFoundError / KeyError: no data set / no such split
      (`dataset.data_source`).
  """
  src = dataset.records_without_images(
      dataset.data_source(dataset_dir, split))
  n = len(src)
  index = np.unique(np.linspace(0, n - 1, min(n, max_records)).astype(int))
  return tuple(float(np.max(src[int(i)]['bbox'][2:4])) for i in index)


def from_config(config: ml_collections.ConfigDict) -> BoxRange | None:
  """The range of ``config.input.dataset_dir``'s train split
  (``input.train_split``) with ``config.calibration.box_range_factor``;
  None, logged, when that split is missing or empty."""
  split = config.input.train_split
  try:
    sides = training_sides_px(config.input.dataset_dir, split)
  except KeyError as e:
    logging.warning('No training boxes to compare boxes with (%s): boxes '
                    'are not checked against the training range.', e)
    return None
  if not sides:
    logging.warning('The %r split of %s is empty: boxes are not checked '
                    'against the training range.', split,
                    config.input.dataset_dir)
    return None
  return BoxRange(min(sides), max(sides),
                  float(config.calibration.box_range_factor), len(sides),
                  split)


def warning(box_range: BoxRange, num_out: int, num_boxes: int, where: str,
            calibrated: bool, whole_frame: bool = False) -> str | None:
  """The run's one warning about ``num_out`` of ``num_boxes`` boxes out of
  range (None when there are none). ``calibrated``: the run has a
  likelihood map (else its likelihoods are raw); ``whole_frame``: the
  boxes are whole images or frames (no detector, no box file), and the
  warning says how to get boxes."""
  if not num_out:
    return None
  text = (f'{where}: {num_out} of {num_boxes} boxes are outside the '
          f'training scale ({box_range.describe()}); ' +
          ('their calibrated likelihood is set to 0 (the calibration has no '
           'data at that scale; the raw likelihood is kept)' if calibrated
           else 'their likelihood is the raw confidence (no calibration), '
           'which means nothing at that scale'))
  if whole_frame:
    text += ('. They are whole images: pass --detector_workdir (a trained '
             'detector, with --detector_config) or --boxes')
  return text + '.'
