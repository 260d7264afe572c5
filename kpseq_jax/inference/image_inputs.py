"""Images and their boxes for ``--mode predict``.

`list_images` finds the images; `read_boxes` parses a COCO detections
list or annotations file; `plan_boxes` decides which box of which image
is decoded (and why the others are skipped); `choose_category` is the
category of whole-image boxes.
"""

import dataclasses
import json
import os
from pathlib import Path
import re

import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.inference import video

IMAGE_SUFFIXES = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff',
                  '.webp')


@dataclasses.dataclass(frozen=True)
class Box:
  """One box to predict: (x, y, w, h) pixels; bbox None = the whole image."""

  category_id: int
  bbox: tuple[float, float, float, float] | None
  score: float = 1.0


@dataclasses.dataclass
class ImageEntry:
  """An input image, its COCO id and its boxes."""

  rel_path: str  # Relative to the --images root, '/'-separated.
  path: Path
  image_id: int
  boxes: list[Box]


def list_images(images: str) -> tuple[Path, list[str]]:
  """(root, sorted relative paths) of an image file or a folder's images.

  Raises:
    FileNotFoundError: if ``images`` does not exist or holds no image.
    ValueError: if ``images`` is a video file.
  """
  p = Path(images)
  if p.is_file() and p.suffix.lower() in video.VIDEO_SUFFIXES:
    raise ValueError(f'--images {images}: a video; analyse videos with '
                     '--mode analyze --videos (DeepLabCut-format output).')
  if p.is_file():
    return p.parent, [p.name]
  if not p.is_dir():
    raise FileNotFoundError(f'--images {images!r}: no such file or folder.')
  rels = sorted(f.relative_to(p).as_posix() for f in p.rglob('*')
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
  if not rels:
    raise FileNotFoundError(f'--images {images!r}: no image files '
                            f'({", ".join(IMAGE_SUFFIXES)}) in the folder.')
  return p, rels


def _matcher(rels: list[str]):
  """file_name -> relative path: exact, else by a unique base name."""
  exact = set(rels)
  by_base: dict[str, list[str]] = {}
  for r in rels:
    by_base.setdefault(r.rsplit('/', 1)[-1], []).append(r)

  def match(file_name: str) -> str | None:
    name = file_name.replace(os.sep, '/')
    if name in exact:
      return name
    same = by_base.get(name.rsplit('/', 1)[-1], [])
    return same[0] if len(same) == 1 else None
  return match


def read_boxes(boxes_file: str, rels: list[str]
               ) -> tuple[dict[str, int], dict[str, list[Box]], list[str]]:
  """Parses a COCO detections list or annotations file.

  Returns:
    (relative path -> image id, relative path -> boxes, descriptions of
    boxes whose image is not under --images).

  Raises:
    ValueError: unknown layout, an entry without a usable box, or a
      detections list whose entries name no file.
  """
  with open(boxes_file) as f:
    data = json.load(f)
  match = _matcher(rels)
  if isinstance(data, dict) and 'annotations' in data:
    files = {int(im['id']): im['file_name'] for im in data.get('images', [])}
    entries = [a for a in data['annotations'] if not a.get('iscrowd', 0)]
  elif isinstance(data, list):
    files, entries = {}, data
    numbered = {}
    for r in rels:  # COCO file names are the zero-padded image id.
      m = re.fullmatch(r'0*(\d+)', Path(r).stem)
      if m:
        numbered.setdefault(int(m.group(1)), r)
  else:
    raise ValueError(f'--boxes {boxes_file}: expected a COCO detections list '
                     'or an annotations file with "images" and '
                     '"annotations".')
  ids, boxes, missing = {}, {}, []
  for i, e in enumerate(entries):
    try:
      image_id, cid = int(e['image_id']), int(e['category_id'])
      x, y, w, h = (float(v) for v in e['bbox'])
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f'--boxes {boxes_file}: entry {i} needs image_id, '
                       f'category_id and bbox [x, y, w, h] ({err!r}).') from err
    if 'file_name' in e:
      rel = match(str(e['file_name']))
    elif isinstance(data, dict):
      rel = match(files[image_id]) if image_id in files else None
    else:
      rel = numbered.get(image_id)
      if not numbered:
        raise ValueError(
            f'--boxes {boxes_file}: detections name images by image_id only, '
            'but no file under --images is named by a number; add '
            '"file_name" to the entries or pass an annotations file with an '
            '"images" table.')
    if rel is None:
      missing.append(f'image {image_id} '
                     f'({e.get("file_name", files.get(image_id, "?"))})')
      continue
    ids[rel] = image_id
    boxes.setdefault(rel, []).append(
        Box(cid, (x, y, w, h), float(e.get('score', 1.0))))
  return ids, boxes, missing


