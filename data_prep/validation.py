"""A validation split held out of the training frames, at build time.

Settings (the checkpoint, the confidence calibration) are chosen on
validation frames, never on the test frames, which are only reported
(issue 36). `carve` moves a seeded share of the ``train`` split's frames
(images, with all their annotations) into a new ``val`` split:

* ``round(fraction * n)`` frames, at least `MIN_FRAMES` (a handful: fewer
  gives no usable validation error);
* a ``train`` split of fewer than `MIN_TRAIN_FRAMES` frames keeps all of
  them: no ``val`` split, and the result says so (training then falls
  back, docs/uncertainty.md);
* data sets that already have a ``val`` split keep theirs (e.g. SLEAP's
  ``--slp_split train=0:0.8,val=0.8:1``);
* the ``test`` split is never touched: a DeepLabCut project's test frames
  stay those of its TrainingFraction.

Frames are drawn by ``numpy.random.default_rng(seed).permutation`` of the
sorted image ids, so the same files and seed give the same split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

DEFAULT_FRACTION = 0.1
MIN_FRAMES = 5
# Below this, taking MIN_FRAMES would remove a quarter or more of training.
MIN_TRAIN_FRAMES = 20
SOURCE_SPLIT = 'train'
SPLIT = 'val'


@dataclasses.dataclass(frozen=True)
class Carve:
  """What `carve` did (stored as the data set's ``validation`` metadata).

  Attributes:
    status: 'carved' (``val`` taken from ``train``), 'given' (the input
      already had a ``val`` split), 'too_few' (``train`` too small: no
      ``val``), 'off' (fraction 0) or 'no_train' (no ``train`` split).
    fraction: the requested share of training frames.
    seed: the permutation's seed.
    num_frames: frames (images) in ``val``; 0 without one.
    num_train_frames_before: frames of ``train`` before carving.
    image_ids: the ``val`` frames' image ids, sorted ('carved' only).
    message: one sentence for the log.
  """
  status: str
  fraction: float
  seed: int
  num_frames: int
  num_train_frames_before: int
  image_ids: list[int]
  message: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def num_val_frames(num_train_frames: int, fraction: float) -> int:
  """Frames to hold out of ``num_train_frames`` at ``fraction``: 0 when
  ``fraction`` is 0 or there are fewer than `MIN_TRAIN_FRAMES`, else
  max(`MIN_FRAMES`, round(fraction * n))."""
  if fraction <= 0 or num_train_frames < MIN_TRAIN_FRAMES:
    return 0
  return max(MIN_FRAMES, int(round(fraction * num_train_frames)))


def carve(coco_data: Mapping[str, dict[str, Any]], fraction: float = DEFAULT_FRACTION,
          seed: int = 0) -> tuple[dict[str, dict[str, Any]], Carve]:
  """Moves a seeded share of ``train``'s frames into ``val`` (module docstring).

  Args:
    coco_data: split name -> COCO keypoint dict (``images``,
      ``annotations``, ``categories``, ...). Not modified.
    fraction: share of training frames, in [0, 0.5].
    seed: the permutation's seed.

  Returns:
    (split name -> COCO dict, with ``val`` after ``train`` when carved;
    the `Carve` record).

  Raises:
    ValueError: ``fraction`` outside [0, 0.5] (more would leave a
      training split smaller than the validation one).
  """
  if not 0 <= fraction <= 0.5:
    raise ValueError(f'--val_fraction {fraction}: must be in [0, 0.5] '
                     '(a share of the training frames).')
  out = dict(coco_data)
  record = lambda status, n, before, ids, msg: (out, Carve(
      status, float(fraction), int(seed), n, before, ids, msg))
  if SPLIT in coco_data:
    n = len(coco_data[SPLIT].get('images', []))
    return record('given', n, 0, [], f'validation split {SPLIT!r} given '
                  f'({n} frames); nothing taken from {SOURCE_SPLIT!r}.')
  if SOURCE_SPLIT not in coco_data:
    return record('no_train', 0, 0, [], f'no {SOURCE_SPLIT!r} split: no '
                  'validation split.')
  train = coco_data[SOURCE_SPLIT]
  ids = sorted(set(_image_id(im) for im in _entries(train, 'images')) - {None})
  if fraction <= 0:
    return record('off', 0, len(ids), [], 'validation split off '
                  '(--val_fraction 0): settings are chosen without one.')
  n = num_val_frames(len(ids), fraction)
  if n == 0:
    return record('too_few', 0, len(ids), [], (
        f'{SOURCE_SPLIT!r} has {len(ids)} frames, fewer than '
        f'{MIN_TRAIN_FRAMES}: no validation split; training will evaluate '
        'the last checkpoint and leave the likelihood uncalibrated.'))
  chosen = set(np.random.default_rng(seed).permutation(ids)[:n].tolist())
  # Entries without a usable id stay in train, where the build reports them.
  part = lambda keep: dict(
      train,
      images=[im for im in _entries(train, 'images')
              if (_image_id(im) in chosen) == keep],
      annotations=[a for a in _entries(train, 'annotations')
                   if (_image_id(a, 'image_id') in chosen) == keep])
  split_order = {}
  for name, data in coco_data.items():
    split_order[name] = part(False) if name == SOURCE_SPLIT else data
    if name == SOURCE_SPLIT:
      split_order[SPLIT] = part(True)
  return split_order, Carve(
      'carved', float(fraction), int(seed), n, len(ids), sorted(chosen),
      f'validation split {SPLIT!r}: {n} of {len(ids)} {SOURCE_SPLIT!r} frames '
      f'(fraction {fraction}, seed {seed}); {len(ids) - n} left to train on.')


def _entries(data: Any, key: str) -> list:
  """``data[key]`` if it is a list, else [] (the build reports the bad file)."""
  value = data.get(key) if isinstance(data, dict) else None
  return value if isinstance(value, list) else []


def _image_id(entry: Any, key: str = 'id') -> int | None:
  """An entry's integer image id, None if it has none."""
  value = entry.get(key) if isinstance(entry, dict) else None
  return value if isinstance(value, int) and not isinstance(value, bool) else None
