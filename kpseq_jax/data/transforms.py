"""Grain transforms of the input pipeline, one job each.

A record from the data set (see `data_prep/build.py`) holds ``image`` uint8
[H, W, 3], ``bbox`` float32 [4] (x, y, w, h pixels), ``keypoints`` float32
[K, 3] (x, y, v pixels), ``category_id``, ``image_id``, ``annotation_id``.
The chain is::

  DecodeImage -> CropAffine | RandomCropAffine -> [RandomFlip] -> WarpToCrop
    -> [ColorJitter] -> Tokenize

Geometry uses continuous pixel coordinates (pixel ``i`` covers ``[i, i+1)``,
as Pillow's affine transform does). The top-down crop is the square of side
``bbox_scale * max(w, h)`` centred on the bbox (aspect kept; MMPose's
``TopdownAffine`` with ``padding=1.25``), mapped onto ``[0, S]^2`` for an
``S = image_size_px`` crop. ``crop_from_image`` float32 [2, 3] maps image
pixels to crop pixels; `invert_affine` inverts it (predictions are mapped
back to the image by `kpseq_jax.inference.predictor.crop_to_image`).
"""

import dataclasses
import io
import math
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

from kpseq_jax.sequence import grammar as sequence
from kpseq_jax.sequence import vocab as vocab_lib

Example = dict[str, Any]


def crop_matrix(bbox: np.ndarray, image_size_px: int, bbox_scale: float,
                scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0),
                rotation_deg: float = 0.0) -> np.ndarray:
  """Affine map from image pixels to top-down crop pixels.

  Args:
    bbox: [4] (x, y, w, h) in pixels; w, h > 0.
    image_size_px: S, side of the square crop in pixels.
    bbox_scale: crop side = bbox_scale * max(w, h) * scale.
    scale: extra multiplier of the crop side (random crop).
    shift: crop-centre shift as a fraction of the crop side (x, y).
    rotation_deg: rotation of the content about the crop centre, degrees,
      counter-clockwise in the displayed image.

  Returns:
    float64 [2, 3] matrix A with ``crop_xy = A @ [x, y, 1]``.
  """
  x, y, w, h = (float(v) for v in bbox)
  side = bbox_scale * max(w, h) * scale
  cx = x + w / 2 + shift[0] * side
  cy = y + h / 2 + shift[1] * side
  s = image_size_px / side
  t = math.radians(rotation_deg)
  # Image y points down, so a counter-clockwise turn on screen is -t here.
  cos, sin = math.cos(t) * s, math.sin(t) * s
  rot = np.array([[cos, sin], [-sin, cos]])
  offset = np.array([image_size_px / 2, image_size_px / 2]) - rot @ [cx, cy]
  return np.concatenate([rot, offset[:, None]], axis=1)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
  """Inverse of a [2, 3] affine matrix (same layout), float64."""
  m = np.concatenate([np.asarray(matrix, np.float64), [[0, 0, 1]]], axis=0)
  return np.linalg.inv(m)[:2]


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """Applies a [2, 3] affine to points [..., 2]; returns float64 [..., 2]."""
  xy = np.asarray(xy, np.float64)
  return xy @ np.asarray(matrix, np.float64)[:, :2].T + matrix[:, 2]


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
  """Decodes ``image`` bytes with Pillow to uint8 [H, W, 3] RGB.

  Raises:
    ValueError: naming the annotation and file if the bytes do not decode
      (data_prep validated them, so this means a damaged data set).
  """

  def map(self, ex: dict[str, Any]) -> dict[str, Any]:
    try:
      img = Image.open(io.BytesIO(ex['image'])).convert('RGB')
      ex['image'] = np.asarray(img, np.uint8)
    except Exception as e:
      raise ValueError(f"annotation {ex.get('annotation_id')} "
                       f"({ex.get('file_name')!r}): image does not decode: "
                       f'{e}') from e
    return ex



