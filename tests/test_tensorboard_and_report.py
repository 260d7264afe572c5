"""TensorBoard events and the evaluation report files of a trained workdir."""

import csv
import io
import struct

import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2

from kpseq_jax.runtime import metric_writer
from kpseq_jax.runtime import scalar_log
from kpseq_jax.evaluation import report as report_lib


def read_events(logdir) -> tuple[dict, dict]:
  """(tag -> {step: value}, tag -> {step: PNG bytes}) of all event files.

  Parses the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and
  the `Event` protos with tensorboardX's bundled proto, no TensorFlow.
  """
  scalars, images = {}, {}
  files = sorted(logdir.glob('events.out.tfevents.*'))
  assert files, f'no event files in {logdir}'
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField('image'):
          images.setdefault(v.tag, {})[event.step] = (
              v.image.encoded_image_string)
        else:
          scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  return scalars, images


def test_training_and_eval_scalars_and_overlays_are_in_the_event_files(
    trained):
  config, workdir, report = trained
  scalars, images = read_events(workdir / metric_writer.SUBDIR)
  for name in ('loss', 'ce', 'l1', 'grad_norm', 'learning_rate',
               'steps_per_sec'):
    # log_every_steps = 1: one point per step.
    assert set(scalars[f'train/{name}']) == {1, 2}, name
    assert all(np.isfinite(v) for v in scalars[f'train/{name}'].values())
  assert scalars['train/learning_rate'][2] == pytest.approx(
      config.optim.learning_rate)
  # The TensorBoard points are the steps' logged losses (one step per log).
  steps = scalar_log.read_steps(str(workdir))
  for step in (1, 2):
    assert scalars['train/loss'][step] == pytest.approx(steps[step]['loss'])
  # evals.every_steps = 1: val (the selection split) after steps 1 and 2;
  # test once, with the checkpoint chosen on val.
  assert set(scalars['eval_val/pck']) == {1, 2}
  chosen = report.checkpoint_step
  assert set(scalars['eval_test/pck']) == {chosen}
  assert scalars['eval_test/pck'][chosen] == pytest.approx(report.pck)
  assert report.likelihood['calibrated'] is not None  # Fitted on val.
  assert scalars['eval_test/likelihood/calibrated/ece'][chosen] == (
      pytest.approx(report.likelihood['calibrated']['ece']))
  assert scalars['eval_test/baseline_pck'][chosen] == pytest.approx(
      report.baseline_pck)
  assert scalars['eval_test/mean_error_px'][chosen] == pytest.approx(
      report.mean_error_px)
  assert scalars['eval_test/per_category_pck/1_mouse_topview'][chosen] == (
      pytest.approx(report.per_category_pck['1:mouse_topview']))
  # Each section's summary floats, at their JSON paths.
  assert scalars['eval_test/oks/ap'][chosen] == pytest.approx(
      report.oks['ap'])
  assert scalars['eval_test/calibration/alpha_0.2/ece'][chosen] == (
      pytest.approx(report.calibration['alpha_0.2']['ece']))
  assert scalars['eval_test/presence/overall/accuracy'][chosen] == (
      pytest.approx(report.presence['overall']['accuracy']))
  # Counts are not curves: no TensorBoard scalar.
  assert 'eval_test/num_instances' not in scalars
  tags = sorted(t for t in images if t.startswith('eval_test/'))
  assert len(tags) == 4  # NUM_OVERLAYS crops of the first eval batch.
  for t in tags:
    img = Image.open(io.BytesIO(images[t][chosen]))
    assert img.size == (2 * 192, 192) and img.mode == 'RGB'  # truth | pred
    assert np.asarray(img).std() > 5  # A picture, not a blank.


def test_writer_off_process_zero_writes_nothing(tmp_path):
  with metric_writer.MetricWriter(str(tmp_path), enabled=False) as w:
    w.write_scalars(1, {'a': 1.0})
    w.write_images(1, {'b': np.zeros([4, 4, 3], np.uint8)})
  assert not (tmp_path / metric_writer.SUBDIR).exists()


def test_writer_rejects_non_rgb8_images_and_cleans_tags(tmp_path):
  with metric_writer.MetricWriter(str(tmp_path), enabled=True) as w:
    with pytest.raises(ValueError, match='uint8'):
      w.write_images(0, {'x': np.zeros([4, 4, 3], np.float32)})
    w.write_scalars(3, {'eval/pck/1:cat face': 0.5})
  scalars, _ = read_events(tmp_path / metric_writer.SUBDIR)
  assert scalars == {'eval/pck/1_cat_face': {3: 0.5}}


def test_eval_report_table_and_pck_curve(trained):
  _, workdir, report = trained
  curve = report.pck_curve
  assert curve.alphas == list(report_lib.ALPHAS)
  assert curve.alphas[0] == 0.05 and curve.alphas[-1] == 0.5
  i = curve.alphas.index(0.2)
  assert curve.pck[i] == report.pck
  assert curve.baseline_pck[i] == report.baseline_pck
  assert np.all(np.diff(curve.pck) >= 0)  # PCK grows with the threshold.
  assert np.all(np.diff(curve.baseline_pck) >= 0)
  rows = list(csv.DictReader(io.StringIO(
      (workdir / 'eval_test.csv').read_text())))
  assert [r['category'] for r in rows] == ['1:mouse_topview', 'mean']
  assert rows[0]['instances'] == '8' and rows[0]['labelled_keypoints'] == '32'
  assert float(rows[-1]['pck@0.2']) == pytest.approx(report.pck, abs=1e-4)
  assert float(rows[-1]['baseline_pck@0.2']) == pytest.approx(
      report.baseline_pck, abs=1e-4)
  md = (workdir / 'eval_test.md').read_text().splitlines()
  assert md[0].startswith('| category | instances |') and md[4] == ''
  # Then OKS AP, the confidence's calibration, the likelihood raw and
  # calibrated (the map fitted on val) and presence.
  sections = [line for line in md if line.startswith('## ')]
  assert sections == ['## OKS (pycocotools COCOeval, keypoints)',
                      '## Confidence calibration',
                      '## Likelihood calibration (test): P(visible and '
                      'within 0.05 x max(box w, h) of the truth)',
                      '## Presence']
  assert (workdir / 'reliability_test.png').exists()
  # dlc_openfield's test frames label every keypoint: 32 known present.
  assert report.presence['overall']['present']['support'] == 32
  assert report.presence['overall']['absent']['support'] == 0
  ap_row = md[md.index(sections[0]) + 4]
  assert ap_row.startswith('| all | ') and float(ap_row.split('|')[2]) == (
      pytest.approx(report.oks['ap'], abs=1e-4))
  png = Image.open(workdir / 'pck_curve_test.png')
  assert png.size == (600, 420)
  assert len(np.unique(np.asarray(png.convert('RGB')).reshape(-1, 3),
                       axis=0)) > 10  # Lines and text were drawn.
