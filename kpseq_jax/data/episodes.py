"""Episodes for category-agnostic pose (CAPE): a query and S supports.

An episode is S support instances and one query instance of the same
category; the model must find the query's keypoints in the supports'
order (`kpseq_jax.models.model.SupportSet`). Training episodes are drawn as
CapeFormer's ``random_paired_samples``
(``capeformer/datasets/datasets/mp100/transformer_dataset.py``): class
balanced, every training category gets as many episodes per epoch as the
largest category has instances, each ``random.sample(num_shots + 1)`` of
its instances (the first S the supports, the last the query), re-drawn
every epoch. Here the draw of slot j in epoch e is seeded by Grain with the
element's global index, so a resumed run draws exactly what an
uninterrupted one would. Evaluation episodes come as a fixed list
(`data_prep.episodes`).

Transforms, one job each, after `LoadEpisode` turns record indices into
records: `EachInstance` runs the single-instance chain (decode, crop,
augment, warp; `transforms.py`) on the query and on every support;
`TokenizeEpisode` permutes and subsamples the keypoints identically in
query and supports (CapeFormer's ``support_order_dropout`` is the
precedent: the model cannot learn a category's keypoint order, only to
follow the support), masks out of the loss what a support does not see,
and builds the query's token sequence.
"""

import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np

from data_prep.episodes import EpisodePool
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

Episode = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainEpisodes:
  """The class-balanced training episode slots of one epoch.

  Attributes:
    category_ids: categories that can make an episode (at least
      ``num_shots + 1`` instances), in pool order.
    records: category id -> record indices of its instances.
    slots_per_category: episodes per category and epoch: the largest
      category's instance count.
    num_shots: S.
    skipped: category id -> instance count of the categories with too few
      instances for one episode (never drawn).
  """
  category_ids: tuple[int, ...]
  records: dict[int, tuple[int, ...]]
  slots_per_category: int
  num_shots: int
  skipped: dict[int, int]

  def __len__(self) -> int:
    """Episodes per epoch."""
    return len(self.category_ids) * self.slots_per_category

  @classmethod
  def from_pool(cls, pool: EpisodePool, index: dict[int, int],
                num_shots: int) -> 'TrainEpisodes':
    """The slots of ``pool``'s instances that are records of the split.

    Args:
      pool: the training split's `EpisodePool`.
      index: annotation id -> record index (`dataset.annotation_index`);
        pool instances without a record (skipped by data_prep) are left out.
      num_shots: S.

    Raises:
      ValueError: if no category has ``num_shots + 1`` instances.
    """
    records = {c: tuple(index[a] for a in pool.annotation_ids[c] if a in index)
               for c in pool.category_ids}
    usable = tuple(c for c in pool.category_ids
                   if len(records[c]) >= num_shots + 1)
    skipped = {c: len(records[c]) for c in pool.category_ids
               if c not in usable and records[c]}
    if not usable:
      raise ValueError(f'no category has {num_shots + 1} instances '
                       f'(num_shots + 1) for a training episode: {skipped}')
    return cls(category_ids=usable,
               records={c: records[c] for c in usable},
               slots_per_category=max(len(records[c]) for c in usable),
               num_shots=num_shots, skipped=skipped)


