"""--mode predict on the dlc_openfield test frames with the smoke model."""

import json
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import coco as coco_lib
import pytest

import conftest
from data_prep.categories import Category
from kpseq_jax.data import dataset
from kpseq_jax.evaluation import metrics
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import predict
from kpseq_jax.inference import predict_outputs
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import results as results_lib
from kpseq_jax.data import transforms
from kpseq_jax.data import visualize


@pytest.fixture(scope='module')
def predicted(trained, shared_data, tmp_path_factory):
  """Predict with test.json's boxes on the whole image folder."""
  config, workdir, _ = trained
  out = tmp_path_factory.mktemp('predict')
  boxes = shared_data / 'dlc_openfield' / 'annotations' / 'test.json'
  summary = predict.predict(config, str(workdir),
                            str(shared_data / 'dlc_openfield' / 'images'),
                            str(out), boxes_file=str(boxes))
  return out, summary, json.loads(boxes.read_text()), workdir


def summary_workdir(predicted):
  return predicted[3]


def test_without_calibration_the_raw_values_are_written(trained, shared_data,
                                                        tmp_path, caplog):
  """A workdir without calibration.json (trained before it) writes raw
  confidences and v = presence >= 0.5, as before; the same workdir with its
  map writes the map of the same raw values for boxes of the training scale,
  and 0 for these whole 640 x 480 frames (training boxes 143-239 px: out
  of range), with a warning naming --detector_workdir and --boxes."""
  config, workdir, _ = trained
  old = tmp_path / 'old'
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns(
      likelihood.FILE, 'tensorboard'))
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('img0001.png', 'img0050.png'):
    shutil.copy(shared_data / 'dlc_openfield' / 'images' / 'm4s1' / name,
                images / name)
  runs, summaries = {}, {}
  for name, w in (('raw', old), ('calibrated', workdir)):
    caplog.clear()
    summaries[name] = predict.predict(config, str(w), str(images),
                                      str(tmp_path / name))
    runs[name] = json.loads((tmp_path / name / 'predictions.json').read_text())
    [warning] = [m for m in caplog.messages if 'outside the training' in m]
    assert '2 of 2 boxes' in warning and '--detector_workdir' in warning
  cmap = likelihood.load(str(workdir), json.loads(
      (workdir / 'best_checkpoint.json').read_text())['step'])
  for r, c in zip(runs['raw'], runs['calibrated']):
    assert 'keypoint_confidence_raw' not in r
    assert r['box_out_of_range'] and c['box_out_of_range']  # 640 px boxes.
    kp = np.reshape(r['keypoints'], [4, 3])
    np.testing.assert_array_equal(kp[:, 2],
                                  np.array(r['keypoint_presence']) >= 0.5)
    np.testing.assert_allclose(c['keypoint_confidence_raw'],
                               r['keypoint_scores'], atol=1e-4)
    assert min(cmap(likelihood.raw_likelihood(
        r['keypoint_scores'], r['keypoint_presence']))) > 0  # The map's.
    # Out of the training range: calibrated likelihood 0, raw kept.
    assert c['keypoint_scores'] == [0.0] * 4
    assert np.reshape(c['keypoints'], [4, 3])[:, 2].tolist() == [0.0] * 4
  for summary in summaries.values():
    assert summary.boxes_out_of_range == summary.num_boxes == 2
    assert summary.box_range['high_px'] < 640


