"""Poses as text (inference/captions.py) and the captioning papers' pixel figures."""

import json

import numpy as np
import pytest

from kpseq_jax.evaluation import metrics
from kpseq_jax.inference import captions

NAMES = ['snout', 'leftear', 'rightear', 'tailbase']


def test_caption_format_and_round_trip():
  kp = np.array([[312.44, 188.0], [301.25, 176.549], [np.nan, np.nan], [-3.0, 1e3]])
  line = captions.caption(kp, NAMES)
  assert line == ('snout (312.4, 188.0); leftear (301.2, 176.5); rightear (n/a); '
                  'tailbase (-3.0, 1000.0)')
  np.testing.assert_allclose(captions.parse_caption(line, NAMES), kp, atol=0.05)
  assert captions.caption(kp[:2], ['a']) == 'a (312.4, 188.0); kp1 (301.2, 176.5)'
  with pytest.raises(ValueError, match='names'):
    captions.parse_caption(line, NAMES[::-1])
  with pytest.raises(ValueError, match='not "name'):
    captions.parse_caption('snout 1, 2', ['snout'])


def test_pixel_accuracy_by_hand():
  gt = np.array([[[0, 0, 2], [10, 10, 2], [5, 5, 0], [0, 0, 2]],
                 [[0, 0, 2], [10, 10, 2], [5, 5, 2], [0, 0, 2]]], float)
  pred = np.array([[[0.6, 0.8], [13, 14], [100, 100], [30, 40]],  # 1, 5, (unlabelled), 50 px
                   [[0, 0], [10, 35], [np.nan, np.nan], [0, 2]]], float)  # 0, 25, missing, 2 px
  r = metrics.pixel_accuracy(pred, gt, NAMES)
  o = r['overall']
  assert o['num_labelled'] == 7 and o['not_generated'] == 1
  assert o['acc@1px'] == pytest.approx(2 / 7)  # 1 px counts (<=), 0 px.
  assert o['acc@5px'] == pytest.approx(4 / 7)  # + 5 px, 2 px.
  assert o['acc@25px'] == pytest.approx(5 / 7)  # + 25 px; 50 px and the missing one never.
  # MAE over coordinates of the 6 generated: |dx|, |dy| pairs.
  abs_err = [0.6, 0.8, 3, 4, 30, 40, 0, 0, 0, 25, 0, 2]
  assert o['mae_px'] == pytest.approx(np.mean(abs_err))
  assert r['per_keypoint']['rightear'] == {'acc@1px': 0.0, 'acc@5px': 0.0, 'acc@25px': 0.0,
                                           'mae_px': pytest.approx(float('nan'), nan_ok=True),
                                           'num_labelled': 1, 'not_generated': 1}
  assert r['per_keypoint']['leftear']['acc@25px'] == 1.0
  assert r['per_keypoint']['leftear']['acc@5px'] == 0.5


def test_eval_report_carries_pixel_accuracy(trained, shared_data):
  """The figures in eval_test.json are those of its predictions."""
  _, workdir, report = trained
  preds = json.loads((workdir / 'predictions_test.json').read_text())
  gt = json.loads((shared_data / 'dlc_openfield' / 'annotations' / 'test.json').read_text())
  anns = {a['image_id']: a for a in gt['annotations']}
  pred = np.array([np.reshape(p['keypoints'], [4, 3])[:, :2] for p in preds])
  truth = np.array([np.reshape(anns[p['image_id']]['keypoints'], [4, 3]) for p in preds])
  expected = metrics.pixel_accuracy(pred, truth, NAMES)
  got = json.loads((workdir / 'eval_test.json').read_text())['pixel_accuracy']
  assert got['thresholds_px'] == [1.0, 5.0, 25.0]
  for key in ('acc@1px', 'acc@5px', 'acc@25px', 'mae_px', 'num_labelled'):
    assert got['overall'][key] == pytest.approx(expected['overall'][key], abs=1e-3)
  assert set(got['per_keypoint']) == set(NAMES)
  assert report.pixel_accuracy['overall']['num_labelled'] == 32  # 8 instances x 4.
