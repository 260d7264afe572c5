"""Coarse to fine across decoder layers: reference-point refinement,
auxiliary losses on every layer, noisy reference points, stride-4 features
(issue 19)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from kpseq_jax.inference import decoding
from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib
from kpseq_jax.training import losses
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts

KMAX = 3
LENGTH = grammar.seq_len(KMAX)
BATCH = 2
VOCAB = vocab_lib.Vocab(16)
LAYERS = 3


def _model(refine_points=True, reference_noise=0.0, **kw):
  args = dict(vocab=VOCAB, resnet=dict(depth=18),
              feature_levels=('c4', 'c5'), d_model=32, max_seq_len=LENGTH,
              transformer=dict(num_heads=2, num_layers=LAYERS, ffn_dim=64,
                               dropout=0.0, refine_points=refine_points,
                               reference_noise=reference_noise))
  args.update(kw)
  return conftest.tiny_model('supervised', **args)


def _zero_last_dense(tree):
  """``tree`` (a head's params) with its last Dense's kernel and bias 0."""
  tree = dict(tree)
  tree['Dense_2'] = jax.tree.map(jnp.zeros_like, tree['Dense_2'])
  return tree


def _images(seed=0, size=64):
  return jax.random.randint(jax.random.PRNGKey(100 + seed),
                            [BATCH, size, size, 3], 0, 255).astype(jnp.uint8)


def _init(model, images, seed=0):
  return model.init(jax.random.PRNGKey(seed), images,
                    jnp.zeros([BATCH, LENGTH], jnp.int32),
                    jnp.zeros([BATCH, LENGTH]), train=False)


def _sequences(seed=0):
  rng = np.random.default_rng(seed)
  kps = np.concatenate([rng.uniform(0.1, 0.9, size=[BATCH, KMAX, 2]),
                        np.ones([BATCH, KMAX, 1])], -1).astype(np.float32)
  seqs = [grammar.build_sequence(k, KMAX, VOCAB, KMAX) for k in kps]
  return {key: jnp.asarray(np.stack([s[key] for s in seqs]))
          for key in seqs[0]}


@pytest.fixture(scope='module')
def refined():
  model = _model()
  images = _images()
  return model, _init(model, images), images


def test_refined_output_is_the_last_layers_step_from_the_previous_point(
    refined):
  """With refinement the (x, y) output is sigmoid(last point head +
  logit(previous layer's point)): with that head's output zeroed it is the
  previous layer's point exactly, and ``coord_head`` plays no part."""
  model, variables, images = refined
  seq = _sequences()
  params = jax.tree.map(lambda x: x, variables['params'])
  last = f'point_heads_{LAYERS - 1}'
  params['decoder'][last] = _zero_last_dense(params['decoder'][last])
  (_, xy), state = model.apply(
      {**variables, 'params': params}, images, seq['input_tokens'],
      seq['input_coords'], train=False, mutable=['intermediates'])
  [aux_xy] = state['intermediates']['aux_coords']
  np.testing.assert_allclose(xy, aux_xy[-1], rtol=0, atol=2e-6)
  assert float(jnp.abs(aux_xy[-1] - aux_xy[-2]).max()) > 1e-3
  assert 'coord_head_0' not in params


def test_each_layer_samples_where_the_previous_one_pointed(refined):
  """The output depends on the first layer's point head (through where the
  later layers sample), but no gradient flows back through the reference
  points (Deformable DETR detaches between layers): only each layer's own
  point trains its head."""
  model, variables, images = refined
  seq = _sequences()

  @jax.jit
  def final_xy(params):
    _, xy = model.apply({**variables, 'params': params}, images,
                        seq['input_tokens'], seq['input_coords'], train=False)
    return xy

  params = variables['params']
  shifted = jax.tree.map(lambda x: x, params)
  head0 = shifted['decoder']['point_heads_0']['Dense_2']
  head0['bias'] = head0['bias'] + jnp.asarray([1.5, -1.5])
  assert float(jnp.abs(final_xy(shifted) - final_xy(params)).max()) > 1e-3

  grads = jax.jit(jax.grad(lambda p: jnp.sum(final_xy(p))))(params)
  for i in range(LAYERS - 1):
    g = grads['decoder'][f'point_heads_{i}']
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g)), i
  last = grads['decoder'][f'point_heads_{LAYERS - 1}']
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(last)) > 0


