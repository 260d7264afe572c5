"""Frozen BatchNorm and frozen backbone stages (DETR / Raster2Seq recipe).

The paper config trains only layer2..layer4 of the ResNet-50, with frozen
BatchNorm (Raster2Seq ``models/backbone.py``, from Deformable DETR).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from kpseq_jax import benchmark
from kpseq_jax.training import config_checks
from kpseq_jax.models import resnet
from kpseq_jax.training import train_state as ts
from conftest import FROZEN_BACKBONE
from conftest import smoke_config


def _random_stats(c, seed):
  r = np.random.default_rng(seed)
  return dict(scale=r.normal(1, 0.3, c), bias=r.normal(0, 0.5, c),
              mean=r.normal(0, 2, c), var=r.uniform(0.2, 3, c))


def test_frozen_batch_norm_matches_flax_running_average_batch_norm():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 8)) * 3 + 1
  st = {k: jnp.asarray(v, jnp.float32) for k, v in _random_stats(8, 0).items()}
  variables = {'params': {'scale': st['scale'], 'bias': st['bias']},
               'batch_stats': {'mean': st['mean'], 'var': st['var']}}
  frozen = resnet.FrozenBatchNorm(epsilon=1e-5)
  reference = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
  # Same variable tree (so ImageNet weights load the same way) ...
  assert (jax.tree.map(jnp.shape, frozen.init(jax.random.PRNGKey(0), x)) ==
          jax.tree.map(jnp.shape, reference.init(jax.random.PRNGKey(0), x)))
  # ... and the same values.
  np.testing.assert_allclose(frozen.apply(variables, x),
                             reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_passes_no_gradient_to_its_variables():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
  st = {k: jnp.asarray(v, jnp.float32) for k, v in _random_stats(4, 1).items()}
  frozen = resnet.FrozenBatchNorm()

  def loss(scale, bias, mean, var, x):
    v = {'params': {'scale': scale, 'bias': bias},
         'batch_stats': {'mean': mean, 'var': var}}
    return jnp.sum(frozen.apply(v, x) ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(
      st['scale'], st['bias'], st['mean'], st['var'], x)
  for g in grads[:4]:
    np.testing.assert_array_equal(g, 0.0)
  assert np.all(np.abs(np.asarray(grads[4])) > 0)  # x still gets one.


def _backbone_grads(frozen_stages, norm='batch'):
  model = resnet.ResNet(depth=18, norm=norm, frozen_stages=frozen_stages,
                        conv_impl='xla')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)

  def loss(params):
    out, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    return sum(jnp.sum(v ** 2) for v in out.values()), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  return variables, grads, updates['batch_stats']


def _is_zero(tree):
  return all(not np.any(np.asarray(a)) for a in jax.tree.leaves(tree))


def test_frozen_stages_get_no_gradient_and_keep_batch_stats():
  variables, grads, stats = _backbone_grads(frozen_stages=1)
  old = variables['batch_stats']
  for name in ('conv1', 'bn1', 'layer1_0', 'layer1_1'):
    assert _is_zero(grads[name]), name
    if name in old:  # Convs have no batch_stats.
      jax.tree.map(np.testing.assert_array_equal, stats[name], old[name])
  for name in ('layer2_0', 'layer3_1', 'layer4_1'):
    assert not _is_zero(grads[name]['conv1']), name
  # Trainable stages still use (and update) batch statistics.
  assert not np.allclose(stats['layer2_0']['bn1']['mean'],
                         old['layer2_0']['bn1']['mean'])


def test_unfrozen_backbone_trains_the_stem():
  variables, grads, stats = _backbone_grads(frozen_stages=-1)
  assert not _is_zero(grads['conv1'])
  assert not _is_zero(grads['layer1_0']['conv1'])
  assert not np.allclose(stats['bn1']['mean'],
                         variables['batch_stats']['bn1']['mean'])


def test_frozen_stage_zero_freezes_only_the_stem():
  _, grads, _ = _backbone_grads(frozen_stages=0)
  assert _is_zero(grads['conv1'])
  assert not _is_zero(grads['layer1_0']['conv1'])


def test_in_frozen_stage_and_bad_values():
  assert resnet.in_frozen_stage('conv1', 0)
  assert not resnet.in_frozen_stage('bn1', -1)
  assert resnet.in_frozen_stage('layer1_2', 1)
  assert not resnet.in_frozen_stage('layer2_0', 1)
  assert resnet.in_frozen_stage('layer4_2', 4)
  with pytest.raises(ValueError, match='not a ResNet submodule'):
    resnet.in_frozen_stage('fc', 1)
  with pytest.raises(ValueError, match='frozen_stages'):
    _backbone_grads(frozen_stages=5)
  with pytest.raises(ValueError,
                     match='model.resnet.frozen_stages=5 is not one of'):
    config_checks.check(smoke_config('d', **{'model.resnet.frozen_stages': 5}))
  with pytest.raises(ValueError,
                     match="model.resnet.norm='frozen' is not one of"):
    config_checks.check(smoke_config('d', **{'model.resnet.norm': 'frozen'}))


def _one_update(tx, params):
  """AdamW's first update for all-ones gradients (one compiled call: eager
  optax over a ResNet's leaves dispatches hundreds of small ops)."""
  return jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p),
                                     tx.init(p), p)[0])(params)


