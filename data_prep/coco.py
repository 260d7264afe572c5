"""Parsing and schema checks for one COCO-style keypoint file (MP-100 format).

Schema (https://cocodataset.org/#format-data, "keypoint detection"):
  images[{id, file_name, width, height}]
  annotations[{id, image_id, category_id, keypoints[x, y, v]*K, bbox[x, y, w, h], ...}]
  categories[{id, name, supercategory, keypoints[names], skeleton[[i, j]]}]

File-level problems (unreadable or empty JSON, missing or mistyped top-level
keys, a malformed category) raise `AnnotationError`. Problems of single image
entries are recorded on the returned `CocoKeypointFile`; annotations are kept as
raw dicts and validated record by record later (`validate.py`), so one bad
record never costs the good ones.

Skeleton indices: COCO specifies 1-based skeleton indices, but the MP-100 files
are already 0-based (every MP-100 category uses index 0). The base is detected
per file: 0-based if any skeleton index in the file is 0, else 1-based. Skeletons
are stored 0-based.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

_TOP_LEVEL_KEYS = ('images', 'annotations', 'categories')


class AnnotationError(ValueError):
  """An annotation file is unreadable or breaks the COCO keypoint schema.

  The message names the file and the offending field.
  """


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One `images[]` entry.

  Attributes:
    id: image id.
    file_name: path relative to the image root (may contain sub-folders).
    width: declared width in pixels (> 0).
    height: declared height in pixels (> 0).
  """

  id: int
  file_name: str
  width: int
  height: int


@dataclasses.dataclass(frozen=True)
class CategorySpec:
  """One `categories[]` entry as written in one file.

  Attributes:
    id: category id; categories are keyed by id, never by name (MP-100 has
      two categories named "face").
    name: category name.
    supercategory: supercategory name ('' when absent).
    keypoint_names: keypoint names; may be empty (then K comes from the
      annotations, see `categories.build_category_table`).
    skeleton: limbs as 0-based keypoint index pairs.
  """

  id: int
  name: str
  supercategory: str
  keypoint_names: tuple[str, ...]
  skeleton: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class CocoKeypointFile:
  """A parsed annotation file.

  Attributes:
    path: the file read.
    images: well-formed image entries by id, duplicates resolved.
    annotations: raw annotation dicts in file order (validated per record).
    categories: category entries in file order.
    skeleton_index_base: 0 or 1, the skeleton index base detected in the file.
    duplicate_image_entries: number of repeated image entries identical to an
      earlier one (dropped silently).
    conflicting_image_ids: image ids listed more than once with different
      content; instances on them are skipped.
    malformed_image_entries: image id (or list position when the id itself is
      unusable) -> the field that broke; instances on them are skipped.
  """

  path: Path
  images: dict[int, ImageEntry]
  annotations: list[dict[str, Any]]
  categories: list[CategorySpec]
  skeleton_index_base: int
  duplicate_image_entries: int
  conflicting_image_ids: frozenset[int]
  malformed_image_entries: dict[Any, str]


def is_int(value: Any) -> bool:
  """True for Python ints (bool excluded) and integral finite floats."""
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return True
  return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def load_annotation_file(path: str | Path) -> CocoKeypointFile:
  """Reads and schema-checks one COCO keypoint JSON file.

  Args:
    path: the JSON file.

  Returns:
    The parsed file; annotations are not yet validated (see `validate.py`).

  Raises:
    AnnotationError: the file is missing, empty or not JSON; a top-level key is
      missing or not a list; a category entry is malformed.
  """
  path = Path(path)
  return parse_annotation_data(read_json(path), path)


def parse_annotation_data(data: Any, path: str | Path) -> CocoKeypointFile:
  """Schema-checks COCO keypoint data already in memory (e.g. converted
  from a DeepLabCut project by `dlc_project.py`).

  Args:
    data: the decoded JSON object (``images``, ``annotations``,
      ``categories``).
    path: the file it stands for, named in messages and reports.

  Returns:
    As `load_annotation_file`.

  Raises:
    AnnotationError: as `load_annotation_file`, except for reading.
  """
  path = Path(path)
  if not isinstance(data, dict):
    raise AnnotationError(f'{path}: top level must be a JSON object, got {type(data).__name__}')
  for key in _TOP_LEVEL_KEYS:
    if key not in data:
      raise AnnotationError(f'{path}: missing top-level key {key!r}')
    if not isinstance(data[key], list):
      raise AnnotationError(
          f'{path}: top-level key {key!r} must be a list, got {type(data[key]).__name__}')
  raw_categories = data['categories']
  if not raw_categories:
    raise AnnotationError(f'{path}: field "categories" is empty')
  base = detect_skeleton_index_base(raw_categories, path)
  categories = [_parse_category(c, i, base, path) for i, c in enumerate(raw_categories)]
  _check_unique_category_ids(categories, path)
  images, duplicates, conflicting, malformed = index_images(data['images'])
  return CocoKeypointFile(
      path=path,
      images=images,
      annotations=list(data['annotations']),
      categories=categories,
      skeleton_index_base=base,
      duplicate_image_entries=duplicates,
      conflicting_image_ids=frozenset(conflicting),
      malformed_image_entries=malformed,
  )


def read_json(path: Path) -> Any:
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError as e:
    raise AnnotationError(f'{path}: annotation file not found') from e
  except (OSError, UnicodeDecodeError) as e:
    raise AnnotationError(f'{path}: cannot read annotation file: {e}') from e
  if not text.strip():
    raise AnnotationError(f'{path}: annotation file is empty')
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise AnnotationError(f'{path}: not valid JSON: {e}') from e


