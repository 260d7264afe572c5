"""Tests for kpseq_jax.models.supervised and the shared layers of model.py
(and the decoder through them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence.vocab import Vocab

NUM_BINS = 16
VOCAB = Vocab(NUM_BINS)
BATCH, LENGTH = 2, 9  # Two keypoint groups + <eos>.


def _tiny_model(**overrides):
  kwargs = dict(vocab=VOCAB, max_seq_len=13, resnet=dict(depth=18),
                feature_levels=('c3', 'c4', 'c5'), d_model=32,
                transformer=dict(num_heads=4, num_layers=2, ffn_dim=64,
                                 num_points=2))
  kwargs.update(overrides)
  return conftest.tiny_model('supervised', **kwargs)


def _inputs():
  v = VOCAB
  tokens = np.array([
      [v.bos, v.coord, 3, 12, v.sep, v.coord, 0, 15, v.sep],
      [v.bos, v.coord, 7, v.nocoord, v.sep, v.coord, 9, 1, v.sep],
  ], np.int32)
  coords = np.where(tokens < NUM_BINS, tokens / (NUM_BINS - 1) + 0.01, 0.0)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, 64, 64, 3),
                                             dtype=np.uint8)
  return jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(coords, jnp.float32)


@pytest.fixture(scope='module')
def tiny():
  """(model, variables, train_forward) for the tiny multi-scale model.

  ``train_forward(tokens, coords)`` is a jitted train-mode forward on the fixed
  images with a fixed dropout rng (so equal inputs give equal outputs),
  returning ((logits, coords), batch_stats updates).
  """
  model = _tiny_model()
  images, tokens, coords = _inputs()
  variables = jax.jit(lambda *a: model.init(jax.random.PRNGKey(0), *a,
                                            train=False))(images, tokens, coords)

  @jax.jit
  def train_forward(tokens, coords):
    return model.apply(variables, images, tokens, coords, train=True,
                       mutable=['batch_stats'],
                       rngs={'dropout': jax.random.PRNGKey(1)})

  return model, variables, train_forward


def test_heads_turn_the_last_layer_into_logits_and_sigmoid_coordinates(
    tiny):
  """With the heads' last kernels zeroed, every position's logits are the
  class bias and its (x, y) the sigmoid of the coordinate bias: the outputs
  are those heads on the last decoder layer (and the memory has the
  levels' cells)."""
  model, variables, _ = tiny
  images, tokens, coords = _inputs()
  p = jax.tree.map(lambda a: a, variables['params'])
  bias = jnp.linspace(-3.0, 3.0, VOCAB.vocab_size)
  p['class_head'] = dict(kernel=jnp.zeros_like(p['class_head']['kernel']),
                         bias=bias)
  p['coord_head_2'] = dict(kernel=jnp.zeros_like(p['coord_head_2']['kernel']),
                           bias=jnp.array([-1.0, 2.0]))
  logits, pred = model.apply(dict(variables, params=p), images, tokens,
                             coords, train=False)
  np.testing.assert_allclose(logits, np.broadcast_to(bias, logits.shape),
                             rtol=1e-6)
  np.testing.assert_allclose(
      pred, np.broadcast_to(1 / (1 + np.exp([1.0, -2.0])), pred.shape),
      rtol=1e-6)
  # The original heads depend on the position (they read the decoder).
  logits, pred = model.apply(variables, images, tokens, coords, train=False)
  assert not np.allclose(logits[:, 1], logits[:, 2], atol=1e-4)
  memory = model.apply(variables, images, False, method='encode')
  assert memory.spatial_shapes == ((8, 8), (4, 4), (2, 2))
  assert memory.features.shape == (BATCH, 64 + 16 + 4, 32)


def test_coordinate_embedding_interpolates_bins():
  table = jax.random.normal(jax.random.PRNGKey(0), (NUM_BINS, 5))
  bins = np.arange(NUM_BINS)
  exact = model_lib.coordinate_embedding(table, jnp.asarray(bins / (NUM_BINS - 1)))
  np.testing.assert_allclose(exact, table, atol=1e-6)

  i = np.arange(NUM_BINS - 1)
  quarter = model_lib.coordinate_embedding(
      table, jnp.asarray((i + 0.25) / (NUM_BINS - 1), jnp.float32))
  np.testing.assert_allclose(quarter, 0.75 * table[i] + 0.25 * table[i + 1],
                             atol=1e-5)

  clipped = model_lib.coordinate_embedding(table, jnp.array([-0.3, 1.7]))
  np.testing.assert_allclose(clipped, table[jnp.array([0, NUM_BINS - 1])],
                             atol=1e-6)


def test_embed_tokens_follows_the_grammar(tiny):
  model, variables, _ = tiny
  _, tokens, coords = _inputs()
  emb = jax.jit(lambda v, t, c: model.apply(v, t, c, method='embed_tokens'))(
      variables, tokens, coords)
  p = variables['params']
  expected_x = model_lib.coordinate_embedding(p['coord_embed'], coords[0, 2])
  expected_y = model_lib.coordinate_embedding(p['coord_embed'], coords[0, 3])
  # Position 2 carries an x, position 3 a y (targets at 1 and 2 of a group).
  np.testing.assert_allclose(emb[0, 2], expected_x + p['axis_embed'][0], atol=1e-6)
  np.testing.assert_allclose(emb[0, 3], expected_y + p['axis_embed'][1], atol=1e-6)
  np.testing.assert_allclose(emb[1, 6], model_lib.coordinate_embedding(
      p['coord_embed'], coords[1, 6]) + p['axis_embed'][0], atol=1e-6)
  special = p['special_embed']
  np.testing.assert_array_equal(emb[0, 0], special[VOCAB.bos - NUM_BINS])
  np.testing.assert_array_equal(emb[0, 4], special[VOCAB.sep - NUM_BINS])
  # <nocoord> at a y position is a special token: no coordinate, no axis.
  np.testing.assert_array_equal(emb[1, 3], special[VOCAB.nocoord - NUM_BINS])


def test_decoder_is_causal(tiny):
  """Changing inputs at t changes no output before t (dropout rng fixed)."""
  _, _, train_forward = tiny
  _, tokens, coords = _inputs()
  forward = lambda t, c: train_forward(t, c)[0]
  logits, pred = forward(tokens, coords)
  t = 5
  changed_tokens = tokens.at[:, t:].set(VOCAB.eos)
  changed_coords = coords.at[:, t:].set(0.5)
  logits2, pred2 = forward(changed_tokens, changed_coords)
  np.testing.assert_allclose(logits2[:, :t], logits[:, :t], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pred2[:, :t], pred[:, :t], rtol=1e-5, atol=1e-5)
  # The test is sensitive: later positions do change.
  assert not np.allclose(logits2[:, t:], logits[:, t:], atol=1e-4)

  # A coordinate value change alone is seen from its own position on.
  coords3 = coords.at[:, 2].add(0.2)
  logits3, _ = forward(tokens, coords3)
  np.testing.assert_allclose(logits3[:, :2], logits[:, :2], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits3[:, 2], logits[:, 2], atol=1e-4)


def test_paper_config_builds_the_paper_model():
  """configs/default.py as training builds it: the ImageNet ResNet-50
  (torchvision's 23,508,032 parameters without the classifier), frozen
  BatchNorm with stem and layer1 frozen, a 6-layer decoder of width 256 with
  8 heads x 1 level x 4 points and a 1024 FFN, 512 coordinate bins and a
  4 * 68 + 1 sequence."""
  from configs import default
  from kpseq_jax.models import supervised
  from kpseq_jax.training import train_state as ts
  config = default.get_config()
  model = ts.create_model(config)
  assert isinstance(model, supervised.Model)
  assert (model.vocab.num_bins, model.max_seq_len) == (512, 4 * 68 + 1)
  assert dict(model.resnet) == dict(depth=50, norm='frozen_batch',
                                    frozen_stages=1, conv_impl='auto',
                                    remat=False, width=64)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **ts.dummy_inputs(config), train=False))
  params = variables['params']
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(params['backbone']) == 23_508_032
  decoder = params['decoder']
  assert sorted(k for k in decoder if k.startswith('layers_')) == [
      f'layers_{i}' for i in range(6)]
  layer = decoder['layers_0']
  assert layer['linear1']['kernel'].shape == (256, 1024)
  # Offsets: heads x levels x points x 2; weights: heads x levels x points.
  assert layer['cross_attn']['sampling_offsets']['kernel'].shape == (256, 64)
  assert layer['cross_attn']['attention_weights']['kernel'].shape == (256, 32)
  assert params['coord_embed'].shape == (512, 256)
  assert params['class_head']['kernel'].shape == (256, 512 + 6)
  assert params['pos_embed'].shape == (4 * 68 + 1, 256)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = _tiny_model(dtype='bfloat16', feature_levels=('c5',))
  images, tokens, coords = _inputs()
  variables = jax.eval_shape(
      lambda *a: model.init(jax.random.PRNGKey(0), *a, train=False),
      images, tokens, coords)
  assert all(p.dtype == jnp.float32
             for p in jax.tree_util.tree_leaves(variables['params']))
  logits, pred = jax.eval_shape(
      lambda v: model.apply(v, images, tokens, coords, train=False), variables)
  assert logits.dtype == pred.dtype == jnp.float32


def test_sine_position_encoding_matches_detr_formula():
  pos = model_lib.sine_position_encoding(2, 3, 8)  # [H, W, D], 4 feats per axis
  # y of row 1 (1-based 2) = 2 / 2 * 2 pi; x of column 0 = 1 / 3 * 2 pi.
  y, x = 2 / (2 + 1e-6) * 2 * np.pi, 1 / (3 + 1e-6) * 2 * np.pi
  dim_t = 10000 ** (np.array([0, 0, 2, 2]) / 4)
  expected_y = [np.sin(y / dim_t[0]), np.cos(y / dim_t[1]),
                np.sin(y / dim_t[2]), np.cos(y / dim_t[3])]
  expected_x = [np.sin(x / dim_t[0]), np.cos(x / dim_t[1]),
                np.sin(x / dim_t[2]), np.cos(x / dim_t[3])]
  np.testing.assert_allclose(pos[1, 0], expected_y + expected_x, atol=1e-6)