def test_train_step_leaves_frozen_parameters_exactly_unchanged():
  """One real train step (AdamW with weight decay, clipping) of the smoke
  model with the paper's backbone setting (the step test_benchmark.py
  compiles too: whichever runs second reads it from the cache)."""
  config = smoke_config('unused', **FROZEN_BACKBONE)
  compiled, _, state, batch = benchmark._compile_step(config)
  before = jax.device_get(state.params['backbone'])
  stats_before = jax.device_get(state.batch_stats)
  state, metrics = compiled(state, batch)  # Donates the old state.
  after = jax.device_get(state.params['backbone'])
  assert np.isfinite(float(metrics['loss']))
  for name in ('conv1', 'bn1', 'layer1_0', 'layer1_1'):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  # Frozen BatchNorm in a trainable stage: scale/bias fixed, convs move.
  jax.tree.map(np.testing.assert_array_equal, after['layer3_0']['bn2'],
               before['layer3_0']['bn2'])
  assert not np.array_equal(after['layer3_0']['conv2']['kernel'],
                            before['layer3_0']['conv2']['kernel'])
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.batch_stats), stats_before)
  # Gradients are zero there anyway; the optimizer must also skip the
  # weight decay (too small to see in one float32 step above).
  tx = ts.create_optimizer(config)
  params = jax.device_get(state.params)
  updates = _one_update(tx, params)
  assert _is_zero(updates['backbone']['layer1_1'])
  assert _is_zero(updates['backbone']['layer4_0']['bn2'])
  assert np.all(np.asarray(updates['backbone']['layer4_0']['conv2']['kernel'])
                != 0)


def test_frozen_labels():
  config = default_config.get_config()
  model = ts.create_model(config)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         **ts.dummy_inputs(config), train=False))['params']
  labels = ts.frozen_labels(params, 'frozen_batch', 1)
  bb = labels['backbone']
  assert set(jax.tree.leaves(bb['layer1_2'])) == {'frozen'}
  assert bb['layer2_0']['conv1']['kernel'] == 'train'
  assert bb['layer2_0']['bn1']['scale'] == 'frozen'
  assert set(jax.tree.leaves({k: v for k, v in labels.items()
                              if k != 'backbone'})) == {'train'}
  assert ts.frozen_labels(params, 'batch', -1)['backbone']['bn1'][
      'scale'] == 'train'


def test_paper_config_warns_without_pretrained_weights():
  config = default_config.get_config()
  assert (config.model.resnet.norm, config.model.resnet.frozen_stages) == (
      'frozen_batch', 1)
  message = config_checks.frozen_without_weights(config)
  assert 'model_init' in message and 'frozen_stages=1' in message
  config.model_init = 'resnet50.safetensors'
  assert config_checks.frozen_without_weights(config) == ''
  assert config_checks.frozen_without_weights(smoke_config('d')) == ''


def test_optimizer_freezes_stages_with_trainable_batch_norm():
  config = smoke_config('unused', **{'model.resnet.norm': 'batch'},
                        **{'model.resnet.frozen_stages': 0})
  model = ts.create_model(config)
  # Only the tree matters here (AdamW's first update for all-ones gradients
  # is non-zero for any parameter value): no init to compile.
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **ts.dummy_inputs(config),
                         train=False)['params']))
  tx = ts.create_optimizer(config)
  updates = _one_update(tx, params)
  assert _is_zero(updates['backbone']['conv1'])
  assert _is_zero(updates['backbone']['bn1'])
  assert np.all(np.asarray(updates['backbone']['layer1_0']['bn1']['scale'])
                != 0)