def test_intermediate_outputs_are_every_earlier_layer_through_the_heads(
    refined):
  """'aux_logits' and 'aux_coords' hold layers 0 .. L-2 through the shared
  class head and each layer's point: with every point head's output
  zeroed all layers keep the first reference point, and with the class
  head's kernel zeroed every layer's logits are its bias."""
  model, variables, images = refined
  seq = _sequences()
  params = jax.tree.map(lambda x: x, variables['params'])
  for i in range(LAYERS):
    name = f'point_heads_{i}'
    params['decoder'][name] = _zero_last_dense(params['decoder'][name])
  bias = jnp.linspace(-1.0, 1.0, VOCAB.vocab_size)
  params['class_head'] = dict(
      kernel=jnp.zeros_like(params['class_head']['kernel']), bias=bias)
  run = lambda p: model.apply(
      {**variables, 'params': p}, images, seq['input_tokens'],
      seq['input_coords'], train=False, mutable=['intermediates'])
  (logits, xy), state = run(params)
  [aux_logits] = state['intermediates']['aux_logits']
  [aux_xy] = state['intermediates']['aux_coords']
  assert aux_logits.shape == (LAYERS - 1,) + logits.shape
  np.testing.assert_allclose(aux_logits,
                             np.broadcast_to(bias, aux_logits.shape),
                             rtol=1e-6)
  for i in range(LAYERS - 1):
    np.testing.assert_allclose(aux_xy[i], xy, rtol=0, atol=2e-6)
  # The trained heads move the point from layer to layer.
  (_, xy), state = run(variables['params'])
  [aux_xy] = state['intermediates']['aux_coords']
  assert float(jnp.abs(aux_xy[0] - xy).max()) > 1e-3


def test_cached_decoder_matches_teacher_forcing_with_refinement(refined):
  """Token for token and coordinate for coordinate: every decode_step
  equals the teacher-forced decode at that position, and the two greedy
  decoders agree."""
  model, variables, images = refined
  seq = _sequences(1)
  memory = model.apply(variables, images, train=False, method=model.encode)
  logits, xy = model.apply(variables, memory, seq['input_tokens'],
                           seq['input_coords'], train=False,
                           method=model.decode)
  step_model = model.for_cached_decoding()
  projected = step_model.apply(variables, memory,
                               method=step_model.project_values)
  cache = decoding.init_cache(step_model, variables, memory, BATCH, LENGTH)
  decode_step = jax.jit(lambda cache, token, coord, t: step_model.apply(
      {**variables, 'cache': cache}, projected, token, coord, t, LENGTH,
      method=step_model.decode_step, mutable=['cache']))
  for t in range(LENGTH):
    (lt, xyt), mutated = decode_step(cache, seq['input_tokens'][:, t],
                                     seq['input_coords'][:, t], jnp.int32(t))
    cache = mutated['cache']
    np.testing.assert_allclose(lt, logits[:, t], rtol=0, atol=1e-5)
    np.testing.assert_allclose(xyt, xy[:, t], rtol=0, atol=1e-6)
  ref = jax.jit(lambda v, im: decoding.greedy_decode(
      model, v, {'image': im}, KMAX))(variables, images)
  cached = jax.jit(lambda v, im: decoding.cached_greedy_decode(
      model, v, {'image': im}, KMAX))(variables, images)
  np.testing.assert_array_equal(cached['tokens'], ref['tokens'])
  # Six sigmoid/logit round trips through the layers: float32 noise of a
  # few 1e-6 (a coordinate bin is 1 / 16 here).
  np.testing.assert_allclose(cached['keypoints'], ref['keypoints'],
                             rtol=0, atol=1e-5)


def test_intermediate_layer_loss_sums_each_layers_sequence_loss():
  rng = np.random.default_rng(0)
  n, length, v = 3, 7, 11
  logits = jnp.asarray(rng.normal(size=[n, BATCH, length, v]), jnp.float32)
  coords = jnp.asarray(rng.uniform(size=[n, BATCH, length, 2]), jnp.float32)
  batch = dict(
      target_tokens=jnp.asarray(rng.integers(0, v, [BATCH, length])),
      target_coords=jnp.asarray(rng.uniform(size=[BATCH, length, 2]),
                                jnp.float32),
      token_weights=jnp.asarray(rng.integers(0, 2, [BATCH, length]),
                                jnp.float32),
      coord_weights=jnp.asarray(rng.integers(0, 2, [BATCH, length]),
                                jnp.float32))
  total, parts = losses.intermediate_layer_loss(logits, coords, batch, 1.0,
                                                5.0)
  each = [losses.sequence_loss(logits[i], coords[i], batch, 1.0, 5.0)
          for i in range(n)]
  np.testing.assert_allclose(total, sum(loss for loss, _ in each), rtol=1e-6)
  np.testing.assert_allclose(parts['aux_ce'],
                             np.mean([p['ce'] for _, p in each]), rtol=1e-6)
  np.testing.assert_allclose(parts['aux_l1'],
                             np.mean([p['l1'] for _, p in each]), rtol=1e-6)
  points_only, _ = losses.intermediate_layer_loss(logits, coords, batch, 0.0,
                                                  5.0)
  np.testing.assert_allclose(
      points_only, sum(5.0 * p['l1'] for _, p in each), rtol=1e-6)


