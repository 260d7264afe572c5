"""Linking per-frame poses into tracks with identities.

Each frame brings N instances x K keypoints (pixels, NaN = missing) and an
instance score. Each track predicts its pose in the new frame with a
constant-velocity motion model (the mean keypoint velocity over its last
``velocity_frames + 1`` observations applied to its last pose; a missing
keypoint moves with the observed ones); the cost of giving a
detection to a track is the mean distance over the keypoints present in
both, divided by the track's size (the diagonal of its pose's box): a
scale-free pose distance. Detections and tracks are
paired by `scipy.optimize.linear_sum_assignment`, and a pair counts only if
its cost is <= ``max_cost``.

``max_animals`` (SLEAP's ``--tracking.max_tracks``, DeepLabCut's
``n_tracks``): at most that many tracks exist; at most that many
detections of a frame are kept (the best scored); once all tracks exist, a
detection left unpaired by the gate goes to a track not paired in this
frame (the closest by centroid to its predicted position) instead of
starting a new track. Without it, an unpaired detection starts a new track
and a track unseen for more than ``max_lost_frames`` frames ends.
"""

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

# Defaults: a pose may differ from its prediction by up to its own size
# (measured with tools/tracker_compare.py, docs/multi_animal.md "Tracking").
MAX_COST = 1.0
VELOCITY_FRAMES = 3
MAX_LOST_FRAMES = 25
_UNPAIRABLE = 1e6  # Cost of a pair sharing no keypoint.


@dataclasses.dataclass
class _Track:
  """One identity: its last pose and its last observations.

  Attributes:
    track_id: the id `PoseTracker.update` returns.
    pose: float64 [K, 2] pixels, the last observation with missing
      keypoints carried along (NaN for one never seen).
    history: (frame, pose) of the last ``velocity_frames + 1``
      observations.
  """
  track_id: int
  pose: np.ndarray
  history: list[tuple[int, np.ndarray]]

  def velocity(self) -> np.ndarray:
    """float64 [2] pixels/frame: the mean over keypoints of their mean
    displacement per frame over the history (0 with one observation)."""
    (t0, p0), (t1, p1) = self.history[0], self.history[-1]
    step = (p1 - p0)[np.isfinite(p1 - p0).all(-1)]
    if t1 == t0 or not len(step):
      return np.zeros(2)
    return step.mean(0) / (t1 - t0)

  def predict(self, frame: int) -> np.ndarray:
    """float64 [K, 2] pixels: the pose moved at constant velocity."""
    return self.pose + self.velocity() * (frame - self.history[-1][0])

  def observe(self, frame: int, pose: np.ndarray, velocity_frames: int):
    """Takes the observed keypoints; missing ones move from their
    prediction by the mean offset of the observed ones."""
    seen = np.isfinite(pose).all(-1)
    moved = self.predict(frame)
    offset = (pose[seen] - moved[seen])[np.isfinite(moved[seen]).all(-1)]
    if len(offset):
      moved = moved + offset.mean(0)
    self.pose = np.where(seen[:, None], pose, moved)
    self.history = (self.history + [(frame, self.pose)]
                    )[-(velocity_frames + 1):]


def size_of(pose: np.ndarray) -> float:
  """Diagonal of the box around a [K, 2] pose (pixels), at least 1 px (the
  diagonal, not the area: a pose of two points in a line has a size)."""
  ok = np.isfinite(pose).all(-1)
  if ok.sum() < 2:
    return 1.0
  return float(max(np.hypot(*np.ptp(pose[ok], axis=0)), 1.0))


def pose_cost(predicted: np.ndarray, detections: np.ndarray) -> np.ndarray:
  """Mean keypoint distance over keypoints present in both, / track size.

  Args:
    predicted: float [T, K, 2] pixels, tracks' predicted poses.
    detections: float [D, K, 2] pixels, NaN = missing.

  Returns:
    float64 [T, D], in track sizes; ``_UNPAIRABLE`` where no keypoint is
    shared.
  """
  d = np.linalg.norm(predicted[:, None] - detections[None], axis=-1)
  ok = np.isfinite(d)
  mean = np.where(ok, d, 0).sum(-1) / np.maximum(ok.sum(-1), 1)
  sizes = np.array([size_of(p) for p in predicted])[:, None]
  return np.where(ok.any(-1), mean / sizes, _UNPAIRABLE)


