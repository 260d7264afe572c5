"""Keypoint presence (<absent>) and per-keypoint confidence, issue 16.

Sequence layout of absent keypoints, the decoders' presence decision and
confidence (cached = reference), and the data set property that says what
v = 0 means.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.inference import decoding
from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 3
BINS = 16
VOCAB = vocab_lib.Vocab(BINS, presence=True)
LENGTH = grammar.seq_len(KMAX)
BATCH = 2


def test_absent_token_shifts_only_categories():
  plain, pres = vocab_lib.Vocab(10, 3), vocab_lib.Vocab(10, 3, presence=True)
  assert pres.absent == 16 and pres.category(0) == 17 == plain.category(0) + 1
  assert pres.vocab_size == plain.vocab_size + 1
  assert (pres.pad, pres.eos, pres.nocoord) == (plain.pad, plain.eos,
                                                plain.nocoord)
  with pytest.raises(ValueError, match='no <absent>'):
    _ = plain.absent


def test_absent_keypoint_is_a_target_and_an_input():
  """<coord> <absent> <absent> <sep>: CE targets, inputs, no L1; an
  unlabelled keypoint not known absent stays <nocoord> with no target."""
  kps = np.array([[0.5, 0.5, 2], [0, 0, 0], [0, 0, 0]], np.float32)
  absent = np.array([False, True, False])
  s = grammar.build_sequence(kps, 3, VOCAB, KMAX, absent=absent)
  x1, y1 = (grammar.position(1, grammar.X, 0),
            grammar.position(1, grammar.Y, 0))
  assert s['target_tokens'][x1] == s['target_tokens'][y1] == VOCAB.absent
  assert s['token_weights'][x1] == s['token_weights'][y1] == 1
  assert s['coord_weights'][x1] == s['coord_weights'][y1] == 0
  assert s['input_tokens'][x1 + 1] == s['input_tokens'][y1 + 1] == VOCAB.absent
  x2 = grammar.position(2, grammar.X, 0)
  assert s['token_weights'][x2] == 0
  assert s['input_tokens'][x2 + 1] == VOCAB.nocoord
  # A labelled keypoint is never absent, whatever the mask says.
  s2 = grammar.build_sequence(kps, 3, VOCAB, KMAX,
                              absent=np.array([True, True, False]))
  x0 = grammar.position(0, grammar.X, 0)
  assert s2['target_tokens'][x0] == VOCAB.quantize(np.float32(0.5))
  with pytest.raises(ValueError, match='without'):
    grammar.build_sequence(kps, 3, vocab_lib.Vocab(BINS), KMAX, absent=absent)


def test_coordinate_mass_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=[4, BINS + 6]).astype(np.float32)
  bins = np.array([0, 5, 15, 8], np.int32)
  mass = np.asarray(decoding.coordinate_mass(jnp.asarray(logits),
                                             jnp.asarray(bins), BINS))
  p = np.exp(logits[:, :BINS]) / np.exp(logits[:, :BINS]).sum(-1,
                                                               keepdims=True)
  for i, b in enumerate(bins):
    for j, r in enumerate(decoding.CONFIDENCE_RADII_BINS):
      want = p[i, max(b - r, 0):b + r + 1].sum()
      np.testing.assert_allclose(mass[i, j], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def model():
  return model_lib.KeypointSequenceModel(
      vocab=VOCAB, backbone_depth=18, feature_levels=('c5',), d_model=32,
      num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0, max_seq_len=LENGTH)


def _variables(model, absent_bias):
  images = jax.random.randint(jax.random.PRNGKey(7), [BATCH, 64, 64, 3], 0,
                              255).astype(jnp.uint8)
  variables = model.init(jax.random.PRNGKey(0), images,
                         jnp.zeros([BATCH, LENGTH], jnp.int32),
                         jnp.zeros([BATCH, LENGTH]), train=False)
  params = jax.tree.map(lambda x: x, variables['params'])
  head = dict(params['class_head'])
  bias = head['bias'].at[VOCAB.eos].add(-1e4)  # Decode all KMAX groups.
  head['bias'] = bias.at[VOCAB.absent].add(absent_bias)
  return dict(variables, params=dict(params, class_head=head)), images


@pytest.mark.parametrize('absent_bias', [-1e4, 1e4, 'mixed'])
def test_decoders_agree_on_presence_and_confidence(model, absent_bias):
  """Cached and reference decoders emit the same tokens, coordinates,
  presence and confidence; a strong <absent> bias makes every group
  <coord> <absent> <absent> <sep> with presence 0 and keypoints still
  decoded; a strong negative one none."""
  bias = 0.0 if absent_bias == 'mixed' else absent_bias
  variables, images = _variables(model, bias)
  if absent_bias == 'mixed':
    # Shift <absent> to between the two crops' margins at the first x step:
    # the first group is absent in one crop and present in the other.
    tokens = jnp.full([BATCH, LENGTH], VOCAB.pad).at[:, 0].set(
        VOCAB.bos).at[:, 1].set(VOCAB.coord)
    logits, _ = model.apply(variables, images, tokens,
                            jnp.zeros([BATCH, LENGTH]), train=False)
    p = np.asarray(decoding.absent_probability(logits[:, 1], VOCAB))
    margin = np.log(p) - np.log1p(-p)
    variables, _ = _variables(model, -float(margin.sum()) / 2)
  ref = decoding.greedy_decode(model, variables, {'image': images}, KMAX)
  cached = decoding.cached_greedy_decode(model, variables, {'image': images},
                                         KMAX)
  for key in ('tokens', 'num_keypoints'):
    np.testing.assert_array_equal(cached[key], ref[key])
  for key in ('keypoints', 'confidence', 'presence'):
    np.testing.assert_allclose(cached[key], ref[key], rtol=0, atol=1e-5)
  tokens = np.asarray(ref['tokens'])
  presence = np.asarray(ref['presence'])
  assert np.all(np.isfinite(np.asarray(ref['keypoints'])))
  conf = np.asarray(ref['confidence'])
  assert np.all((conf >= 0) & (conf <= 1))
  assert np.all(np.diff(conf, axis=-1) >= -1e-6)  # Wider radius, more mass.
  xs = [grammar.position(g, grammar.X, 0) + 1 for g in range(KMAX)]
  ys = [grammar.position(g, grammar.Y, 0) + 1 for g in range(KMAX)]
  is_absent = tokens[:, xs] == VOCAB.absent
  np.testing.assert_array_equal(tokens[:, ys] == VOCAB.absent, is_absent)
  np.testing.assert_array_equal(is_absent, presence < 0.5)
  if absent_bias == 1e4:
    assert is_absent.all() and np.all(presence < 1e-3)
  elif absent_bias == -1e4:
    assert not is_absent.any() and np.all(presence > 0.999)
  else:
    assert sorted(is_absent[:, 0]) == [False, True]