@dataclasses.dataclass(frozen=True)
class CropAffine(grain.transforms.Map):
  """Deterministic top-down crop (evaluation): adds ``crop_from_image``."""

  image_size_px: int
  bbox_scale: float = 1.25

  def map(self, ex: Example) -> Example:
    ex['crop_from_image'] = crop_matrix(ex['bbox'], self.image_size_px,
                                        self.bbox_scale).astype(np.float32)
    return ex


@dataclasses.dataclass(frozen=True)
class RandomCropAffine(grain.transforms.RandomMap):
  """Top-down crop with random scale, shift and rotation (training).

  Draws scale ~ U(scale_range), shift ~ U(-shift_frac, shift_frac) per axis,
  rotation ~ U(-rotation_deg, rotation_deg).
  """

  image_size_px: int
  bbox_scale: float = 1.25
  scale_range: tuple[float, float] = (0.75, 1.25)
  shift_frac: float = 0.1
  rotation_deg: float = 0.0

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    scale = rng.uniform(*self.scale_range)
    shift = tuple(rng.uniform(-self.shift_frac, self.shift_frac, size=2))
    rot = rng.uniform(-self.rotation_deg, self.rotation_deg)
    ex['crop_from_image'] = crop_matrix(
        ex['bbox'], self.image_size_px, self.bbox_scale, scale, shift,
        rot).astype(np.float32)
    return ex


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of the crop that swaps left/right keypoints.

  With probability ``prob``, composes ``x -> S - x`` into
  ``crop_from_image`` and permutes the keypoint rows with the category's
  flip permutation (pix2seq disabled flipping because it did not swap
  left/right keypoints; this does). Categories without flip pairs (absent
  from ``flip_permutations``) are never flipped.

  Attributes:
    image_size_px: S.
    flip_permutations: category id -> int [K] permutation; row k of the
      flipped keypoints is row ``perm[k]`` of the original.
    prob: flip probability.
  """

  image_size_px: int
  flip_permutations: Mapping[int, np.ndarray]
  prob: float = 0.5

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    perm = self.flip_permutations.get(int(ex['category_id']))
    if perm is None or rng.uniform() >= self.prob:
      return ex
    flip = np.array([[-1.0, 0.0, self.image_size_px], [0.0, 1.0, 0.0]])
    m = ex['crop_from_image'].astype(np.float64)
    ex['crop_from_image'] = (flip[:, :2] @ m + np.concatenate(
        [np.zeros([2, 2]), flip[:, 2:]], 1)).astype(np.float32)
    ex['keypoints'] = ex['keypoints'][perm]
    return ex


@dataclasses.dataclass(frozen=True)
class WarpToCrop(grain.transforms.Map):
  """Warps image and keypoints with ``crop_from_image``.

  Output ``image`` uint8 [S, S, 3] (bilinear, black outside the image);
  ``keypoints_crop`` float32 [K, 3]: x, y normalised to [0, 1] by S, v set to
  0 for keypoints that land outside the crop (they are then unlabelled, see
  `sequence.py`). The original ``keypoints`` (pixels) are kept for
  evaluation.
  """

  image_size_px: int

  def map(self, ex: Example) -> Example:
    m = ex['crop_from_image'].astype(np.float64)
    inv = invert_affine(m)  # Pillow wants crop -> image coefficients.
    img = Image.fromarray(ex['image']).transform(
        (self.image_size_px, self.image_size_px), Image.Transform.AFFINE,
        data=tuple(inv.reshape(-1)), resample=Image.Resampling.BILINEAR)
    ex['image'] = np.asarray(img, np.uint8)
    ex['keypoints_crop'] = keypoints_in_crop(m, ex['keypoints'],
                                             self.image_size_px)
    return ex


def keypoints_in_crop(crop_from_image: np.ndarray, keypoints: np.ndarray,
                      image_size_px: int) -> np.ndarray:
  """Keypoints [K, 3] (x, y pixels, v) -> float32 [K, 3] (x, y normalised
  to [0, 1] by the crop side S, v; v = 0 for keypoints outside the crop)."""
  xy = apply_affine(crop_from_image, keypoints[:, :2]) / image_size_px
  inside = np.all((xy >= 0) & (xy <= 1), axis=1)
  v = np.where(inside, keypoints[:, 2], 0.0)
  return np.concatenate([xy, v[:, None]], axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WarpToCanvas(grain.transforms.Map):
  """PRTR's end-to-end variant: the whole image on a canvas, the crop as
  the frame of the keypoints (`model.Memory.from_crop`).

  Output ``image`` uint8 [H, W, 3]: the whole image resized (aspect kept,
  bilinear) to fit ``canvas_hw``, top-left aligned, zeros elsewhere (the
  detector's evaluation canvas, `data.detection.ResizeToCanvas`);
  ``keypoints_crop`` exactly as `WarpToCrop` gives them (the tokens do not
  change); ``memory_from_crop`` float32 [2, 3], the affine from normalised
  crop (x, y) to normalised canvas (x, y):
  ``diag(s / W, s / H) @ inverse(crop_from_image) @ diag(S, S)``, with s the
  canvas pixels per image pixel. Flips and rotations drawn into
  ``crop_from_image`` by the random crop come through it; the image itself
  is never flipped.

  Attributes:
    image_size_px: S, the crop side the tokens are normalised by.
    canvas_hw: (H, W) canvas in pixels (``detector_image_size_px``).
  """

  image_size_px: int
  canvas_hw: tuple[int, int]

  def map(self, ex: Example) -> Example:
    m = ex['crop_from_image']
    ex['image'], canvas_from_image = to_canvas(ex['image'], self.canvas_hw)
    ex['keypoints_crop'] = keypoints_in_crop(m, ex['keypoints'],
                                             self.image_size_px)
    ex['memory_from_crop'] = memory_from_crop(m, canvas_from_image,
                                              self.image_size_px)
    return ex


def to_canvas(image: np.ndarray, canvas_hw: tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """The whole image resized (aspect kept, bilinear) onto a canvas.

  Args:
    image: uint8 [h, w, 3].
    canvas_hw: (H, W) canvas in pixels.

  Returns:
    (canvas uint8 [H, W, 3], top-left aligned, zeros elsewhere;
    float64 [3, 3] affine from image pixels to normalised canvas (x, y)).
  """
  h, w = image.shape[:2]
  ch, cw = canvas_hw
  scale = min(ch / h, cw / w)
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  canvas = np.zeros([ch, cw, 3], np.uint8)
  canvas[:nh, :nw] = np.asarray(Image.fromarray(image).resize(
      (nw, nh), Image.Resampling.BILINEAR))
  return canvas, np.diag([nw / w / cw, nh / h / ch, 1.0])


def memory_from_crop(crop_from_image: np.ndarray,
                     canvas_from_image: np.ndarray,
                     image_size_px: int) -> np.ndarray:
  """float32 [2, 3]: normalised crop (x, y) -> normalised canvas (x, y).

  ``canvas_from_image @ inverse(crop_from_image) @ diag(S, S, 1)`` with
  ``crop_from_image`` [2, 3] image -> crop pixels (`crop_matrix`),
  ``canvas_from_image`` [3, 3] from `to_canvas` and S = ``image_size_px``.
  """
  image_from_crop = np.concatenate(
      [invert_affine(crop_from_image.astype(np.float64)), [[0, 0, 1]]])
  s = image_size_px
  return (canvas_from_image @ image_from_crop @ np.diag([s, s, 1.0])
          )[:2].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """Random brightness, contrast and saturation (torchvision's ColorJitter).

  Each factor is drawn from U(1 - strength, 1 + strength) and applied in
  random order on the uint8 [S, S, 3] ``image``, as torchvision does.
  """

  strength: float = 0.2

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    img = ex['image'].astype(np.float32)
    for op in rng.permutation(3):
      f = rng.uniform(1 - self.strength, 1 + self.strength)
      gray = img @ np.array([0.299, 0.587, 0.114], np.float32)  # [S, S]
      if op == 0:  # Brightness.
        img = img * f
      elif op == 1:  # Contrast: blend with the mean grey level.
        img = img * f + (1 - f) * gray.mean()
      else:  # Saturation: blend with the grey image.
        img = img * f + (1 - f) * gray[..., None]
      img = np.clip(img, 0, 255)
    ex['image'] = img.astype(np.uint8)
    return ex


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
  """Builds the token sequence and pads per-instance arrays to Kmax.

  Keeps only batchable fields: the model inputs and targets of
  `sequence.build_sequence`, plus for evaluation ``image`` uint8 [S, S, 3],
  ``keypoints`` float32 [Kmax, 3] (pixels, v = 0 padding), ``bbox`` [4],
  ``crop_from_image`` [2, 3], ``num_keypoints``, ``category_id``,
  ``image_id``, ``annotation_id`` (int32); with ``category_index`` (category
  conditioning) also ``category_token`` (int32, the input after ``<bos>``);
  after `WarpToCanvas`, ``image`` is the [H, W, 3] canvas and
  ``memory_from_crop`` [2, 3] is kept.

  Raises:
    ValueError: if the instance has more than Kmax keypoints, or its
      category is not in ``category_index``.
  """

  vocab: vocab_lib.Vocab
  max_num_keypoints: int
  category_index: dict[int, int] | None = None
  unlabelled_absent: bool = False  # DatasetInfo.unlabelled_means == 'absent'.

  def map(self, ex: Example) -> Example:
    k = ex['keypoints'].shape[0]
    kmax = self.max_num_keypoints
    if k > kmax:
      raise ValueError(
          f"annotation {ex['annotation_id']} (image {ex['image_id']}) has "
          f'{k} keypoints > max_num_keypoints={kmax}; raise '
          '--config.max_num_keypoints.')
    cat_token = None
    if self.category_index is not None:
      cid = int(ex['category_id'])
      if cid not in self.category_index:
        raise ValueError(f"annotation {ex['annotation_id']}: category {cid} "
                         'is not in the data set\'s category table.')
      cat_token = self.vocab.category(self.category_index[cid])
    absent = np.zeros([kmax], np.float32)
    if self.unlabelled_absent:
      absent[:k] = ex['keypoints'][:, 2] == 0
    out = sequence.build_sequence(
        _pad_rows(ex['keypoints_crop'], kmax), k, self.vocab, kmax, cat_token,
        absent > 0 if self.vocab.presence else None)
    if cat_token is not None:
      out['category_token'] = np.int32(cat_token)
    out.update(
        image=ex['image'],
        keypoints=_pad_rows(ex['keypoints'], kmax),
        bbox=np.asarray(ex['bbox'], np.float32),
        crop_from_image=ex['crop_from_image'],
        num_keypoints=np.int32(k),
        category_id=np.int32(ex['category_id']),
        image_id=np.int32(ex['image_id']),
        annotation_id=np.int32(ex['annotation_id']),
        keypoint_absent=absent)
    if 'memory_from_crop' in ex:  # PRTR end-to-end (`WarpToCanvas`).
      out['memory_from_crop'] = ex['memory_from_crop']
    return out


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads float32 [K, C] to [rows, C]."""
  out = np.zeros([rows, a.shape[1]], np.float32)
  out[:a.shape[0]] = a
  return out


def flip_permutation(num_keypoints: int,
                     flip_pairs: list[tuple[int, int]]) -> np.ndarray | None:
  """Keypoint permutation for a horizontal flip, or None if none applies.

  Args:
    num_keypoints: K.
    flip_pairs: 0-based (left, right) index pairs.

  Returns:
    int32 [K]: ``perm[i] = j`` and ``perm[j] = i`` for each pair, identity
    elsewhere; None when ``flip_pairs`` is empty (never flip).
  """
  if not flip_pairs:
    return None
  perm = np.arange(num_keypoints, dtype=np.int32)
  for i, j in flip_pairs:
    perm[i], perm[j] = j, i
  return perm
