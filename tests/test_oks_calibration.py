"""OKS AP (evaluation/oks.py) and confidence calibration / presence
(evaluation/calibration.py): hand-computed cases, pycocotools called
directly as the reference, and the real MP-100 annotations."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from data_prep import categories as categories_lib
from data_prep import coco as data_coco
from kpseq_jax.evaluation import calibration
from kpseq_jax.evaluation import oks
from kpseq_jax.inference import results

BOX = (10.0, 20.0, 100.0, 50.0)  # w * h = 5000 px^2.
# xtcocotools' area of a ground truth without one: 0.53 w h (a literal
# here, so a change of oks.AREA_FROM_BBOX fails the tests).
AREA_053 = 0.53 * BOX[2] * BOX[3]
STATS = ('ap', 'ap50', 'ap75', 'ar', 'ar50', 'ar75')


def _gt(image_id, xy, v=None, category_id=1, bbox=BOX, area=None):
  xy = np.asarray(xy, np.float64)
  v = np.full(len(xy), 2.0) if v is None else np.asarray(v, np.float64)
  return oks.GroundTruth(image_id, category_id,
                         np.concatenate([xy, v[:, None]], 1), bbox, area)


def _distance_for_term(term, area, sigma=oks.DEFAULT_SIGMA):
  """Pixel distance whose OKS term exp(-d^2 / (2 A (2 sigma)^2)) is term."""
  return math.sqrt(-math.log(term) * 2 * area * (2 * sigma) ** 2)


# ---------------------------------------------------------------- OKS AP


def test_perfect_predictions_score_one():
  rng = np.random.default_rng(0)
  gts = []
  for i in range(6):
    v = rng.choice([0, 1, 2], size=5)
    v[0] = 2  # At least one labelled keypoint.
    gts.append(_gt(i, rng.uniform(20, 60, [5, 2]), v))
  preds = [oks.Prediction(g.image_id, 1, g.keypoints[:, :2]) for g in gts]
  r = oks.evaluate_oks(gts, preds)
  assert [getattr(r, k) for k in STATS] == [1.0] * 6
  assert r.num_categories == 1 and r.skipped == {}
  assert r.per_category[1].sigma_source == oks.SIGMA_DEFAULT
  assert r.per_category[1].sigmas == (0.1,) * 5


def test_oks_between_ap50_and_ap75_by_hand():
  # OKS = mean over labelled keypoints of the terms: (1 + 0.24) / 2 = 0.62;
  # the v = 0 keypoint, predicted far away, does not count. Matched at the
  # thresholds 0.50, 0.55, 0.60 of ten: AP = AR = 0.3, AP50 1, AP75 0.
  area = AREA_053
  d = _distance_for_term(0.24, area)
  g = _gt(1, [[30, 30], [50, 40], [0, 0]], v=[2, 1, 0])
  p = oks.Prediction(1, 1, np.array([[30, 30], [50 + d, 40], [500, 500]]))
  r = oks.evaluate_oks([g], [p])
  # pytest.approx: COCOeval's mean of 101 precisions of 1 is 1 - 1e-16.
  assert [getattr(r, s) for s in STATS] == pytest.approx(
      [0.3, 1.0, 0.0, 0.3, 1.0, 0.0])


def test_unpredicted_keypoint_is_a_miss():
  # NaN keypoint: term 0, OKS (1 + 1 + 0) / 3 = 0.667: thresholds
  # 0.50 ... 0.65 match (4 of 10). Placed at (0, 0) instead it would be
  # near its ground truth here and score more.
  g = _gt(1, [[30, 30], [50, 40], [1, 2]])
  p = oks.Prediction(1, 1, np.array([[30, 30], [50, 40], [np.nan, np.nan]]))
  r = oks.evaluate_oks([g], [p])
  assert [r.ap, r.ap50, r.ap75] == pytest.approx([0.4, 1.0, 0.0])


def test_area_defaults_to_053_of_the_box():
  # One keypoint at a distance giving OKS 0.62 with area 0.53 w h (AP 0.3);
  # with area w h the same distance gives 0.62 ** 0.53 = 0.776 (AP 0.6).
  area = AREA_053
  d = _distance_for_term(0.62, area)
  p = oks.Prediction(1, 1, np.array([[30 + d, 30]]))
  ap = {}
  for label, a in (('none', None), ('053', area), ('box', BOX[2] * BOX[3])):
    r = oks.evaluate_oks([_gt(1, [[30, 30]], area=a)], [p])
    ap[label] = r.ap
    assert r.per_category[1].num_area_from_bbox == (a is None)
  assert ap['none'] == pytest.approx(0.3)
  assert ap['053'] == pytest.approx(0.3)
  assert ap['box'] == pytest.approx(0.6)


def test_matches_cocoeval_called_directly():
  """Several instances per image, false positives, scores, given and
  missing areas, overridden sigmas: the same numbers as COCOeval on
  hand-built COCO dicts."""
  rng = np.random.default_rng(1)
  k, sigmas = 4, [0.05, 0.1, 0.15, 0.2]
  gts, preds, ref_gt, ref_dt = [], [], [], []
  for image in range(1, 9):
    for _ in range(2):
      x, y = rng.uniform(0, 200, 2)
      w, h = rng.uniform(30, 80, 2)
      xy = np.stack([rng.uniform(x, x + w, k), rng.uniform(y, y + h, k)], 1)
      v = rng.choice([0, 1, 2], k, p=[0.2, 0.3, 0.5])
      area = float(w * h * 0.8) if rng.uniform() < 0.5 else None
      g = _gt(image, xy, v, category_id=3, bbox=(x, y, w, h), area=area)
      gts.append(g)
      ref_gt.append({
          'id': len(ref_gt) + 1, 'image_id': image, 'category_id': 3,
          'keypoints': np.where(v[:, None] > 0, g.keypoints, [0, 0, 0])
                       .reshape(-1).tolist(),
          'num_keypoints': int((v > 0).sum()), 'bbox': [x, y, w, h],
          'area': area if area is not None else 0.53 * w * h, 'iscrowd': 0})
      for noise in (rng.uniform(1, 8), 40.0):  # A close and a poor guess.
        p_xy = xy + rng.normal(0, noise, xy.shape)
        score = float(rng.uniform())
        preds.append(oks.Prediction(image, 3, p_xy, score))
        ref_dt.append({'image_id': image, 'category_id': 3, 'score': score,
                       'keypoints': np.concatenate(
                           [p_xy, np.ones([k, 1])], 1).reshape(-1).tolist()})
  r = oks.evaluate_oks(gts, preds, sigmas={3: sigmas})

  gt_coco = coco_lib.COCO()
  gt_coco.dataset = {'images': [{'id': i} for i in range(1, 9)],
                     'categories': [{'id': 3, 'name': 'c'}],
                     'annotations': ref_gt}
  with contextlib.redirect_stdout(io.StringIO()):
    gt_coco.createIndex()
    e = cocoeval.COCOeval(gt_coco, gt_coco.loadRes(ref_dt), 'keypoints')
    e.params.kpt_oks_sigmas = np.array(sigmas)
    e.evaluate()
    e.accumulate()
    e.summarize()
  expected = [e.stats[i] for i in (0, 1, 2, 5, 6, 7)]
  assert 0.1 < expected[0] < 0.9  # Not a trivial case.
  np.testing.assert_allclose([getattr(r, s) for s in STATS], expected)
  np.testing.assert_allclose(
      [getattr(r.per_category[3], s) for s in STATS], expected)
  assert r.per_category[3].sigma_source == oks.SIGMA_OVERRIDE


def test_coco_person_layout_gets_coco_sigmas():

  class Cat:  # Anything with a name and keypoint names.
    def __init__(self, name, keypoint_names):
      self.name, self.keypoint_names = name, keypoint_names

  names = oks.COCO_PERSON_KEYPOINTS
  xy = np.linspace(10, 80, 34).reshape(17, 2)
  gts = [_gt(1, xy, category_id=5), _gt(1, xy[:3], category_id=6)]
  preds = [oks.Prediction(1, 5, xy), oks.Prediction(1, 6, xy[:3])]
  cats = {5: Cat('person', names), 6: Cat('thing', names[:3])}
  r = oks.evaluate_oks(gts, preds, categories=cats)
  np.testing.assert_allclose(r.per_category[5].sigmas,
                             cocoeval.Params('keypoints').kpt_oks_sigmas)
  assert r.per_category[5].sigma_source == oks.SIGMA_COCO_PERSON
  assert r.per_category[6].sigma_source == oks.SIGMA_DEFAULT
  assert r.per_category[5].name == 'person'
  # Without a uniform default, the non-COCO category has no sigmas.
  with pytest.raises(ValueError, match=r"category 6 \('thing'\).*sigmas"):
    oks.evaluate_oks(gts, preds, categories=cats, default_sigma=None)


def test_sigma_length_error_names_category_and_field():
  gts = [_gt(1, [[1, 2], [3, 4], [5, 6]], category_id=9)]
  preds = [oks.Prediction(1, 9, np.array([[1, 2], [3, 4], [5, 6]]))]
  with pytest.raises(ValueError,
                     match=r'category 9.*"sigmas" has 2 values.*3 keypoints'):
    oks.evaluate_oks(gts, preds, sigmas={9: [0.1, 0.1]})
  # A table may hold categories not evaluated (one table for every split).
  r = oks.evaluate_oks(gts, preds, sigmas={9: [0.2] * 3, 99: [0.1]})
  assert r.per_category[9].sigmas == (0.2,) * 3 and 99 not in r.per_category


def test_malformed_inputs_are_errors():
  g = _gt(1, [[1, 2], [3, 4]])
  with pytest.raises(ValueError, match=r'predictions\[0\].*"keypoints" has 3'):
    oks.evaluate_oks([g], [oks.Prediction(1, 1, np.zeros([3, 2]))])
  with pytest.raises(ValueError, match=r'"image_id" 2 has no ground truth'):
    oks.evaluate_oks([g], [oks.Prediction(2, 1, np.zeros([2, 2]))])
  with pytest.raises(ValueError, match=r'visibility must be 0, 1 or 2'):
    oks.evaluate_oks([_gt(1, [[1, 2]], v=[3])], [])


def test_categories_with_different_k_are_averaged_skipping_undefined():
  # Category 1 (K 3): perfect, AP 1. Category 2 (K 5): OKS 0.62 as in the
  # hand case, AP 0.3. Category 3: nothing labelled (COCOeval: -1) and
  # category 4: predictions without ground truth: both skipped, reported.
  area = AREA_053
  d = _distance_for_term(0.24, area)
  xy3 = np.array([[20., 30], [40, 50], [60, 45]])
  xy5 = np.array([[20., 30], [40, 50], [60, 45], [0, 0], [0, 0]])
  gts = [_gt(1, xy3, category_id=1), _gt(2, xy3, category_id=1),
         _gt(1, xy5, v=[2, 2, 0, 0, 0], category_id=2),
         _gt(2, xy3, v=[0, 0, 0], category_id=3)]
  far = xy5.copy()
  far[1, 0] += d
  preds = [oks.Prediction(1, 1, xy3), oks.Prediction(2, 1, xy3),
           oks.Prediction(1, 2, far), oks.Prediction(2, 3, xy3),
           oks.Prediction(2, 4, xy5[:4])]
  r = oks.evaluate_oks(gts, preds)
  assert r.per_category[1].ap == 1.0
  assert r.per_category[2].ap == pytest.approx(0.3)
  assert r.per_category[2].num_keypoints == 5
  assert [r.ap, r.ap50, r.ap75, r.ar] == pytest.approx([0.65, 1, 0.5, 0.65])
  assert r.num_categories == 2
  assert set(r.skipped) == {3, 4}
  assert r.per_category[3].ap is None and r.per_category[4].ap is None
  d = json.loads(json.dumps(r.to_dict()))  # JSON-safe, None stays None.
  assert d['per_category']['3']['ap'] is None and d['skipped']['4']


def test_no_prediction_scores_zero():
  r = oks.evaluate_oks([_gt(1, [[1, 2]])], [])
  assert r.ap == 0.0 and r.ar == 0.0 and r.num_categories == 1


def test_bbox_keypoint_score_is_mmpose_rescoring():
  # Mean over keypoint scores > 0.2: (0.5 + 0.9) / 2 = 0.7; x box 0.8.
  assert results.bbox_keypoint_score(0.8, [0.1, 0.5, 0.9]) == pytest.approx(0.56)
  assert results.bbox_keypoint_score(0.8, [0.1, 0.2]) == 0.0
  assert results.bbox_keypoint_score(1.0, [0.1, 0.3], threshold=0.0) == (
      pytest.approx(0.2))


def test_arrays_round_trip_into_instances():
  kp = np.zeros([2, 4, 3])
  kp[..., 2] = 2
  gts = oks.ground_truth_from_arrays([1, 2], [7, 8], kp, np.ones([2, 4]),
                                     [4, 2], area=[np.nan, 3.0])
  assert [len(g.keypoints) for g in gts] == [4, 2]
  assert gts[0].area is None and gts[1].area == 3.0
  preds = oks.predictions_from_arrays([1, 2], [7, 8], np.zeros([2, 4, 2]),
                                      [4, 2], scores=[0.5, 0.7])
  assert [len(p.keypoints) for p in preds] == [4, 2]
  assert preds[1].score == 0.7 and preds[0].keypoint_scores is None


def test_real_mp100_noisy_ground_truth(shared_data):
  """MP-100 split 1 test (20 categories, K 9 to 39): GT plus small noise
  scores a high AP, bigger noise a lower one, averaged over categories."""
  path = shared_data / 'mp100' / 'annotations' / 'mp100_split1_test.json'
  table = categories_lib.build_category_table(
      [data_coco.load_annotation_file(path)])
  anns = json.loads(path.read_text())['annotations']
  gts = [oks.GroundTruth(
      a['image_id'], a['category_id'],
      np.asarray(a['keypoints'], np.float64).reshape(-1, 3), a['bbox'],
      a.get('area')) for a in anns]
  rng = np.random.default_rng(0)

  def noisy(fraction):  # Noise std = fraction x max(w, h) of the box.
    return [oks.Prediction(
        g.image_id, g.category_id,
        g.keypoints[:, :2] + rng.normal(0, fraction * max(g.bbox[2:]),
                                        [len(g.keypoints), 2]))
            for g in gts]

  small = oks.evaluate_oks(gts, noisy(0.005), categories=table)
  big = oks.evaluate_oks(gts, noisy(0.1), categories=table)
  assert small.num_categories == len(table) == 20
  assert small.ap > 0.9
  assert big.ap < small.ap - 0.2
  for r in (small, big):
    assert r.ap == pytest.approx(
        np.mean([c.ap for c in r.per_category.values()]))
  assert {c.num_keypoints for c in small.per_category.values()} >= {9, 39}


# ------------------------------------------------------------ calibration


def test_ece_perfectly_calibrated_vs_overconfident():
  # In each bin the hit rate equals the confidence: ECE 0.
  conf = np.repeat([0.15, 0.45, 0.85], 20)
  hit = np.concatenate([np.arange(20) < n for n in (3, 9, 17)])
  r = calibration.calibration(conf, hit)
  assert r.ece == pytest.approx(0.0, abs=1e-12)
  assert r.table.count[1] == 20 and r.table.accuracy[1] == pytest.approx(0.15)
  assert r.table.mean_confidence[0] is None  # Empty bin.
  # Always 0.9 sure, right 60% of the time: ECE 0.3.
  over = calibration.calibration(np.full(10, 0.9), np.arange(10) < 6)
  assert over.ece == pytest.approx(0.3)
  assert over.accuracy == pytest.approx(0.6)


def test_reliability_bins_are_right_closed():
  # (0.2, 0.3] holds 0.3 despite 0.3 * 10 > 3 in floating point; 0 is in
  # bin 0, 1 in the last.
  t = calibration.reliability_table(np.array([0.0, 0.3, 0.30001, 1.0]),
                                    np.ones(4, bool))
  assert t.count == [1, 0, 1, 1, 0, 0, 0, 0, 0, 1]


def test_mask_and_value_checks():
  conf = np.array([[0.9, np.nan], [0.2, 7.0]])
  hit = np.array([[True, False], [False, True]])
  mask = np.array([[True, False], [True, False]])
  r = calibration.calibration(conf, hit, mask=mask)
  assert r.num == 2 and r.auroc == 1.0
  with pytest.raises(ValueError, match='NaN'):
    calibration.calibration(conf, hit)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    calibration.calibration(np.array([1.5]), np.array([True]))


def test_auroc_perfect_chance_and_undefined():
  y = np.array([0, 0, 1, 1], bool)
  assert calibration.auroc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
  assert calibration.auroc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
  assert calibration.auroc(np.full(4, 0.5), y) == 0.5  # Ties count 1/2.
  # Mann-Whitney by hand: pairs (pos, neg) ranked right: 3 of 4.
  assert calibration.auroc(np.array([0.1, 0.6, 0.5, 0.9]), y) == 0.75
  assert calibration.auroc(np.array([0.2, 0.7]), np.array([True, True])) is None
  assert calibration.auroc(np.array([0.2, 0.7]), np.zeros(2, bool)) is None
  one = calibration.calibration(np.array([0.5]), np.array([True]))
  assert one.auroc is None and one.ece == pytest.approx(0.5)


def test_presence_always_present_model():
  truth = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1]], bool)
  known = np.ones_like(truth)
  known[3, 0] = False  # Unknown truth: not counted.
  m = calibration.presence_metrics(np.ones(truth.shape), truth, known,
                                   keypoint_names=['a', 'b', 'c'])
  absent, present = m.overall.absent, m.overall.present
  assert absent.f1 == 0.0 and absent.recall == 0.0
  assert absent.precision is None  # Never predicted absent: 0/0.
  assert absent.support == 4 and absent.predicted == 0
  assert present.precision == pytest.approx(7 / 11) and present.recall == 1.0
  assert present.f1 == pytest.approx(2 * 7 / (2 * 7 + 4))
  assert m.overall.num == 11 and m.overall.accuracy == pytest.approx(7 / 11)
  assert m.per_keypoint['a'].num == 3
  assert m.per_keypoint['a'].absent.f1 is None  # 'a' is never absent.
  assert m.per_keypoint['b'].absent.f1 == 0.0
  json.dumps(m.to_dict())  # JSON-safe.


def test_presence_threshold_and_both_classes():
  prob = np.array([[0.9, 0.5, 0.49, 0.1]])
  truth = np.array([[True, False, False, True]])
  m = calibration.presence_metrics(prob, truth)  # Said: T, T, F, F.
  p, a = m.overall.present, m.overall.absent
  assert (p.precision, p.recall, p.f1) == (0.5, 0.5, 0.5)
  assert (a.precision, a.recall, a.f1) == (0.5, 0.5, 0.5)
  m = calibration.presence_metrics(prob, truth, threshold=0.05)
  assert m.overall.present.recall == 1.0 and m.overall.absent.f1 == 0.0
  with pytest.raises(ValueError, match='keypoint_names'):
    calibration.presence_metrics(prob, truth, keypoint_names=['a'])
