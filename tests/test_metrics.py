"""PCK@0.2 by MP-100's protocol: hand-computed values and the real MP-100 files."""

import collections
import json

import numpy as np
import pytest

from data_prep import episodes
from kpseq_jax.evaluation import metrics

SPLIT_FILES = [f'mp100_split{s}_{part}.json' for s in range(1, 6)
               for part in ('test', 'val')]


def test_pck_hand_values():
  # bbox max side 51 -> MP-100 clean size 50 -> threshold 10 px, strict.
  gt = np.array([[[10, 10, 2], [20, 20, 2], [30, 30, 1], [40, 40, 0]]],
                np.float64)
  pred = np.array([[[10, 19.9], [26, 28], [np.nan, np.nan], [0, 0]]])
  bbox = np.array([[0, 0, 51, 30]])
  correct, labelled, err = metrics.correct_keypoints(pred, gt, bbox)
  np.testing.assert_array_equal(correct, [[True, False, False, False]])
  np.testing.assert_array_equal(labelled, [[True, True, True, False]])
  np.testing.assert_allclose(err[0, :2], [9.9, 10.0])  # 10.0: on the edge.
  assert np.isnan(err[0, 2])
  pck, evaluated = metrics.instance_pck(pred, gt, bbox)
  np.testing.assert_allclose(pck, [1 / 3])  # 1 of 3 labelled.
  assert evaluated.tolist() == [True]


def test_pck_is_a_mean_over_categories_of_instance_means():
  acc = metrics.PCKAccumulator(alpha=0.2)
  gt = np.zeros([4, 2, 3])
  gt[..., 2] = 2
  gt[3, 1, 2] = 0  # Instance 3 has one labelled keypoint.
  bbox = np.array([[0, 0, 11, 11]] * 4, np.float64)  # threshold 2 px
  pred = np.zeros([4, 2, 2])
  pred[0, 1] = [5, 0]         # cat 1: instance PCK 1/2
  pred[1] = [[0, 1], [1, 1]]  # cat 2: 2/2 (errors 1 and 1.414)
  pred[2] = [[3, 0], [3, 0]]  # cat 2: 0/2
  pred[3] = [[0, 0], [9, 9]]  # cat 2: 1/1 (keypoint 1 unlabelled)
  acc.update(np.array([1, 2, 2, 2]), pred, gt, bbox)
  r = acc.result()
  assert r.per_category == pytest.approx({1: 0.5, 2: 2 / 3})
  assert r.pck == pytest.approx((0.5 + 2 / 3) / 2)
  assert r.pck_instance_mean == pytest.approx((0.5 + 1 + 0 + 1) / 4)
  # Pooled keypoints: cat 2 has 3 correct of 5.
  assert r.pck_keypoint_pooled == pytest.approx((0.5 + 3 / 5) / 2)
  assert r.mean_error_px == pytest.approx((5 + 1 + np.sqrt(2) + 6) / 7)
  assert r.num_keypoints == 7 and r.num_excluded == 0


def _load(shared_data, name):
  """(annotation id -> MP-100 clean box, category id -> annotations)."""
  path = shared_data / 'mp100' / 'annotations' / name
  data = json.loads(path.read_text())
  clean = episodes.episode_pool(data, str(path)).clean_bbox
  by_cat = collections.defaultdict(list)
  for a in data['annotations']:
    by_cat[a['category_id']].append(a)
  return clean, by_cat


def _arrays(anns, clean):
  """[N, K, 3] keypoints, [N, 4] MP-100 clean boxes (size 0 for the
  instances MP-100 drops), [N] annotation ids."""
  kps = np.array([a['keypoints'] for a in anns], np.float64).reshape(
      len(anns), -1, 3)
  boxes = np.array([clean.get(a['id'], (0, 0, 0, 0)) for a in anns])
  return kps, boxes, np.array([a['id'] for a in anns])


