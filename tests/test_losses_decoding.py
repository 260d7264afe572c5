"""Loss on hand values; greedy decoding obeys the grammar and the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from kpseq_jax.inference import decoding
from kpseq_jax.training import losses
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib


def test_sequence_loss_hand_values():
  # 2 positions, vocab of 3; uniform logits -> CE = log 3 at weighted spots.
  logits = jnp.zeros([1, 2, 3])
  coords = jnp.array([[[0.5, 0.5], [0.1, 0.9]]])
  batch = dict(target_tokens=jnp.array([[0, 2]]),
               target_coords=jnp.array([[[0.3, 0.5], [0.0, 0.0]]]),
               token_weights=jnp.array([[1.0, 0.0]]),
               coord_weights=jnp.array([[1.0, 0.0]]))
  loss, parts = losses.sequence_loss(logits, coords, batch, 1.0, 5.0)
  assert float(parts['ce']) == pytest.approx(np.log(3), rel=1e-6)
  assert float(parts['l1']) == pytest.approx(0.1, rel=1e-6)  # (0.2 + 0) / 2
  assert float(loss) == pytest.approx(np.log(3) + 0.5, rel=1e-6)


@pytest.fixture(scope='module')
def tiny():
  model = conftest.tiny_model(
      vocab=vocab_lib.Vocab(16), resnet=dict(depth=18),
      feature_levels=('c4', 'c5'), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=grammar.seq_len(3))
  images = jax.random.randint(jax.random.PRNGKey(0), [2, 64, 64, 3], 0, 255
                              ).astype(jnp.uint8)
  length = grammar.seq_len(3)
  variables = model.init(jax.random.PRNGKey(1), images,
                         jnp.zeros([2, length], jnp.int32),
                         jnp.zeros([2, length]), train=False)
  return model, variables, images


@pytest.mark.parametrize('eos_bias,expected_num', [(-1e4, 3), (0.0, None),
                                                   (1e4, 0)])
def test_greedy_decoding_follows_the_grammar_and_the_model(
    tiny, eos_bias, expected_num):
  """<eos> pushed down (all 3 groups), left as initialised, or pushed up
  (no group): the grammar holds and each decision is the model's."""
  model, variables, images = tiny
  v = vocab_lib.Vocab(16)
  params = dict(variables['params'])
  params['class_head'] = dict(params['class_head'])
  params['class_head']['bias'] = params['class_head']['bias'].at[v.eos].add(
      eos_bias)
  variables = dict(variables, params=params)
  out = jax.jit(lambda var, im: decoding.greedy_decode(
      model, var, {'image': im}, 3))(
      variables, images)
  tokens = np.asarray(out['tokens'])
  num = np.asarray(out['num_keypoints'])
  kps = np.asarray(out['keypoints'])
  assert tokens.shape == (2, 13) and kps.shape == (2, 3, 2)
  if expected_num is not None:
    np.testing.assert_array_equal(num, expected_num)
  for i in range(2):
    k = num[i]
    assert tokens[i, 0] == v.bos
    for g in range(k):
      grp = tokens[i, 1 + 4 * g:5 + 4 * g]
      assert grp[0] == v.coord and grp[3] == v.sep
      assert np.all(grp[1:3] < v.num_bins)
      np.testing.assert_array_equal(grp[1:3], v.quantize(kps[i, g]))
    if 4 * k + 1 < 13:
      assert tokens[i, 4 * k + 1] == v.eos
    assert np.all(np.isnan(kps[i, k:])) and np.all(np.isfinite(kps[i, :k]))
  # Teacher-forcing the generated prefix reproduces each decision.
  coords_in = np.zeros([2, 13], np.float32)
  for i in range(2):
    for g in range(num[i]):
      coords_in[i, 2 + 4 * g:4 + 4 * g] = kps[i, g]
  logits, xy = model.apply(variables, images, jnp.asarray(tokens),
                           jnp.asarray(coords_in), train=False)
  for i in range(2):
    for g in range(num[i]):
      np.testing.assert_allclose(
          [xy[i, 1 + 4 * g, 0], xy[i, 2 + 4 * g, 1]],
          np.clip(kps[i, g], 0, 1), atol=1e-5)
      assert logits[i, 4 * g, v.coord] >= logits[i, 4 * g, v.eos]
    if num[i] < 3:
      assert logits[i, 4 * num[i], v.eos] > logits[i, 4 * num[i], v.coord]