def _train_step(model, aux_ce_weight):
  images = _images(3)
  params = _init(model, images)['params']
  tx = optax.adamw(1e-3)
  state = ts.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                        opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
  batch = dict(_sequences(2), image=images)
  batch['target_coords'] = batch['target_coords'].astype(jnp.float32)
  fn = jax.jit(lambda s, b: step_lib.train_step(
      s, b, model=model, tx=tx, schedule=lambda _: 1e-3, ce_weight=1.0,
      l1_weight=5.0, aux_ce_weight=aux_ce_weight))
  return fn(state, batch)


def test_train_step_adds_every_earlier_layers_loss():
  # One compiled step (refined points, auxiliary CE at half weight so the
  # check tells the two weights apart); `losses.intermediate_layer_loss`'s
  # own test covers CE weight 0. The ResNet is frozen (its backward pass
  # doubled the compilation; the losses are the decoder's).
  aux_ce_weight = 0.5
  model = _model(feature_levels=('c5',),
                 resnet=dict(depth=18, frozen_stages=4))
  _, m = _train_step(model, aux_ce_weight)
  expected = (m['ce'] + 5.0 * m['l1'] + (LAYERS - 1) * (
      aux_ce_weight * m['aux_ce'] + 5.0 * m['aux_l1']))
  np.testing.assert_allclose(m['loss'], expected, rtol=1e-5)
  assert float(m['aux_ce']) > 0 and float(m['aux_l1']) > 0


def test_reference_noise_only_in_training():
  noisy = _model(reference_noise=0.05, feature_levels=('c5',))
  clean = _model(feature_levels=('c5',))
  images = _images(4)
  variables = _init(clean, images)
  seq = _sequences(4)
  args = (images, seq['input_tokens'], seq['input_coords'])
  rngs = {'dropout': jax.random.PRNGKey(7)}
  for train, differ in ((False, False), (True, True)):
    (_, a), _ = noisy.apply(variables, *args, train=train, rngs=rngs,
                            mutable=['batch_stats'])
    (_, b), _ = clean.apply(variables, *args, train=train, rngs=rngs,
                            mutable=['batch_stats'])
    assert (float(jnp.abs(a - b).max()) > 1e-4) == differ, train


def test_stride_4_level_is_the_projected_c2_map():
  """With 'c2' first the memory starts with the stride-4 map (32 x 32 cells
  of a 128 px crop): the 1x1 projection and GroupNorm of the ResNet's c2
  features plus the sine position encoding and level embedding 0."""
  model = _model(feature_levels=('c2', 'c5'), refine_points=False)
  images = _images(5, size=128)
  variables = _init(model, images)
  memory = model.apply(variables, images, train=False, method=model.encode)
  assert memory.spatial_shapes == ((32, 32), (4, 4))
  c2 = model.apply(variables, images, False,
                   method=model.backbone_features)['c2']  # [B, 32, 32, C]
  p = variables['params']
  kernel = p['input_proj_c2']['kernel'][0, 0]  # [C, 32]
  h = np.einsum('bhwc,cd->bhwd', c2, kernel) + p['input_proj_c2']['bias']
  h = np.asarray(h, np.float64)  # GroupNorm(32) of 32 channels: per channel.
  h = (h - h.mean((1, 2), keepdims=True)) / np.sqrt(
      h.var((1, 2), keepdims=True) + 1e-6)
  h = h * p['input_norm_c2']['scale'] + p['input_norm_c2']['bias']
  h = h + model_lib.sine_position_encoding(32, 32, 32) + p['level_embed'][0]
  np.testing.assert_allclose(memory.features[:, :32 * 32],
                             h.reshape(BATCH, 32 * 32, 32), rtol=0, atol=2e-4)
