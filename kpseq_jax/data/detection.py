"""Whole images with all their instances: the detection stage input (issue 18).

The data set stores one record per instance (`data_prep/build.py`) and each
image once (`data_prep.image_store`). The detector needs one element per
image holding all its instances, so `image_groups` indexes a split once by
``image_id`` (reading no image) and `ImageGroups` serves an image (read
once) with the boxes and categories of all its records.

Each image is resized with its aspect ratio kept onto a zero canvas of
``config.detector.image_size_px`` = (H, W) (static shapes for `jax.jit`);
evaluation places it at the top-left at the fitting scale, training at a
random scale (``detector.scale_range`` times the fitting scale; above 1
the canvas shows a random crop, DETR's ``RandomSizeCrop``) and offset,
flipped horizontally with ``input.flip_prob`` (DETR's ``RandomResize`` /
``RandomHorizontalFlip``, ``datasets/coco.py``) and vertically with
``detector.vertical_flip_prob`` (top-down videos, where up and down are
arbitrary). Boxes
become normalised [0, 1] (cx, cy, w, h) of the canvas, DETR's target
format; an instance whose box leaves the canvas is clipped, and one left
with no area is dropped.

Elements (numpy):
  image        uint8 [H, W, 3] canvas
  boxes        float32 [N, 4] (cx, cy, w, h) normalised canvas coordinates,
               N = ``detector_num_queries``; rows >= the image's instances
               are zero
  labels       int32 [N] class index (`DatasetInfo.category_index`)
  box_valid    bool [N]
  canvas_from_image  float32 [3] (scale, dx, dy): canvas px = scale *
               image px + (dx, dy)
  image_id     int64
  image_size   float32 [2] (width, height) of the original image, pixels
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from absl import logging
import grain
import ml_collections
import numpy as np
from PIL import Image

from kpseq_jax.data import dataset
from kpseq_jax.data import pipeline
from kpseq_jax.data import transforms

# The systems whose output is boxes (whole images in, this module's data):
# Deformable DETR (models/detector.py) and CenterNet (models/centroid.py).
BOX_MODELS = ('detector', 'centroid')


def boxes_per_image(config: ml_collections.ConfigDict) -> int:
  """Boxes per image a box model's data keeps (the rest are dropped,
  counted): the detector's ``model.num_queries``, the centroid model's
  ``model.max_objects``."""
  if config.model_name == 'centroid':
    return config.model.max_objects
  return config.model.num_queries


def image_groups(source) -> list[tuple[int, ...]]:
  """Record indices of each image of a `dataset.data_source`, by image id.

  One pass over the records (images are not decoded). Images come in
  increasing ``image_id``, their records in storage order.

  Returns:
    list of tuples of record indices, one tuple per image.
  """
  by_image: dict[int, list[int]] = {}
  records = dataset.records_without_images(source)
  for i in range(len(records)):
    by_image.setdefault(int(records[i]['image_id']), []).append(i)
  return [tuple(by_image[k]) for k in sorted(by_image)]


@dataclasses.dataclass(frozen=True)
class ImageGroups:
  """Random-access source of images with all their instances.

  Element ``i``: the first record of group ``i`` (``image`` bytes,
  ``image_id``, ``file_name``) plus ``bboxes`` float32 [M, 4] (x, y, w, h
  pixels) and ``category_ids`` int64 [M] of all M records of the image.
  """

  source: Any
  groups: tuple[tuple[int, ...], ...]

  def __len__(self) -> int:
    return len(self.groups)

  def __getitem__(self, i: int) -> dict[str, Any]:
    group = self.groups[i]
    meta = dataset.records_without_images(self.source)
    records = [meta[j] for j in group[1:]]
    first = self.source[group[0]]  # The one image read.
    records.insert(0, first)
    return {
        'image': first['image'],
        'image_id': np.int64(first['image_id']),
        'annotation_id': int(first['annotation_id']),
        'file_name': first['file_name'],
        'bboxes': np.stack([np.asarray(r['bbox'], np.float32)
                            for r in records]),
        'category_ids': np.asarray([int(r['category_id']) for r in records],
                                   np.int64),
    }


def _place_image(img: np.ndarray, canvas_hw: tuple[int, int], scale: float,
                 offset: tuple[float, float], flip: bool,
                 vertical_flip: bool = False):
  """(canvas uint8 [H, W, 3], resized (w, h), integer offset (dx, dy)):
  ``img`` (flipped if asked) resized by ``scale`` at ``offset`` on a black
  canvas, clipped to it."""
  h, w = img.shape[:2]
  ch, cw = canvas_hw
  if flip:
    img = img[:, ::-1]
  if vertical_flip:
    img = img[::-1]
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  resized = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
      (nw, nh), Image.Resampling.BILINEAR))
  canvas = np.zeros([ch, cw, 3], np.uint8)
  dx, dy = int(round(offset[0])), int(round(offset[1]))
  # The part of the resized image that lands on the canvas.
  x0, y0 = max(0, dx), max(0, dy)
  x1, y1 = min(cw, dx + nw), min(ch, dy + nh)
  if x1 > x0 and y1 > y0:
    canvas[y0:y1, x0:x1] = resized[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
  return canvas, (nw, nh), (dx, dy)


def to_canvas(ex: dict[str, Any], canvas_hw: tuple[int, int], scale: float,
              offset: tuple[float, float], flip: bool,
              class_index: dict[int, int], max_boxes: int,
              vertical_flip: bool = False) -> dict[str, Any]:
  """Resizes a decoded image onto the canvas and converts its boxes.

  Args:
    ex: ``image`` uint8 [h, w, 3], ``bboxes`` [M, 4] (x, y, w, h) pixels,
      ``category_ids`` [M], ``image_id``.
    canvas_hw: (H, W) canvas size in pixels.
    scale: canvas pixels per image pixel.
    offset: (dx, dy) canvas pixels of the image's top-left corner.
    flip: mirror the image (and boxes) left-right before placing it.
    vertical_flip: mirror them top-bottom (training only, as ``flip``).
    class_index: category id -> class index.
    max_boxes: N, rows of the padded box arrays; instances beyond N (the
      smallest boxes first) are dropped with a warning.

  Returns:
    the element described in the module docstring.
  """
  h, w = ex['image'].shape[:2]
  ch, cw = canvas_hw
  canvas, (nw, nh), (dx, dy) = _place_image(ex['image'], canvas_hw, scale,
                                             offset, flip, vertical_flip)
  xa, ya, xb, yb = _canvas_corners(ex['bboxes'], (w, h), (nw / w, nh / h),
                                   (dx, dy), canvas_hw, flip, vertical_flip)
  keep = (xb - xa > 1e-3) & (yb - ya > 1e-3)
  order = np.argsort(-((xb - xa) * (yb - ya)) * keep, kind='stable')
  order = order[keep[order]]
  if len(order) > max_boxes:
    logging.warning('image %s: %d instances, keeping the %d largest '
                    '(config.model.num_queries or max_objects).',
                    ex.get('image_id'), len(order), max_boxes)
    order = order[:max_boxes]
  boxes = np.zeros([max_boxes, 4], np.float32)
  labels = np.zeros([max_boxes], np.int32)
  valid = np.zeros([max_boxes], bool)
  n = len(order)
  boxes[:n] = np.stack([(xa + xb) / 2 / cw, (ya + yb) / 2 / ch,
                        (xb - xa) / cw, (yb - ya) / ch], -1)[order]
  labels[:n] = [class_index[int(c)] for c in
                np.asarray(ex['category_ids'])[order]]
  valid[:n] = True
  # Flipping mirrors the image before the affine: canvas x = sx * (w - x)
  # + dx, which `canvas_from_image` cannot express; predictions are only
  # mapped back for unflipped (evaluation) canvases.
  return {'image': canvas, 'boxes': boxes, 'labels': labels,
          'box_valid': valid,
          'canvas_from_image': np.asarray([scale, dx, dy], np.float32),
          'image_id': np.int64(ex['image_id']),
          'image_size': np.asarray([w, h], np.float32)}


def _canvas_corners(bboxes, image_wh: tuple[int, int],
                    scale_xy: tuple[float, float], offset: tuple[int, int],
                    canvas_hw: tuple[int, int], flip: bool,
                    vertical_flip: bool) -> tuple[np.ndarray, ...]:
  """(x0, y0, x1, y1), each float64 [M] canvas pixels clipped to the
  canvas, of (x, y, w, h) image-pixel ``bboxes`` [M, 4] mirrored as asked,
  scaled by the resize's exact per-axis ``scale_xy`` and shifted."""
  (w, h), (sx, sy), (dx, dy), (ch, cw) = (image_wh, scale_xy, offset,
                                          canvas_hw)
  b = np.asarray(bboxes, np.float64).reshape(-1, 4)
  left, right = b[:, 0], b[:, 0] + b[:, 2]
  top, bottom = b[:, 1], b[:, 1] + b[:, 3]
  if flip:
    left, right = w - right, w - left
  if vertical_flip:
    top, bottom = h - bottom, h - top
  return (np.clip(left * sx + dx, 0, cw), np.clip(top * sy + dy, 0, ch),
          np.clip(right * sx + dx, 0, cw), np.clip(bottom * sy + dy, 0, ch))


