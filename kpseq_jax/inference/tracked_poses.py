"""Every animal's pose of each video frame, linked into identities
(``--mode analyze --max_animals N``).

`TrackedPoses.add` takes one frame's poses (one per detected box, in the
detector's order) and gives them to a `tracking.PoseTracker` with
``max_animals=N``; the poses are stored by identity: slot n of a frame is
track n (``track_<n>``), so the arrays are the layout of
`multi_animal_output` (``write_slp``, ``dlc_tracks_table``) with
``track_ids[f, n]`` = n where track n was seen in frame f, else -1.
"""

import collections

import numpy as np

from kpseq_jax.inference import tracking


def track_name(track_id: int) -> str:
  """``track_<id>``: SLEAP's name for an identity its tracker made."""
  return f'track_{track_id}'


class TrackedPoses:
  """The tracked poses of one video, frame by frame in order.

  Args:
    max_animals: at most this many identities (`tracking.PoseTracker`).
    num_keypoints: K.
    **tracker_args: further `tracking.PoseTracker` arguments.
  """

  def __init__(self, max_animals: int, num_keypoints: int, **tracker_args):
    self.max_animals = max_animals
    self.num_keypoints = num_keypoints
    self.tracker = tracking.PoseTracker(max_animals=max_animals,
                                        **tracker_args)
    self._rows: list[tuple[np.ndarray, ...]] = []
    self.frame_indices: list[int] = []
    self.animals_per_frame: collections.Counter = collections.Counter()

  def add(self, frame: int, keypoints_px: np.ndarray,
          likelihood: np.ndarray, box_scores: list[float] | None) -> np.ndarray:
    """Tracks frame ``frame``'s poses.

    Args:
      frame: the video frame index (increasing between calls).
      keypoints_px: float [N_f, K, 2] pixels, one pose per box, NaN = not
        generated.
      likelihood: float [N_f, K] in [0, 1] (`analyze.likelihood_of`).
      box_scores: float [N_f] the boxes' detector scores, the instance
        scores (and the tracker's ranking); None: the frame had no
        detection (its whole-frame pose is no animal and is dropped).

    Returns:
      int32 [N_f] the track id of each pose (-1: left out by the tracker).
    """
    k, n = self.num_keypoints, self.max_animals
    kp = np.asarray(keypoints_px, np.float64).reshape(-1, k, 2)
    lk = np.asarray(likelihood, np.float64).reshape(-1, k)
    if box_scores is None:
      kp, lk, box_scores = kp[:0], lk[:0], []
    scores = np.asarray(box_scores, np.float64).reshape(len(kp))
    ids = self.tracker.update(frame, kp, scores)
    row = (np.full((n, k, 2), np.nan), np.full((n, k), np.nan),
           np.zeros(n), np.full(n, -1, np.int32))
    for i, t in enumerate(ids):
      if t >= 0:
        row[0][t], row[1][t], row[2][t], row[3][t] = kp[i], lk[i], scores[i], t
    self._rows.append(row)
    self.frame_indices.append(int(frame))
    self.animals_per_frame[int(np.sum(ids >= 0))] += 1
    return ids

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keypoints_px float [F, N, K, 2], point_scores float [F, N, K],
    instance_scores float [F, N], track_ids int32 [F, N]) over the frames
    added, N = ``max_animals`` (`multi_animal_output`'s layout)."""
    n, k = self.max_animals, self.num_keypoints
    if not self._rows:
      return (np.zeros((0, n, k, 2)), np.zeros((0, n, k)), np.zeros((0, n)),
              np.zeros((0, n), np.int32))
    return tuple(np.stack(a) for a in zip(*self._rows))

  def track_names(self) -> list[str]:
    """``track_0`` .. ``track_<N-1>``: every identity the tracker may make
    (DeepLabCut's table has a column group per individual, seen or not)."""
    return [track_name(t) for t in range(self.max_animals)]
