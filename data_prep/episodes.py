r"""MP-100's episode protocol for category-agnostic pose estimation (CAPE), bit for bit.

  python -m data_prep.episodes --annotations mp100_split1_test.json \
      --num_shots 1 --num_episodes 200 --num_queries 15 --out episodes.jsonl

writes one JSON line per query sample, `[support annotation ids..., query
annotation id]`, in the reference's order.

The protocol, as in CapeFormer (github.com/flyinglynx/CapeFormer, files
capeformer/datasets/datasets/mp100/test_dataset.py for test and
transformer_dataset.py for val, `_get_db` and `make_paired_samples`):

  1. Instances: images in the order of the file's `images` list; per image its
     annotations in file order with iscrowd == 0. The clean box is
     x1 = max(0, x), x2 = min(W - 1, x1 + max(0, w - 1)), w' = x2 - x1 (and so
     for y, h), in pixels: one pixel less than the bbox unless clipped. An
     instance is kept if it has a bbox, area > 0 when given, w' > 0, h' > 0,
     some keypoint value != 0 and num_keypoints != 0 when given.
  2. Per category (order of the file's `categories` list), `num_episodes` times:
     draw num_shots + num_queries distinct instances with `random.sample`; the
     first num_shots are the supports, and each remaining one is a query: one
     sample per query. Python's `random` is seeded with 1 first (the reference
     also seeds numpy with 0, which it never draws from). MP-100: test
     num_episodes=200, val 100, num_queries=15; num_shots 1 or 5.
  3. PCK normalises by max(w', h') of the query's clean box (`EpisodePool.clean_bbox`).

The reference crashes on a category with fewer than num_shots + num_queries
instances; we raise `InsufficientInstancesError` naming them all or, with
--skip_small_categories, skip them. A skipped category draws nothing, so the
categories after it get other episodes than they would if it could be drawn
from (the reference has no result to compare with: it crashes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
import random
import sys
import tempfile
from typing import Any, Iterable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging

Box = tuple[float, float, float, float]


class InsufficientInstancesError(ValueError):
  """Categories have fewer instances than one episode needs.

  Attributes:
    counts: category id -> number of instances, for every such category.
    needed: num_shots + num_queries.
  """

  def __init__(self, counts: Mapping[int, int], needed: int):
    self.counts, self.needed = dict(counts), needed
    listed = ', '.join(f'category {c} has {n}' for c, n in self.counts.items())
    super().__init__(f'an episode needs {needed} instances of a category (num_shots + num_queries): {listed}')


@dataclasses.dataclass(frozen=True)
class EpisodePool:
  """The instances episodes are drawn from (the reference's `cat2obj`).

  Attributes:
    category_ids: the file's category ids in file order (draw order), with or
      without instances.
    annotation_ids: category id -> ids of its kept instances, in the
      reference's order (the order decides which instances a draw picks).
    clean_bbox: annotation id -> the reference's clean box (x1, y1, w, h) in
      original-image pixels; max(w, h) is the PCK normaliser of a query.
  """

  category_ids: tuple[int, ...]
  annotation_ids: dict[int, tuple[int, ...]]
  clean_bbox: dict[int, Box]

  def to_json(self) -> dict[str, Any]:
    """A JSON-safe dict (string keys) that `from_json` turns back into this pool."""
    return {'category_ids': list(self.category_ids),
            'annotation_ids': {str(c): list(ids) for c, ids in self.annotation_ids.items()},
            'clean_bbox': {str(a): list(box) for a, box in self.clean_bbox.items()}}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> EpisodePool:
    """Inverse of `to_json`. Raises ValueError naming a missing or inconsistent field."""
    try:
      category_ids = tuple(int(c) for c in data['category_ids'])
      return cls(category_ids=category_ids,
                 annotation_ids={c: tuple(int(a) for a in data['annotation_ids'][str(c)]) for c in category_ids},
                 clean_bbox={int(a): tuple(float(v) for v in box) for a, box in data['clean_bbox'].items()})
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'episode pool JSON: missing or malformed field {e!r}') from e


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_field(record: Any, field: str, where: str) -> int:
  if not isinstance(record, dict):
    raise ValueError(f'{where}: must be an object')
  v = record.get(field)
  if not isinstance(v, int) or isinstance(v, bool):
    raise ValueError(f'{where}: field {field!r} must be an int, got {v!r}')
  return v


def _clean_bbox(ann: dict[str, Any], width: float, height: float, where: str) -> Box | None:
  """The reference's clean box, or None if it drops the instance (same arithmetic, so same NaN/inf outcomes)."""
  if 'bbox' not in ann:
    return None
  bbox = ann['bbox']
  if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
    raise ValueError(f'{where}: field "bbox" must be 4 numbers, got {bbox!r}')
  if 'area' in ann and not _is_number(ann['area']):
    raise ValueError(f'{where}: field "area" must be a number, got {ann["area"]!r}')
  x, y, w, h = bbox
  x1, y1 = max(0, x), max(0, y)
  x2 = min(width - 1, x1 + max(0, w - 1))
  y2 = min(height - 1, y1 + max(0, h - 1))
  if ('area' not in ann or ann['area'] > 0) and x2 > x1 and y2 > y1:
    return float(x1), float(y1), float(x2 - x1), float(y2 - y1)
  return None


def _has_keypoints(ann: dict[str, Any], where: str) -> bool:
  if 'keypoints' not in ann:
    return False
  kps = ann['keypoints']
  if not (isinstance(kps, list) and kps and all(map(_is_number, kps))):
    raise ValueError(f'{where}: field "keypoints" must be a non-empty list of numbers')
  return max(kps) != 0 and not ('num_keypoints' in ann and ann['num_keypoints'] == 0)


def episode_pool(coco: Mapping[str, Any], path: str = '<dict>') -> EpisodePool:
  """The episode pool of a parsed COCO keypoint file, as the reference builds it.

  Plain Python with pycocotools' ordering: getImgIds = `images` order,
  getAnnIds(imgIds=i, iscrowd=False) = that image's annotations in file order
  whose iscrowd == False, getCatIds = `categories` order.

  Args:
    coco: the parsed JSON (images, annotations, categories).
    path: the file name for error messages.

  Raises:
    ValueError: naming `path`, the annotation (id, or position if the id is
      unusable) and the field: a top-level table missing; an id not an int; a
      repeated annotation or category id; an annotation on an unknown image,
      or without iscrowd; a kept instance with an unknown category; a
      non-numeric bbox, area or keypoints; an image width or height not a finite
      number. (The reference ignores annotations on unknown images and crashes
      on most of the rest.)
  """
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(coco.get(key), list):
      raise ValueError(f'{path}: top-level field {key!r} is missing or not a list')
  # pycocotools keeps images in a dict: a repeated id keeps the position of its
  # first entry and the content (width, height) of its last.
  images = {_int_field(img, 'id', f'{path}: images[{i}]'): img for i, img in enumerate(coco['images'])}
  annotation_ids: dict[int, list[int]] = {}
  for i, cat in enumerate(coco['categories']):
    cid = _int_field(cat, 'id', f'{path}: categories[{i}]')
    if cid in annotation_ids:
      raise ValueError(f'{path}: categories[{i}]: field "id": category id {cid} is listed twice')
    annotation_ids[cid] = []
  per_image: dict[int, list[tuple[int, dict[str, Any]]]] = {image_id: [] for image_id in images}
  seen: set[int] = set()
  for i, ann in enumerate(coco['annotations']):
    ann_id = _int_field(ann, 'id', f'{path}: annotations[{i}]')
    where = f'{path}: annotation id {ann_id}'
    if ann_id in seen:
      raise ValueError(f'{where}: field "id": annotation id is listed twice')
    seen.add(ann_id)
    image_id = _int_field(ann, 'image_id', where)
    if image_id not in per_image:
      raise ValueError(f'{where}: field "image_id": no image with id {image_id}')
    if 'iscrowd' not in ann:
      raise ValueError(f'{where}: field "iscrowd" is missing (pycocotools getAnnIds needs it)')
    if ann['iscrowd'] == False:  # noqa: E712 (getAnnIds compares with ==, so 0 and 0.0 count)
      per_image[image_id].append((ann_id, ann))
  clean_bbox: dict[int, Box] = {}
  for image_id, anns in per_image.items():
    img = images[image_id]
    width, height = img.get('width'), img.get('height')
    if not all(_is_number(v) and math.isfinite(v) for v in (width, height)):
      raise ValueError(f'{path}: image id {image_id}: fields "width" and "height" must be finite numbers, '
                       f'got {width!r}, {height!r}')
    for ann_id, ann in anns:
      where = f'{path}: annotation id {ann_id}'
      box = _clean_bbox(ann, width, height, where)
      if box is None or not _has_keypoints(ann, where):
        continue
      category_id = _int_field(ann, 'category_id', where)
      if category_id not in annotation_ids:
        raise ValueError(f'{where}: field "category_id": {category_id} is not in "categories"')
      annotation_ids[category_id].append(ann_id)
      clean_bbox[ann_id] = box
  return EpisodePool(category_ids=tuple(annotation_ids),
                     annotation_ids={c: tuple(ids) for c, ids in annotation_ids.items()},
                     clean_bbox=clean_bbox)


def load_episode_pool(path: str | Path) -> EpisodePool:
  """`episode_pool` of a JSON file. Raises ValueError naming the file."""
  try:
    data = json.loads(Path(path).read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read annotation JSON: {e}') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: top level must be a JSON object')
  return episode_pool(data, str(path))


@dataclasses.dataclass(frozen=True)
class PairedSamples:
  """Result of `make_paired_samples`.

  Attributes:
    samples: one tuple per query: (support ids..., query id), annotation ids.
    skipped: category id -> instance count of the categories skipped for
      having too few instances (empty unless skip_small_categories).
  """

  samples: list[tuple[int, ...]]
  skipped: dict[int, int]


def make_paired_samples(pool: EpisodePool, num_shots: int, num_episodes: int, num_queries: int,
                        skip_small_categories: bool = False) -> PairedSamples:
  """The reference's `make_paired_samples`: the same samples in the same order.

  len(samples) = categories drawn x num_episodes x num_queries.

  Args:
    pool: the instances (`episode_pool`).
    num_shots: supports per episode (MP-100: 1 or 5).
    num_episodes: episodes per category (MP-100: test 200, val 100).
    num_queries: queries per episode (MP-100: 15).
    skip_small_categories: skip categories with fewer than num_shots +
      num_queries instances instead of raising. This changes the draws of every
      later category compared with the reference (which would have crashed).

  Raises:
    InsufficientInstancesError: such categories exist (all named, before any
      draw) and skip_small_categories is False.
    ValueError: a count is < 1.
  """
  for name, value in (('num_shots', num_shots), ('num_episodes', num_episodes), ('num_queries', num_queries)):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  needed = num_shots + num_queries
  small = {c: len(pool.annotation_ids[c]) for c in pool.category_ids if len(pool.annotation_ids[c]) < needed}
  if small and not skip_small_categories:
    raise InsufficientInstancesError(small, needed)
  # = the reference's `random.seed(1)` without touching the global state.
  # random.sample's draws depend only on the population's length, so sampling
  # annotation ids picks the same instances as sampling db indices.
  rng = random.Random(1)
  samples: list[tuple[int, ...]] = []
  for c in pool.category_ids:
    if c in small:
      continue
    for _ in range(num_episodes):
      shots = tuple(rng.sample(pool.annotation_ids[c], needed))
      samples.extend(shots[:num_shots] + (query,) for query in shots[num_shots:])
  return PairedSamples(samples=samples, skipped=small)


def supports_for_each_query(query_pool: EpisodePool, support_pool: EpisodePool, num_shots: int,
                             seed: int = 0, skip_small_categories: bool = False) -> PairedSamples:
  """Episodes whose supports come from another split: every query once.

  For held-out frames of a lab data set, the supports are labelled training
  frames (the user's labels) and each test frame is a query: per category
  of ``query_pool`` (file order), per query instance (pool order), draw
  ``num_shots`` distinct supports of the same category from ``support_pool``
  with ``random.Random(seed).sample``. Not MP-100's protocol (that draws
  supports and queries from one file, `make_paired_samples`).

  Args:
    query_pool: the evaluated split's pool.
    support_pool: the split the supports come from.
    num_shots: supports per query.
    seed: seed of the draws.
    skip_small_categories: skip query categories with fewer than
      ``num_shots`` support instances instead of raising.

  Raises:
    InsufficientInstancesError: such categories exist (all named) and
      skip_small_categories is False.
    ValueError: num_shots < 1.
  """
  if num_shots < 1:
    raise ValueError(f'num_shots must be >= 1, got {num_shots}')
  small = {c: len(support_pool.annotation_ids.get(c, ())) for c in query_pool.category_ids
           if query_pool.annotation_ids[c] and len(support_pool.annotation_ids.get(c, ())) < num_shots}
  if small and not skip_small_categories:
    raise InsufficientInstancesError(small, num_shots)
  rng = random.Random(seed)
  samples: list[tuple[int, ...]] = []
  for c in query_pool.category_ids:
    if c in small:
      continue
    for query in query_pool.annotation_ids[c]:
      samples.append(tuple(rng.sample(support_pool.annotation_ids[c], num_shots)) + (query,))
  return PairedSamples(samples=samples, skipped=small)


def split_pools(annotation_paths: Mapping[str, str | Path]) -> tuple[dict[str, dict], dict[str, str]]:
  """Data-set metadata: (split -> `EpisodePool.to_json()`, split -> why it has none).

  A split gets no pool, and the reason instead, when the episode protocol does
  not accept its file (see `episode_pool`); the build itself goes on, since it
  skips bad records one by one.
  """
  pools, errors = {}, {}
  for split, path in annotation_paths.items():
    try:
      pools[split] = load_episode_pool(path).to_json()
    except ValueError as e:
      errors[split] = str(e)
      logging.warning('split %r has no episode pool: %s', split, e)
  return pools, errors


def write_jsonl_atomically(lines: Iterable[Sequence[int]], out: str | Path) -> None:
  """Writes one JSON list per line to `out` via a temporary file and a rename."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.incomplete')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(list(line)) + '\n' for line in lines)
    os.replace(tmp, out)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _define_flags() -> None:
  # Defined only when run as a program: data_prep.build defines flags of the
  # same names, and both modules are imported together.
  flags.DEFINE_string('annotations', None, 'COCO keypoint JSON file of one MP-100 part (e.g. mp100_split1_test.json).')
  flags.DEFINE_integer('num_shots', None, 'Support instances per episode (MP-100: 1 or 5).')
  flags.DEFINE_integer('num_episodes', 200, 'Episodes per category (MP-100: test 200, val 100).')
  flags.DEFINE_integer('num_queries', 15, 'Query instances per episode (MP-100: 15).')
  flags.DEFINE_string('out', None, 'Output JSONL file: one [support ids..., query id] line per query.')
  flags.DEFINE_bool('skip_small_categories', False,
                    'Skip categories with too few instances instead of failing (changes later draws).')
  flags.mark_flags_as_required(['annotations', 'num_shots', 'out'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  try:
    pool = load_episode_pool(FLAGS.annotations)
    result = make_paired_samples(pool, FLAGS.num_shots, FLAGS.num_episodes, FLAGS.num_queries,
                                 skip_small_categories=FLAGS.skip_small_categories)
    write_jsonl_atomically(result.samples, FLAGS.out)
  except InsufficientInstancesError as e:
    sys.exit(f'data_prep.episodes: error: {FLAGS.annotations}: {e}')
  except (ValueError, OSError) as e:  # Messages from episode_pool name the file.
    sys.exit(f'data_prep.episodes: error: {e}')
  num_categories = len(pool.category_ids) - len(result.skipped)
  if result.skipped:
    logging.warning('skipped categories with fewer than %d instances (category id: count): %s',
                    FLAGS.num_shots + FLAGS.num_queries, result.skipped)
  logging.info('%d categories x %d episodes = %d episodes; wrote %d lines to %s',
               num_categories, FLAGS.num_episodes, num_categories * FLAGS.num_episodes, len(result.samples), FLAGS.out)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
