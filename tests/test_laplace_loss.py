"""The Laplace option of the coordinate loss (``coordinate_loss='laplace'``,
issue 19): `losses.laplace_nll`, `losses.sequence_loss` with a log scale,
the model's ``scale_head`` and the train step that reads it."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import conftest
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib
from kpseq_jax.training import losses
from kpseq_jax.models import supervised
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts

KMAX = 2
LENGTH = grammar.seq_len(KMAX)
VOCAB = vocab_lib.Vocab(16)
BATCH = 2


def test_laplace_nll_hand_values_and_its_minimum_at_the_error():
  e, b = 0.1, 0.05
  np.testing.assert_allclose(
      losses.laplace_nll(jnp.float32(e), jnp.log(jnp.float32(b))),
      e / b + np.log(2 * b), rtol=1e-6)
  # d/d(log b) = 1 - |e| / b: zero at b = |e|, where the value is
  # 1 + log 2|e|.
  grad = jax.grad(lambda s: losses.laplace_nll(jnp.float32(e), s))
  np.testing.assert_allclose(grad(jnp.log(jnp.float32(e))), 0.0, atol=1e-6)
  assert grad(jnp.log(jnp.float32(e / 2))) < 0 < grad(jnp.log(jnp.float32(
      2 * e)))
  np.testing.assert_allclose(
      losses.laplace_nll(jnp.float32(e), jnp.log(jnp.float32(e))),
      1 + np.log(2 * e), rtol=1e-6)


def test_sequence_loss_swaps_the_l1_for_the_likelihood_on_the_same_positions():
  logits = jnp.zeros([1, 3, 4])
  coords = jnp.asarray([[[0.5, 0.5], [0.2, 0.3], [0.9, 0.9]]])
  batch = dict(target_tokens=jnp.zeros([1, 3], jnp.int32),
               target_coords=jnp.asarray([[[0.6, 0.5], [0.2, 0.1],
                                           [0.0, 0.0]]]),
               token_weights=jnp.ones([1, 3]),
               coord_weights=jnp.asarray([[1.0, 1.0, 0.0]]))  # 3rd: masked.
  log_b = jnp.log(jnp.full([1, 3, 2], 0.1))
  plain, p = losses.sequence_loss(logits, coords, batch, 1.0, 5.0)
  loss, parts = losses.sequence_loss(logits, coords, batch, 1.0, 5.0, log_b)
  errors = np.array([0.1, 0.0, 0.0, 0.2])  # |e| of the two kept positions.
  nll = np.mean(errors / 0.1 + np.log(0.2))
  np.testing.assert_allclose(parts['laplace_nll'], nll, rtol=1e-5)
  np.testing.assert_allclose(parts['l1'], p['l1'], rtol=1e-6)
  np.testing.assert_allclose(parts['l1'], errors.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, parts['ce'] + 5.0 * nll, rtol=1e-5)
  assert 'laplace_nll' not in p
  np.testing.assert_allclose(plain, p['ce'] + 5.0 * p['l1'], rtol=1e-6)


def _model(coordinate_scale):
  return conftest.tiny_model(
      vocab=VOCAB, resnet=dict(depth=18), feature_levels=('c5',), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=LENGTH,
      coordinate_loss='laplace' if coordinate_scale else 'l1')


def test_the_model_sows_a_log_scale_per_coordinate_from_its_scale_head():
  args = (jnp.zeros([BATCH, 64, 64, 3], jnp.uint8),
          jnp.zeros([BATCH, LENGTH], jnp.int32), jnp.zeros([BATCH, LENGTH]))
  for with_scale in (True, False):
    model = _model(with_scale)
    variables = jax.eval_shape(lambda: model.init(  # Shapes only.
        jax.random.PRNGKey(0), *args, train=False))
    assert ('scale_head' in variables['params']) == with_scale
    _, sown = jax.eval_shape(lambda v: model.apply(
        v, *args, train=False, mutable=['intermediates']), variables)
    if with_scale:
      [log_scale] = sown['intermediates']['coord_log_scale']
      assert log_scale.shape == (BATCH, LENGTH, 2)
      assert log_scale.dtype == jnp.float32
    else:
      assert 'coord_log_scale' not in sown.get('intermediates', {})


class _Scaled(nn.Module):
  """Stands in for the sequence model: fixed outputs and a log scale from
  one parameter, sown as the real model sows it."""
  coordinate_loss: str = 'laplace'
  inputs = staticmethod(supervised.Model.inputs)

  @nn.compact
  def __call__(self, images, input_tokens, input_coords, train=False):
    s = self.param('s', nn.initializers.constant(-1.0), [])
    b, length = input_tokens.shape
    self.sow('intermediates', 'coord_log_scale', jnp.full([b, length, 2], s))
    return jnp.zeros([b, length, 3]), jnp.full([b, length, 2], 0.5)


def test_the_train_step_trains_the_scale_by_the_likelihood():
  model = _Scaled()
  batch = dict(image=jnp.zeros([1, 8, 8, 3], jnp.uint8),
               input_tokens=jnp.zeros([1, 2], jnp.int32),
               input_coords=jnp.zeros([1, 2]),
               target_tokens=jnp.zeros([1, 2], jnp.int32),
               target_coords=jnp.asarray([[[0.6, 0.5], [0.5, 0.2]]]),
               token_weights=jnp.ones([1, 2]), coord_weights=jnp.ones([1, 2]))
  params = {'s': jnp.float32(-1.0)}
  tx = optax.sgd(0.1)
  state = ts.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                        opt_state=tx.init(params), rng=jax.random.PRNGKey(2))
  new_state, m = step_lib.train_step(
      state, batch, model=model, tx=tx, schedule=lambda _: 0.1,
      ce_weight=1.0, l1_weight=5.0)
  errors = np.array([0.1, 0.0, 0.0, 0.3])
  b = np.exp(-1.0)
  np.testing.assert_allclose(m['laplace_nll'],
                             np.mean(errors / b + np.log(2 * b)), rtol=1e-5)
  np.testing.assert_allclose(m['l1'], errors.mean(), rtol=1e-5)
  np.testing.assert_allclose(m['loss'], m['ce'] + 5.0 * m['laplace_nll'],
                             rtol=1e-5)
  # d loss / d s = 5 (1 - mean|e| / b): b = 0.37 > mean|e| = 0.1, so the
  # scale shrinks towards the error.
  grad = 5.0 * (1 - errors.mean() / b)
  np.testing.assert_allclose(new_state.params['s'], -1.0 - 0.1 * grad,
                             rtol=1e-5)


def test_config_switch_builds_the_scale_head():
  from configs import default
  config = default.get_config()
  assert config.model.coordinate_loss == 'l1'  # The paper's loss by default.
  assert ts.create_model(config).coordinate_loss == 'l1'
  config.model.coordinate_loss = 'laplace'
  assert ts.create_model(config).coordinate_loss == 'laplace'
