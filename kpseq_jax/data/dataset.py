"""A data set written by `data_prep`: its category table, splits and records.

`load_info` reads what training and evaluation need to know from the data
set's metadata (`data_prep/build.py` writes it); `data_source` opens a split
for random access with the images left as encoded bytes (the pipeline's
`transforms.DecodeImage` decodes them).
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep.categories import Category
from data_prep import image_store
from data_prep.episodes import EpisodePool
from kpseq_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline and evaluation need to know about a data set.

  Attributes:
    categories: category id -> `data_prep.categories.Category` (K, keypoint
      names, skeleton, flip pairs).
    split_sizes: split name -> number of records.
    episode_pools: split name -> the instances CAPE episodes are drawn
      from (`data_prep.episodes.EpisodePool`); a split whose annotation file
      the episode protocol refused has none.
    episode_pool_errors: split name -> why it has no pool.
    unlabelled_means: what a keypoint with v = 0 means, recorded by
      `data_prep.build` (``--unlabelled_means``): 'unknown' (not labelled;
      COCO, MP-100; also data sets built before it was recorded) or
      'absent' (not visible; DeepLabCut).
  """

  categories: dict[int, Category]
  split_sizes: dict[str, int]
  episode_pools: dict[str, EpisodePool] = dataclasses.field(
      default_factory=dict)
  episode_pool_errors: dict[str, str] = dataclasses.field(
      default_factory=dict)
  unlabelled_means: str = 'unknown'

  def category_index(self) -> dict[int, int]:
    """category id -> index (position among the ids in increasing order),
    the ``vocab.category(index)`` of category conditioning."""
    return {cid: i for i, cid in enumerate(sorted(self.categories))}

  def flip_permutations(self) -> dict[int, np.ndarray]:
    """category id -> int32 [K] flip permutation, for flippable categories.

    Row k of a flipped instance's keypoints is row ``perm[k]`` of the
    original (`transforms.flip_permutation`).
    """
    perms = {}
    for c in self.categories.values():
      perm = transforms.flip_permutation(c.num_keypoints, list(c.flip_pairs))
      if perm is not None:
        perms[c.id] = perm
    return perms


def _builder(dataset_dir: str) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder_from_directory(dataset_dir)
  except Exception as e:  # tfds raises several types for a missing dir.
    raise FileNotFoundError(
        f'No data set at --config.input.dataset_dir={dataset_dir!r} ({e}). '
        'Build it with `python -m data_prep.build` (see README).') from e


def load_info(dataset_dir: str) -> DatasetInfo:
  """Reads the category table and split sizes of a data set.

  Raises:
    FileNotFoundError: if ``dataset_dir`` holds no data set.
    KeyError: if its metadata has no ``categories`` table.
  """
  b = _builder(dataset_dir)
  meta = b.info.metadata or {}
  if 'categories' not in meta:
    raise KeyError(f'{dataset_dir}: metadata has no "categories" table; '
                   'rebuild it with `python -m data_prep.build`.')
  cats = {int(c['id']): Category.from_metadata(c)
          for c in meta['categories']}
  sizes = {name: s.num_examples for name, s in b.info.splits.items()}
  pools = {split: EpisodePool.from_json(pool)
           for split, pool in (meta.get('episode_pools') or {}).items()}
  return DatasetInfo(categories=cats, split_sizes=sizes, episode_pools=pools,
                     episode_pool_errors=dict(
                         meta.get('episode_pool_errors') or {}),
                     unlabelled_means=str(
                         meta.get('unlabelled_means') or 'unknown'))


def crop_resolution(dataset_dir: str, split: str, image_size_px: int,
                    bbox_scale: float) -> str | None:
  """How many image pixels one top-down crop pixel covers, as a sentence.

  Reads the split's bbox sizes that ``data_prep.build`` put in the data
  set's ``prep_report.json`` (``bbox_long_side_px``: quantiles of the
  longer side, pixels). The crop is the bbox's longer side times
  ``bbox_scale`` resampled to ``image_size_px`` (`transforms.CropAffine`),
  so one crop pixel (and, with ``num_bins == image_size_px``, one
  coordinate bin) is ``long_side * bbox_scale / image_size_px`` image
  pixels: the resolution a pixel-error target has to live with
  (docs/precision.md).

  Returns:
    the sentence, or None when the report or its figures are missing (data
    sets built before 2026-11-30) or the split has no record.
  """
  path = os.path.join(dataset_dir, 'prep_report.json')
  try:
    with open(path) as f:
      sides = json.load(f)['splits'][split]['bbox_long_side_px']
  except (OSError, KeyError, TypeError, ValueError):
    return None
  if not sides:
    return None
  per_px = {k: v * bbox_scale / image_size_px for k, v in sides.items()}
  return (f'{split!r} boxes: longer side {sides["min"]:.0f}-'
          f'{sides["max"]:.0f} px (median {sides["median"]:.0f}); at '
          f'bbox_scale {bbox_scale:g} and image_size_px {image_size_px} one '
          f'crop pixel covers {per_px["min"]:.2f}-{per_px["max"]:.2f} image '
          f'pixels (median {per_px["median"]:.2f})')


def data_source(dataset_dir: str, split: str):
  """Random-access source of a split's records; images stay encoded bytes.

  Each image is stored once (`data_prep.image_store`) and joined to its
  records here; ``records_without_images(source)`` is the view that reads
  no image. Records hold ``image`` (bytes), ``bbox`` float32 [4] (x, y, w, h pixels),
  ``keypoints`` float32 [K, 3] (x, y, v pixels), ``category_id``,
  ``image_id``, ``annotation_id``, ``file_name`` and, since version 2.1.0,
  ``track`` (read it with `instance_track`; see `data_prep/build.py`).

  Raises:
    FileNotFoundError: if the data set is missing.
    KeyError: if ``split`` is not one of its splits.
  """
  b = _builder(dataset_dir)
  if split not in b.info.splits:
    raise KeyError(f'{dataset_dir} has no split {split!r}; it has '
                   f'{sorted(b.info.splits)}.')
  if 'image' in b.info.features:  # Version 1: the image in every record.
    return b.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return image_store.InstanceSource(
      b.as_data_source(split=split),
      image_store.ImageStore(dataset_dir, split))


records_without_images = image_store.records_without_images


def instance_track(record) -> str:
  """The identity of a record's instance: its ``track`` text (a SLEAP
  track or DeepLabCut individual name, `data_prep.sleap_import`), '' when
  it has none or the data set predates the field (version < 2.1.0)."""
  track = record.get('track', b'')
  return track.decode('utf-8') if isinstance(track, bytes) else str(track)


def annotation_index(source) -> dict[int, int]:
  """annotation id -> record index of a `data_source` (one pass over it:
  records are stored in no useful order; images are not decoded).

  Raises:
    ValueError: if an annotation id occurs twice (data_prep writes each
      annotation once per split).
  """
  index = {}
  records = records_without_images(source)
  for i in range(len(records)):
    ann_id = int(records[i]['annotation_id'])
    if ann_id in index:
      raise ValueError(f'annotation {ann_id} is stored twice (records '
                       f'{index[ann_id]} and {i}); rebuild the data set.')
    index[ann_id] = i
  return index