def choose_category(info: dataset.DatasetInfo,
                    category_id: int | None) -> int:
  """The category of whole-image boxes.

  Raises:
    ValueError: unknown id, or several categories and none chosen.
  """
  table = ', '.join(f'{c.id} ({c.name})' for c in info.categories.values())
  if category_id is not None:
    if category_id not in info.categories:
      raise ValueError(f'--category {category_id} is not in the data set\'s '
                       f'category table: {table}.')
    return category_id
  if len(info.categories) != 1:
    raise ValueError(f'The model knows several categories ({table}); pass '
                     '--category ID or a --boxes file with category_id.')
  return next(iter(info.categories))


@dataclasses.dataclass
class BoxPlan:
  """The boxes ``--mode predict`` decodes.

  Attributes:
    entries: images to read with their boxes (empty boxes: filled by a
      detector once the image is read).
    boxes_without_image: boxes of the --boxes file whose image is not under
      --images (descriptions).
    skipped_boxes: boxes not decoded, as dict(file, bbox, reason).
  """

  entries: list[ImageEntry]
  boxes_without_image: list[str] = dataclasses.field(default_factory=list)
  skipped_boxes: list[dict] = dataclasses.field(default_factory=list)


def skip_reason(category_id: int, info: dataset.DatasetInfo,
                wanted_category: int | None) -> str | None:
  """Why a box of ``category_id`` is not decoded (not ``--category``, or
  not in the model's category table); None if it is."""
  if wanted_category is not None and category_id != wanted_category:
    return f'category {category_id} is not --category {wanted_category}'
  if category_id not in info.categories:
    return f'category {category_id} is not in the model\'s table'
  return None


def plan_boxes(root: Path, rels: list[str], info: dataset.DatasetInfo,
               boxes_file: str | None, category_id: int | None,
               detected: bool) -> BoxPlan:
  """Which boxes of which images ``--mode predict`` decodes.

  Args:
    root, rels: `list_images`.
    info: the model's data set (its category table).
    boxes_file: --boxes, or None.
    category_id: --category, or None.
    detected: boxes come from a detector (entries get empty box lists).

  Raises:
    ValueError: bad --boxes file or none of its boxes under --images;
      unknown --category, or none with several categories (whole images).
  """
  if category_id is not None:
    choose_category(info, category_id)  # Raises if not in the table.
  if boxes_file:
    return _file_boxes(root, rels, info, boxes_file, category_id)
  if detected:
    return BoxPlan([ImageEntry(rel, root / rel, i + 1, [])
                    for i, rel in enumerate(rels)])
  cid = choose_category(info, category_id)
  return BoxPlan([ImageEntry(rel, root / rel, i + 1, [Box(cid, None)])
                  for i, rel in enumerate(rels)])


def _file_boxes(root: Path, rels: list[str], info: dataset.DatasetInfo,
                boxes_file: str, category_id: int | None) -> BoxPlan:
  """`plan_boxes` of a --boxes file: boxes of another category or without
  area are skipped."""
  ids, boxes, missing = read_boxes(boxes_file, rels)
  if not boxes:
    raise ValueError(f'--boxes {boxes_file}: none of its boxes is for an '
                     f'image under --images {root} ({len(missing)} '
                     'boxes, e.g. ' + '; '.join(missing[:3]) + ').')
  plan = BoxPlan([], boxes_without_image=missing)
  for rel in rels:
    keep = []
    for b in boxes.get(rel, []):
      why = skip_reason(b.category_id, info, category_id)
      if why is None and not (np.all(np.isfinite(b.bbox)) and b.bbox[2] > 0
                              and b.bbox[3] > 0):
        why = f'bbox {list(b.bbox)} has no area'
      if why:
        plan.skipped_boxes.append(dict(file=rel, bbox=list(b.bbox),
                                       reason=why))
      else:
        keep.append(b)
    if keep:
      plan.entries.append(ImageEntry(rel, root / rel, ids[rel], keep))
  return plan
