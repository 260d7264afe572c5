"""Optional category token after <bos>: sequence, embedding offsets, decoding."""

import jax
import jax.numpy as jnp
import numpy as np

import conftest
from kpseq_jax.inference import decoding
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 3
NUM_CATEGORIES = 5


def test_vocab_puts_categories_after_the_special_tokens():
  v = vocab_lib.Vocab(10, NUM_CATEGORIES)
  assert v.category(0) == 16 and v.category(4) == 20
  assert v.vocab_size == 21 and v.num_prefix_tokens == 1
  assert vocab_lib.Vocab(10).num_prefix_tokens == 0


def test_sequence_is_the_plain_one_shifted_behind_the_category():
  v = vocab_lib.Vocab(10, NUM_CATEGORIES)
  kps = np.array([[0.1, 0.2, 2], [0.5, 0.5, 0], [0.9, 0.3, 1]], np.float32)
  plain = grammar.build_sequence(kps, 3, vocab_lib.Vocab(10), KMAX)
  cat = grammar.build_sequence(kps, 3, v, KMAX, v.category(2))
  assert len(cat['input_tokens']) == grammar.seq_len(KMAX, 1) == 14
  np.testing.assert_array_equal(
      cat['input_tokens'][:4], [v.bos, v.category(2), v.coord, 1])
  np.testing.assert_array_equal(cat['input_tokens'][2:],
                                plain['input_tokens'][1:])
  np.testing.assert_array_equal(cat['input_coords'][2:],
                                plain['input_coords'][1:])
  for k in ('target_tokens', 'target_coords', 'token_weights',
            'coord_weights'):
    np.testing.assert_array_equal(cat[k][1:], plain[k])
  # The category is given, never a target.
  assert cat['token_weights'][0] == 0 and cat['coord_weights'][0] == 0


def _model(num_categories, length):
  return conftest.tiny_model(
      vocab=vocab_lib.Vocab(16, num_categories), resnet=dict(depth=18),
      feature_levels=('c5',), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=length)


def test_embedding_axes_follow_the_shifted_grammar():
  length = grammar.seq_len(KMAX, 1)
  m = _model(NUM_CATEGORIES, length)
  v = m.vocab
  images = jnp.zeros([1, 32, 32, 3], jnp.uint8)
  variables = m.init(jax.random.PRNGKey(0), images,
                     jnp.zeros([1, length], jnp.int32),
                     jnp.zeros([1, length]), train=False)
  # <bos> <cat> <coord> x y <sep>: x at input 3, y at input 4.
  tokens = jnp.array([[v.bos, v.category(1), v.coord, 5, 7, v.sep]])
  coords = jnp.array([[0, 0, 0, 5 / 15, 7 / 15, 0]], jnp.float32)
  emb = m.apply(variables, tokens, coords, method=m.embed_tokens)
  p = variables['params']
  table = p['coord_embed']
  np.testing.assert_allclose(emb[0, 3], table[5] + p['axis_embed'][0],
                             atol=1e-6)
  np.testing.assert_allclose(emb[0, 4], table[7] + p['axis_embed'][1],
                             atol=1e-6)
  np.testing.assert_allclose(emb[0, 1],
                             p['special_embed'][v.category(1) - 16])


def test_cached_decoder_matches_reference_and_emits_the_category():
  length = grammar.seq_len(KMAX, 1)
  m = _model(NUM_CATEGORIES, length)
  v = m.vocab
  images = jax.random.randint(jax.random.PRNGKey(1), [3, 32, 32, 3], 0,
                              255).astype(jnp.uint8)
  variables = m.init(jax.random.PRNGKey(2), images,
                     jnp.zeros([3, length], jnp.int32),
                     jnp.zeros([3, length]), train=False)
  # <eos> suppressed: every group is decoded and checked below.
  head = dict(variables['params']['class_head'])
  head['bias'] = head['bias'].at[v.eos].add(-1e4)
  variables = dict(variables, params=dict(variables['params'],
                                          class_head=head))
  cats = jnp.array([v.category(0), v.category(3), v.category(4)], jnp.int32)
  inputs = {'image': images, 'category_token': cats}
  ref = jax.jit(lambda var, x: decoding.greedy_decode(m, var, x, KMAX))(
      variables, inputs)
  cached = jax.jit(lambda var, x: decoding.cached_greedy_decode(
      m, var, x, KMAX))(variables, inputs)
  np.testing.assert_array_equal(cached['tokens'], ref['tokens'])
  np.testing.assert_allclose(cached['keypoints'], ref['keypoints'],
                             atol=1e-6)
  tokens = np.asarray(ref['tokens'])
  assert tokens.shape == (3, length)
  np.testing.assert_array_equal(ref['num_keypoints'], KMAX)
  np.testing.assert_array_equal(tokens[:, 0], v.bos)
  np.testing.assert_array_equal(tokens[:, 1], cats)
  # Then the plain grammar: <coord> or <eos> at each group start.
  assert np.all(np.isin(tokens[:, 2], [v.coord, v.eos]))
  for row, n in zip(tokens, np.asarray(ref['num_keypoints'])):
    for g in range(n):
      start = 2 + 4 * g
      assert row[start] == v.coord and row[start + 3] == v.sep
      assert row[start + 1] < v.num_bins and row[start + 2] < v.num_bins