class PoseTracker:
  """Frame-by-frame tracker (module docstring); `update` once per frame."""

  def __init__(self, max_animals: int | None = None,
               max_cost: float = MAX_COST,
               velocity_frames: int = VELOCITY_FRAMES,
               max_lost_frames: int = MAX_LOST_FRAMES):
    if max_animals is not None and max_animals < 1:
      raise ValueError(f'max_animals must be >= 1, got {max_animals}')
    self.max_animals = max_animals
    self.max_cost = max_cost
    self.velocity_frames = velocity_frames
    self.max_lost_frames = max_lost_frames
    self.tracks: list[_Track] = []
    self._next_id = 0

  def _candidates(self, frame: int) -> list[_Track]:
    if self.max_animals is not None:
      return self.tracks
    return [t for t in self.tracks
            if frame - t.history[-1][0] <= self.max_lost_frames]

  def update(self, frame: int, poses: np.ndarray,
             scores: np.ndarray | None = None) -> np.ndarray:
    """Assigns this frame's instances to tracks.

    Args:
      frame: the frame index (increasing between calls; gaps allowed).
      poses: float [N, K, 2] pixels, NaN = missing keypoint.
      scores: float [N] instance scores (higher = better; default all 1):
        new tracks start from the best, and with ``max_animals`` only the
        best ``max_animals`` instances are kept.

    Returns:
      int32 [N] track ids (0, 1, ...); -1 for an instance left out (beyond
      ``max_animals``, or with no keypoint).
    """
    poses = np.asarray(poses, np.float64)
    scores = np.ones(len(poses)) if scores is None else np.asarray(scores)
    ids = np.full(len(poses), -1, np.int32)
    if not len(poses):
      return ids
    usable = [i for i in np.argsort(-scores, kind='stable')
              if np.isfinite(poses[i]).all(-1).any()]
    if self.max_animals is not None:
      usable = usable[:self.max_animals]
    tracks = self._candidates(frame)
    paired = self._pair(frame, tracks, poses, usable, ids, gate=True)
    left = [i for i in usable if ids[i] < 0]
    free = [t for t in tracks if t.track_id not in paired]
    if self.max_animals is not None and len(self.tracks) >= self.max_animals:
      self._pair(frame, free, poses, left, ids, gate=False)
    else:
      for i in left:
        self._new_track(frame, poses[i], ids, i)
    return ids

  def _pair(self, frame, tracks, poses, det_ids, ids, gate: bool) -> set:
    """Pairs ``det_ids`` with ``tracks`` (pose cost gated at ``max_cost``;
    without the gate, by centroid distance); fills ``ids``, updates the
    tracks; returns the paired track ids."""
    if not tracks or not det_ids:
      return set()
    predicted = np.stack([t.predict(frame) for t in tracks])
    dets = poses[det_ids]
    if gate:
      cost = pose_cost(predicted, dets)
    else:
      centres = np.nanmean(dets, axis=1)  # [D, 2]
      cost = np.linalg.norm(predicted.mean(1)[:, None] - centres[None], axis=-1)
    rows, cols = optimize.linear_sum_assignment(cost)
    done = set()
    for r, c in zip(rows, cols):
      if gate and cost[r, c] > self.max_cost:
        continue
      tracks[r].observe(frame, dets[c], self.velocity_frames)
      ids[det_ids[c]] = tracks[r].track_id
      done.add(tracks[r].track_id)
    return done

  def _new_track(self, frame: int, pose: np.ndarray, ids, i: int):
    track = _Track(self._next_id, pose, [(frame, pose)])
    self.tracks.append(track)
    ids[i] = track.track_id
    self._next_id += 1


def track_poses(poses: Sequence[np.ndarray],
                scores: Sequence[np.ndarray] | None = None,
                frames: Sequence[int] | None = None,
                **tracker_args) -> list[np.ndarray]:
  """Tracks a whole sequence with one `PoseTracker`.

  Args:
    poses: per frame, float [N_t, K, 2] pixels (NaN = missing).
    scores: per frame, float [N_t] instance scores (default all 1).
    frames: frame indices (default 0, 1, ...).
    **tracker_args: `PoseTracker`'s arguments (``max_animals``, ...).

  Returns:
    Per frame, int32 [N_t] track ids (-1 = left out).
  """
  tracker = PoseTracker(**tracker_args)
  frames = range(len(poses)) if frames is None else frames
  return [tracker.update(f, p, None if scores is None else scores[t])
          for t, (f, p) in enumerate(zip(frames, poses))]
