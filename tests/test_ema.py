"""Moving average of the weights (``config.optim.ema_decay``,
`step.update_ema`): its formula, the skipped update, and that evaluation,
prediction and checkpoints carry the average rather than the live
weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.training import checkpointing
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts


def _quadratic_state(ema_decay):
  """A one-parameter state trained by SGD on (w - 3)^2, whose 'BatchNorm
  statistic' is set to the step count by the loss function."""
  params = {'w': jnp.zeros([2], jnp.float32)}
  stats = {'mean': jnp.zeros([2], jnp.float32)}
  tx = optax.sgd(0.25)
  state = ts.TrainState(
      step=jnp.int32(0), params=params, batch_stats=stats,
      opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
      ema={'params': params, 'batch_stats': stats} if ema_decay else {})

  def step(state, poison=0.0):
    def loss_fn(p):
      loss = jnp.sum((p['w'] - 3.0) ** 2) + poison
      return loss, ({}, {'mean': jnp.full([2], state.step + 1.0)})
    return step_lib.apply_gradients(
        state, loss_fn, tx=tx, schedule=lambda _: 0.25,
        skip_nonfinite=True, ema_decay=ema_decay)

  return state, jax.jit(step)


def test_average_follows_tf_moving_average_with_num_updates():
  decay = 0.2
  state, step = _quadratic_state(decay)
  w = mean = 0.0
  ema_w = ema_mean = 0.0
  for t in range(4):
    state, _ = step(state)
    w = w - 0.25 * 2 * (w - 3.0)  # SGD on (w - 3)^2.
    mean = t + 1.0
    d = min(decay, (1 + t) / (10 + t))  # 0.1, 0.18, 0.2 (capped), 0.2.
    ema_w = d * ema_w + (1 - d) * w
    ema_mean = d * ema_mean + (1 - d) * mean
  np.testing.assert_allclose(state.params['w'], [w, w], rtol=1e-6)
  np.testing.assert_allclose(state.ema['params']['w'], [ema_w, ema_w],
                             rtol=1e-6)
  np.testing.assert_allclose(state.ema['batch_stats']['mean'],
                             [ema_mean, ema_mean], rtol=1e-6)
  # The average lags the live weights: this is not a copy of them.
  assert abs(ema_w - w) > 0.01


def test_skipped_update_leaves_the_average_unchanged():
  state, step = _quadratic_state(0.5)
  state, _ = step(state)
  before = jax.tree.map(np.asarray, state.ema)
  state, metrics = step(state, poison=jnp.nan)
  assert int(metrics['update_skipped']) == 1
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, state.ema), before)


def test_without_decay_the_state_has_no_average():
  state, step = _quadratic_state(0.0)
  state, _ = step(state)
  assert state.ema == {}
  assert state.inference_variables()['params'] is state.params


@pytest.fixture(scope='module')
def smoke_state():
  config = smoke.get_config()
  config.input.dataset_dir = 'unused'
  config.optim.ema_decay = 0.99
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  return config, mesh, model, tx, ts.create_train_state(config, model, tx,
                                                        mesh)


def test_average_starts_as_a_copy_in_the_weights_shardings(smoke_state):
  _, _, _, _, state = smoke_state
  pairs = zip(jax.tree.leaves(state.ema['params']),
              jax.tree.leaves(state.params))
  for e, p in pairs:
    np.testing.assert_array_equal(e, p)
    assert e.sharding == p.sharding
    # Own buffers: the train step donates the state, which fails on a
    # buffer held twice.
    assert e.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()


def test_predictor_and_checkpoint_use_the_average(smoke_state, tmp_path):
  config, mesh, model, tx, state = smoke_state
  state = state.replace(ema={
      'params': jax.tree.map(lambda p: p + 1.0, state.params),
      'batch_stats': state.batch_stats})
  predictor = predictor_lib.Predictor.from_state(config, model, state, mesh)
  jax.tree.map(np.testing.assert_array_equal,
               predictor.variables['params'], state.ema['params'])

  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(5, state)
  ckpt.wait()
  restored, step = ckpt.restore(ts.abstract_train_state(config, model, tx,
                                                        mesh))
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, restored.ema['params'],
               state.ema['params'])
  # A model put on this run's backbone gets the averaged one too.
  backbone, _ = checkpointing.read_backbone(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, backbone,
               state.ema['params']['backbone'])
  # Evaluated with a config without the average, the checkpoint is
  # refused by name rather than read without it.
  plain = config.copy_and_resolve_references()
  plain.optim.ema_decay = 0.0
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='checkpoint are not in this config: ema/.*'
                     'ema_decay'):
    ckpt.restore(ts.abstract_train_state(plain, model, tx, mesh))
  ckpt.close()


@pytest.mark.parametrize('averaged', [True, False])
def test_inference_restores_exactly_the_weights_it_uses(
    smoke_state, tmp_path, monkeypatch, averaged):
  """`predictor.restore_variables` gives `TrainState.inference_variables`
  of the saved state bit for bit, on the same shardings, without building
  an optimizer or reading its state: the checkpoint's optimizer state
  (SGD's, which no config builds) would not restore into this config's."""
  config, mesh, model, _, state = smoke_state
  config = config.copy_and_resolve_references()
  params = jax.tree.map(lambda p: p * 2.0 + 1.0, state.params)
  if averaged:
    state = state.replace(params=params)  # The average is now another.
  else:
    config.optim.ema_decay = 0.0
    state = state.replace(params=params, ema={})
  sgd = optax.sgd(0.1, momentum=0.9)
  state = state.replace(opt_state=sgd.init(state.params))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(7, state)
  ckpt.wait()
  ckpt.close()

  def no_optimizer(*args, **kwargs):
    raise AssertionError('inference built an optimizer')
  monkeypatch.setattr(ts, 'create_optimizer', no_optimizer)
  _, variables, step = predictor_lib.restore_variables(config,
                                                       str(tmp_path), mesh)
  assert step == 7
  want = state.inference_variables()
  assert jax.tree.structure(variables) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert got.sharding == ref.sharding
  # Different weights with and without the average: the right one was read.
  live = jax.tree.leaves(state.params)[0]
  assert np.array_equal(jax.tree.leaves(variables['params'])[0],
                        live) != averaged


def test_inference_refuses_weights_of_another_model(smoke_state, tmp_path):
  config, mesh, _, _, state = smoke_state
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, state)
  ckpt.wait()
  ckpt.close()
  bigger = config.copy_and_resolve_references()
  bigger.model.d_model *= 2
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='another config'):
    predictor_lib.restore_variables(bigger, str(tmp_path), mesh)
