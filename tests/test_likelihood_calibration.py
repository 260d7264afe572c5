"""Likelihood calibration and checkpoint choice on the validation split
(issue 36): the isotonic map, its file, where the calibrated value is
written, and the best-validation checkpoint."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from kpseq_jax.evaluation import calibration
from kpseq_jax.evaluation import calibration_fit
import conftest
from kpseq_jax.inference import analyze
from kpseq_jax.inference import box_range
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import results
from kpseq_jax.training import checkpointing


def _miscalibrated(n, seed):
  """Raw scores whose true hit rate is raw ** 3 (over-confident): a raw
  0.8 is right half the time."""
  rng = np.random.default_rng(seed)
  raw = rng.uniform(0, 1, n)
  return raw, rng.uniform(0, 1, n) < raw ** 3


def test_isotonic_map_is_monotone_and_reduces_ece_on_held_out_data():
  raw, hit = _miscalibrated(4000, 0)
  cmap = calibration_fit.fit(raw, hit, 0.05, step=7, split='val',
                             presence=False)
  assert np.all(np.diff(cmap.raw_knots) > 0)
  assert np.all(np.diff(cmap.probability_knots) >= 0)
  grid = np.linspace(0, 1, 501)
  assert np.all(np.diff(cmap(grid)) >= 0)
  test_raw, test_hit = _miscalibrated(4000, 1)  # Fresh draws: not fitted on.
  before = calibration.calibration(test_raw, test_hit)
  after = calibration.calibration(cmap(test_raw), test_hit)
  assert before.ece > 0.15 and after.ece < 0.03
  assert after.auroc >= before.auroc - 0.01  # Monotone: ranking kept.
  assert cmap(np.array([np.nan]))[0] != cmap(np.array([np.nan]))[0]  # NaN.


def test_all_hits_give_a_laplace_clipped_constant():
  cmap = calibration_fit.fit(np.linspace(0.1, 0.9, 30), np.ones(30, bool),
                             0.05, 1, 'val', False)
  np.testing.assert_allclose(cmap(np.array([0.0, 0.5, 1.0])), 31 / 32)


def _logistic(n, seed, a=2.0, b=-1.0):
  """Raw scores whose true hit rate is sigmoid(a logit(raw) + b)."""
  rng = np.random.default_rng(seed)
  raw = rng.uniform(0, 1, n)
  z = a * np.log(raw / (1 - raw)) + b
  return raw, rng.uniform(0, 1, n) < 1 / (1 + np.exp(-z))


def test_platt_recovers_a_logistic_truth():
  raw, hit = _logistic(4000, 0)
  a, b = calibration_fit._platt(raw, hit)
  assert abs(a - 2) < 0.2 and abs(b + 1) < 0.2
  cmap = calibration_fit.fit(raw, hit, 0.05, 1, 'val', False, 'platt')
  grid = np.linspace(0.02, 0.98, 49)
  truth = 1 / (1 + np.exp(-(2 * np.log(grid / (1 - grid)) - 1)))
  np.testing.assert_allclose(cmap(grid), truth, atol=0.03)
  assert cmap.method == 'platt'


@pytest.mark.parametrize('method', ['isotonic', 'platt'])
def test_small_validation_sets_keep_the_raw_ranking(method):
  # 25 keypoints (dlc_reaching's 5 validation frames): isotonic regression
  # alone is a few steps that tie keypoints the raw value ranked.
  raw, hit = _miscalibrated(25, 3)
  cmap = calibration_fit.fit(raw, hit, 0.05, 1, 'val', False, method)
  inside = np.linspace(raw.min(), raw.max(), 200)
  assert np.all(np.diff(cmap(inside)) > 0)
  test_raw, test_hit = _miscalibrated(2000, 4)
  keep = (test_raw >= raw.min()) & (test_raw <= raw.max())
  test_raw, test_hit = test_raw[keep], test_hit[keep]
  assert (calibration.calibration(cmap(test_raw), test_hit).auroc
          == pytest.approx(calibration.calibration(test_raw, test_hit).auroc))


def test_auto_chooses_by_cross_validated_brier_score():
  # A step truth on many keypoints: isotonic; a logistic one: Platt.
  rng = np.random.default_rng(5)
  raw = rng.uniform(0, 1, 2000)
  hit = rng.uniform(0, 1, 2000) < np.where(raw < 0.5, 0.1, 0.9)
  assert calibration_fit.fit(raw, hit, 0.05, 1, 'val', False).method == (
      'isotonic')
  for seed in range(4):  # Close on a logistic truth: the lower one wins.
    raw, hit = _logistic(300, seed)
    brier = {m: calibration_fit.cross_validated_brier(raw, hit, m)
             for m in ('isotonic', 'platt')}
    assert calibration_fit.fit(raw, hit, 0.05, 1, 'val', False).method == (
        min(brier, key=brier.get))
  assert calibration_fit.fit(*_logistic(300, 0), 0.05, 1, 'val',
                             False).method == 'platt'  # Both are reached.
  with pytest.raises(ValueError, match='temperature.*not one of'):
    calibration_fit.fit(raw, hit, 0.05, 1, 'val', False, 'temperature')


def test_map_file_round_trip_step_check_and_bad_files(tmp_path):
  raw, hit = _miscalibrated(500, 2)
  cmap = calibration_fit.fit(raw, hit, 0.05, 12, 'val', True)
  likelihood.save(cmap, str(tmp_path))
  text = (tmp_path / likelihood.FILE).read_text()
  assert json.loads(text)['format'] == likelihood.FORMAT  # JSON, no pickle.
  back = likelihood.load(str(tmp_path), 12)
  np.testing.assert_allclose(back(raw), cmap(raw))
  assert likelihood.load(str(tmp_path), 13) is None  # Another checkpoint.
  assert likelihood.load(str(tmp_path / 'none'), 12) is None  # Old workdir.
  data = json.loads(text)
  data['probability_knots'] = data['probability_knots'][::-1]
  (tmp_path / likelihood.FILE).write_text(json.dumps(data))
  with pytest.raises(ValueError, match='calibration.json.*monotone'):
    likelihood.load(str(tmp_path), 12)
  del data['hit_alpha']
  (tmp_path / likelihood.FILE).write_text(json.dumps(data))
  with pytest.raises(ValueError, match="missing field.*hit_alpha"):
    likelihood.load(str(tmp_path), 12)


def test_known_absent_keypoints_are_misses_and_unknown_ones_left_out():
  batch = dict(
      keypoints=np.array([[[10, 10, 2], [0, 0, 0], [0, 0, 0]]], np.float32),
      bbox=np.array([[0, 0, 100, 100]], np.float32),
      num_keypoints=np.array([3]),
      keypoint_absent=np.array([[0, 1, 0]], np.float32))
  pred = np.array([[[12, 10], [50, 50], [50, 50]]], np.float64)
  hit, known = calibration_fit.hits(batch, pred, None, 0.05)
  np.testing.assert_array_equal(hit, [[True, False, False]])
  np.testing.assert_array_equal(known, [[True, True, False]])


def test_coco_results_carry_the_calibrated_likelihood():
  pred = np.array([[[5.0, 6.0], [7.0, 8.0], [np.nan, np.nan]]])
  conf = np.array([[0.9, 0.2, np.nan]])
  presence = np.array([[1.0, 0.4, 0.9]])
  cmap = likelihood.CalibrationMap((0.0, 1.0), (0.1, 0.7), 0.05, 'e', 1,
                                   'val', 10, 5)
  calibrated = cmap(likelihood.raw_likelihood(conf, presence))
  [r] = results.coco_results(pred, [3], [1], [1], keypoint_scores=conf,
                             presence=presence, likelihood=calibrated)
  kp = np.reshape(r['keypoints'], [3, 3])
  np.testing.assert_allclose(kp[:, 2], [0.1 + 0.6 * 0.9, 0.1 + 0.6 * 0.08, 0],
                             atol=1e-3)  # Not generated: 0.
  np.testing.assert_allclose(r['keypoint_scores'], np.nan_to_num(calibrated[0]),
                             atol=1e-4)
  np.testing.assert_allclose(r['keypoint_confidence_raw'], [0.9, 0.2, 0])
  [plain] = results.coco_results(pred, [3], [1], [1], keypoint_scores=conf,
                                 presence=presence)
  assert np.reshape(plain['keypoints'], [3, 3])[:, 2].tolist() == [1, 0, 0]
  assert 'keypoint_confidence_raw' not in plain


class _Batcher:
  """What `analyze._decode_batch` reads of a `CropBatcher`."""
  batch_size = 4

  def __init__(self, pred, calibration_map, boxes=None):
    self.pred, self.calibration = pred, calibration_map
    self.box_range = boxes
    self.pose_box_passes = 0  # The boxes as given.

  def predict_crops(self, crops):
    del crops
    return self.pred


class _Policy:
  def update(self, kp, lk, w, h):
    self.seen = lk


def test_dlc_table_likelihood_is_calibrated_and_pcutoff_share_logged(
    tmp_path):
  k = 2
  conf = np.array([[0.9, 0.5], [0.3, 0.95]], np.float32)
  pred = predictor_lib.Prediction(
      keypoints=np.zeros((2, k, 2), np.float32), num_keypoints=np.full(2, k),
      keypoints_px=np.arange(8, dtype=np.float64).reshape(2, k, 2),
      confidence=conf, confidence_by_radius=conf[..., None])
  cmap = likelihood.CalibrationMap((0.0, 0.5, 1.0), (0.0, 0.2, 1.0), 0.05,
                                   'e', 1, 'val', 10, 5)
  batch = analyze.video_lib.FrameBatch(start=0, frames=[None, None])
  batch.crops = [[{}], [{}]]
  policy = _Policy()
  kp, lk, raw, far = analyze._decode_batch(batch, _Batcher(pred, cmap),
                                           policy, 1, k, 640, 480)
  assert not np.concatenate(far).any()  # No box range: nothing checked.
  np.testing.assert_allclose(np.concatenate(policy.seen), conf)  # Raw.
  np.testing.assert_allclose(np.concatenate(lk), cmap(conf))
  category = analyze.dataset.Category(
      id=1, name='mouse', supercategory='animal', num_keypoints=k,
      keypoint_names=('snout', 'tail'), skeleton=(), flip_pairs=(),
      num_keypoints_source='keypoint_names')
  vinfo = analyze.video_lib.VideoInfo(path=str(tmp_path / 'v.mp4'),
                                      width=640, height=480, fps=30.0,
                                      num_frames=2, codec='h264')
  summary = analyze.VideoSummary(video=vinfo.path, scorer='S', width=640,
                                 height=480, fps=30.0, frames_in_header=2)
  outputs = analyze._Outputs(category, 'S', str(tmp_path), 0, False, 0.6)
  analyze.write_outputs(vinfo, np.concatenate(kp), np.concatenate(lk),
                        summary, outputs, raw=np.concatenate(raw))
  table = pd.read_hdf(summary.files['h5'])
  np.testing.assert_allclose(
      table.xs('likelihood', level='coords', axis=1).to_numpy(), cmap(conf))
  raw_csv = pd.read_csv(summary.files['likelihood_raw'], index_col=0)
  np.testing.assert_allclose(raw_csv.to_numpy(), conf, atol=1e-6)
  # Calibrated 0.84/0.92 and 0.12/0.2: one frame of each part under 0.6;
  # raw 0.9/0.3 and 0.5/0.95: also one each.
  assert summary.below_pcutoff == {'snout': 0.5, 'tail': 0.5}
  assert summary.below_pcutoff_raw == {'snout': 0.5, 'tail': 0.5}


def test_the_chosen_checkpoint_is_the_best_validation_one(tmp_path):
  """Steps saved with validation errors 3, 1, 2, 4 px and max_to_keep 1:
  Orbax keeps step 2 (1 px) beside the latest, and it is the choice."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  for step, err in zip((1, 2, 3, 4), (3.0, 1.0, 2.0, 4.0)):
    state = {'w': jnp.full((2,), float(step))}
    ckpt.save(step, state, metrics={checkpointing.SELECTION_METRIC: err})
    checkpointing.record_validation(str(tmp_path), 'val', step, err)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  step, why = checkpointing.chosen_step(str(tmp_path))
  assert step == 2 and 'val' in why
  best = json.loads((tmp_path / checkpointing.BEST_FILE).read_text())
  assert [h['value'] for h in best['history']] == [3.0, 1.0, 2.0, 4.0]
  # A resumed run that re-evaluates step 4 better replaces its entry.
  checkpointing.record_validation(str(tmp_path), 'val', 4, 0.5)
  assert checkpointing.read_best(str(tmp_path))['step'] == 4


