"""Box detector (issue 18): GIoU, Hungarian matching, set loss, heads, and a
tiny detector that learns to box a rectangle."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from kpseq_jax.models import detector
from kpseq_jax.models import model as model_lib
from kpseq_jax.models import box_ops
from kpseq_jax.training import detection_losses

# Jitted once for the module: eager dispatch of these is slower than their
# compilation.
_match = jax.jit(detection_losses.hungarian_match)
_set_loss = jax.jit(detection_losses.set_loss)

def _np_giou(a, b):
  """Reference GIoU of two xyxy boxes (Rezatofighi et al. 2019, Alg. 1)."""
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = area(a) + area(b) - inter
  enclosing = ((max(a[2], b[2]) - min(a[0], b[0]))
               * (max(a[3], b[3]) - min(a[1], b[1])))
  return inter / union - (enclosing - union) / enclosing


def _np_xyxy(cxcywh):
  cx, cy, w, h = cxcywh
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _np_cost(logit_row, box, gt_box, label):
  """Deformable DETR HungarianMatcher cost (models/matcher.py), weights
  2 / 5 / 2, alpha 0.25, gamma 2, written out for one pair."""
  p = 1 / (1 + np.exp(-logit_row[label]))
  neg = 0.75 * p**2 * -np.log(1 - p + 1e-8)
  pos = 0.25 * (1 - p)**2 * -np.log(p + 1e-8)
  l1 = np.abs(box - gt_box).sum()
  return 2 * (pos - neg) + 5 * l1 - 2 * _np_giou(_np_xyxy(box),
                                                 _np_xyxy(gt_box))


def _random_problem(seed, batch=2, queries=4, gts=3, classes=3):
  rng = np.random.default_rng(seed)
  def boxes(*shape):
    centre = rng.uniform(0.2, 0.8, shape + (2,))
    size = rng.uniform(0.05, 0.4, shape + (2,))
    return np.concatenate([centre, size], -1).astype(np.float32)
  logits = rng.normal(0, 2, (batch, queries, classes)).astype(np.float32)
  labels = rng.integers(0, classes, (batch, gts)).astype(np.int32)
  valid = np.array([[True, False, True], [True, True, False]])[:, :gts]
  return logits, boxes(batch, queries), boxes(batch, gts), labels, valid


def _brute_force(logits, boxes, gt_boxes, labels, valid):
  """[B, M] optimal query per valid box (-1 for padding), by trying every
  injective assignment."""
  out = np.full(valid.shape, -1)
  for b in range(valid.shape[0]):
    cols = np.flatnonzero(valid[b])
    cost = np.array([[_np_cost(logits[b, q], boxes[b, q], gt_boxes[b, j],
                               labels[b, j]) for j in cols]
                     for q in range(logits.shape[1])])  # [Q, m]
    best = min(itertools.permutations(range(logits.shape[1]), len(cols)),
               key=lambda rows: cost[list(rows), range(len(cols))].sum())
    out[b, cols] = best
  return out


# (a) ------------------------------------------------------------------------


@pytest.mark.parametrize('seed', range(4))
def test_hungarian_match_equals_brute_force(seed):
  problem = _random_problem(seed)
  match = _match(*map(jnp.asarray, problem))
  assert match.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(match), _brute_force(*problem))


def test_matching_cost_is_deformable_detrs():
  logits, boxes, gt_boxes, labels, _ = _random_problem(7)
  cost = np.asarray(jax.jit(detection_losses.matching_cost)(
      logits, boxes, gt_boxes, labels))  # [B, Q, M]
  expected = np.array([[[_np_cost(logits[b, q], boxes[b, q], gt_boxes[b, j],
                                  labels[b, j]) for j in range(3)]
                        for q in range(4)] for b in range(2)])
  np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-5)


# (b) ------------------------------------------------------------------------


def test_hungarian_match_under_jit_and_vmap():
  problems = [_random_problem(seed) for seed in (11, 12)]
  expected = np.stack([_brute_force(*p) for p in problems])  # [2, B, M]
  np.testing.assert_array_equal(
      np.asarray(_match(*map(jnp.asarray, problems[0]))), expected[0])
  stacked = [jnp.asarray(np.stack(x)) for x in zip(*problems)]
  batched = jax.jit(jax.vmap(detection_losses.hungarian_match))(*stacked)
  np.testing.assert_array_equal(np.asarray(batched), expected)


def test_hungarian_match_rejects_more_boxes_than_queries():
  logits, boxes, gt_boxes, labels, valid = _random_problem(0, queries=2)
  with pytest.raises(ValueError, match='queries'):
    _match(logits, boxes, gt_boxes, labels, valid)


# (c) ------------------------------------------------------------------------


def test_generalized_iou_hand_values():
  a = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0],
                 [0.2, 0.3, 0.5, 0.9]])
  b = jnp.array([[2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0],
                 [0.2, 0.3, 0.5, 0.9]])
  giou = np.asarray(box_ops.generalized_iou(a, b))
  # Disjoint: IoU 0, union 2, enclosing [0, 3] x [0, 1] = 3 -> -1/3.
  # Overlapping: inter 1, union 7, enclosing 9 -> 1/7 - 2/9.
  # Identical: 1.
  np.testing.assert_allclose(giou, [-1 / 3, 1 / 7 - 2 / 9, 1.0], rtol=1e-6)


def test_pairwise_generalized_iou_agrees_with_elementwise():
  rng = np.random.default_rng(0)
  def boxes(n):
    lo = rng.uniform(0, 0.7, (2, n, 2))
    return np.concatenate([lo, lo + rng.uniform(0.01, 0.3, (2, n, 2))], -1)
  a, b = boxes(3), boxes(5)  # [2, 3, 4], [2, 5, 4]
  pairwise = np.asarray(box_ops.pairwise_generalized_iou(a, b))
  assert pairwise.shape == (2, 3, 5)
  for i, n, m in itertools.product(range(2), range(3), range(5)):
    assert pairwise[i, n, m] == pytest.approx(
        float(box_ops.generalized_iou(a[i, n], b[i, m])), abs=1e-6)
    assert pairwise[i, n, m] == pytest.approx(_np_giou(a[i, n], b[i, m]),
                                              abs=1e-5)


def test_box_conversions():
  cxcywh = jnp.array([0.5, 0.4, 0.2, 0.6])
  xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy, [0.4, 0.1, 0.6, 0.7], rtol=1e-6)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, rtol=1e-6)


# (d) ------------------------------------------------------------------------


def _layered(seed, layers=2):
  """A set_loss problem with L layers of predictions."""
  logits, boxes, gt_boxes, labels, valid = _random_problem(seed)
  rng = np.random.default_rng(seed + 100)
  logits = np.stack([logits + rng.normal(0, 1, logits.shape)
                     for _ in range(layers)]).astype(np.float32)
  boxes = np.stack([np.clip(boxes + rng.normal(0, 0.05, boxes.shape),
                            0.01, 0.99) for _ in range(layers)]
                   ).astype(np.float32)
  return logits, boxes, gt_boxes, labels, valid


def test_set_loss_is_invariant_to_permuting_queries():
  logits, boxes, gt_boxes, labels, valid = _layered(3)
  loss, parts = _set_loss(logits, boxes, gt_boxes, labels, valid)
  perm = np.array([2, 0, 3, 1])
  loss_p, parts_p = _set_loss(logits[:, :, perm], boxes[:, :, perm],
                              gt_boxes, labels, valid)
  assert float(loss_p) == pytest.approx(float(loss), rel=1e-6)
  for k in ('class', 'l1', 'giou', 'aux'):
    assert float(parts_p[k]) == pytest.approx(float(parts[k]), rel=1e-6)
  # Total = weighted last layer + aux, and the aux layer really counts.
  last = 2 * parts['class'] + 5 * parts['l1'] + 2 * parts['giou']
  assert float(loss) == pytest.approx(float(last + parts['aux']), rel=1e-6)
  assert float(parts['aux']) > 0


def test_set_loss_matches_deformable_detr_formulas():
  """Focal loss summed over queries and classes, L1 and 1 - GIoU summed over
  matched pairs, all divided by the number of boxes in the batch."""
  logits, boxes, gt_boxes, labels, valid = _layered(5, layers=1)
  _, parts = _set_loss(logits, boxes, gt_boxes, labels, valid)
  match = _brute_force(logits[0], boxes[0], gt_boxes, labels, valid)
  num_boxes = valid.sum()
  target = np.zeros(logits[0].shape)
  l1 = giou = 0.0
  for b, j in zip(*np.nonzero(valid)):
    q = match[b, j]
    target[b, q, labels[b, j]] = 1.0
    l1 += np.abs(boxes[0, b, q] - gt_boxes[b, j]).sum()
    giou += 1 - _np_giou(_np_xyxy(boxes[0, b, q]), _np_xyxy(gt_boxes[b, j]))
  p = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
  ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
  p_t = p * target + (1 - p) * (1 - target)
  alpha_t = 0.25 * target + 0.75 * (1 - target)
  focal = (alpha_t * ce * (1 - p_t)**2).sum()
  assert float(parts['class']) == pytest.approx(focal / num_boxes, rel=1e-5)
  assert float(parts['l1']) == pytest.approx(l1 / num_boxes, rel=1e-5)
  assert float(parts['giou']) == pytest.approx(giou / num_boxes, rel=1e-5)
  assert float(parts['aux']) == 0.0


def test_set_loss_is_zero_for_boxes_equal_to_the_targets():
  _, boxes, gt_boxes, labels, valid = _layered(8)
  logits = np.full(boxes.shape[:-1] + (3,), -8.0, np.float32)  # [L, B, Q, C]
  # Query 3 - j predicts box j exactly with its class; the others are
  # elsewhere with low scores.
  for b, j in zip(*np.nonzero(valid)):
    boxes[:, b, 3 - j] = gt_boxes[b, j]
    logits[:, b, 3 - j, labels[b, j]] = 8.0
  _, parts = _set_loss(logits, boxes, gt_boxes, labels, valid)
  assert float(parts['l1']) == pytest.approx(0.0, abs=1e-6)
  assert float(parts['giou']) == pytest.approx(0.0, abs=1e-6)
  assert float(parts['class']) < 1e-3


# (e) ------------------------------------------------------------------------


def test_set_loss_without_ground_truth_is_finite_with_finite_gradients():
  logits, boxes, _, _, _ = _layered(9)
  gt_boxes = np.zeros((2, 3, 4), np.float32)  # Padding is all zeros.
  labels = np.zeros((2, 3), np.int32)
  valid = np.zeros((2, 3), bool)

  def loss_fn(logits, boxes):
    return detection_losses.set_loss(logits, boxes, gt_boxes, labels,
                                     valid)

  (loss, parts), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(logits, boxes)
  assert np.isfinite(float(loss))
  assert float(parts['l1']) == 0.0 and float(parts['giou']) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert np.abs(np.asarray(grads[0])).sum() > 0  # Scores pushed down.
  np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)


# (f) ------------------------------------------------------------------------

_TINY = dict(num_queries=5, d_model=32, feature_levels=('c4', 'c5'),
             transformer=dict(num_heads=4, num_layers=2, ffn_dim=64,
                              dropout=0.0))


def _detector(num_classes, box_refine=True, frozen_stages=-1):
  return conftest.tiny_model(
      'detector', num_classes=num_classes, box_refine=box_refine,
      resnet=dict(depth=18, frozen_stages=frozen_stages), **_TINY)


def _decoder_problem(box_refine):
  """A tiny detector, its decoder-only variables and a random memory."""
  model = _detector(2, box_refine)
  memory = model_lib.Memory(
      jax.random.normal(jax.random.PRNGKey(0), (2, 4 * 4 + 2 * 2, 32)),
      ((4, 4), (2, 2)))
  variables = jax.jit(lambda key, m: model.init(key, m, False,
                                                method=model.decode))(
      jax.random.PRNGKey(1), memory)
  return model, variables, memory


def test_box_refine_stops_gradients_between_layers():
  """Layer 1 samples around and refines layer 0's box (its value changes
  with layer 0's head), but no gradient reaches layer 0's head through
  that reference (Deformable DETR detaches it)."""
  model, variables, memory = _decoder_problem(box_refine=True)
  params = variables['params']

  def boxes_of(head0):  # [L, B, Q, 4]
    return model.apply({'params': {**params, 'box_heads_0': head0}}, memory,
                       False, method=model.decode)[1]

  @jax.jit
  def probe(head0):
    grad = lambda l: jax.grad(lambda h: boxes_of(h)[l].sum())(head0)
    return boxes_of(head0), grad(0), grad(1)

  head0 = params['box_heads_0']
  boxes, grad0, grad1 = probe(head0)
  assert all(np.abs(np.asarray(g)).sum() == 0
             for g in jax.tree_util.tree_leaves(grad1))
  assert sum(np.abs(np.asarray(g)).sum()
             for g in jax.tree_util.tree_leaves(grad0)) > 0
  shifted = jax.tree_util.tree_map(lambda x: x, head0)
  shifted['Dense_2']['bias'] = shifted['Dense_2']['bias'] + 0.5
  moved = probe(shifted)[0]
  assert np.abs(np.asarray(moved[1] - boxes[1])).max() > 1e-3


def test_heads_per_layer_with_box_refine_shared_without():
  def heads(box_refine):
    model = _detector(2, box_refine)
    memory = model_lib.Memory(jnp.zeros((1, 20, 32)), ((4, 4), (2, 2)))
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), memory, False, method=model.decode))
    return sorted(k for k in shapes['params'] if 'heads' in k)

  assert heads(True) == ['box_heads_0', 'box_heads_1', 'class_heads_0',
                         'class_heads_1']
  assert heads(False) == ['box_heads_0', 'class_heads_0']


def test_create_model_passes_the_detector_config_through():
  """``model_name='detector'``: `detector.Model(**config.model)` with the
  data set's classes; each field of the config reaches the model."""
  from configs import dlc_openfield_detector
  from kpseq_jax.training import train_state as ts
  config = dlc_openfield_detector.get_config()
  config.model.num_queries = 7
  config.model.box_refine = False
  config.model.transformer.num_layers = 2
  config.model.resnet.conv_impl = 'xla'
  config.model.dtype = 'bfloat16'
  model = ts.create_model(config)
  assert type(model) is detector.Model
  assert (model.num_classes, model.num_queries, model.box_refine,
          model.transformer['num_layers'], model.resnet['conv_impl'],
          model.feature_levels) == (1, 7, False, 2, 'xla',
                                    ('c2', 'c3', 'c4', 'c5'))
  assert jnp.dtype(model.dtype) == jnp.bfloat16