@dataclasses.dataclass(frozen=True)
class DrawEpisode(grain.transforms.RandomMap):
  """Slot index -> record indices of one training episode.

  Slot j belongs to category ``j // slots_per_category``; its S + 1
  distinct instances are drawn with the element's rng (the first S are the
  supports, the last the query, as ``random.sample(num_shots + 1)``).
  """
  episodes: TrainEpisodes

  def random_map(self, slot: int, rng: np.random.Generator) -> Episode:
    e = self.episodes
    records = e.records[e.category_ids[int(slot) // e.slots_per_category]]
    pick = rng.choice(len(records), e.num_shots + 1, replace=False)
    return {'supports': [records[i] for i in pick[:-1]],
            'query': records[pick[-1]]}


@dataclasses.dataclass(frozen=True)
class LoadEpisode(grain.transforms.Map):
  """Record indices -> records (images still encoded).

  Attributes:
    query_source: random-access records of the query's split.
    support_source: the supports' split (the same source for MP-100's
      protocol; the training split for lab data evaluated on held-out
      frames).
  """
  query_source: Any
  support_source: Any

  def map(self, e: Episode) -> Episode:
    return {'query': dict(self.query_source[int(e['query'])]),
            'supports': [dict(self.support_source[int(i)])
                         for i in e['supports']]}


@dataclasses.dataclass(frozen=True)
class EachInstance(grain.transforms.RandomMap):
  """Runs a single-instance transform chain on the query and each support.

  Random transforms draw from the episode's rng one instance after the
  other, so every instance gets its own augmentation.
  """
  chain: tuple[Any, ...]

  def _run(self, ex: dict, rng: np.random.Generator) -> dict:
    for t in self.chain:
      ex = (t.random_map(ex, rng) if isinstance(t, grain.transforms.RandomMap)
            else t.map(ex))
    return ex

  def random_map(self, e: Episode, rng: np.random.Generator) -> Episode:
    return {'query': self._run(e['query'], rng),
            'supports': [self._run(s, rng) for s in e['supports']]}


def keypoint_order(num_keypoints: int, rng: np.random.Generator,
                   permute: bool, min_keep_frac: float) -> np.ndarray:
  """Which keypoints an episode asks for, in which order.

  Args:
    num_keypoints: K of the category.
    rng: the episode's generator.
    permute: shuffle the order (else the category's order).
    min_keep_frac: keep a uniform number of keypoints in
      ``[max(1, ceil(min_keep_frac * K)), K]`` (1.0: all).

  Returns:
    int64 [K'] original keypoint indices, group g asks for keypoint
    ``order[g]``.
  """
  order = rng.permutation(num_keypoints) if permute else np.arange(
      num_keypoints)
  if min_keep_frac < 1.0:
    low = max(1, math.ceil(min_keep_frac * num_keypoints))
    order = order[:rng.integers(low, num_keypoints + 1)]
  return order


@dataclasses.dataclass(frozen=True)
class TokenizeEpisode(grain.transforms.RandomMap):
  """Query sequence and support arrays of a cropped episode.

  The keypoints are reordered (and subsampled) by `keypoint_order`, the
  same for query and supports. A keypoint counts in the loss only if it is
  visible in the query and in every support (CapeFormer's training mask);
  the query's ``keypoints`` (pixels, for the metric) keep v > 0 only where
  the query and every support are labelled (the mask of
  ``TestBaseDataset._report_metric``).

  Output fields (Kmax = ``max_num_keypoints``, S = shots, s = crop side):
    the `grammar.build_sequence` fields of the query; ``image`` uint8
    [s, s, 3]; ``support_image`` uint8 [S, s, s, 3]; ``support_keypoints``
    float32 [S, Kmax, 2] normalised crop (x, y); ``support_visible``
    float32 [S, Kmax] (labelled and inside the support crop);
    ``num_keypoints`` int32 (K'); ``query_keypoints`` float32 [Kmax, 2]
    normalised query-crop (x, y) per group and ``query_keypoint_weights``
    float32 [Kmax] (1 where the loss counts the keypoint), the targets of
    the support proposals; ``keypoint_order`` int32 [Kmax] (the
    category's index of each group, -1 padding); ``keypoints`` float32
    [Kmax, 3] query pixels, reordered, v masked as above; ``bbox``,
    ``crop_from_image``, ``category_id``, ``image_id``, ``annotation_id``
    of the query and ``support_annotation_ids`` int32 [S].

  Attributes:
    vocab: token layout (no category tokens: nothing tells the model the
      category).
    max_num_keypoints: Kmax.
    permute: shuffle the keypoint order per episode.
    min_keep_frac: subsample keypoints (see `keypoint_order`; 1.0 keeps
      all).

  Raises:
    ValueError: naming the query annotation if the vocabulary has category
      tokens or the category has more than Kmax keypoints.
  """
  vocab: vocab_lib.Vocab
  max_num_keypoints: int
  permute: bool = False
  min_keep_frac: float = 1.0

  def random_map(self, e: Episode, rng: np.random.Generator) -> dict:
    q, sups = e['query'], e['supports']
    k, kmax = q['keypoints'].shape[0], self.max_num_keypoints
    if k > kmax or self.vocab.num_prefix_tokens:
      raise ValueError(
          f"annotation {q['annotation_id']}: {k} keypoints (max_num_keypoints"
          f'={kmax}) and {self.vocab.num_categories} category tokens: a CAPE '
          'episode needs K <= max_num_keypoints and no category tokens.')
    order = keypoint_order(k, rng, self.permute, self.min_keep_frac)
    n = len(order)
    crop = np.stack([s['keypoints_crop'][order] for s in sups])  # [S, n, 3]
    visible = crop[..., 2] > 0  # Labelled and inside the support crop.
    labelled = np.stack([s['keypoints'][order, 2] > 0 for s in sups])
    query = q['keypoints_crop'][order].copy()  # [n, 3]
    query[:, 2] *= visible.all(axis=0)  # Loss only where every support sees.
    out = grammar.build_sequence(_pad(query, kmax), n, self.vocab, kmax)
    truth = q['keypoints'][order].copy()  # [n, 3] pixels.
    truth[:, 2] *= labelled.all(axis=0)  # The reference's metric mask.
    support_xy = np.zeros([len(sups), kmax, 2], np.float32)
    support_xy[:, :n] = crop[..., :2]
    support_visible = np.zeros([len(sups), kmax], np.float32)
    support_visible[:, :n] = visible
    out.update(
        image=q['image'],
        support_image=np.stack([s['image'] for s in sups]),
        support_keypoints=support_xy,
        support_visible=support_visible,
        num_keypoints=np.int32(n),
        query_keypoints=_pad(query[:, :2], kmax),
        query_keypoint_weights=_pad((query[:, 2:] > 0).astype(np.float32),
                                    kmax)[:, 0],
        keypoint_order=np.pad(order, (0, kmax - n),
                              constant_values=-1).astype(np.int32),
        keypoints=_pad(truth, kmax),
        bbox=np.asarray(q['bbox'], np.float32),
        crop_from_image=q['crop_from_image'],
        category_id=np.int32(q['category_id']),
        image_id=np.int32(q['image_id']),
        annotation_id=np.int32(q['annotation_id']),
        support_annotation_ids=np.array(
            [s['annotation_id'] for s in sups], np.int32))
    return out


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  """float32 [n, C] zero-padded to [rows, C]."""
  out = np.zeros([rows, a.shape[1]], np.float32)
  out[:len(a)] = a
  return out


def check_samples(samples: Sequence[tuple[int, ...]],
                  query_index: dict[int, int],
                  support_index: dict[int, int]
                  ) -> tuple[list[tuple[int, ...]], list[str]]:
  """Keeps the episodes whose instances all are records of their splits.

  Args:
    samples: (support ids..., query id) annotation ids.
    query_index: annotation id -> record of the query split.
    support_index: the same for the support split.

  Returns:
    (record-index tuples (support records..., query record) of the usable
    samples, descriptions of the skipped ones naming the annotation).
  """
  kept, skipped = [], []
  for sample in samples:
    *supports, query = sample
    missing = [a for a in supports if a not in support_index] + (
        [query] if query not in query_index else [])
    if missing:
      skipped.append(f'episode {list(sample)}: annotations {missing} have no '
                     'record (data_prep skipped them)')
      continue
    kept.append(tuple(support_index[a] for a in supports) +
                (query_index[query],))
  return kept, skipped
