"""Per-record validation of one annotation against its category and image size.

Pure functions, no I/O: the caller supplies the image size (decoded size in
build mode, declared size in check mode). A record either passes, possibly
repaired, or is rejected with one `Problem`.

Repairs (the record is kept; counted on `Instance`, reported as notes):
  * a box sticking out of the image is clipped to it;
  * a labelled keypoint with a NaN/inf x or y (DeepLabCut exports NaN for
    "not labelled"), or lying more than `KEYPOINT_TOLERANCE_PX` outside the
    image, is marked unlabelled: (0, 0, 0). One bad keypoint never costs the
    record its good ones;
  * an unlabelled keypoint's x, y are set to 0 (NaN there is harmless).

Skip reasons (`Problem.reason`), in the order they are checked:
  malformed_field          a field is missing or has the wrong type (also
                           an optional ``track`` that is not text)
  unknown_category         category_id is not in the category table
  keypoint_count_mismatch  len(keypoints) / 3 != the category's K
  non_finite_keypoints     a visibility v is NaN or infinite, or every
                           labelled keypoint had a NaN/inf coordinate
  non_finite_bbox          a bbox value is NaN or infinite
  invalid_visibility       a v is not 0, 1 or 2 (2.0 counts as 2)
  bbox_empty               bbox w <= 0 or h <= 0 (zero or negative size)
  no_labelled_keypoints    no keypoint has v > 0
  keypoint_outside_image   every labelled keypoint lies outside the image
  bbox_outside_image       the box clipped to the image is empty
Reasons produced by the caller (build.py): duplicate_annotation_id,
missing_image_entry, conflicting_image_entry, malformed_image_entry,
image_file_missing, image_path_outside_root, image_undecodable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from data_prep import categories as categories_lib
from data_prep import coco

# A labelled keypoint may lie this far outside [0, W] x [0, H] (pixels).
KEYPOINT_TOLERANCE_PX = 1.0
# Box edges moved by less than this when clipping do not count as a clip (pixels).
BBOX_CLIP_EPS_PX = 1e-3


@dataclasses.dataclass(frozen=True)
class Problem:
  """Why a record is rejected.

  Attributes:
    field: the annotation (or image) field at fault, e.g. 'keypoints'.
    reason: a short snake_case reason (see module docstring).
    detail: a human-readable explanation.
  """

  field: str
  reason: str
  detail: str = ''


@dataclasses.dataclass(frozen=True)
class Instance:
  """A validated annotation.

  Attributes:
    annotation_id: annotation id.
    image_id: image id.
    category_id: category id.
    bbox: float32 [4], (x, y, w, h) in pixels, inside the image.
    keypoints: float32 [K, 3], (x, y, v) in pixels, v in {0, 1, 2}; all
      finite, labelled ones inside the image (within the tolerance).
    bbox_clipped: True if the box stuck out of the image and was clipped.
    num_outside_unlabelled: labelled keypoints outside the image, set to
      unlabelled.
    num_non_finite_unlabelled: labelled keypoints with a NaN/inf coordinate,
      set to unlabelled.
    track: the instance's identity (the annotation's optional ``track``
      text: a SLEAP track or DeepLabCut individual); '' when it has none.
  """

  annotation_id: int
  image_id: int
  category_id: int
  bbox: np.ndarray
  keypoints: np.ndarray
  bbox_clipped: bool
  num_outside_unlabelled: int = 0
  num_non_finite_unlabelled: int = 0
  track: str = ''


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_ids(ann: Any) -> Problem | None:
  """Checks that an annotation is an object with int id, image_id, category_id."""
  if not isinstance(ann, dict):
    return Problem('annotation', 'malformed_field', f'annotation is a {type(ann).__name__}, not an object')
  for key in ('id', 'image_id', 'category_id'):
    if not coco.is_int(ann.get(key)):
      return Problem(key, 'malformed_field', f'{key} must be an int, got {ann.get(key)!r}')
  return None


def _numbers(ann: Mapping[str, Any], key: str, length: int | None) -> tuple[np.ndarray | None, Problem | None]:
  values = ann.get(key)
  if not isinstance(values, list) or not all(_is_number(x) for x in values):
    return None, Problem(key, 'malformed_field', f'{key} must be a list of numbers')
  if length is not None and len(values) != length:
    return None, Problem(key, 'malformed_field', f'{key} must have {length} numbers, has {len(values)}')
  return np.asarray(values, dtype=np.float64), None


def validate_instance(
    ann: Mapping[str, Any],
    category: categories_lib.Category | None,
    image_height_px: int,
    image_width_px: int,
) -> tuple[Instance | None, Problem | None]:
  """Validates one annotation; returns exactly one of (instance, problem).

  Args:
    ann: raw COCO annotation dict.
    category: its category from the merged table, None if unknown.
    image_height_px: height H of the (displayed) image in pixels.
    image_width_px: width W of the (displayed) image in pixels.

  Returns:
    (Instance, None) for a good record, the box clipped to [0, W] x [0, H] if
    it stuck out; (None, Problem) otherwise. Never raises on bad data.
  """
  problem = check_ids(ann)
  if problem:
    return None, problem
  if category is None:
    return None, Problem('category_id', 'unknown_category', f'category id {ann["category_id"]} is not defined')
  kps, problem = _numbers(ann, 'keypoints', None)
  if problem:
    return None, problem
  if kps.size != 3 * category.num_keypoints:
    return None, Problem('keypoints', 'keypoint_count_mismatch',
                         f'{kps.size} values = {kps.size / 3:g} keypoints, category {category.id} '
                         f'has K={category.num_keypoints}')
  bbox, problem = _numbers(ann, 'bbox', 4)
  if problem:
    return None, problem
  track = ann.get('track', '')
  if not isinstance(track, str):
    return None, Problem('track', 'malformed_field', f'track must be text, got {track!r}')
  keypoints = kps.reshape(-1, 3)  # [K, 3]
  problem = _check_values(keypoints, bbox)
  if problem:
    return None, problem
  keypoints, non_finite, outside = _unlabel_bad_keypoints(keypoints, image_height_px, image_width_px)
  if not np.any(keypoints[:, 2] > 0):
    if outside:
      return None, Problem('keypoints', 'keypoint_outside_image',
                           f'all {outside} labelled keypoint(s) lie outside the '
                           f'{image_width_px}x{image_height_px} image')
    return None, Problem('keypoints', 'non_finite_keypoints',
                         f'all {non_finite} labelled keypoint(s) have a NaN or infinite coordinate')
  clipped_bbox, was_clipped = clip_bbox(bbox, image_height_px, image_width_px)
  if clipped_bbox[2] <= 0 or clipped_bbox[3] <= 0:
    return None, Problem('bbox', 'bbox_outside_image',
                         f'bbox {bbox.tolist()} is empty once clipped to {image_width_px}x{image_height_px}')
  return Instance(
      annotation_id=int(ann['id']),
      image_id=int(ann['image_id']),
      category_id=int(ann['category_id']),
      bbox=clipped_bbox.astype(np.float32),
      keypoints=keypoints.astype(np.float32),
      bbox_clipped=was_clipped,
      num_outside_unlabelled=outside,
      num_non_finite_unlabelled=non_finite,
      track=track,
  ), None


def _check_values(keypoints: np.ndarray, bbox: np.ndarray) -> Problem | None:
  """Value checks on keypoints [K, 3] and bbox [4], in the documented order."""
  if not np.all(np.isfinite(keypoints[:, 2])):
    return Problem('keypoints', 'non_finite_keypoints', 'a visibility value is NaN or infinite')
  if not np.all(np.isfinite(bbox)):
    return Problem('bbox', 'non_finite_bbox', f'bbox {bbox.tolist()} has a NaN or infinite value')
  visibility = keypoints[:, 2]
  if not np.all(np.isin(visibility, (0.0, 1.0, 2.0))):
    bad = sorted(set(visibility[~np.isin(visibility, (0.0, 1.0, 2.0))].tolist()))
    return Problem('keypoints', 'invalid_visibility', f'visibility values {bad} not in {{0, 1, 2}}')
  if bbox[2] <= 0 or bbox[3] <= 0:
    return Problem('bbox', 'bbox_empty', f'bbox {bbox.tolist()} has w <= 0 or h <= 0')
  if not np.any(visibility > 0):
    return Problem('keypoints', 'no_labelled_keypoints', 'no keypoint has v > 0')
  return None


def _unlabel_bad_keypoints(keypoints: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
  """Marks labelled keypoints with a NaN/inf coordinate or outside the image unlabelled.

  Args:
    keypoints: float64 [K, 3] (x, y, v), v finite and in {0, 1, 2}.
    height: image height H in pixels.
    width: image width W in pixels.

  Returns:
    (float64 [K, 3] copy with those keypoints and every unlabelled one set
    to (0, 0, 0), number unlabelled for a NaN/inf coordinate, number
    unlabelled for lying more than `KEYPOINT_TOLERANCE_PX` outside
    [0, W] x [0, H]).
  """
  kps = keypoints.copy()
  labelled = kps[:, 2] > 0  # [K]
  finite = np.all(np.isfinite(kps[:, :2]), axis=1)  # [K]
  tol = KEYPOINT_TOLERANCE_PX
  with np.errstate(invalid='ignore'):
    inside = ((kps[:, 0] >= -tol) & (kps[:, 0] <= width + tol) &
              (kps[:, 1] >= -tol) & (kps[:, 1] <= height + tol))
  non_finite = labelled & ~finite
  outside = labelled & finite & ~inside
  kps[~labelled | non_finite | outside] = 0.0
  return kps, int(non_finite.sum()), int(outside.sum())


def clip_bbox(bbox: np.ndarray, height: int, width: int) -> tuple[np.ndarray, bool]:
  """Clips an (x, y, w, h) box to [0, width] x [0, height].

  Args:
    bbox: float [4], (x, y, w, h) in pixels.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    (clipped float64 [4] box, possibly with w or h <= 0 when it lies wholly
    outside; whether any edge moved by more than `BBOX_CLIP_EPS_PX`).
  """
  x0, y0, w, h = (float(v) for v in bbox)
  x1, y1 = x0 + w, y0 + h
  cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
  cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
  if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
    return np.array([x0, y0, w, h]), False
  moved = max(abs(cx0 - x0), abs(cy0 - y0), abs(cx1 - x1), abs(cy1 - y1))
  return np.array([cx0, cy0, cx1 - cx0, cy1 - cy0]), bool(moved > BBOX_CLIP_EPS_PX)
