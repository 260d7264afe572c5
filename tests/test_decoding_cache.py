"""The cached decoder reproduces the full-recompute reference decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from kpseq_jax.inference import decoding
from kpseq_jax.inference import predictor
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 4
LENGTH = grammar.seq_len(KMAX)
BATCH = 3


@pytest.fixture(scope='module')
def model():
  return conftest.tiny_model(
      vocab=vocab_lib.Vocab(16), resnet=dict(depth=18),
      feature_levels=('c4', 'c5'), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=LENGTH)


@pytest.fixture(scope='module')
def decoders(model):
  ref = jax.jit(lambda v, im: decoding.greedy_decode(
      model, v, {'image': im}, KMAX))
  cached = jax.jit(lambda v, im: decoding.cached_greedy_decode(
      model, v, {'image': im}, KMAX))
  return ref, cached


def _init(model, seed):
  images = jax.random.randint(jax.random.PRNGKey(100 + seed),
                              [BATCH, 64, 64, 3], 0, 255).astype(jnp.uint8)
  variables = model.init(jax.random.PRNGKey(seed), images,
                         jnp.zeros([BATCH, LENGTH], jnp.int32),
                         jnp.zeros([BATCH, LENGTH]), train=False)
  return variables, images


def _with_eos_bias(variables, vocab, bias):
  """Adds ``bias`` to the classifier's ``<eos>`` logit."""
  params = jax.tree.map(lambda x: x, variables['params'])  # Fresh dicts.
  head = dict(params['class_head'])
  head['bias'] = head['bias'].at[vocab.eos].add(bias)
  params = dict(params, class_head=head)
  return dict(variables, params=params)


def _assert_same(ref, cached):
  np.testing.assert_array_equal(np.asarray(cached['tokens']),
                                np.asarray(ref['tokens']))
  np.testing.assert_array_equal(np.asarray(cached['num_keypoints']),
                                np.asarray(ref['num_keypoints']))
  np.testing.assert_allclose(np.asarray(cached['keypoints']),
                             np.asarray(ref['keypoints']), rtol=0, atol=1e-6)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_cached_matches_reference_full_length(model, decoders, seed):
  """<eos> suppressed: all KMAX groups decoded, every step compared."""
  variables, images = _init(model, seed)
  variables = _with_eos_bias(variables, vocab_lib.Vocab(16), -1e4)
  ref, cached = decoders
  r = ref(variables, images)
  assert np.all(np.asarray(r['num_keypoints']) == KMAX)
  _assert_same(r, cached(variables, images))


@pytest.mark.parametrize('seed', [0, 3])
def test_cached_matches_reference_with_early_eos(model, decoders, seed):
  """The <eos> bias is set between the batch's step-0 margins so one
  sequence stops at once while the others go on."""
  variables, images = _init(model, seed)
  vocab = vocab_lib.Vocab(16)
  bos = jnp.full([BATCH, LENGTH], vocab.bos, jnp.int32)
  logits, _ = model.apply(variables, images, bos, jnp.zeros([BATCH, LENGTH]),
                          train=False)
  margin = np.sort(np.asarray(logits[:, 0, vocab.eos] -
                              logits[:, 0, vocab.coord]))  # [B] ascending
  variables = _with_eos_bias(variables, vocab,
                             -float(margin[-1] + margin[-2]) / 2)
  ref, cached = decoders
  r = ref(variables, images)
  num = np.asarray(r['num_keypoints'])
  assert num.min() == 0 and num.max() > 0, num
  _assert_same(r, cached(variables, images))


def test_decode_step_matches_teacher_forcing(model):
  """Feeding a fixed sequence step by step gives decode()'s outputs."""
  variables, images = _init(model, 5)
  vocab = vocab_lib.Vocab(16)
  rng = np.random.default_rng(0)
  kps = np.concatenate([rng.uniform(size=[BATCH, KMAX, 2]),
                        np.ones([BATCH, KMAX, 1])], -1).astype(np.float32)
  seqs = [grammar.build_sequence(k, KMAX, vocab, KMAX) for k in kps]
  tokens = jnp.asarray(np.stack([s['input_tokens'] for s in seqs]))
  coords = jnp.asarray(np.stack([s['input_coords'] for s in seqs]))
  memory = model.apply(variables, images, train=False, method=model.encode)
  logits, xy = model.apply(variables, memory, tokens, coords, train=False,
                           method=model.decode)
  step_model = model.clone(cache_decoding=True)
  projected = step_model.apply(variables, memory,
                               method=step_model.project_values)
  cache = decoding.init_cache(step_model, variables, memory, BATCH, LENGTH)
  for t in range(LENGTH):
    (lt, xyt), mutated = step_model.apply(
        {**variables, 'cache': cache}, projected, tokens[:, t], coords[:, t],
        jnp.int32(t), LENGTH, method=step_model.decode_step,
        mutable=['cache'])
    cache = mutated['cache']
    np.testing.assert_allclose(lt, logits[:, t], rtol=0, atol=1e-5)
    np.testing.assert_allclose(xyt, xy[:, t], rtol=0, atol=1e-6)


def test_make_decode_fn_defaults_to_cached(model):
  variables, images = _init(model, 0)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fast = predictor.make_decode_fn(model, KMAX, rep, rep)
  slow = predictor.make_decode_fn(model, KMAX, rep, rep, cached=False)
  _assert_same(slow(variables, {'image': images}),
               fast(variables, {'image': images}))