def fit_scale(image_wh: tuple[int, int], canvas_hw: tuple[int, int]) -> float:
  """Largest scale that fits a (w, h) image inside an (H, W) canvas."""
  return min(canvas_hw[0] / image_wh[1], canvas_hw[1] / image_wh[0])


@dataclasses.dataclass(frozen=True)
class ResizeToCanvas(grain.transforms.Map):
  """Evaluation: fitting scale, top-left, no flip (`to_canvas`)."""

  canvas_hw: tuple[int, int]
  class_index: dict[int, int]
  max_boxes: int

  def map(self, ex):
    h, w = ex['image'].shape[:2]
    return to_canvas(ex, self.canvas_hw, fit_scale((w, h), self.canvas_hw),
                     (0.0, 0.0), False, self.class_index, self.max_boxes)


@dataclasses.dataclass(frozen=True)
class RandomResizeToCanvas(grain.transforms.RandomMap):
  """Training: random scale in ``scale_range`` x the fitting scale, random
  offset (the image stays on the canvas; above the canvas's size, the
  canvas stays on the image: a random crop), random flips (`to_canvas`)."""

  canvas_hw: tuple[int, int]
  class_index: dict[int, int]
  max_boxes: int
  scale_range: tuple[float, float] = (0.75, 1.0)
  flip_prob: float = 0.5
  vertical_flip_prob: float = 0.0

  def random_map(self, ex, rng: np.random.Generator):
    h, w = ex['image'].shape[:2]
    scale = fit_scale((w, h), self.canvas_hw) * rng.uniform(*self.scale_range)
    ch, cw = self.canvas_hw
    dx = rng.uniform(*sorted((0.0, cw - w * scale)))
    dy = rng.uniform(*sorted((0.0, ch - h * scale)))
    return to_canvas(ex, self.canvas_hw, scale, (dx, dy),
                     bool(rng.uniform() < self.flip_prob), self.class_index,
                     self.max_boxes,
                     bool(rng.uniform() < self.vertical_flip_prob))


