"""What is evaluated and against what: instances or CAPE episodes.

The keypoint evaluators (`evaluate.py`) score one decoding
(`common.decode`: decode a batch, map to pixels) of one of two protocols:

* `Instances` (``model_name`` not 'cape'): every instance of the split,
  PCK@0.2 by MP-100's protocol with data_prep's in-image box
  (`metrics.py`), the mean over categories of each category's mean; the
  baseline is the mean pose of the training crops (`baseline.py`).
* `Episodes` (``model_name='cape'``): query samples of CAPE episodes
  (`data_prep.episodes`), as CapeFormer's ``TestBaseDataset._report_metric``
  (``capeformer/datasets/datasets/mp100/test_base_dataset.py``): a keypoint
  counts only if labelled in the query and in every support; the
  normaliser is max(w, h) of the query's clean box in original pixels
  (`EpisodePool.clean_bbox`); a sample with no such keypoint scores 0; the
  split's figure is the mean over samples. The baseline is the support
  pose: each keypoint where the supports have it in their own crops.
"""

from typing import Iterator

from absl import logging
import ml_collections
import numpy as np

from data_prep import episodes as episodes_lib
from kpseq_jax.data import dataset
from kpseq_jax.data import episodes as data_episodes
from kpseq_jax.data import pipeline
from kpseq_jax.evaluation import baseline as baseline_lib

INSTANCE_PROTOCOL = (
    'MP-100 (POMNet _report_metric): per-instance PCK@0.2, threshold 0.2 x '
    'max(clean bbox w, h), mean per category, then over categories; see '
    'evaluation/metrics.py')
MEAN_POSE = 'mean pose of the training crops'
SUPPORT_POSE = 'support pose (the supports\' keypoints, at their crop places)'


class Instances:
  """Every instance of a split (``model_name`` not 'cape').

  Args:
    config: the run's config.
    info: the data set's info.
    split: the evaluated split.
  """
  description = INSTANCE_PROTOCOL
  baseline_name = MEAN_POSE
  mean_over_samples = False  # The figure is the mean over categories.

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo, split: str):
    self.config, self.info, self.split = config, info, split
    self.mean_pose = baseline_lib.mean_pose(config)  # Once per run.
    n = info.split_sizes[split]
    self.num_samples = (n if config.evals.num_examples <= 0 else
                        min(config.evals.num_examples, n))
    self.notes: list[str] = []

  def batches(self) -> Iterator[dict]:
    """Process-local eval batches (`pipeline.create_eval_batches`)."""
    return pipeline.create_eval_batches(self.config, self.info, self.split)

  def baseline(self, batch: dict) -> np.ndarray:
    """The mean pose of each instance's category, float32 [N, Kmax, 2]
    normalised crop (NaN for a category never seen in training)."""
    kmax = self.config.max_num_keypoints
    return np.stack([baseline_lib.padded(self.mean_pose.get(int(c)), kmax)
                     for c in batch['category_id']])

  def normaliser(self, batch: dict) -> None:
    """None: `metrics.bbox_size` of the records' in-image boxes."""
    del batch


class Episodes:
  """Query samples of CAPE episodes (``model_name='cape'``; module docstring).

  The episode list is drawn here, once per run, and checked against the
  records before anything is trained: a category with too few instances
  raises `data_prep.episodes.InsufficientInstancesError` naming it (or,
  with ``cape.skip_small_categories``, is skipped and reported), and an
  episode naming an annotation that has no record is skipped and reported.

  Args:
    config: the run's config (``cape.*``).
    info: the data set's info (its episode pools).
    split: the evaluated (query) split.

  Raises:
    KeyError: if a split has no episode pool (`config_checks` says why
      before this).
    data_prep.episodes.InsufficientInstancesError: see above.
  """
  baseline_name = SUPPORT_POSE
  mean_over_samples = True

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo, split: str):
    self.config, self.info, self.split = config, info, split
    self.support_split = config.cape.support_split or split
    pool = info.episode_pools[split]
    if self.support_split == split:
      drawn = episodes_lib.make_paired_samples(
          pool, config.cape.num_shots, config.cape.num_episodes,
          config.cape.num_queries, config.cape.skip_small_categories)
      how = (f'MP-100 protocol (CapeFormer make_paired_samples): '
             f'{config.cape.num_episodes} episodes x '
             f'{config.cape.num_queries} queries per category')
    else:
      drawn = episodes_lib.supports_for_each_query(
          pool, info.episode_pools[self.support_split], config.cape.num_shots,
          config.seed, config.cape.skip_small_categories)
      how = (f'every {split} instance a query once, supports from '
             f'{self.support_split}')
    self.samples = drawn.samples  # Annotation ids, for episodes_<split>.jsonl.
    self.notes = [f'category {c} skipped: {n} instances, an episode needs '
                  f'more' for c, n in drawn.skipped.items()]
    query_index = dataset.annotation_index(
        dataset.data_source(config.input.dataset_dir, split))
    support_index = query_index if self.support_split == split else (
        dataset.annotation_index(dataset.data_source(
            config.input.dataset_dir, self.support_split)))
    self.records, missing = data_episodes.check_samples(
        self.samples, query_index, support_index)
    self.notes += missing
    for note in self.notes:
      logging.warning('CAPE episodes of %s: %s', split, note)
    self.clean_size = {a: max(box[2], box[3])
                       for a, box in pool.clean_bbox.items()}
    n = len(self.records)
    self.num_samples = (n if config.evals.num_examples <= 0 else
                        min(config.evals.num_examples, n))
    shuffle = ', keypoints in a random order per episode' if (
        config.cape.eval_permuted) else ''
    self.description = (
        f'MP-100 CAPE, {config.cape.num_shots}-shot episodes ({how}{shuffle}); '
        'CapeFormer TestBaseDataset._report_metric: per query sample, the '
        'keypoints labelled in the query and every support, PCK@0.2 against '
        '0.2 x max(clean bbox w, h) of the query, 0 for a sample without '
        'such a keypoint; mean over samples')
    logging.info('CAPE episodes of %s: %d query samples (%s)', split, n, how)

  def batches(self) -> Iterator[dict]:
    """Process-local episode batches
    (`pipeline.create_episode_eval_batches`)."""
    return pipeline.create_episode_eval_batches(
        self.config, self.info, self.records, self.split, self.support_split)

  def baseline(self, batch: dict) -> np.ndarray:
    """Support pose: float32 [N, Kmax, 2] normalised crop, the mean over
    the shots that see each keypoint (NaN where none does)."""
    seen = batch['support_visible'][..., None] > 0  # [N, S, Kmax, 1]
    total = np.where(seen, batch['support_keypoints'], 0.0).sum(axis=1)
    count = seen.sum(axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(count > 0, total / count, np.nan).astype(np.float32)

  def normaliser(self, batch: dict) -> np.ndarray:
    """float64 [N] max(w, h) of each query's clean box (pixels)."""
    return np.array([self.clean_size[int(a)] for a in batch['annotation_id']],
                    np.float64)


def create(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
           split: str) -> Instances | Episodes:
  """The protocol of ``config.model_name`` for ``split``."""
  return (Episodes if config.model_name == 'cape' else Instances)(
      config, info, split)
