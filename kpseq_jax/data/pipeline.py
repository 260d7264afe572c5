"""Grain input pipeline over the ArrayRecord data set written by `data_prep`.

Training: ``source -> shuffle(seed) -> repeat -> decode -> random crop ->
flip -> warp -> colour jitter -> tokenize -> shard by process -> batch``.
Evaluation: ``source -> shard -> decode -> crop -> warp -> tokenize ->
batch`` (one pass, last batch padded with ``valid = 0`` examples).
Category-agnostic pose (``model_name='cape'``, `episodes.py`): the elements
are episodes (S supports and a query of one category), drawn class-balanced
in training and from a fixed list in evaluation; every instance of an
episode goes through the same per-instance chain, then
`episodes.TokenizeEpisode`.

Each process reads its own shard (``jax.process_index()``) and yields the
process-local part of the global batch. In training the shard comes after
the maps, which are lazy (a process only decodes its own examples), so
Grain seeds each example's augmentation by its index in the global stream:
the examples of a global batch do not depend on the number of processes.

Prefetching (`read_options`): Grain's default for ``to_iter_dataset`` is 16
threads and 500 elements ahead, i.e. 500 *batches* for the batched training
stream (393 MB of 128 px uint8 crops at batch 16, 786 MB of 512 px ones at
batch 2), prepared at start-up beside the first compilation and steps and
thrown away at the end. Iterators here prefetch
``config.input.prefetch_batches`` batches on ``config.input.data_threads``
threads instead (flax's ImageNet example and big_vision keep 2 batches
ahead); that only bounds how far ahead the
pipeline runs, so the elements and the checkpointed iterator state are the
same.
"""

import dataclasses
import os
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import episodes as episodes_lib
from kpseq_jax.data import transforms
from kpseq_jax.sequence import vocab as vocab_lib


def _instance_chain(config: ml_collections.ConfigDict,
                    info: dataset.DatasetInfo,
                    train: bool) -> list[grain.transforms.Map]:
  """Decode, top-down crop (random in training), flip, warp, jitter: the
  per-instance transforms before tokenisation. With
  ``model_name='end_to_end'`` the warp puts the whole image on the
  canvas and the crop becomes ``memory_from_crop`` (`WarpToCanvas`)."""
  s = config.input.image_size_px
  warp = (transforms.WarpToCanvas(s, tuple(config.detector.image_size_px))
          if config.model_name == 'end_to_end'
          else transforms.WarpToCrop(s))
  if not train:
    return [transforms.DecodeImage(),
            transforms.CropAffine(s, config.input.bbox_scale), warp]
  chain = [
      transforms.DecodeImage(),
      transforms.RandomCropAffine(
          s, config.input.bbox_scale, tuple(config.input.scale_range),
          config.input.shift_frac, config.input.rotation_deg),
      transforms.RandomFlip(s, info.flip_permutations(),
                            config.input.flip_prob),
      warp,
  ]
  if config.input.color_jitter > 0:
    chain.append(transforms.ColorJitter(config.input.color_jitter))
  return chain


def apply_transforms(ds: grain.MapDataset, chain) -> grain.MapDataset:
  """``ds`` mapped by each transform of ``chain`` in turn (``random_map``
  for `grain.transforms.RandomMap`s, seeded by the dataset's seed)."""
  for t in chain:
    ds = ds.random_map(t) if isinstance(
        t, grain.transforms.RandomMap) else ds.map(t)
  return ds