def test_one_result_per_box_inside_its_crop(predicted):
  out, summary, gt, _ = predicted
  results = json.loads((out / 'predictions.json').read_text())
  anns = {a['image_id']: a for a in gt['annotations']}
  assert summary.num_boxes == len(results) == len(gt['annotations']) == 23
  # The test frames' own boxes are of the training scale.
  assert summary.boxes_out_of_range == 0
  assert not any(r['box_out_of_range'] for r in results)
  assert summary.num_images == 23 and not summary.unreadable
  assert sorted(r['image_id'] for r in results) == sorted(anns)
  for r in results:
    # Instance score: mmpose's bbox_keypoint rescoring of the per-keypoint
    # confidences (box score 1 for given boxes).
    assert r['category_id'] == 1 and len(r['keypoint_scores']) == 4
    assert all(0 <= s <= 1 for s in r['keypoint_scores'])
    assert r['score'] == pytest.approx(
        results_lib.bbox_keypoint_score(1.0, r['keypoint_scores']), abs=1e-3)
    kp = np.reshape(r['keypoints'], [4, 3])  # K * 3 numbers.
    presence = np.array(r['keypoint_presence'])
    assert presence.shape == (4,) and np.all((presence >= 0) & (presence <= 1))
    # The run fitted a likelihood map on its val split: the third values
    # and keypoint_scores are the calibrated confidence x presence.
    cmap = likelihood.load(str(summary_workdir(predicted)),
                           summary.checkpoint_step)
    calibrated = cmap(likelihood.raw_likelihood(r['keypoint_confidence_raw'],
                                                presence))
    np.testing.assert_allclose(r['keypoint_scores'], calibrated, atol=1e-2)
    np.testing.assert_allclose(kp[:, 2], calibrated, atol=1e-2)
    # Decoded crop coordinates are in [0, 1]: back in the image they lie in
    # the top-down crop square of the box.
    m = transforms.crop_matrix(anns[r['image_id']]['bbox'], 1, 1.25)
    crop_xy = transforms.apply_affine(m, kp[:, :2])
    assert np.all((crop_xy >= -1e-3) & (crop_xy <= 1 + 1e-3))
  table = json.loads((out / 'images.json').read_text())['images']
  assert {(i['id'], i['file_name']) for i in table} == {
      (i['id'], i['file_name']) for i in gt['images']}


def test_results_load_in_pycocotools_and_match_eval(predicted, trained,
                                                    shared_data):
  """Same crops as evaluation: same keypoints and the same PCK figure."""
  out, _, _, _ = predicted
  _, workdir, report = trained
  gt = coco_lib.COCO(str(shared_data / 'dlc_openfield' / 'annotations' /
                         'test.json'))
  dt = gt.loadRes(str(out / 'predictions.json'))
  eval_preds = json.loads((workdir / 'predictions_test.json').read_text())
  ids = [p['image_id'] for p in eval_preds]  # The 8 instances evaluated.
  acc = metrics.PCKAccumulator()
  for p in eval_preds:
    [d] = dt.loadAnns(dt.getAnnIds(imgIds=p['image_id']))
    np.testing.assert_allclose(d['keypoints'], p['keypoints'], atol=2e-3)
    [a] = gt.loadAnns(gt.getAnnIds(imgIds=p['image_id']))
    acc.update(np.array([a['category_id']]),
               np.reshape(d['keypoints'], [1, 4, 3])[..., :2],
               np.reshape(a['keypoints'], [1, 4, 3]), np.array([a['bbox']]))
  assert len(ids) == 8
  assert acc.result().pck == pytest.approx(report.pck)
  assert acc.result().mean_error_px == pytest.approx(
      report.mean_error_px, abs=1e-3)


def test_overlays_have_the_image_size_and_keypoint_colours(predicted,
                                                           shared_data):
  out, _, gt, _ = predicted
  results = {r['image_id']: r for r in
             json.loads((out / 'predictions.json').read_text())}
  colors = visualize.keypoint_colors(4)
  assert len(set(colors)) == 4
  checked = 0
  for im in gt['images']:
    src = Image.open(shared_data / 'dlc_openfield' / 'images' /
                     im['file_name'])
    path = predict_outputs.overlay_path(str(out), im['file_name'])
    overlay = Image.open(path)
    assert overlay.format == 'PNG' and overlay.mode == 'RGB'
    assert overlay.size == src.size == (im['width'], im['height'])
    pixels = np.asarray(overlay)
    kp = np.reshape(results[im['id']]['keypoints'], [4, 3])
    radius = visualize.marker_radius(*overlay.size)
    for k in range(4):  # Discs are drawn in order; a later one may cover.
      later = np.linalg.norm(kp[k + 1:, :2] - kp[k, :2], axis=1)
      if np.any(later < 2 * radius + 2):
        continue
      x, y = np.round(kp[k, :2]).astype(int)
      if not (0 <= x < overlay.size[0] and 0 <= y < overlay.size[1]):
        continue  # Off the image: no centre to look at.
      assert tuple(pixels[y, x]) == colors[k], (im['file_name'], k)
      checked += 1
    # Away from the drawing the overlay is the (grey) input image.
    grey = np.asarray(src.convert('RGB'))
    far = np.ones(pixels.shape[:2], bool)
    yy, xx = np.mgrid[:pixels.shape[0], :pixels.shape[1]]
    for x, y in kp[:, :2]:
      far &= np.hypot(xx - x, yy - y) > 80
    np.testing.assert_array_equal(pixels[far], grey[far])
  assert checked >= 23  # At least one keypoint per image checked.


