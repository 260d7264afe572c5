"""PRTR's two-stage path (issue 18): keypoints from a detector's boxes in
evaluation and in ``--mode predict``."""

import collections
import dataclasses
import json

import numpy as np
import pytest

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.evaluation import detected_boxes


def test_match_by_iou_is_one_to_one_and_thresholded():
  truth = np.array([[0, 0, 10, 10], [20, 0, 10, 10], [50, 50, 5, 5]])
  found = np.array([[21, 0, 10, 10],   # IoU 0.82 with truth 1.
                    [0, 0, 10, 9],     # 0.9 with truth 0.
                    [1, 0, 10, 10],    # 0.82 with truth 0: taken by row 1.
                    [52, 52, 5, 5]])   # 0.22 with truth 2: below 0.5.
  match = detected_boxes.match_by_iou(found, truth, 0.5)
  assert {g: d for g, (d, _) in match.items()} == {0: 1, 1: 0}
  assert match[0][1] == pytest.approx(0.9)
  assert match[1][1] == pytest.approx(90 / 110)
  assert detected_boxes.match_by_iou(found[:0], truth, 0.5) == {}


@dataclasses.dataclass
class _BoxesOf:
  """A stand-in detector: the annotated boxes of the split's images
  (``shift`` px to the right), or nothing."""
  boxes: list
  shift: float = 0.0
  threshold: float = 0.3

  def detect(self, image):
    del image
    return [(cid, (x + self.shift, y, w, h), 0.9)
            for cid, (x, y, w, h) in self.boxes.pop(0)]


def _annotated_boxes(config, split='test'):
  source = dataset.data_source(config.input.dataset_dir, split)
  return [[(int(source[j]['category_id']), tuple(source[j]['bbox']))
           for j in g] for g in detection.image_groups(source)]


def test_keypoints_from_detected_boxes_next_to_ground_truth_boxes(
    trained, tmp_path):
  from kpseq_jax.evaluation import common
  from kpseq_jax.inference import predictor as predictor_lib
  from kpseq_jax.runtime import metric_writer
  from kpseq_jax.runtime import sharding
  config, workdir, _ = trained
  # The first 3 test images, not the smoke config's 8: each image is
  # decoded from both kinds of box in each of the three runs, and 8 images
  # took about a minute more here (the same code path per image).
  config = config.copy_and_resolve_references()
  config.evals.num_examples = n = 3
  boxes = _annotated_boxes(config)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, _ = predictor_lib.restore_variables(
      config, str(workdir), mesh)
  predictor = predictor_lib.Predictor(config, model, variables, mesh)
  # One compiled decoder for the three runs.
  inputs = common.Inputs(predictor, predictor.variables, None)
  info = dataset.load_info(config.input.dataset_dir)

  def run(detector):
    evaluator = detected_boxes.DetectedBoxesEvaluator(config, info, 'test',
                                                      detector)
    with metric_writer.MetricWriter(str(tmp_path)) as writer:
      reports = common.run([('detected_boxes', evaluator)], inputs,
                           str(tmp_path), writer)
    return detected_boxes.DetectedBoxesReport(
        **reports['test_detected_boxes'])
  # Detections equal to the annotated boxes: both figures the same.
  same = run(_BoxesOf(list(boxes)))
  # The first n images, one mouse each.
  assert same.num_images == same.num_instances == same.num_matched == n
  assert same.num_missed == same.num_unmatched_detections == 0
  assert same.pck_detected_boxes == same.pck_gt_boxes
  assert same.mean_error_px_detected_boxes == same.mean_error_px_gt_boxes
  # Multi-instance OKS AP (pycocotools) from every detection's pose: the
  # same poses, the same summary (the 2-step model's AP itself is ~0).
  assert same.oks_detected_boxes == same.oks_gt_boxes
  assert same.oks_detected_boxes['per_category']['1']['num_predictions'] == n
  saved = json.loads(
      (tmp_path / 'eval_test_detected_boxes.json').read_text())
  assert saved['pck_gt_boxes'] == same.pck_gt_boxes
  table = (tmp_path / 'eval_test_detected_boxes.md').read_text()
  assert f'{n} of {n} instances matched' in table
  assert '| detected | ' in table and '| ground truth | ' in table
  # Per instance: the detection is the annotated box (IoU 1, ratios 1) and
  # both errors are the instance's own.
  assert len(saved['instances']) == n
  for inst in saved['instances']:
    assert inst['iou'] == pytest.approx(1.0)
    assert inst['width_ratio'] == inst['height_ratio'] == pytest.approx(1.0)
    assert inst['error_px_detected_box'] == inst['error_px_gt_box'] > 0
  assert same.median_error_px_detected_boxes == same.median_error_px_gt_boxes
  assert same.median_error_px_gt_boxes == pytest.approx(float(np.median(
      [i['error_px_gt_box'] for i in saved['instances']])))
  # No detection: every instance missed, PCK 0 from detected boxes.
  none = run(_BoxesOf([[] for _ in boxes]))
  assert none.num_matched == 0 and none.num_missed == n
  assert none.pck_detected_boxes == 0.0
  assert none.pck_gt_boxes == same.pck_gt_boxes
  assert none.oks_detected_boxes['per_category']['1']['num_predictions'] == 0
  assert none.oks_detected_boxes['ap'] == 0.0
  assert none.oks_gt_boxes == same.oks_gt_boxes
  assert all(i['iou'] is None and i['error_px_detected_box'] is None
             and i['error_px_gt_box'] is not None for i in none.instances)
  assert none.median_error_px_detected_boxes is None
  # Shifted boxes: matched (IoU >= 0.5) but cropped elsewhere.
  moved = run(_BoxesOf(list(boxes), shift=8.0))
  assert moved.num_matched == n
  assert moved.mean_error_px_detected_boxes != same.mean_error_px_gt_boxes