def _tokenize(config: ml_collections.ConfigDict,
              info: dataset.DatasetInfo) -> transforms.Tokenize:
  return transforms.Tokenize(
      vocab_lib.from_config(config), config.max_num_keypoints,
      info.category_index() if config.vocab.category_conditioning else None,
      unlabelled_absent=info.unlabelled_means == 'absent')


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

  Elements are dicts of numpy arrays with a leading local batch dimension:
  instances (`transforms.Tokenize` fields) or, with ``model_name='cape'``,
  episodes (`episodes.TokenizeEpisode` fields). Iterators of the result
  are checkpointable (``get_state``/``set_state``) for exact resume.
  """
  source = dataset.data_source(config.input.dataset_dir,
                               config.input.train_split)
  if config.model_name == 'cape':
    ds = _train_episodes(config, info, source)
  else:
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    ds = apply_transforms(ds, _instance_chain(config, info, train=True) +
                [_tokenize(config, info)])
  return shard_and_batch(config, ds)


def read_options(config: ml_collections.ConfigDict,
                 elements: int) -> grain.ReadOptions:
  """Grain's threads and prefetch buffer for this config's iterators.

  Args:
    config: ``data_threads`` (0: the machine's CPU count, at most Grain's
      default 16).
    elements: how many elements (batches in training, examples in
      evaluation) to keep ready ahead of the consumer; >= 1.
  """
  threads = config.input.data_threads or min(16, os.cpu_count() or 1)
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(1, elements))


def eval_read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  """`read_options` of the evaluation iterators: ``prefetch_batches``
  local eval batches of examples ahead."""
  return read_options(config, config.input.prefetch_batches *
                      local_batch_size(config.evals.batch_size))


def shard_and_batch(config: ml_collections.ConfigDict,
                    ds: grain.MapDataset) -> grain.IterDataset:
  """This process's share of an endless, mapped training dataset, in
  local batches of ``batch_size / processes`` (``worker_count`` Grain
  worker processes prefetch them when > 0)."""
  # Sharded after the (lazy) maps, so an example's augmentation is seeded by
  # its global index: any process count sees the same examples.
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(local_batch_size(config.input.batch_size), drop_remainder=True)
  it_ds = ds.to_iter_dataset(
      read_options(config, config.input.prefetch_batches))
  if config.input.worker_count > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.input.worker_count))
  return it_ds


def _train_episodes(config: ml_collections.ConfigDict,
                    info: dataset.DatasetInfo, source) -> grain.MapDataset:
  """Endless class-balanced training episodes (`episodes.TrainEpisodes`),
  shuffled per epoch, augmented per instance, tokenised."""
  eps = episodes_lib.TrainEpisodes.from_pool(
      info.episode_pools[config.input.train_split],
      dataset.annotation_index(source), config.cape.num_shots)
  ds = grain.MapDataset.range(len(eps)).seed(config.seed).shuffle().repeat()
  return apply_transforms(ds, [
      episodes_lib.DrawEpisode(eps),
      episodes_lib.LoadEpisode(source, source),
      episodes_lib.EachInstance(
          tuple(_instance_chain(config, info, train=True))),
      episodes_lib.TokenizeEpisode(
          vocab_lib.from_config(config), config.max_num_keypoints,
          permute=config.cape.permute_keypoints,
          min_keep_frac=config.cape.min_keep_frac)])


def create_eval_batches(config: ml_collections.ConfigDict,
                        info: dataset.DatasetInfo,
                        split: str | None = None) -> Iterator[dict]:
  """One pass over an eval split's instances in process-local batches.

  Yields:
    see `padded_batches`; `transforms.Tokenize` fields.
  """
  source = dataset.data_source(config.input.dataset_dir,
                               split or config.evals.split)
  ds = grain.MapDataset.source(source)
  if config.evals.num_examples > 0:
    ds = ds[:config.evals.num_examples]
  ds = apply_transforms(ds, _instance_chain(config, info, train=False) +
              [_tokenize(config, info)])
  yield from padded_batches(ds, config.evals.batch_size,
                            eval_read_options(config))


@dataclasses.dataclass(frozen=True)
class _AsEpisode(grain.transforms.Map):
  """(support records..., query record) -> `episodes.LoadEpisode` input."""

  def map(self, records):
    return {'supports': list(records[:-1]), 'query': records[-1]}


def create_episode_eval_batches(config: ml_collections.ConfigDict,
                                info: dataset.DatasetInfo,
                                samples: list[tuple[int, ...]],
                                split: str,
                                support_split: str) -> Iterator[dict]:
  """One pass over evaluation episodes in process-local batches.

  Args:
    config: the run's config (crop, ``cape.eval_permuted``: the keypoints
      of each episode in a random order, the same in supports and query,
      seeded by ``seed`` and the episode's position).
    info: the data set's info.
    samples: (support records..., query record) record indices
      (`episodes.check_samples`).
    split: the queries' split.
    support_split: the supports' split.

  Yields:
    see `padded_batches`; `episodes.TokenizeEpisode` fields.
  """
  query_source = dataset.data_source(config.input.dataset_dir, split)
  support_source = (
      query_source if support_split == split else
      dataset.data_source(config.input.dataset_dir, support_split))
  ds = grain.MapDataset.source(list(samples)).seed(config.seed)
  if config.evals.num_examples > 0:
    ds = ds[:config.evals.num_examples]
  ds = apply_transforms(ds, [
      _AsEpisode(),
      episodes_lib.LoadEpisode(query_source, support_source),
      episodes_lib.EachInstance(
          tuple(_instance_chain(config, info, train=False))),
      episodes_lib.TokenizeEpisode(
          vocab_lib.from_config(config), config.max_num_keypoints,
          permute=config.cape.eval_permuted)])
  yield from padded_batches(ds, config.evals.batch_size,
                            eval_read_options(config))


def padded_batches(ds: grain.MapDataset, global_batch_size: int,
                   options: grain.ReadOptions | None = None
                   ) -> Iterator[dict]:
  """This process's share of ``ds`` in fixed-size batches, one pass.

  Every process yields the same number of batches (collectives need it):
  ``ceil(ceil(N / processes) / b)`` for N examples and local batch b. Short
  batches are padded by repeating an example with ``valid = 0``.

  Args:
    ds: the examples.
    global_batch_size: examples per global batch.
    options: Grain's read options (`read_options`); None: Grain's default.

  Yields:
    dicts of numpy arrays with leading dim ``global_batch_size /
    processes`` and a float32 ``valid`` [b] mask.
  """
  n, procs = len(ds), jax.process_count()
  b = local_batch_size(global_batch_size)
  num_batches = -(-(-(-n // procs)) // b)  # ceil(ceil(n / procs) / b)
  local = ds[jax.process_index()::procs]
  filler = None
  examples = iter(local.to_iter_dataset(options))
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