def _chain(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
           train: bool) -> list:
  canvas = tuple(config.detector.image_size_px)
  classes = info.category_index()
  if not train:
    return [transforms.DecodeImage(),
            ResizeToCanvas(canvas, classes, boxes_per_image(config))]
  chain = [transforms.DecodeImage(),
           RandomResizeToCanvas(canvas, classes, boxes_per_image(config),
                                tuple(config.detector.scale_range),
                                config.input.flip_prob,
                                config.detector.vertical_flip_prob)]
  if config.input.color_jitter > 0:
    chain.append(transforms.ColorJitter(config.input.color_jitter))
  return chain


def _groups(config: ml_collections.ConfigDict, split: str) -> ImageGroups:
  source = dataset.data_source(config.input.dataset_dir, split)
  return ImageGroups(source, tuple(image_groups(source)))


def num_images(config: ml_collections.ConfigDict, split: str) -> int:
  """Images of a split (the detector's examples; one pass over it)."""
  return len(_groups(config, split))


def create_train_dataset(config: ml_collections.ConfigDict,
                         info: dataset.DatasetInfo) -> grain.IterDataset:
  """Infinite, shuffled, augmented, batched whole images (process-local),
  as `pipeline.create_train_dataset` (same seeding, sharding, batching)."""
  ds = grain.MapDataset.source(_groups(config, config.input.train_split))
  ds = ds.seed(config.seed).shuffle().repeat()
  ds = pipeline.apply_transforms(ds, _chain(config, info, train=True))
  return pipeline.shard_and_batch(config, ds)


def create_eval_batches(config: ml_collections.ConfigDict,
                        info: dataset.DatasetInfo,
                        split: str | None = None) -> Iterator[dict]:
  """One pass over a split's images in process-local batches, padded with
  ``valid = 0`` elements (`pipeline.padded_batches`)."""
  ds = grain.MapDataset.source(_groups(config, split or config.evals.split))
  if config.evals.num_examples > 0:
    ds = ds[:config.evals.num_examples]
  ds = pipeline.apply_transforms(ds, _chain(config, info, train=False))
  yield from pipeline.padded_batches(ds, config.evals.batch_size,
                                     pipeline.eval_read_options(config))
