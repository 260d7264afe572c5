"""Tests for kpseq_jax.resnet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.models.resnet import ResNet


def _feature_shapes(model, batch, size):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables, images)
  return {k: v.shape for k, v in features.items()}, variables


def test_resnet18_runs_with_strides_4_8_16_32():
  model = ResNet(depth=18)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                           train=False))(images)
  features = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, images)
  assert {k: v.shape for k, v in features.items()} == {
      'c2': (2, 16, 16, 64), 'c3': (2, 8, 8, 128), 'c4': (2, 4, 4, 256),
      'c5': (2, 2, 2, 512)}
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in features.values())


def test_resnet50_channels_and_torchvision_names():
  shapes, variables = _feature_shapes(ResNet(depth=50), 2, 64)
  assert shapes == {'c2': (2, 16, 16, 256), 'c3': (2, 8, 8, 512),
                    'c4': (2, 4, 4, 1024), 'c5': (2, 2, 2, 2048)}
  params = variables['params']
  assert set(params) == {'conv1', 'bn1'} | {
      f'layer{s}_{b}' for s, n in zip(range(1, 5), (3, 4, 6, 3))
      for b in range(n)}
  assert set(params['layer2_0']) == {
      'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_0',
      'downsample_1'}
  # v1.5: the stride-2 3x3 conv of layer2_0 maps 128 -> 128 channels.
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert set(variables['batch_stats']['bn1']) == {'mean', 'var'}


def test_resnet50_paper_shape_512px():
  shapes, _ = _feature_shapes(ResNet(depth=50), 2, 512)
  assert shapes['c5'] == (2, 16, 16, 2048)
  assert shapes['c3'] == (2, 64, 64, 512)


def test_resnet34_block_count():
  _, variables = _feature_shapes(ResNet(depth=34), 1, 32)
  assert sum(k.startswith('layer3_') for k in variables['params']) == 6


def _train_step_stats(norm):
  model = ResNet(depth=18, norm=norm)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 3 + 1
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                           train=False))(images)

  @jax.jit
  def run(variables, x):
    train_out, updates = model.apply(variables, x, train=True,
                                     mutable=['batch_stats'])
    eval_out = model.apply(variables, x, train=False)
    return train_out['c5'], eval_out['c5'], updates

  train_out, eval_out, updates = run(variables, images)
  return variables, updates, train_out, eval_out


def test_frozen_batch_norm_keeps_running_stats():
  variables, updates, train_out, eval_out = _train_step_stats('frozen_batch')
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         variables['batch_stats'], updates['batch_stats'])
  # Train mode normalises with the running statistics, like eval mode.
  np.testing.assert_allclose(train_out, eval_out, rtol=1e-6, atol=1e-6)


def test_batch_norm_updates_running_stats():
  variables, updates, train_out, eval_out = _train_step_stats('batch')
  old = variables['batch_stats']['bn1']['mean']
  new = updates['batch_stats']['bn1']['mean']
  # Flax momentum 0.9 (torch 0.1): new = 0.9 * old + 0.1 * batch mean.
  assert not np.allclose(old, new)
  np.testing.assert_allclose(old, 0.0)
  assert not np.allclose(train_out, eval_out)


def test_group_norm_has_no_batch_stats():
  _, variables = _feature_shapes(ResNet(depth=18, norm='group'), 1, 32)
  assert 'batch_stats' not in variables
  assert set(variables['params']['bn1']) == {'scale', 'bias'}


def test_bfloat16_compute_float32_params():
  shapes, variables = _feature_shapes(ResNet(depth=18, dtype=jnp.bfloat16), 1, 32)
  assert shapes['c5'] == (1, 1, 1, 512)
  assert all(p.dtype == jnp.float32
             for p in jax.tree_util.tree_leaves(variables['params']))


def test_rejects_unknown_depth_and_norm():
  with pytest.raises(ValueError, match='depth must be one of .*got 101'):
    _feature_shapes(ResNet(depth=101), 1, 32)
  with pytest.raises(ValueError, match="norm must be one of .*got 'layer'"):
    _feature_shapes(ResNet(depth=18, norm='layer'), 1, 32)