def detect_skeleton_index_base(raw_categories: Sequence[Any], path: Path) -> int:
  """Returns 0 if any skeleton index in the file is 0, else 1 (COCO's base).

  Raises:
    AnnotationError: a skeleton is not a list of [int, int] pairs with
      non-negative entries.
  """
  indices = []
  for i, cat in enumerate(raw_categories):
    skeleton = cat.get('skeleton', []) if isinstance(cat, dict) else []
    if not isinstance(skeleton, list):
      raise AnnotationError(f'{path}: categories[{i}].skeleton must be a list')
    for limb in skeleton:
      if not (isinstance(limb, list) and len(limb) == 2 and all(is_int(j) and j >= 0 for j in limb)):
        raise AnnotationError(
            f'{path}: categories[{i}].skeleton has a malformed limb {limb!r} '
            '(want [i, j] with non-negative ints)')
      indices.extend(int(j) for j in limb)
  return 0 if 0 in indices else 1


def _parse_category(cat: Any, position: int, base: int, path: Path) -> CategorySpec:
  where = f'{path}: categories[{position}]'
  if not isinstance(cat, dict):
    raise AnnotationError(f'{where} must be an object')
  if not is_int(cat.get('id')):
    raise AnnotationError(f'{where}.id must be an int, got {cat.get("id")!r}')
  if not isinstance(cat.get('name'), str):
    raise AnnotationError(f'{where}.name must be a string (category id {cat["id"]})')
  supercategory = cat.get('supercategory', '')
  if not isinstance(supercategory, str):
    raise AnnotationError(f'{where}.supercategory must be a string (category id {cat["id"]})')
  names = cat.get('keypoints', [])
  if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
    raise AnnotationError(f'{where}.keypoints must be a list of strings (category id {cat["id"]})')
  skeleton = tuple((int(i) - base, int(j) - base) for i, j in cat.get('skeleton', []))
  return CategorySpec(
      id=int(cat['id']),
      name=cat['name'],
      supercategory=supercategory,
      keypoint_names=tuple(names),
      skeleton=skeleton,
  )


def _check_unique_category_ids(categories: Sequence[CategorySpec], path: Path) -> None:
  seen: dict[int, CategorySpec] = {}
  for cat in categories:
    if cat.id in seen and seen[cat.id] != cat:
      raise AnnotationError(f'{path}: field "categories" lists id {cat.id} twice with different content')
    seen[cat.id] = cat


def index_images(
    raw_images: Sequence[Any],
) -> tuple[dict[int, ImageEntry], int, set[int], dict[Any, str]]:
  """Indexes image entries by id.

  Args:
    raw_images: the `images` list of a COCO file.

  Returns:
    (images by id, number of identical duplicates dropped, ids listed with
    conflicting content, malformed entries as id-or-position -> field).
    Conflicting ids are removed from the returned index.
  """
  images: dict[int, ImageEntry] = {}
  duplicates = 0
  conflicting: set[int] = set()
  malformed: dict[Any, str] = {}
  for position, raw in enumerate(raw_images):
    entry, bad_field = parse_image_entry(raw)
    if entry is None:
      key = raw.get('id') if isinstance(raw, dict) and is_int(raw.get('id')) else f'images[{position}]'
      malformed[key] = bad_field
      continue
    if entry.id not in images:
      images[entry.id] = entry
    elif images[entry.id] == entry:
      duplicates += 1
    else:
      conflicting.add(entry.id)
  for image_id in conflicting:
    del images[image_id]
  return images, duplicates, conflicting, malformed


def parse_image_entry(raw: Any) -> tuple[ImageEntry | None, str]:
  """Parses one image entry; returns (entry, '') or (None, offending field)."""
  if not isinstance(raw, dict):
    return None, 'images[]'
  if not is_int(raw.get('id')):
    return None, 'id'
  if not isinstance(raw.get('file_name'), str) or not raw['file_name']:
    return None, 'file_name'
  for key in ('width', 'height'):
    if not (is_int(raw.get(key)) and raw[key] > 0):
      return None, key
  return ImageEntry(int(raw['id']), raw['file_name'], int(raw['width']), int(raw['height'])), ''


def parse_split_argument(arg: str) -> tuple[str, Path]:
  """Parses an `--annotations` value: `PATH` (split = file stem) or `NAME=PATH`.

  Raises:
    ValueError: the split name is not made of letters, digits and '_'
      (TFDS split names); pass NAME=PATH to choose one.
  """
  name, sep, rest = arg.partition('=')
  if sep and name and '/' not in name:
    split, path = name, Path(rest)
  else:
    split, path = Path(arg).stem, Path(arg)
  if not split.replace('_', 'a').isalnum() or not split.isascii():
    raise ValueError(f'{arg}: split name {split!r} must be letters, digits and "_"; '
                     'pass NAME=PATH to name the split')
  return split, path


def parse_split_arguments(args: Sequence[str]) -> dict[str, Path]:
  """Parses all `--annotations` values into {split name: path}, in order.

  Raises:
    ValueError: a split name is invalid or given twice.
  """
  splits: dict[str, Path] = {}
  for arg in args:
    split, path = parse_split_argument(arg)
    if split in splits:
      raise ValueError(f'split {split!r} given twice ({splits[split]} and {path})')
    splits[split] = path
  return splits


def annotation_ids(ann: Mapping[str, Any]) -> tuple[Any, Any, Any]:
  """(id, image_id, category_id) of a raw annotation, None where absent."""
  if not isinstance(ann, dict):
    return None, None, None
  return ann.get('id'), ann.get('image_id'), ann.get('category_id')
