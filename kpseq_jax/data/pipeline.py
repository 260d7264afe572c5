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

from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import transforms
from kpseq_jax.sequence import vocab as vocab_lib


def _geometry(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
              train: bool) -> list[grain.transforms.Map]:
  """The crop/augment/tokenize chain for training or evaluation."""
  s = config.image_size_px
  vocab = vocab_lib.from_config(config)
  if train:
    chain = [
        transforms.DecodeImage(),
        transforms.RandomCropAffine(
            s, config.bbox_scale, tuple(config.scale_range),
            config.shift_frac, config.rotation_deg),
        transforms.RandomFlip(s, info.flip_permutations(), config.flip_prob),
        transforms.WarpToCrop(s),
    ]
    if config.color_jitter > 0:
      chain.append(transforms.ColorJitter(config.color_jitter))
  else:
    chain = [transforms.DecodeImage(), transforms.CropAffine(s, config.bbox_scale),
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
                         info: dataset.DatasetInfo) -> grain.IterDataset:
  """Infinite, shuffled, augmented, batched training data (process-local).

  Elements are dicts of numpy arrays with a leading local batch dimension,
  see `transforms.Tokenize` for the fields. Iterators of the result are
  checkpointable (``get_state``/``set_state``) for exact resume.
  """
  source = dataset.data_source(config.dataset_dir, config.train_split)
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


def create_eval_batches(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
                        split: str | None = None) -> Iterator[dict]:
  """One pass over an eval split in process-local batches.

  Every process yields the same number of batches (collectives need it):
  ``ceil(ceil(N / processes) / b)`` for N examples and local batch b. Short
  batches are padded by repeating an example with ``valid = 0``.

  Yields:
    dicts of numpy arrays with leading dim ``eval_batch_size / processes``
    and a float32 ``valid`` [b] mask.
  """
  source = dataset.data_source(config.dataset_dir, split or config.eval_split)
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
