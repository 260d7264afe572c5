"""Walks the annotations of one file, validating each and loading its image.

Shared by build mode (images decoded from an image root) and check mode
(declared image sizes only). Skip reasons produced here: duplicate_annotation_id,
conflicting_image_entry, malformed_image_entry, missing_image_entry,
unknown_category, image_path_outside_root, image_file_missing,
image_undecodable; the rest come from `validate.validate_instance`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tqdm

from data_prep import categories as categories_lib
from data_prep import coco
from data_prep import images as images_lib
from data_prep import report as report_lib
from data_prep import validate


@dataclasses.dataclass(frozen=True)
class DeclaredImage:
  """Image size as declared by the image entry (check mode: no decoding)."""

  height: int
  width: int


ImageLoader = Callable[[coco.ImageEntry], tuple[Any, 'validate.Problem | None']]


class FileImageLoader:
  """Loads images from an image root, remembering the last one.

  Calling it with an ImageEntry returns (EncodedImage, None) or (None, Problem)
  with reason image_path_outside_root, image_file_missing or image_undecodable.
  """

  def __init__(self, image_root: str | Path):
    self._root = Path(image_root).resolve()
    self._last: tuple[int | None, Any] = (None, None)

  def __call__(self, entry: coco.ImageEntry) -> tuple[images_lib.EncodedImage | None, validate.Problem | None]:
    if self._last[0] != entry.id:
      self._last = (entry.id, self._load(entry))
    return self._last[1]

  def _load(self, entry: coco.ImageEntry):
    path = (self._root / entry.file_name).resolve()
    if not path.is_relative_to(self._root):
      return None, validate.Problem('file_name', 'image_path_outside_root', f'{entry.file_name} leaves {self._root}')
    try:
      return images_lib.load_rgb_image(path, (entry.width, entry.height)), None
    except FileNotFoundError:
      return None, validate.Problem('file_name', 'image_file_missing', f'{path} does not exist')
    except (images_lib.ImageDecodeError, IsADirectoryError, PermissionError) as e:
      return None, validate.Problem('file_name', 'image_undecodable', str(e))


def declared_image(entry: coco.ImageEntry) -> tuple[DeclaredImage, None]:
  """Image loader for check mode: the declared width and height, no I/O."""
  return DeclaredImage(entry.height, entry.width), None


def iter_valid_instances(
    coco_file: coco.CocoKeypointFile,
    categories: Mapping[int, categories_lib.Category],
    split_report: report_lib.SplitReport,
    load_image: ImageLoader,
) -> Iterator[tuple[validate.Instance, coco.ImageEntry, Any]]:
  """Validates the annotations of one file in order, yielding the good ones.

  Skipped records and notes are recorded on `split_report` (read and skipped
  are updated here; `written` is left to the caller).

  Args:
    coco_file: the parsed file.
    categories: the merged category table.
    split_report: report to update.
    load_image: ImageEntry -> (image with .height/.width, None) or (None, Problem).

  Yields:
    (instance, image entry, loaded image).
  """
  split_report.notes['duplicate_image_entries'] += coco_file.duplicate_image_entries
  seen_ids: set[int] = set()
  noted_images: set[int] = set()
  for ann in tqdm.tqdm(coco_file.annotations, desc=split_report.split, unit='ann', leave=False):
    split_report.read += 1
    result = _resolve(ann, coco_file, categories, load_image, seen_ids)
    if isinstance(result, validate.Problem):
      ann_id, image_id, _ = coco.annotation_ids(ann)
      split_report.skipped.append(report_lib.SkippedRecord(
          str(coco_file.path), ann_id, image_id, result.field, result.reason, result.detail))
      continue
    instance, entry, image = result
    if entry.id not in noted_images:
      noted_images.add(entry.id)
      _note_image(entry, image, split_report)
    split_report.notes['bbox_clipped'] += instance.bbox_clipped
    split_report.notes['keypoint_outside_image_unlabelled'] += instance.num_outside_unlabelled
    split_report.notes['keypoint_non_finite_unlabelled'] += instance.num_non_finite_unlabelled
    split_report.notes['records_with_keypoints_unlabelled'] += bool(
        instance.num_outside_unlabelled or instance.num_non_finite_unlabelled)
    if ann.get('num_keypoints') != int(np.sum(instance.keypoints[:, 2] > 0)):
      split_report.notes['num_keypoints_field_mismatch'] += 1
    split_report.instances_per_category[instance.category_id] += 1
    split_report.bbox_long_sides_px.append(float(max(instance.bbox[2:])))
    yield instance, entry, image


def _resolve(ann, coco_file, categories, load_image, seen_ids):
  """One annotation -> (instance, entry, image) or the Problem that rejects it."""
  problem = validate.check_ids(ann)
  if problem:
    return problem
  ann_id, image_id, category_id = (int(v) for v in coco.annotation_ids(ann))
  if ann_id in seen_ids:
    return validate.Problem('id', 'duplicate_annotation_id', f'annotation id {ann_id} seen before; first kept')
  seen_ids.add(ann_id)
  if image_id in coco_file.conflicting_image_ids:
    return validate.Problem('image_id', 'conflicting_image_entry',
                            f'image {image_id} is listed more than once with different content')
  if image_id in coco_file.malformed_image_entries:
    return validate.Problem('image_id', 'malformed_image_entry',
                            f'image {image_id} entry has a bad {coco_file.malformed_image_entries[image_id]!r}')
  entry = coco_file.images.get(image_id)
  if entry is None:
    return validate.Problem('image_id', 'missing_image_entry', f'no image entry with id {image_id}')
  if category_id not in categories:
    return validate.Problem('category_id', 'unknown_category', f'category id {category_id} is not defined')
  image, problem = load_image(entry)
  if problem:
    return problem
  instance, problem = validate.validate_instance(ann, categories[category_id], image.height, image.width)
  return problem or (instance, entry, image)


def _note_image(entry: coco.ImageEntry, image: Any, split_report: report_lib.SplitReport) -> None:
  if (image.height, image.width) != (entry.height, entry.width):
    split_report.notes['image_size_differs_from_entry'] += 1
  if isinstance(image, images_lib.EncodedImage):
    split_report.notes['image_reencoded_png'] += not image.kept_original
    split_report.notes['image_mode_converted'] += image.source_mode != 'RGB'
    split_report.notes['exif_rotated'] += image.exif_rotated
    split_report.notes['exif_ignored_size_is_stored'] += image.exif_ignored
