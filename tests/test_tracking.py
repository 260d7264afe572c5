"""Identity tracking (kpseq_jax/inference/tracking.py) on real fly tracks
made harder, and on constructed crossings and disappearances."""


import numpy as np
import pytest

from kpseq_jax.evaluation import identity
from kpseq_jax.inference import tracking

from conftest import SHARED_DATA

CLIP = SHARED_DATA / 'sleap_flies' / 'clip.slp'


@pytest.fixture(scope='module')
def fly_tracks():
  if not CLIP.exists():
    pytest.skip(f'{CLIP} not found')
  return identity.read_tracks(CLIP, user_only=True)


def perturbed(labels, sigma, drop, seed):
  """Identities removed, order shuffled, noise, instances dropped."""
  rng = np.random.default_rng(seed)
  out = []
  for f in range(len(labels.frame_idx)):
    poses = labels.points[f][labels.ids[f] >= 0]
    poses = poses + rng.normal(0, sigma, poses.shape)
    poses = poses[rng.random(len(poses)) >= drop]
    out.append(poses[rng.permutation(len(poses))])
  return out


def test_real_fly_tracks_mild_noise_keep_identities(fly_tracks):
  poses = perturbed(fly_tracks, sigma=2.0, drop=0.02, seed=0)
  ids = tracking.track_poses(poses, frames=fly_tracks.frame_idx,
                             max_animals=2)
  assert max(i.max(initial=-1) for i in ids) == 1  # Never a third track.
  rows = {int(f): [(p, int(i)) for p, i in zip(poses[r], ids[r])]
          for r, f in enumerate(fly_tracks.frame_idx) if len(ids[r])}
  preds = identity.from_rows(rows, ('a', 'b'), fly_tracks.nodes, {})
  result = identity.score(fly_tracks, preds, max_dist_px=10.0)
  dropped = sum(len(p) for p in poses)
  assert result['paired'] == dropped  # Every instance kept was paired.
  assert result['wrong_identity'] == 0
  assert result['identity_changes'] == 0
  assert result['motmetrics']['num_switches'] == 0


def fly(x, y, k=5):
  """A [k, 2] pose: k points along x, 40 px long, centred at (x, y)."""
  return np.stack([x + np.linspace(-20, 20, k), np.full(k, y)], -1)


def test_crossing_flies_keep_identities_by_their_motion():
  # A moves right, B left, 20 px/frame, 4 px apart in y: between frames 4
  # and 5 they pass each other, so at frame 5 each is nearer the other's
  # last place (10.8 px) than its own (20 px): only the motion model keeps
  # them apart.
  frames = [np.stack([fly(100 + 20 * t, 100), fly(290 - 20 * t, 104)])
            for t in range(10)]
  ids = tracking.track_poses(frames, max_animals=2)
  assert [list(i) for i in ids] == [[0, 1]] * 10
  # The same with the order of detections reversed in every other frame.
  flipped = [f[::-1] if t % 2 else f for t, f in enumerate(frames)]
  ids = tracking.track_poses(flipped, max_animals=2)
  assert [list(i) for i in ids] == [[1, 0] if t % 2 else [0, 1]
                                    for t in range(10)]


def test_lost_animal_gets_its_identity_back_with_max_animals():
  # B disappears for 20 frames and comes back 300 px away (beyond the gate).
  frames = []
  for t in range(40):
    a = fly(100, 100 + t)
    frames.append(np.stack([a]) if 10 <= t < 30
                  else np.stack([a, fly(500 + (300 if t >= 30 else 0), 500)]))
  ids = tracking.track_poses(frames, max_animals=2)
  assert all(list(i) == [0, 1] for t, i in enumerate(ids) if len(i) == 2)
  # Without max_animals, B comes back as a new track.
  ids = tracking.track_poses(frames)
  assert list(ids[-1]) == [0, 2]


def test_max_animals_keeps_the_best_scored_instances():
  frames = [np.stack([fly(100, 100), fly(300, 100), fly(500, 100)])] * 3
  scores = [np.array([0.9, 0.2, 0.8])] * 3
  ids = tracking.track_poses(frames, scores, max_animals=2)
  assert [list(i) for i in ids] == [[0, -1, 1]] * 3


def test_missing_keypoints_are_carried_with_the_motion():
  track = tracking._Track(0, fly(100, 100), [(0, fly(100, 100))])
  seen = fly(110, 100)
  seen[0] = np.nan
  track.observe(1, seen, velocity_frames=3)
  np.testing.assert_allclose(track.pose, fly(110, 100))
  np.testing.assert_allclose(track.predict(3), fly(130, 100))
