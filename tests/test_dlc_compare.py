"""tools/dlc_compare.py's pure parts (no DeepLabCut needed)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import dlc_project

REPO = Path(__file__).resolve().parents[1]
OPENFIELD = (REPO.parent / 'shared' / 'data' / 'dlc_projects'
             / 'openfield-Pranav-2018-10-30')

_spec = importlib.util.spec_from_file_location(
    'dlc_compare', REPO / 'tools' / 'dlc_compare.py')
dlc_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dlc_compare)


@pytest.mark.parametrize('fraction', [None, 0.8])
def test_indices_pick_our_split_frames_in_deeplabcuts_table(fraction):
  """Rows chosen in DeepLabCut's table carry our test frames' labels."""
  data, _, config = dlc_project.to_coco(OPENFIELD, fraction)
  table = dlc_project.read_labels(
      OPENFIELD / 'labeled-data' / 'm4s1' / 'CollectedData_Pranav.h5')
  # DeepLabCut's merged table, rows in another order than the file's.
  shuffled = table.iloc[np.random.RandomState(1).permutation(len(table))]
  test = data['test']
  rows = dlc_compare.dlc_indices(
      shuffled.index, [im['file_name'] for im in test['images']])
  xy, _ = dlc_compare.dlc_table_xy(shuffled.iloc[rows],
                                   list(config.bodyparts))
  ours = np.array([a['keypoints'] for a in test['annotations']]
                  ).reshape(len(rows), -1, 3)
  np.testing.assert_allclose(xy, np.where(ours[..., 2:] > 0,
                                          ours[..., :2], np.nan))
  assert len(rows) == (6 if fraction is None else 24)


def test_indices_name_a_missing_and_a_repeated_frame():
  index = ['labeled-data/v/a.png', ('labeled-data', 'v', 'b.png')]
  assert dlc_compare.dlc_indices(index, ['v/b.png', 'v/a.png']) == [1, 0]
  with pytest.raises(ValueError, match='v/c.png'):
    dlc_compare.dlc_indices(index, ['v/c.png'])
  with pytest.raises(ValueError, match='twice'):
    dlc_compare.dlc_indices(index + ['labeled-data\\v\\a.png'], ['v/a.png'])


def test_holdout_uses_only_training_frames():
  train = [f'v/{i:03d}.png' for i in range(20)]
  fit, out = dlc_compare.holdout_split(train, 0.25)
  assert len(out) == 5 and sorted(fit + out) == train
  assert not set(fit) & set(out)
  with pytest.raises(ValueError):
    dlc_compare.holdout_split(train[:1], 0.5)


def test_keypoint_errors_is_deeplabcuts_mean_distance():
  gt = np.array([[[0., 0.], [10., 10.], [np.nan, np.nan]],
                 [[0., 0.], [0., 0.], [5., 5.]]])
  pred = np.array([[[3., 4.], [10., 10.], [1., 1.]],     # 5, 0, unlabelled
                   [[6., 8.], [np.nan, np.nan], [5., 5.]]])  # 10, none, 0
  score = np.array([[0.9, 0.1, 0.9], [0.9, 0.9, 0.9]])
  r = dlc_compare.keypoint_errors(pred, gt)
  assert r['mean_px'] == pytest.approx(15 / 4)  # Not the root mean square.
  assert r['rmse_px'] == pytest.approx(math.sqrt(125 / 4))
  assert (r['counted'], r['labelled'], r['no_position']) == (4, 5, 1)
  assert r['per_keypoint_px'][:2] == pytest.approx([7.5, 0.0])
  cut = dlc_compare.keypoint_errors(pred, gt, score, pcutoff=0.5)
  assert cut['mean_px'] == pytest.approx(15 / 3) and cut['counted'] == 3
  with pytest.raises(ValueError):
    dlc_compare.keypoint_errors(pred[:, :2], gt)


def test_trajectory_distance_median_per_body_part_where_both_have_one():
  a = np.zeros((4, 2, 2))
  b = np.zeros((4, 2, 2))
  b[:, 0, 0] = [1., 2., 100., 3.]    # Median 2.5 despite the outlier.
  b[1:, 1] = np.nan                  # One frame has both.
  b[0, 1] = [0., 4.]
  r = dlc_compare.trajectory_distance(a, b)
  assert r['median_px'] == pytest.approx([2.5, 4.0])
  assert r['frames_both'] == [4, 1] and r['frames'] == 4


def test_table_and_coco_readers_agree_on_positions_and_absence():
  cols = pd.MultiIndex.from_product([['s'], ['nose', 'tail'],
                                     ['x', 'y', 'likelihood']],
                                    names=['scorer', 'bodyparts', 'coords'])
  df = pd.DataFrame([[1., 2., .9, 3., 4., .2]], columns=cols)
  xy, like = dlc_compare.dlc_table_xy(df, ['tail', 'nose'])
  np.testing.assert_allclose(xy[0], [[3., 4.], [1., 2.]])
  np.testing.assert_allclose(like[0], [.2, .9])
  results = [dict(image_id=7, keypoints=[3., 4., 1., 0., 0., 0.],
                  keypoint_scores=[.5, .1])]
  xy, score = dlc_compare.coco_prediction_xy(results, [7, 8], 2)
  np.testing.assert_allclose(xy[0, 0], [3., 4.])
  assert np.isnan(xy[0, 1]).all() and np.isnan(xy[1]).all()
  np.testing.assert_allclose(score[0], [.5, .1])
