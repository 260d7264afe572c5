"""The ViT as a config choice (``model.encoder='vit'``): built, trained,
loaded, optimised and sharded through the normal config path
(configs/default.py's ``model.vit`` group, `train_state`, `config_checks`)."""

import json
from pathlib import Path
import re

import flax
import jax
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

import conftest
from configs import default
from configs import dlc_openfield
from configs import mp100
from kpseq_jax import benchmark
from kpseq_jax.models import vit_pretrained
from kpseq_jax.runtime import sharding
from kpseq_jax.training import config_checks
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts

FIXTURES = Path(__file__).parent / 'fixtures'
# A ViT-B/16 config shrunk: depth 2, width 64, patch 16, 64 px crops.
TINY_VIT = {'model.vit.depth': 2, 'model.vit.width': 64,
            'model.vit.num_heads': 2, 'model.vit.pyramid_dim': 32,
            'optim.warmup_steps': 0}


def _tiny_vit_config(**overrides):
  """configs/smoke.py:supervised,mae (the ViT recipe) at `TINY_VIT` size,
  with the paper's frozen-ResNet fields left in ``model.resnet`` (the ViT
  must ignore them)."""
  return conftest.smoke_config('unused', 'supervised,mae',
                               **{**TINY_VIT, **conftest.FROZEN_BACKBONE,
                                  **overrides})


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


def test_one_train_step_of_the_config_built_vit_updates_every_vit_parameter():
  c = _tiny_vit_config(**{'model.feature_levels': ('c3', 'c4', 'c5')})
  config_checks.check(c)
  assert config_checks.frozen_without_weights(c) == ''
  model = ts.create_model(c)
  tx = ts.create_optimizer(c)
  mesh = sharding.create_mesh(c.sharding.mesh_shape)
  state = ts.create_train_state(c, model, tx, mesh)
  before = jax.tree.map(np.asarray, state.params['backbone'])
  assert 'blocks_1' in before and 'pyramid' in before  # The ViT, not a ResNet.
  batch = sharding.global_batch(
      {k: v for k, v in benchmark.synthetic_batch(c, c.input.batch_size).items()
       if k in step_lib.train_fields(model)}, mesh)
  step = step_lib.make_train_step(
      c, model, tx, ts.learning_rate_schedule(c),
      jax.tree.map(lambda a: a.sharding, state), mesh)
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  after = _flat(jax.tree.map(np.asarray, state.params['backbone']))
  unchanged = [k for k, v in _flat(before).items()
               if np.array_equal(v, after[k])]
  # Norm scales and biases too: the ResNet's frozen_batch / frozen_stages
  # labels must not freeze the ViT's LayerNorms.
  assert unchanged == []


def test_model_init_loads_the_dinov2_file_into_the_config_built_vit():
  path = str(FIXTURES / 'vit_dinov2.safetensors')  # Depth 2, width 32.
  c = conftest.smoke_config(
      'unused', 'supervised,dinov2', model_init=path,
      **{'input.image_size_px': 56, 'optim.warmup_steps': 0,
         'model.vit.width': 32, 'model.vit.depth': 2,
         'model.vit.num_heads': 2, 'model.vit.num_registers': 2,
         'model.vit.pos_embed_grid': 4, 'model.vit.pyramid_dim': 32})
  config_checks.check(c)
  model = ts.create_model(c)
  tx = ts.create_optimizer(c)
  state = ts.create_train_state(c, model, tx,
                                sharding.create_mesh(c.sharding.mesh_shape))
  want = vit_pretrained.convert_vit(vit_pretrained.read_safetensors(path))
  got = {k: np.asarray(v) for k, v in _flat(state.params['backbone']).items()
         if not k.startswith('pyramid/')}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_layer_decay_from_create_optimizer_lowers_early_blocks_rates():
  """First AdamW step with unit gradients: each update is -lr x its layer's
  scale (Adam's m / sqrt(v) = 1), layer_decay ** (depth + 1 - layer id)."""
  c = _tiny_vit_config(**{'optim.layer_decay': 0.5,
                          'optim.weight_decay': 0.0,
                          'optim.grad_clip_norm': 0.0})
  model = ts.create_model(c)
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **ts.dummy_inputs(c), train=False))['params']
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params)
  tx = ts.create_optimizer(c)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  rate = {k: -float(np.mean(v)) / c.optim.learning_rate
          for k, v in _flat(updates).items()}
  depth = 2
  for key, layer in (('backbone/patch_embed/kernel', 0),
                     ('backbone/blocks_0/attn/qkv/kernel', 1),
                     ('backbone/blocks_1/mlp/fc2/kernel', 2),
                     ('backbone/norm/scale', depth + 1),
                     ('backbone/pyramid/c4_output/kernel', depth + 1),
                     ('class_head/kernel', depth + 1)):
    np.testing.assert_allclose(rate[key], 0.5 ** (depth + 1 - layer),
                               rtol=1e-4, err_msg=key)
  resnet = _tiny_vit_config(**{'model.encoder': 'resnet'})
  with pytest.raises(ValueError, match="model.encoder='vit'"):
    ts.create_optimizer(resnet)


