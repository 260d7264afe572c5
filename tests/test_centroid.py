"""The centre-heatmap box model (CenterNet, models/centroid.py): its targets,
loss and decoding against hand values, a tiny one learning to box two
rectangles, and the config path through training, `--mode eval` and the
detector `predict`/`analyze` use."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from kpseq_jax.models import centroid
from kpseq_jax.models import detector
from kpseq_jax.training import centroid_losses

_targets = jax.jit(centroid_losses.centre_targets, static_argnums=(3, 4))


def test_targets_peak_at_the_centre_cell_with_offset_and_size_in_cells():
  # One box on an 8 x 10 grid (h, w): centre (0.55, 0.3) -> cell column
  # 5.5 -> 5, row 2.4 -> 2; size (0.2, 0.5) -> 2 x 4 cells.
  boxes = np.array([[[0.55, 0.3, 0.2, 0.5], [0, 0, 0, 0]]], np.float32)
  t = _targets(boxes, np.zeros((1, 2), np.int32),
               np.array([[True, False]]), (8, 10), 2)
  heat = np.asarray(t['heatmap'])
  assert heat.shape == (1, 8, 10, 2)
  assert heat[0, 2, 5, 0] == 1.0 and (heat[..., 1] == 0).all()
  assert np.argwhere(heat[..., 0] == 1.0).tolist() == [[0, 2, 5]]
  # TTFNet's Gaussian, sigma = 0.54 * size / 6 cells per axis.
  sx, sy = 0.54 * 2 / 6, 0.54 * 4 / 6
  assert heat[0, 3, 6, 0] == pytest.approx(
      np.exp(-0.5 * ((1 / sx) ** 2 + (1 / sy) ** 2)), rel=1e-5)
  assert int(t['cell'][0, 0]) == 2 * 10 + 5
  np.testing.assert_allclose(t['offset'][0, 0], [0.5, 0.4], atol=1e-5)
  np.testing.assert_allclose(t['size'][0, 0], [2.0, 4.0], atol=1e-5)


def test_targets_of_a_class_take_the_larger_gaussian():
  boxes = np.array([[[0.25, 0.5, 0.5, 0.5], [0.65, 0.5, 0.5, 0.5]]],
                   np.float32)
  valid = np.array([[True, True]])
  one = _targets(boxes[:, :1], np.zeros((1, 1), np.int32), valid[:, :1],
                 (8, 8), 1)['heatmap']
  other = _targets(boxes[:, 1:], np.zeros((1, 1), np.int32), valid[:, 1:],
                   (8, 8), 1)['heatmap']
  both = _targets(boxes, np.zeros((1, 2), np.int32), valid, (8, 8),
                  1)['heatmap']
  close = dict(rtol=1e-4, atol=1e-7)  # Other shapes, other fusion.
  np.testing.assert_allclose(both, np.maximum(one, other), **close)
  split = _targets(boxes, np.array([[0, 1]], np.int32), valid, (8, 8),
                   2)['heatmap']
  np.testing.assert_allclose(split[..., 0], one[..., 0], **close)
  np.testing.assert_allclose(split[..., 1], other[..., 0], **close)


def test_heatmap_loss_is_centernets_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (2, 4, 5, 1)).astype(np.float32)
  target = rng.uniform(0, 0.9, (2, 4, 5, 1)).astype(np.float32)
  target[0, 1, 2, 0] = target[1, 3, 4, 0] = 1.0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  pos = target == 1
  # CenterNet src/lib/models/losses.py _neg_loss, alpha 2, beta 4.
  pos_loss = (np.log(p) * (1 - p) ** 2)[pos].sum()
  neg_loss = (np.log(1 - p) * p ** 2 * (1 - target) ** 4)[~pos].sum()
  want = -(pos_loss + neg_loss) / pos.sum()
  got = centroid_losses.heatmap_focal_loss(logits, target, jnp.float32(2))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_offset_and_size_are_read_at_each_boxs_centre_cell():
  boxes = np.array([[[0.55, 0.3, 0.2, 0.5], [0.1, 0.9, 0.1, 0.1]]],
                   np.float32)
  labels, valid = np.zeros((1, 2), np.int32), np.array([[True, False]])
  heat = np.zeros((1, 8, 10, 1), np.float32)
  offset = np.zeros((1, 8, 10, 2), np.float32)
  size = np.zeros((1, 8, 10, 2), np.float32)
  offset[0, 2, 5], size[0, 2, 5] = [0.5, 0.4], [2.0, 4.0]
  _, parts = centroid_losses.centroid_loss(heat, offset, size, boxes, labels,
                                           valid)
  assert float(parts['offset']) == pytest.approx(0, abs=1e-4)
  assert float(parts['size']) == pytest.approx(0, abs=1e-4)
  # The same values one cell to the right miss: mean |error| over (x, y).
  shifted = np.roll(offset, 1, axis=2), np.roll(size, 1, axis=2)
  _, parts = centroid_losses.centroid_loss(heat, *shifted, boxes, labels,
                                           valid)
  assert float(parts['offset']) == pytest.approx(0.45, abs=1e-3)
  assert float(parts['size']) == pytest.approx(3.0, abs=1e-3)


def test_decoding_keeps_local_maxima_and_reads_their_boxes():
  heat = np.full((1, 4, 6, 1), -5.0, np.float32)
  heat[0, 1, 1, 0], heat[0, 1, 2, 0] = 3.0, 2.0  # A peak and its shoulder.
  heat[0, 3, 4, 0] = 1.0  # A second, weaker peak.
  offset = np.full((1, 4, 6, 2), 0.5, np.float32)
  size = np.full((1, 4, 6, 2), 2.0, np.float32)
  size[0, 3, 4] = [-1.0, 3.0]  # A negative width decodes to 0.
  logits, boxes = centroid.dense_to_queries(heat, offset, size)
  assert logits.shape == (1, 1, 24, 1) and boxes.shape == (1, 1, 24, 4)
  scores, labels, xyxy = detector.top_detections(logits[-1], boxes[-1], 3)
  # The shoulder (2.0) is not a maximum: the third box is a flat background
  # cell (a plateau counts as a maximum, as in CenterNet's _nms).
  assert float(logits[0, 0, 1 * 6 + 2, 0]) == centroid.SUPPRESSED
  np.testing.assert_allclose(scores[0], jax.nn.sigmoid(
      np.array([3.0, 1.0, -5.0])), atol=1e-6)
  # Cell (row 1, col 1) + 0.5: centre (1.5 / 6, 1.5 / 4), 2 x 2 cells.
  np.testing.assert_allclose(
      xyxy[0, 0], [0.5 / 6, 0.5 / 4, 2.5 / 6, 2.5 / 4], atol=1e-6)
  np.testing.assert_allclose(
      xyxy[0, 1], [4.5 / 6, 2.0 / 4, 4.5 / 6, 5.0 / 4], atol=1e-6)
  assert (np.asarray(labels) == 0).all()


# One bright rectangle per 64 x 64 image, pixels (x0, y0, x1, y1).
_RECTS = np.array([[8, 8, 28, 24], [30, 30, 58, 54]], np.float32)


def test_a_tiny_centroid_model_learns_to_box_two_rectangles():
  """40 AdamW steps (random, frozen ResNet-18; only the neck and heads
  train) put each image's best box on its rectangle (IoU > 0.5)."""
  model = centroid.Model(
      num_classes=1, resnet=conftest.RESNET | dict(depth=18, frozen_stages=4),
      feature_levels=('c3', 'c4', 'c5'), d_model=32, head_width=32)
  problem = conftest.rectangle_problem(_RECTS)
  images, gt_boxes = problem['images'], problem['gt_boxes']
  labels, valid = problem['labels'], problem['valid']
  variables = jax.jit(model.init, static_argnums=2)(
      jax.random.key(0, impl='rbg'), images, False)
  params = dict(variables['params'])
  frozen = dict(variables, params=params.pop('backbone'))
  tx = optax.adamw(3e-3, weight_decay=1e-4)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      v = dict(frozen, params={**p, 'backbone': frozen['params']})
      heat, offset, size = model.apply(v, images, False)
      return centroid_losses.centroid_loss(heat, offset, size, gt_boxes,
                                           labels, valid)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = jax.jit(tx.init)(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  v = dict(frozen, params={**params, 'backbone': frozen['params']})
  logits, boxes, _ = jax.jit(
      lambda v, x: model.apply(v, x, False,
                               method=model.detect_with_features))(v, images)
  _, _, xyxy = detector.top_detections(logits[-1], boxes[-1], 1)
  assert losses[-1] < 0.25 * losses[0]
  for i, gt in enumerate(problem['gt_xyxy']):
    top = np.asarray(xyxy[i, 0])
    assert conftest.box_iou(top, gt) > 0.5, (i, top, gt)


@pytest.fixture(scope='module')
def tiny_centroid(dlc_dataset, tmp_path_factory):
  """configs/sleap_flies_centroid.py shrunk, trained 2 steps on the real
  open-field frames by `train.train_and_evaluate`."""
  from configs import sleap_flies_centroid
  from kpseq_jax import train
  c = sleap_flies_centroid.get_config()
  c.input.dataset_dir = str(dlc_dataset)
  c.max_num_keypoints = 4
  c.detector.image_size_px = (96, 128)
  c.model.resnet.width = 16  # configs/smoke.py's.
  c.model.d_model, c.model.head_width = 32, 16
  c.input.batch_size, c.optim.num_train_steps, c.log_every_steps = 4, 2, 1
  c.checkpoint_every_steps, c.evals.every_steps, c.evals.batch_size = 2, 0, 8
  workdir = tmp_path_factory.mktemp('centroid')
  reports = train.train_and_evaluate(c, str(workdir))
  return c, workdir, reports


def test_the_config_trains_evaluates_and_detects_like_the_detector(
    tiny_centroid, shared_data):
  """Box AP on val and test, `--mode eval` reading the checkpoint back to
  the same figure, and `ImageDetector` (predict, analyze) boxing a real
  frame as the evaluation did."""
  from kpseq_jax.data import detection
  from kpseq_jax.evaluation import evaluate
  from kpseq_jax.inference import box_predictor
  from kpseq_jax.runtime import sharding
  from PIL import Image
  c, workdir, reports = tiny_centroid
  assert sorted(reports) == ['test_boxes', 'val_boxes']
  assert reports['test_boxes']['num_images'] == 23
  logged = [json.loads(l) for l in (workdir / 'metrics.jsonl').open()]
  assert {'heatmap', 'offset', 'size'} <= set(logged[-1])
  again = evaluate.evaluate(c, str(workdir))['test_boxes']
  assert again['ap'] == reports['test_boxes']['ap'] and again['step'] == 2
  # The detector path of predict and analyze (`ImageDetector`: restore,
  # canvas, forward pass) gives the boxes and scores the evaluation wrote
  # for the same frame.
  first = json.loads((shared_data / 'dlc_openfield' / 'annotations' /
                      'test.json').read_text())['images'][0]
  image = np.asarray(Image.open(shared_data / 'dlc_openfield' / 'images' /
                                first['file_name']).convert('RGB'))
  found = box_predictor.ImageDetector(c, str(workdir),
                                      sharding.create_mesh((-1, 1)))
  ex = detection.to_canvas(
      dict(image=image, bboxes=np.zeros([0, 4], np.float32),
           category_ids=np.zeros([0], np.int64), image_id=0),
      found.predictor.canvas_hw,
      detection.fit_scale((640, 480), found.predictor.canvas_hw), (0.0, 0.0),
      False, found.class_index, found.max_boxes)
  det = found.predictor.predict(
      {k: ex[k][None] for k in ('image', 'canvas_from_image', 'image_size')})
  written = [d for d in json.loads(
      (workdir / 'detections_test.json').read_text())
             if d['image_id'] == first['id']]
  assert len(written) == c.detector.max_detections
  np.testing.assert_allclose(det.scores[0], [d['score'] for d in written],
                             atol=1e-5)
  x0, y0, x1, y1 = np.moveaxis(det.boxes_px[0], -1, 0)
  np.testing.assert_allclose(np.stack([x0, y0, x1 - x0, y1 - y0], -1),
                             [d['bbox'] for d in written], atol=1e-2)


def test_the_config_check_names_levels_the_neck_cannot_sum():
  from configs import sleap_flies_centroid
  from kpseq_jax.training import config_checks
  c = sleap_flies_centroid.get_config()
  config_checks.check(c)
  c.model.feature_levels = ('c3', 'c5')
  with pytest.raises(ValueError, match=r"feature_levels=\('c3', 'c5'\) must "
                     'be consecutive levels'):
    config_checks.check(c)
  c.model.feature_levels, c.model.d_model = ('c4', 'c5'), 48
  with pytest.raises(ValueError, match='d_model=48 must be a multiple of 32'):
    config_checks.check(c)