def test_a_data_set_without_val_falls_back_to_test_with_a_warning():
  from configs import smoke
  from kpseq_jax.data import dataset
  from kpseq_jax.training import config_checks
  config = smoke.get_config()
  old = dataset.DatasetInfo(categories={}, split_sizes={'train': 93,
                                                        'test': 23})
  selection, report, warning = config_checks.evaluation_splits(config, old)
  assert (selection, report) == (None, 'test')
  assert "no 'val' split" in warning and 'last checkpoint' in warning
  new = dataclasses.replace(old, split_sizes={'train': 84, 'val': 9,
                                              'test': 23})
  assert config_checks.evaluation_splits(config, new) == ('val', 'test', None)


def test_whole_frame_boxes_are_outside_the_training_range_of_real_frames(
    dlc_dataset, shared_data):
  """dlc_openfield's training boxes are 143-239 px (max(w, h)): the test
  frames' own boxes are in range, a whole 640 x 480 frame (640 > 2 x 239)
  is not, nor is a 60 px box (< 143 / 2); calibrated likelihoods of the
  keypoints of out-of-range boxes are 0, the others the map's."""
  config = conftest.smoke_config(dlc_dataset)
  r = box_range.from_config(config)
  assert r.factor == 2.0 and r.split == 'train'
  assert 130 < r.min_side_px < 160 and 220 < r.max_side_px < 250
  test = json.loads((shared_data / 'dlc_openfield' / 'annotations' /
                     'test.json').read_text())
  assert not r.out_of_range([a['bbox'] for a in test['annotations']]).any()
  whole = [(0, 0, im['width'], im['height']) for im in test['images']]
  assert {im['width'] for im in test['images']} == {640}
  assert r.out_of_range(whole).all()
  np.testing.assert_array_equal(
      r.out_of_range([(5, 5, 60, 40), (0, 0, 2 * r.max_side_px, 10),
                      (0, 0, 2 * r.max_side_px + 1, 10)]),
      [True, False, True])
  cmap = likelihood.CalibrationMap((0.0, 1.0), (0.2, 0.9), 0.05, 'e', 1,
                                   'val', 10, 5)
  raw = np.array([[0.9, 0.6, np.nan], [0.9, 0.6, 0.1]])  # [N=2 boxes, K=3]
  boxes = [test['annotations'][0]['bbox'], whole[0]]
  out = likelihood.calibrate(cmap, raw, r.out_of_range(boxes))
  np.testing.assert_allclose(out[0], cmap(raw[0]))  # NaN stays NaN.
  np.testing.assert_array_equal(out[1], [0.0, 0.0, 0.0])
  assert r.out_of_range(boxes).tolist() == [False, True]
  warning = box_range.warning(r, 1, 2, 'predict', True, whole_frame=True)
  assert '1 of 2 boxes' in warning and '--detector_workdir' in warning
  assert '--boxes' in warning
  assert box_range.warning(r, 0, 2, 'predict', True) is None


