"""Identity metrics (kpseq_jax/evaluation/identity.py): issue 35's figures
for SLEAP's clip predictions, and hand-counted constructed cases."""

import json

import numpy as np
import pytest

from kpseq_jax.evaluation import identity

from conftest import SHARED_DATA

FLIES = SHARED_DATA / 'sleap_flies'


def test_sleap_clip_predictions_give_the_issue_figures(tmp_path):
  """24 of 3,000 instances with the wrong identity, 7 identity changes,
  266 misses (issue 35), from the files, by the one command."""
  if not (FLIES / 'clip.predictions.slp').exists():
    pytest.skip('sleap_flies not found')
  result = identity.main([
      '--labels', str(FLIES / 'clip.slp'),
      '--predictions', str(FLIES / 'clip.predictions.slp'),
      '--nodes', 'head,thorax', '--out_dir', str(tmp_path)])
  assert (result['labelled_instances'], result['wrong_identity'],
          result['identity_changes'], result['misses']) == (3000, 24, 7, 266)
  written = json.loads((tmp_path / 'eval_identity_clip.predictions.json')
                       .read_text())
  assert written['wrong_identity'] == 24
  assert '| 3000 | 24 | 7 | 266 |' in (
      tmp_path / 'eval_identity_clip.predictions.md').read_text()


def tracks(frames, names, nodes=('head', 'thorax')):
  """`Tracks` from per frame [(x, y, track id)] (both nodes 10 px apart)."""
  rows = {f: [(np.array([[x, y], [x + 10, y]], np.float32), t)
              for x, y, t in inst] for f, inst in enumerate(frames)}
  return identity.from_rows(rows, names, nodes, {})


def test_counts_a_swap_a_miss_and_a_false_positive():
  labels = tracks([[(0, 0, 0), (100, 0, 1)]] * 4, ('female', 'male'))
  preds = tracks([
      [(1, 0, 0), (101, 0, 1)],
      [(1, 0, 0), (101, 0, 1)],
      [(1, 0, 1), (101, 0, 0)],  # Swapped from here on.
      [(1, 0, 1), (500, 0, 0)],  # The male's pose is 400 px off.
  ], ('female', 'male'))
  r = identity.score(labels, preds)
  assert r['wrong_identity'] == 3  # Both in frame 2, the female in 3.
  assert r['identity_changes'] == 2  # Each fly once, frame 1 -> 2.
  assert r['misses'] == 1 and r['false_positives'] == 1
  assert r['motmetrics']['num_switches'] == 2
  assert r['motmetrics']['num_misses'] == 1


def test_other_track_names_are_mapped_by_most_paired_instances():
  labels = tracks([[(0, 0, 0), (100, 0, 1)]] * 4, ('female', 'male'))
  preds = tracks([[(1, 0, 1), (101, 0, 0)]] * 3 + [[(1, 0, 0), (101, 0, 1)]],
                 ('track_0', 'track_1'))
  r = identity.score(labels, preds)
  assert r['identity_mapping'] == {'track_1': 'female', 'track_0': 'male'}
  assert r['wrong_identity'] == 2 and r['identity_changes'] == 2


def test_frames_select_video_frames_and_the_gate_is_in_pixels():
  labels = tracks([[(0, 0, 0)]] * 4, ('a',))
  preds = tracks([[(30, 0, 0)]] * 4, ('a',))
  assert identity.score(labels, preds, slice(1, 3))['labelled_instances'] == 2
  assert identity.score(labels, preds, max_dist_px=29)['misses'] == 4
  assert identity.score(labels, preds, max_dist_px=30)['misses'] == 0


def test_a_keypoint_on_the_neighbour_counts_as_a_jump():
  # Flies 100 px apart; in frame 1 the female's predicted thorax sits on
  # the male's thorax (her head stays hers, so she is still paired).
  nodes = ('head', 'thorax')
  def rows(thorax_of_female):
    return {0: [(np.array([[0, 0], [10, 0]], np.float32), 0),
                (np.array([[100, 0], [110, 0]], np.float32), 1)],
            1: [(np.array([[0, 0], thorax_of_female], np.float32), 0),
                (np.array([[100, 0], [110, 0]], np.float32), 1)]}
  labels = identity.from_rows(rows([10, 0]), ('f', 'm'), nodes)
  preds = identity.from_rows(rows([108, 0]), ('f', 'm'), nodes)
  r = identity.score(labels, preds, max_dist_px=60)
  assert r['neighbour_jumps'] == {'jumped_keypoints': 1,
                                  'jumped_instances': 1,
                                  'checked_keypoints': 8}
  assert 'Keypoints on the neighbouring animal: 1 of 8' in identity.markdown(
      r, 't')
