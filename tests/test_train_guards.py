"""Non-finite loss/gradient guards of the train step and impossible configs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dlc_openfield_detector
from configs import smoke
from kpseq_jax.training import config_checks
from data_prep.categories import Category
from kpseq_jax.data import dataset
from kpseq_jax.runtime import scalar_log
from kpseq_jax.training import metrics_log
from kpseq_jax.models import supervised
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts

B, L, V = 2, 6, 5


class _Tiny(nn.Module):
  """Stands in for the sequence model: logits and coords from two params."""
  coordinate_loss: str = 'l1'
  inputs = staticmethod(supervised.Model.inputs)

  @nn.compact
  def __call__(self, images, input_tokens, input_coords, train=False):
    w = self.param('w', nn.initializers.ones, [V])
    c = self.param('c', nn.initializers.zeros, [2])
    logits = jnp.broadcast_to(w, [B, L, V]) * input_coords[..., None]
    return logits, jnp.broadcast_to(c, [B, L, 2]) + input_coords[..., None]


def _batch(bad_value=None):
  """A batch; ``bad_value`` (NaN/inf) in one input coordinate poisons the
  loss and the gradients."""
  coords = jnp.linspace(0, 1, B * L).reshape(B, L)
  if bad_value is not None:
    coords = coords.at[0, 0].set(bad_value)
  return dict(image=jnp.zeros([B, 4, 4, 3], jnp.uint8),
              input_tokens=jnp.zeros([B, L], jnp.int32),
              input_coords=coords,
              target_tokens=jnp.ones([B, L], jnp.int32),
              target_coords=jnp.full([B, L, 2], 0.5, jnp.float32),
              token_weights=jnp.ones([B, L]), coord_weights=jnp.ones([B, L]))


def _step(skip):
  model, tx = _Tiny(), optax.adamw(1e-2)
  params = model.init(jax.random.PRNGKey(0), *[_batch()[k] for k in (
      'image', 'input_tokens', 'input_coords')])['params']
  state = ts.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                        opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
  fn = jax.jit(lambda s, b: step_lib.train_step(
      s, b, model=model, tx=tx, schedule=lambda _: 1e-2, ce_weight=1.0,
      l1_weight=5.0, skip_nonfinite=skip))
  return state, fn


def test_nonfinite_update_is_skipped_inside_the_jitted_step():
  state, fn = _step(skip=True)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  bad, m = fn(state, _batch(np.nan))
  assert int(m['update_skipped']) == 1 and not np.isfinite(m['grad_norm'])
  assert int(bad.step) == 1  # The step (rng fold, data position) advances.
  after = jax.tree.map(np.asarray, (bad.params, bad.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  good, m = fn(bad, _batch())
  assert int(m['update_skipped']) == 0 and np.isfinite(m['loss'])
  assert not np.array_equal(good.params['c'], before[0]['c'])


def test_without_skipping_the_nan_reaches_the_state():
  state, fn = _step(skip=False)
  bad, m = fn(state, _batch(np.nan))
  assert int(m['update_skipped']) == 0
  assert not np.all(np.isfinite(bad.params['w']))


def _metrics(loss, grad_norm, skipped=0):
  return dict(loss=loss, ce=1.0, l1=1.0, grad_norm=grad_norm,
              learning_rate=1e-3, update_skipped=skipped)


@pytest.mark.parametrize('loss, grad_norm', [(np.nan, 1.0), (1.0, np.inf)])
def test_nonfinite_loss_or_gradient_stops_naming_the_step(tmp_path, loss,
                                                         grad_norm):
  log = metrics_log.MetricsLog(10, scalar_log.JsonlWriter(str(tmp_path)))
  log.add(1, _metrics(1.0, 1.0))
  log.add(2, _metrics(loss, grad_norm))
  with pytest.raises(metrics_log.NonFiniteLossError, match='at step 2 '):
    log.flush(log=True)
  steps = scalar_log.read_steps(str(tmp_path))  # Written before raising.
  assert sorted(steps) == [1, 2] and steps[1]['loss'] == 1.0


def test_skipped_updates_are_counted_not_raised(tmp_path):
  log = metrics_log.MetricsLog(10, scalar_log.JsonlWriter(str(tmp_path)),
                          skip_nonfinite=True)
  log.add(1, _metrics(np.nan, np.nan, skipped=1))
  log.add(2, _metrics(1.0, np.inf, skipped=1))
  log.add(3, _metrics(1.0, 1.0))
  log.flush(log=True)
  assert log.skipped_updates == 2
  assert [s['update_skipped'] for s in
          scalar_log.read_steps(str(tmp_path)).values()] == [1, 1, 0]


def test_too_many_consecutive_skipped_updates_stop_training(tmp_path):
  log = metrics_log.MetricsLog(20, scalar_log.JsonlWriter(str(tmp_path)),
                          skip_nonfinite=True, max_consecutive_skipped=3)
  # Two skipped, one good (resets the run), then three skipped in a row.
  for step, skipped in enumerate([1, 1, 0, 1, 1, 1, 0], 1):
    log.add(step, _metrics(np.nan if skipped else 1.0, 1.0, skipped=skipped))
  with pytest.raises(metrics_log.NonFiniteLossError,
                     match='3 consecutive updates up to step 6 '):
    log.flush(log=True)
  assert log.skipped_updates == 5


def _info(ks):
  cats = {i: Category.from_metadata(
      {'id': i, 'name': f'c{i}', 'num_keypoints': k})
          for i, k in enumerate(ks, 1)}
  return dataset.DatasetInfo(cats, {'train': 5, 'test': 2})


def _set(config, path, value):
  *groups, name = path.split('.')
  for g in groups:
    config = config[g]
  config[name] = value


@pytest.mark.parametrize('field, value, message', [
    ('input.image_size_px', 100,
     'input.image_size_px=100 must be a positive multiple of 32'),
    ('vocab.num_bins', 1, 'vocab.num_bins=1 must be >= 2'),
    ('sharding.mesh_shape', (3, 1), 'sharding.mesh_shape=(3, 1) has 3 devices'),
    ('model.transformer.reference_noise', 0.7,
     'model.transformer.reference_noise=0.7 must be in [0, 0.5)'),
    ('model.feature_levels', ('c1',), "model.feature_levels=('c1',) must be"),
    ('input.prefetch_batches', 0, 'input.prefetch_batches=0 must be >= 1'),
    ('model.resnet.depth', 101, 'model.resnet.depth=101 is not one of'),
    ('model.resnet.width', 0, 'model.resnet.width=0 must be >= 1'),
    # The smoke config's width 16 cannot be split into GroupNorm's 32 groups.
    ('model.resnet.norm', 'group', 'model.resnet.width=16 must be >= 1, '
     "and a multiple of 32 with norm='group'"),
    ('model.coordinate_loss', 'l2', "model.coordinate_loss='l2' is not one of"),
    ('model_name', 'pose', "model_name='pose' is not one of"),
])
def test_impossible_config_fails_with_a_clear_message(field, value, message):
  c = smoke.get_config()
  c.input.dataset_dir = 'x'
  _set(c, field, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(c)


def test_model_fields_must_be_the_systems_constructor_fields():
  """A supervised config switched to the detector on the command line is
  refused naming the fields the detector does not have."""
  c = smoke.get_config()
  c.input.dataset_dir = 'x'
  c.model_name = 'detector'
  with pytest.raises(ValueError, match=re.escape(
      "model.aux_loss is not a field of models/detector.py's Model")):
    config_checks.check(c)


@pytest.mark.parametrize('field, value, message', [
    ('detector.scale_range', (1.5, 0.5),
     'detector.scale_range=(1.5, 0.5) must satisfy 0 < lo <= hi'),
    ('detector.vertical_flip_prob', 2.0,
     'detector.vertical_flip_prob=2.0 must be in [0, 1]'),
    ('detector.image_size_px', (16, 64),
     'detector.image_size_px=(16, 64) must be (height, width)'),
    ('detector.max_detections', 11,
     'detector.max_detections=11 must be in 1 .. '),
    ('detector.nms_iou', 1.5, 'detector.nms_iou=1.5 must be in [0, 1]'),
])
def test_impossible_detector_config_fails_with_a_clear_message(field, value,
                                                              message):
  c = dlc_openfield_detector.get_config()  # 10 queries, 1 class.
  c.input.dataset_dir = 'x'
  _set(c, field, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check(c)


def test_end_to_end_canvas_must_be_multiples_of_32():
  c = smoke.get_config('end_to_end')
  c.input.dataset_dir = 'x'
  c.detector.image_size_px = (100, 128)
  with pytest.raises(ValueError, match=re.escape(
      'detector.image_size_px=(100, 128) must be (height, width), >= 32 px '
      'and with the ResNet multiples of 32')):
    config_checks.check(c)


def test_detector_needs_a_class_per_category():
  c = dlc_openfield_detector.get_config()  # max_num_categories = 1
  config_checks.check_dataset(c, _info([4]))
  with pytest.raises(ValueError, match=re.escape(
      "data set's 2 categories (the detector's classes)")):
    config_checks.check_dataset(c, _info([4, 4]))


def test_category_longer_than_the_sequence_is_rejected():
  c = smoke.get_config()  # max_num_keypoints = 4
  config_checks.check_dataset(c, _info([4, 3]))
  with pytest.raises(ValueError, match=r'largest: 2:c2 with K=17.*'
                     r'max_num_keypoints=17'):
    config_checks.check_dataset(c, _info([4, 17, 9]))
  # No 'val' split: the report split ('test') is evaluated instead (logged
  # by training); neither split is an error naming the selection split.
  c.evals.split = 'val'
  config_checks.check_dataset(c, _info([4]))
  c.evals.report_split = 'heldout'
  with pytest.raises(ValueError, match="evals.split='val' is not a split"):
    config_checks.check_dataset(c, _info([4]))


def test_eval_mode_checks_the_config_before_restoring(tmp_path, dlc_dataset):
  from kpseq_jax.evaluation import evaluate
  c = smoke.get_config()
  c.input.dataset_dir = str(dlc_dataset)
  c.max_num_keypoints = 3  # The mouse has K = 4.
  with pytest.raises(ValueError, match='K=4'):
    evaluate.evaluate(c, str(tmp_path))  # No checkpoint: would be FileNotFound.