# `tiny_detector` (conftest.py): trained once per run, shared with
# tests/test_multi_animal_analysis.py.


def test_detector_trains_and_reports_box_ap_on_real_frames(tiny_detector,
                                                           shared_data):
  """Box AP of every test image by pycocotools, written to the workdir;
  `--mode eval` reads the checkpoint back to the same figures."""
  from kpseq_jax.evaluation import box_ap
  from kpseq_jax.evaluation import evaluate
  c, workdir, report = tiny_detector
  assert isinstance(report, box_ap.BoxReport)
  assert report.num_images == report.num_instances == 23  # One mouse each.
  saved = json.loads((workdir / 'eval_test_boxes.json').read_text())
  assert saved['ap'] == report.ap and saved['step'] == 2
  dets = json.loads((workdir / 'detections_test.json').read_text())
  assert len(dets) == 23 * 3
  assert {d['category_id'] for d in dets} == {1}
  assert all(0 <= d['bbox'][0] <= 640 and 0 <= d['bbox'][1] <= 480
             for d in dets)
  # The AP is pycocotools' of the written detections against the data
  # set's boxes (the canvas round trip moves them by float error only).
  images = json.loads((shared_data / 'dlc_openfield' / 'annotations' /
                       'test.json').read_text())['images']
  records = dataset.records_without_images(
      dataset.data_source(c.input.dataset_dir, 'test'))
  truth = [dict(image_id=int(r['image_id']), category_id=1,
                bbox=[float(v) for v in r['bbox']])
           for r in (records[i] for i in range(len(records)))]
  assert box_ap.box_ap(images, truth, dets, [1])['ap'] == pytest.approx(
      report.ap, abs=1e-3)
  again = evaluate.evaluate(c, str(workdir))['test_boxes']
  assert again['ap'] == report.ap and again['step'] == 2


def _boxes(*xywh, score=0.9, image_id=1):
  return [dict(image_id=image_id, category_id=1, bbox=list(b), score=score)
          for b in xywh]