@pytest.mark.parametrize('name', SPLIT_FILES)
def test_ground_truth_against_itself_is_one(shared_data, name):
  clean_boxes, by_cat = _load(shared_data, name)
  acc = metrics.PCKAccumulator()
  for cid, anns in by_cat.items():
    kps, clean, _ = _arrays(anns, clean_boxes)
    size = np.max(clean[:, 2:], axis=1)
    acc.update(np.full(len(anns), cid), kps[..., :2], kps, clean, size=size)
  r = acc.result()
  assert r.pck == 1.0 and r.pck_instance_mean == 1.0
  assert len(r.per_category) == len(by_cat)
  # Real quirk: some "face" (id 18) boxes have negative w and h; MP-100's
  # clean_bbox makes them empty and does not evaluate them.
  negative = sum(a['bbox'][2] <= 0 or a['bbox'][3] <= 0
                 for anns in by_cat.values() for a in anns)
  assert r.num_excluded == negative
  assert sum(r.per_category_instances.values()) + negative == sum(
      len(a) for a in by_cat.values())


def test_known_perturbation_on_split1_test(shared_data):
  """Annotation ids divisible by 3: every keypoint moved 0.25 s right (all
  wrong); the rest moved (0.1 s, 0.1 s), 0.141 s (all right). Per category
  the PCK is the share of instances not moved far; the split figure is the
  mean of those shares over categories."""
  clean_boxes, by_cat = _load(shared_data, 'mp100_split1_test.json')
  acc = metrics.PCKAccumulator()
  expected = {}
  for cid, anns in by_cat.items():
    kps, clean, ids = _arrays(anns, clean_boxes)
    size = np.max(clean[:, 2:], axis=1)
    far = ids % 3 == 0
    shift = np.where(far[:, None], [0.25, 0.0], [0.1, 0.1]) * size[:, None]
    acc.update(np.full(len(anns), cid), kps[..., :2] + shift[:, None], kps,
               clean, size=size)
    expected[cid] = sum(a['id'] % 3 != 0 for a in anns) / len(anns)
  r = acc.result()
  assert len(expected) == 20  # split 1 test: 20 categories.
  assert r.per_category == pytest.approx(expected)
  assert r.pck == pytest.approx(sum(expected.values()) / len(expected))


def test_one_real_instance_by_hand(shared_data):
  """First instance of split1_test (klipspringer face, 9 keypoints, all
  labelled, bbox w 935.009 in a 1723 px wide image -> clean size 934.009):
  keypoints 0-2 moved exactly 0.2 s (wrong, the comparison is strict),
  3-4 moved 0.199 s (right): PCK 6/9."""
  clean_boxes, by_cat = _load(shared_data, 'mp100_split1_test.json')
  ann = by_cat[10][0]
  assert ann['bbox'][2] == pytest.approx(935.0092315673828)
  kps, clean, _ = _arrays([ann], clean_boxes)
  size = np.max(clean[:, 2:], axis=1)
  assert size[0] == pytest.approx(934.0092315673828)
  assert np.all(kps[0, :, 2] > 0) and kps.shape[1] == 9
  pred = kps[..., :2].copy()
  pred[0, :3, 1] += 0.2 * size[0]
  pred[0, 3:5, 0] -= 0.199 * size[0]
  pck, evaluated = metrics.instance_pck(pred, kps, clean, size=size)
  assert evaluated.tolist() == [True]
  assert pck[0] == pytest.approx(6 / 9)
  # The in-image bbox path (data_prep's boxes) gives the same here.
  bbox = np.array([ann['bbox']])
  assert metrics.instance_pck(pred, kps, bbox)[0][0] == pytest.approx(6 / 9)


def test_a_sample_without_keypoints_scores_zero_and_is_counted():
  """A CAPE query whose keypoints no support sees (all masked): PCK 0, as
  mmpose's keypoint_pck_accuracy gives it, counted in the result."""
  gt = np.zeros([2, 2, 3])
  gt[0, :, 2] = 2  # Sample 0: both keypoints count.
  pred = np.zeros([2, 2, 2])  # Exactly right.
  acc = metrics.PCKAccumulator()
  acc.update(np.array([1, 1]), pred, gt, np.array([[0, 0, 11, 11]] * 2))
  r = acc.result()
  assert r.pck_instance_mean == 0.5  # (1 + 0) / 2.
  assert r.num_without_keypoints == 1 and r.num_keypoints == 2