# (g) ------------------------------------------------------------------------

# One bright rectangle per 64 x 64 image, pixels (x0, y0, x1, y1).
_RECTS = np.array([[8, 8, 28, 24], [36, 30, 60, 56]], np.float32)


@pytest.fixture(scope='module')
def trained():
  """The tiny detector trained 40 AdamW steps on `_RECTS` (random, frozen
  ResNet-18: the backbone's backward pass would double the step's time) and
  its outputs on the two images after the last step."""
  model = _detector(1, frozen_stages=4)
  problem = conftest.rectangle_problem(_RECTS)
  images, gt_boxes, gt_xyxy = (problem['images'], problem['gt_boxes'],
                               problem['gt_xyxy'])
  labels, valid = problem['labels'], problem['valid']
  # rbg keys: the initialisers compile twice as fast as with threefry.
  variables = jax.jit(model.init, static_argnums=2)(
      jax.random.key(0, impl='rbg'), images, False)
  params = dict(variables['params'])
  frozen = dict(variables, params=params.pop('backbone'))
  tx = optax.adamw(3e-3, weight_decay=1e-4)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      v = dict(frozen, params={**p, 'backbone': frozen['params']})
      logits, boxes = model.apply(v, images, True)
      loss, _ = detection_losses.set_loss(logits, boxes, gt_boxes, labels,
                                          valid)
      return loss, (logits, boxes)
    (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, outputs

  opt_state = jax.jit(tx.init)(params)
  losses = []
  for _ in range(41):  # The 41st call returns the outputs after 40 updates.
    params, opt_state, loss, (logits, boxes) = step(params, opt_state)
    losses.append(loss)
  return dict(logits=np.asarray(logits), boxes=np.asarray(boxes),
              losses=np.asarray(losses), gt_xyxy=gt_xyxy)


def test_detector_outputs(trained):
  logits, boxes = trained['logits'], trained['boxes']
  assert logits.shape == (2, 2, 5, 1) and logits.dtype == np.float32
  assert boxes.shape == (2, 2, 5, 4) and boxes.dtype == np.float32
  assert (boxes >= 0).all() and (boxes <= 1).all()


def test_tiny_detector_learns_to_box_a_rectangle(trained):
  assert trained['losses'][-1] < 0.25 * trained['losses'][0]
  scores, labels, xyxy = detector.top_detections(
      trained['logits'][-1], trained['boxes'][-1], 1)
  for i, gt in enumerate(trained['gt_xyxy']):
    top = np.asarray(xyxy[i, 0])
    assert conftest.box_iou(top, gt) > 0.5, (i, top, gt)
  assert (np.asarray(labels) == 0).all()


# (h) ------------------------------------------------------------------------


def test_top_detections_picks_the_highest_scores():
  logits = jnp.array([[[-1.0, 2.0], [3.0, -5.0], [0.5, 1.0]]])  # [1, 3, 2]
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.2, 0.2],
                      [0.8, 0.8, 0.4, 0.2]]])
  scores, labels, xyxy = jax.jit(detector.top_detections,
                                 static_argnums=2)(logits, boxes, 3)
  # Ranking of the 6 (query, class) logits: (1, 0) 3.0, (0, 1) 2.0,
  # (2, 1) 1.0.
  np.testing.assert_allclose(scores[0], jax.nn.sigmoid(jnp.array([3.0, 2.0,
                                                                  1.0])),
                             rtol=1e-6)
  np.testing.assert_array_equal(labels[0], [0, 1, 1])
  assert labels.dtype == jnp.int32
  np.testing.assert_allclose(
      xyxy[0], [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.6, 0.7],
                [0.6, 0.7, 1.0, 0.9]], rtol=1e-6)