@pytest.mark.parametrize('rules', [
    (('.*', 'fsdp'),),  # The default.
    ((r'.*backbone/(patch_embed|blocks_\d+/(attn|mlp)/\w+)/kernel', 'fsdp'),
     ('.*', 'replicate'))])
def test_sharding_rules_put_vit_kernels_and_their_moments_on_fsdp(rules):
  c = _tiny_vit_config(**{'sharding.fsdp_min_param_elements': 2**10,
                          'sharding.rules': rules})
  model = ts.create_model(c)
  state = ts.abstract_train_state(
      c, model, ts.create_optimizer(c),
      AbstractMesh((1, 8), sharding.MESH_AXES))
  specs = {sharding.leaf_path(p): a.sharding.spec for p, a in
           jax.tree_util.tree_flatten_with_path(state)[0]}
  kernel = re.compile(r'.*backbone/(patch_embed|blocks_\d+/(attn|mlp)/\w+)/kernel')
  vit_kernels = [k for k in specs if kernel.fullmatch(k)]
  # 2 blocks x (qkv, proj, fc1, fc2) + patch_embed, each as params, mu, nu.
  assert len(vit_kernels) == 9 * 3
  assert {k for k in vit_kernels if sharding.FSDP_AXIS not in specs[k]} == set()
  # Whole ViT kernels fit only on an axis divisible by 8 (e.g. qkv [64, 192]).
  assert specs['params/backbone/blocks_0/attn/qkv/kernel'] == P(None, 'fsdp')
  if rules[-1] == ('.*', 'replicate'):  # The rules, not the shapes, chose.
    assert specs['params/class_head/kernel'] == P()


def test_image_sizes_must_be_whole_patches():
  c = _tiny_vit_config(**{'input.image_size_px': 72})
  with pytest.raises(ValueError, match=r'72 px is not a multiple of the ViT '
                     r'patch 16 px .* 64 or 80'):
    config_checks.check(c)
  c = default.get_config('supervised,dinov2')
  c.input.update(dataset_dir='unused', image_size_px=512)  # The paper's.
  with pytest.raises(ValueError, match='patch 14 px .* 504 or 518'):
    config_checks.check(c)


@pytest.mark.parametrize('arg, layout', [
    ('supervised,mae', 'mae_pretrain_vit_base'),
    ('cape,dinov2', 'dinov2_vits14')])
def test_vit_configs_hold_every_parameter_of_their_weights_file(arg, layout):
  """The paper and MP-100 ViT variants, as training builds them, take the
  released file's every entry (full-size key lists, tests/fixtures)."""
  c = (mp100.get_config(arg) if arg.startswith('cape')
       else default.get_config(arg))
  c.input.dataset_dir = 'unused'
  config_checks.check(c)
  model = ts.create_model(c)
  params = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
      **ts.dummy_inputs(c), train=False))['params']
  shapes = json.loads((FIXTURES / 'vit_layouts.json').read_text())[layout]
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  vit_pretrained.place_vit(params['backbone'], vit_pretrained.convert_vit(sd),
                           layout)  # Raises, listing any gap.


def test_mp100_vit_variant_is_the_paper_vit_config_with_a_split():
  paper = default.get_config('cape,dinov2')
  ours = mp100.get_config('cape,dinov2')
  assert ours.model.to_dict() == paper.model.to_dict()
  assert ours.optim.to_dict() == paper.optim.to_dict()
  assert ours.input.image_size_px == 504
  assert mp100.get_config('supervised,dinov2').model_name == 'supervised'
  with pytest.raises(ValueError, match='neither a system'):
    mp100.get_config('cape,vit_h')


def test_dlc_openfield_vit_changes_only_the_backbone():
  resnet, vit = dlc_openfield.get_config(), dlc_openfield.get_config('vit')
  assert vit.model.encoder == 'vit'
  for group in ('input', 'vocab', 'loss', 'decode', 'evals'):
    assert vit[group].to_dict() == resnet[group].to_dict(), group
  same_budget = ('num_train_steps', 'decay_steps', 'learning_rate')
  assert ([vit.optim[k] for k in same_budget] ==
          [resnet.optim[k] for k in same_budget])
  assert vit.model.transformer.to_dict() == resnet.model.transformer.to_dict()
  assert vit.model.feature_levels == resnet.model.feature_levels


def test_benchmark_times_the_paper_vit_b16_next_to_the_resnet50():
  configs = benchmark.paper_configs(['resnet', 'mae'], 'data/x')
  assert sorted(configs) == ['paper', 'paper_mae']
  vit = configs['paper_mae']
  assert (vit.model.encoder, vit.model.vit.variant, vit.model.vit.patch_size,
          vit.input.image_size_px) == ('vit', 'B', 16, 512)
  assert configs['paper'].model.encoder == 'resnet'
  assert benchmark._describe(vit)['backbone'] == 'vit'
  # Variants act on the ViT's fields, not the unused ResNet group.
  remat = benchmark._variant(vit, 'remat')
  assert remat.model.vit.remat and not remat.model.resnet.remat
  xla = benchmark._variant(vit, 'xla_conv')
  assert xla.model.vit.conv_impl == 'xla'
  assert xla.model.resnet.conv_impl == 'auto'
  with pytest.raises(ValueError, match='for the ResNet'):
    benchmark._variant(vit, 'trainable_backbone')
