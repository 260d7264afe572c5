"""PCK@0.2 on hand-computed values."""

import numpy as np
import pytest

from kpseq_jax import metrics


def test_pck_hand_values():
  # bbox max side 50 -> threshold 10 px.
  gt = np.array([[[10, 10, 2], [20, 20, 2], [30, 30, 1], [40, 40, 0]]],
                np.float64)
  pred = np.array([[[10, 19.9, 0], [26, 28, 0], [np.nan, np.nan, 0],
                    [0, 0, 0]]])[..., :2]
  correct, labelled, err = metrics.correct_keypoints(
      pred, gt, np.array([[0, 0, 50, 30]]))
  np.testing.assert_array_equal(correct, [[True, True, False, False]])
  np.testing.assert_array_equal(labelled, [[True, True, True, False]])
  np.testing.assert_allclose(err[0, :2], [9.9, 10.0])  # 10.0 is on the edge.
  assert np.isnan(err[0, 2])


def test_pck_is_a_mean_over_categories():
  acc = metrics.PCKAccumulator(alpha=0.2)
  gt = np.zeros([3, 2, 3])
  gt[..., 2] = 2
  bbox = np.array([[0, 0, 10, 10]] * 3, np.float64)  # threshold 2 px
  pred = np.zeros([3, 2, 2])
  pred[0, 1] = [5, 0]   # cat 1: 1 of 2 correct
  pred[1] = [[0, 1], [1, 1]]  # cat 2: 2 of 2 correct (error 1 and 1.414)
  pred[2] = [[3, 0], [3, 0]]  # cat 2: 0 of 2
  acc.update(np.array([1, 2, 2]), pred, gt, bbox)
  r = acc.result()
  assert r['per_category'] == {1: 0.5, 2: 0.5}
  assert r['pck'] == pytest.approx(0.5)
  assert r['mean_error_px'] == pytest.approx((5 + 1 + np.sqrt(2) + 6) / 6)
  assert r['num_keypoints'] == 6