def test_box_ap_of_hand_made_detections():
  """pycocotools' box AP as `box_ap` reports it: 1 for the true boxes, an
  IoU-0.6 box counts at AP50 but not at the stricter thresholds, a miss
  scores 0, and a false positive ranked first lowers the AP."""
  from kpseq_jax.evaluation import box_ap
  images = [dict(id=1, width=640, height=480), dict(id=2, width=640,
                                                    height=480)]
  truth = (_boxes((100, 100, 100, 100)) + _boxes((300, 200, 50, 80),
                                                 image_id=2))
  exact = box_ap.box_ap(images, truth, truth, [1])
  assert exact['ap'] == exact['ap50'] == exact['ar100'] == pytest.approx(1.0)
  # Shifted by 20 px on image 1: IoU 8000 / 12000 = 0.67, a match at IoU
  # thresholds 0.50-0.65, not at 0.70-0.95 (there recall 1/2, and precision
  # 1 with the shifted box ranked last: AP 51/101 on COCO's 101 recalls).
  shifted = _boxes((120, 100, 100, 100), score=0.5) + truth[1:]
  s = box_ap.box_ap(images, truth, shifted, [1])
  assert s['ap50'] == pytest.approx(1.0)
  assert s['ap75'] == pytest.approx(51 / 101, abs=1e-6)
  assert s['ap'] == pytest.approx((4 + 6 * 51 / 101) / 10, abs=1e-6)
  missed = box_ap.box_ap(images, truth, _boxes((500, 0, 20, 20)), [1])
  assert missed['ap'] == missed['ap50'] == 0.0
  # A confident false positive ranked above the true boxes.
  ranked = truth + _boxes((500, 0, 20, 20), score=0.99)
  r = box_ap.box_ap(images, truth, ranked, [1])
  assert r['ap50'] < 1.0 and r['ar100'] == pytest.approx(1.0)
  assert box_ap.box_ap(images, truth, [], [1])['ap'] == 0.0


def test_predict_crops_the_detected_boxes(tiny_detector, trained, shared_data,
                                          tmp_path):
  """`--mode predict` without --boxes takes the detector's boxes above its
  threshold; an image with none is counted and gets no prediction."""
  import shutil
  from kpseq_jax.inference import box_predictor
  from kpseq_jax.inference import predict
  from kpseq_jax.runtime import sharding
  det_config, det_workdir, _ = tiny_detector
  config, workdir, _ = trained
  images = tmp_path / 'frames'
  images.mkdir()
  frames = sorted((shared_data / 'dlc_openfield' / 'images' / 'm4s1').glob(
      '*.png'))[:2]
  for f in frames:
    shutil.copy(f, images / f.name)
  detector = box_predictor.ImageDetector(
      det_config, str(det_workdir), sharding.create_mesh((-1, 1)))
  detector.threshold = 0.0  # Untrained scores: keep every box.
  found = detector.detect(np.zeros([480, 640, 3], np.uint8))
  assert len(found) == 3 and all(cid == 1 for cid, _, _ in found)
  summary = predict.predict(config, str(workdir), str(images),
                            str(tmp_path / 'all'), detector=detector)
  assert summary.num_images == 2 and summary.num_boxes == 6
  preds = json.loads((tmp_path / 'all' / 'predictions.json').read_text())
  # Every box of each image (3 = max_detections) gave one pose.
  assert sorted(collections.Counter(p['image_id'] for p in preds).values()
                ) == [3, 3]
  detector.threshold = 1.01  # Nothing passes.
  summary = predict.predict(config, str(workdir), str(images),
                            str(tmp_path / 'none'), detector=detector)
  assert summary.num_boxes == 0
  assert summary.images_without_detection == [f.name for f in frames]
  report = json.loads(
      (tmp_path / 'none' / 'predict_report.json').read_text())
  assert report['images_without_detection'] == [f.name for f in frames]