def test_video_frames_cropped_whole_get_likelihood_0(dlc_dataset):
  """`analyze._decode_batch` with the real training range: a frame cropped
  whole is out of range (likelihood 0, raw kept), a tight box is not."""
  k = 2
  conf = np.array([[0.9, 0.5], [0.3, 0.95]], np.float32)
  pred = predictor_lib.Prediction(
      keypoints=np.zeros((2, k, 2), np.float32), num_keypoints=np.full(2, k),
      keypoints_px=np.zeros((2, k, 2)), confidence=conf,
      confidence_by_radius=conf[..., None])
  cmap = likelihood.CalibrationMap((0.0, 1.0), (0.3, 0.9), 0.05, 'e', 1,
                                   'val', 10, 5)
  r = box_range.from_config(conftest.smoke_config(dlc_dataset))
  batch = analyze.video_lib.FrameBatch(start=0, frames=[None, None])
  batch.boxes = [[(0, 0, 640, 480)], [(100, 100, 180, 120)]]
  batch.crops = [[{}], [{}]]
  _, lk, raw, far = analyze._decode_batch(
      batch, _Batcher(pred, cmap, r), _Policy(), 1, k, 640, 480)
  assert [f.tolist() for f in far] == [[True], [False]]
  np.testing.assert_array_equal(lk[0], [[0.0, 0.0]])
  np.testing.assert_allclose(lk[1], cmap(conf[1:]))
  np.testing.assert_allclose(np.concatenate(raw), conf)
