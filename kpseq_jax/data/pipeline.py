"""Grain input pipeline over the ArrayRecord data set written by `data_prep`.

Training: ``source -> shuffle(seed) -> repeat -> decode -> random crop ->
flip -> warp -> colour jitter -> tokenize -> shard by process -> batch``.
Evaluation: ``source -> shard -> decode -> crop -> warp -> tokenize ->
batch`` (one pass, last batch padded with ``valid = 0`` examples).

Each process reads its own shard (``jax.process_index()``) and yields the
process-local part of the global batch. In training the shard comes after
the maps, which are lazy (a process only decodes its own examples), so
Grain seeds each example's augmentation by its index in the global stream:
the examples of a global batch do not depend on the number of processes.
"""

import dataclasses
import io
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep.categories import Category
from kpseq_jax import transforms
from kpseq_jax import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline and evaluation need to know about a data set."""

  categories: dict[int, Category]
  split_sizes: dict[str, int]

  def category_index(self) -> dict[int, int]:
    """category id -> index (position among the ids in increasing order),
    the ``vocab.category(index)`` of category conditioning."""
    return {cid: i for i, cid in enumerate(sorted(self.categories))}

  def flip_permutations(self) -> dict[int, np.ndarray]:
    """category id -> int32 [K] flip permutation, for flippable categories."""
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
        f'No data set at --config.dataset_dir={dataset_dir!r} ({e}). Build it '
        'with `python -m data_prep.build` (see README).') from e


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
  return DatasetInfo(categories=cats, split_sizes=sizes)


def data_source(dataset_dir: str, split: str):
  """Random-access source of records; images stay encoded bytes.

  Raises:
    FileNotFoundError: if the data set is missing.
    KeyError: if ``split`` is not one of its splits.
  """
  b = _builder(dataset_dir)
  if split not in b.info.splits:
    raise KeyError(f'{dataset_dir} has no split {split!r}; it has '
                   f'{sorted(b.info.splits)}.')
  return b.as_data_source(
      split=split, decoders={'image': tfds.decode.SkipDecoding()})


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


def _geometry(config: ml_collections.ConfigDict, info: DatasetInfo,
              train: bool) -> list[grain.transforms.Map]:
  """The crop/augment/tokenize chain for training or evaluation."""
  s = config.image_size_px
  vocab = vocab_lib.Vocab(
      config.num_bins,
      config.max_num_categories if config.category_conditioning else 0)
  if train:
    chain = [
        DecodeImage(),
        transforms.RandomCropAffine(
            s, config.bbox_scale, tuple(config.scale_range),
            config.shift_frac, config.rotation_deg),
        transforms.RandomFlip(s, info.flip_permutations(), config.flip_prob),
        transforms.WarpToCrop(s),
    ]
    if config.color_jitter > 0:
      chain.append(transforms.ColorJitter(config.color_jitter))
  else:
    chain = [DecodeImage(), transforms.CropAffine(s, config.bbox_scale),
             transforms.WarpToCrop(s)]
  chain.append(transforms.Tokenize(
      vocab, config.max_num_keypoints,
      info.category_index() if config.category_conditioning else None))
  return chain


def local_batch_size(global_batch_size: int) -> int:
  """Per-process batch size.

  Raises:
    ValueError: if the global batch does not split evenly over processes.
  """
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'batch size {global_batch_size} is not divisible by '
                     f'the number of processes {n}.')
  return global_batch_size // n


def create_train_dataset(config: ml_collections.ConfigDict,
                         info: DatasetInfo) -> grain.IterDataset:
  """Infinite, shuffled, augmented, batched training data (process-local).

  Elements are dicts of numpy arrays with a leading local batch dimension,
  see `transforms.Tokenize` for the fields. Iterators of the result are
  checkpointable (``get_state``/``set_state``) for exact resume.
  """
  source = data_source(config.dataset_dir, config.train_split)
  ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
  for t in _geometry(config, info, train=True):
    ds = ds.random_map(t) if isinstance(
        t, grain.transforms.RandomMap) else ds.map(t)
  # Sharded after the (lazy) maps, so an example's augmentation is seeded by
  # its global index: any process count sees the same examples.
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  it_ds = ds.to_iter_dataset()
  if config.worker_count > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.worker_count))
  return it_ds


def create_eval_batches(config: ml_collections.ConfigDict, info: DatasetInfo,
                        split: str | None = None) -> Iterator[dict]:
  """One pass over an eval split in process-local batches.

  Every process yields the same number of batches (collectives need it):
  ``ceil(ceil(N / processes) / b)`` for N examples and local batch b. Short
  batches are padded by repeating an example with ``valid = 0``.

  Yields:
    dicts of numpy arrays with leading dim ``eval_batch_size / processes``
    and a float32 ``valid`` [b] mask.
  """
  source = data_source(config.dataset_dir, split or config.eval_split)
  ds = grain.MapDataset.source(source)
  if config.num_eval_examples > 0:
    ds = ds[:config.num_eval_examples]
  for t in _geometry(config, info, train=False):
    ds = ds.map(t)
  n, procs = len(ds), jax.process_count()
  b = local_batch_size(config.eval_batch_size)
  num_batches = -(-(-(-n // procs)) // b)  # ceil(ceil(n / procs) / b)
  local = ds[jax.process_index()::procs]
  filler = None
  examples = iter(local.to_iter_dataset())
  for _ in range(num_batches):
    buf = []
    for ex in examples:
      ex['valid'] = np.float32(1.0)
      buf.append(ex)
      if len(buf) == b:
        break
    if filler is None:  # Any example serves as padding (shapes only).
      filler = dict(buf[0] if buf else ds[0], valid=np.float32(0.0))
    yield _stack(buf + [filler] * (b - len(buf)))


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def mean_pose(config: ml_collections.ConfigDict,
              info: DatasetInfo) -> dict[int, np.ndarray]:
  """Mean normalised keypoint positions per category in the training crops.

  Each training instance is cropped deterministically (no augmentation) and
  its labelled keypoints averaged per (category, keypoint). This is the
  floor every reported PCK is compared with.

  Returns:
    category id -> float32 [K, 2], normalised [0, 1] crop coordinates (the
    crop centre 0.5 where a keypoint is never labelled).
  """
  source = data_source(config.dataset_dir, config.train_split)
  sums: dict[int, np.ndarray] = {}
  counts: dict[int, np.ndarray] = {}
  for i in range(len(source)):
    r = source[i]
    cid = int(r['category_id'])
    kps = np.asarray(r['keypoints'], np.float64)
    m = transforms.crop_matrix(r['bbox'], 1, config.bbox_scale)
    xy = transforms.apply_affine(m, kps[:, :2])
    lab = (kps[:, 2] > 0)[:, None]
    sums[cid] = sums.get(cid, 0) + np.where(lab, xy, 0)
    counts[cid] = counts.get(cid, 0) + lab
  return {c: np.where(counts[c] > 0, sums[c] / np.maximum(counts[c], 1),
                      0.5).astype(np.float32) for c in sums}