def test_end_to_end_keypoints_reuse_the_detectors_backbone_pass(
    tiny_detector, dlc_dataset, shared_data):
  """PRTR's one backbone pass: an end-to-end keypoint model whose backbone
  equals the detector's decodes from the detector's feature maps
  (`box_predictor.shares_backbone`, `CanvasBatcher.features_of`) and gets
  the keypoints it gets when it encodes the frames itself; a backbone
  that differs in one array, or another canvas, is not shared."""
  import jax
  from conftest import smoke_config
  from PIL import Image
  from kpseq_jax.inference import box_predictor
  from kpseq_jax.inference import batchers
  from kpseq_jax.inference import predictor as predictor_lib
  from kpseq_jax.runtime import sharding
  from kpseq_jax.training import train_state as ts
  det_config, det_workdir, _ = tiny_detector
  mesh = sharding.create_mesh((-1, 1))
  detector = box_predictor.ImageDetector(det_config, str(det_workdir), mesh)
  detector.threshold = 0.0  # Untrained scores: keep every box.
  config = smoke_config(dlc_dataset, **{'model_name': 'end_to_end'},
                        **{'detector.image_size_px': (96, 128)},
                        **{'model.resnet.norm': 'frozen_batch'},
                        **{'evals.batch_size': 8})
  model = ts.create_model(config)
  variables = jax.jit(lambda r: model.init(
      r, **ts.dummy_inputs(config), train=False))(jax.random.PRNGKey(1))
  det_vars = detector.predictor.variables
  own = {c: dict(variables[c]) for c in ('params', 'batch_stats')}
  for c in own:
    own[c]['backbone'] = det_vars[c]['backbone']
  head = dict(own['params']['class_head'])  # No <eos>: decode every group.
  head['bias'] = head['bias'].at[model.vocab.eos].add(-1e4)
  own['params']['class_head'] = head
  kp = predictor_lib.Predictor(config, model, jax.device_put(own), mesh)
  assert box_predictor.shares_backbone(detector, kp, config) == (
      True, 'equal backbones')
  moved = jax.tree.map(lambda a: a, own)
  conv = dict(moved['params']['backbone']['conv1'])
  conv['kernel'] = conv['kernel'] + 1e-3
  moved['params']['backbone'] = dict(moved['params']['backbone'], conv1=conv)
  shared, why = box_predictor.shares_backbone(
      detector, predictor_lib.Predictor(config, model, moved, mesh), config)
  assert not shared and 'conv1' in why
  shared, why = box_predictor.shares_backbone(
      detector, kp, smoke_config(dlc_dataset, **{'model_name': 'end_to_end'},
                                 **{'detector.image_size_px': (64, 96)}))
  assert not shared and 'canvases differ' in why

  frame = np.asarray(Image.open(sorted(
      (shared_data / 'dlc_openfield' / 'images' / 'm4s1').glob('*.png'))[0]
  ).convert('RGB'))
  frames = [frame, np.ascontiguousarray(frame[::-1, ::-1])]  # Two images.
  once = batchers.make_batcher(config, kp, {}, detector=detector)
  twice = batchers.make_batcher(config, kp, {})
  assert once.features_of is not None and twice.features_of is None
  exs_once, exs_twice, boxes = [], [], []
  for frame in frames:
    boxes.append([bbox for _, bbox, _ in detector.detect(frame)])
    for bbox in boxes[-1]:  # 3 per frame (max_detections).
      exs_once.append(once.crop(frame, bbox, 1))
      exs_twice.append(twice.crop(frame, bbox, 1))
  assert len(exs_once) == 6
  shared_pred = once.predict_crops(exs_once)
  own_pred = twice.predict_crops(exs_twice)
  assert np.all(np.isfinite(own_pred.keypoints_px))
  assert (once.images_from_detector, once.images_encoded) == (2, 0)
  assert (twice.images_from_detector, twice.images_encoded) == (0, 2)
  np.testing.assert_allclose(shared_pred.keypoints_px, own_pred.keypoints_px,
                             atol=1e-3)
  np.testing.assert_allclose(shared_pred.confidence, own_pred.confidence,
                             atol=1e-4)
  # The same box on the other image decodes elsewhere: the maps matter.
  other = twice.predict_crops([twice.crop(frames[1], b, 1)
                               for b in boxes[0]])
  assert np.abs(other.keypoints_px - own_pred.keypoints_px[:3]).max() > 0.1