def test_cli_whole_images_and_unreadable_files(trained, shared_data,
                                               tmp_path):
  """``--mode predict`` without boxes; a broken file is listed, not fatal."""
  config, workdir, _ = trained
  images = tmp_path / 'in'
  (images / 'sub').mkdir(parents=True)
  src = shared_data / 'dlc_openfield' / 'images' / 'm4s1'
  shutil.copy(src / 'img0004.png', images / 'a.png')
  shutil.copy(src / 'img0009.png', images / 'sub' / 'b.png')
  (images / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  (images / 'notes.txt').write_text('ignored')
  out = tmp_path / 'out'
  # A subprocess: kpseq_jax.main and data_prep.build both define --out.
  run = subprocess.run(
      [sys.executable, '-m', 'kpseq_jax.main', '--mode=predict',
       f'--config={conftest.REPO / "configs" / "smoke.py"}',
       f'--config.input.dataset_dir={config.input.dataset_dir}',
       f'--workdir={workdir}',
       f'--config.vocab.presence_token={config.vocab.presence_token}',
       f'--images={images}', f'--out={out}'],
      cwd=conftest.REPO, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'broken.png' in run.stderr  # Listed at the end.
  table = json.loads((out / 'images.json').read_text())['images']
  assert [(i['id'], i['file_name']) for i in table] == [(1, 'a.png'),
                                                        (3, 'sub/b.png')]
  results = json.loads((out / 'predictions.json').read_text())
  assert [r['image_id'] for r in results] == [1, 3]
  for r in results:  # Whole-image box: the crop covers the image.
    kp = np.reshape(r['keypoints'], [4, 3])
    assert np.all((kp[:, 0] > -100) & (kp[:, 0] < 740))
  report = json.loads((out / 'predict_report.json').read_text())
  assert [u['file'] for u in report['unreadable']] == ['broken.png']
  assert (out / 'overlays' / 'a.png').exists()
  assert (out / 'overlays' / 'sub' / 'b.png').exists()
  assert not (out / 'overlays' / 'broken.png').exists()


def _info(*ids):
  cats = {i: Category.from_metadata(
      dict(id=i, name=f'c{i}', num_keypoints=2, keypoint_names=['a', 'b']))
          for i in ids}
  return dataset.DatasetInfo(cats, {'train': 1})


def test_category_choice():
  assert image_inputs.choose_category(_info(3), None) == 3
  assert image_inputs.choose_category(_info(3, 4), 4) == 4
  with pytest.raises(ValueError, match='several categories'):
    image_inputs.choose_category(_info(3, 4), None)
  with pytest.raises(ValueError, match='not in the data set'):
    image_inputs.choose_category(_info(3), 7)


def test_boxes_from_a_detections_list(tmp_path):
  rels = ['x/000000000042.jpg', 'y/cat.png', 'y/dog.png']
  dets = [{'image_id': 42, 'category_id': 1, 'bbox': [1, 2, 3, 4],
           'score': 0.9},
          {'image_id': 7, 'category_id': 2, 'bbox': [0, 0, 5, 5],
           'file_name': 'cat.png'},
          {'image_id': 8, 'category_id': 1, 'bbox': [0, 0, 5, 5]}]
  f = tmp_path / 'dets.json'
  f.write_text(json.dumps(dets))
  ids, boxes, missing = image_inputs.read_boxes(str(f), rels)
  assert ids == {'x/000000000042.jpg': 42, 'y/cat.png': 7}
  assert boxes['x/000000000042.jpg'] == [image_inputs.Box(1, (1, 2, 3, 4), 0.9)]
  assert boxes['y/cat.png'] == [image_inputs.Box(2, (0, 0, 5, 5), 1.0)]
  assert missing == ['image 8 (?)']
  f.write_text(json.dumps([{'image_id': 1, 'category_id': 1,
                            'bbox': [0, 0, 1, 1]}]))
  with pytest.raises(ValueError, match='no file under --images is named'):
    image_inputs.read_boxes(str(f), ['y/cat.png'])
