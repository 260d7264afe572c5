"""The ViT encoder (models/vit.py) and its weights (models/vit_pretrained.py)
against the reference implementations' outputs in tests/fixtures (made by
tools/vit_parity_fixture.py with timm and DINOv2's code; see
tests/fixtures/README.md)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from kpseq_jax.models import vit as vit_lib
from kpseq_jax.models import vit_pretrained
from kpseq_jax.runtime import sharding

FIXTURES = Path(__file__).parent / 'fixtures'
PARITY = np.load(FIXTURES / 'vit_parity.npz')
NUM_INPUTS = 3


def _fixture_model(name: str) -> tuple[vit_lib.ViT, dict]:
  """The fixture's ViT with the file's weights (depth 2, width 32, 2 heads)."""
  path = str(FIXTURES / f'vit_{name}.safetensors')
  fields = vit_pretrained.vit_fields(vit_pretrained.read_safetensors(path))
  layer_scale = fields.pop('layer_scale')
  fields.update(num_heads=2, layer_scale_init=1.0 if layer_scale else 0.0,
                pos_interpolation='dinov2' if name == 'dinov2' else 'timm')
  model = vit_lib.ViT(**fields)
  x = jnp.zeros((1, 56, 56, 3))
  params = jax.eval_shape(lambda x: model.init(
      jax.random.key(0), x, method=vit_lib.ViT.tokens), x)['params']
  return model, vit_pretrained.load_vit(path, {'backbone': params})['backbone']


@pytest.mark.parametrize('name', ['timm', 'timm_reg', 'dinov2'])
def test_tokens_match_the_reference_implementation(name):
  # timm: class token, timm's antialiased resampling; timm_reg: LayerScale,
  # registers, no position embedding on them; dinov2: DINOv2's own code
  # (register_tokens, mask_token, 0.1-offset resampling). Inputs at grids
  # 5x6, 3x5 and the stored 4x4.
  model, params = _fixture_model(name)
  inputs = [PARITY[f'input_{i}'].astype(np.float32) / 32
            for i in range(NUM_INPUTS)]
  outputs = jax.jit(lambda xs: [  # One compilation for the three sizes.
      model.apply({'params': params}, x, method=vit_lib.ViT.tokens)
      for x in xs])(inputs)
  for i, got in enumerate(outputs):
    want = PARITY[f'{name}_features_{i}']
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() <= 1e-4, (name, i)


def test_resampling_matrices_match_torch_interpolate():
  for key in PARITY.files:
    if key.startswith('resample_'):
      _, mode, m, g = key.split('_')
      np.testing.assert_allclose(
          vit_lib.resample_weights(int(m), int(g), mode), PARITY[key],
          atol=1e-5, err_msg=key)


@pytest.mark.parametrize('layout', [
    'vit_small_patch14_dinov2', 'vit_small_patch14_reg4_dinov2',
    'dinov2_vits14', 'dinov2_vits14_reg', 'dinov2_vitb14',
    'vit_base_patch16_224.mae', 'mae_pretrain_vit_base'])
def test_every_key_of_the_full_size_layouts_is_mapped(layout):
  shapes = json.loads((FIXTURES / 'vit_layouts.json').read_text())[layout]
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  fields = vit_pretrained.vit_fields(sd)
  want = {'dinov2_vitb14': ('B', 14, 37), 'vit_base_patch16_224.mae': ('B', 16, 14),
          'mae_pretrain_vit_base': ('B', 16, 14)}.get(layout, ('S', 14, 37))
  assert (fields['variant'], fields['patch_size'],
          fields['pos_embed_grid']) == want
  assert fields['layer_scale'] == ('dinov2' in layout)
  fields['layer_scale_init'] = 1.0 if fields.pop('layer_scale') else 0.0
  model = vit_lib.ViT(**fields)
  p = fields['patch_size']
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False),
                          jnp.zeros((1, 2 * p, 2 * p, 3)))['params']
  flat = vit_pretrained.convert_vit(sd)
  placed = vit_pretrained.place_vit(target, flat, layout)  # Raises on a gap.
  assert placed['blocks_0']['attn']['qkv']['kernel'] is flat[
      'blocks_0/attn/qkv/kernel']
  ignored = [k for k in shapes if k.startswith(('decoder_', 'mask_token'))]
  assert len(flat) == len(shapes) - len(ignored)


def test_unknown_missing_and_torch_files_are_clear_errors(tmp_path):
  from safetensors.numpy import save_file
  sd = vit_pretrained.read_safetensors(str(FIXTURES / 'vit_timm.safetensors'))
  with pytest.raises(ValueError, match=r"2 keys .*'blocks\.0\.attn\.q_norm"):
    vit_pretrained.convert_vit({**sd, 'blocks.0.attn.q_norm.weight': sd['norm.weight'],
                                'rel_pos_h': sd['norm.weight']})
  model, params = _fixture_model('timm')
  del sd['blocks.1.mlp.fc2.bias']
  path = str(tmp_path / 'cut.safetensors')
  save_file(sd, path)
  with pytest.raises(ValueError, match=r"missing \['blocks_1/mlp/fc2/bias'\]"):
    vit_pretrained.load_vit(path, {'backbone': params})
  bf16 = str(tmp_path / 'bf16.safetensors')  # numpy cannot hold bfloat16.
  import safetensors.flax
  safetensors.flax.save_file({'cls_token': jnp.full((1, 1, 2), 1.5, jnp.bfloat16)}, bf16)
  loaded = vit_pretrained.convert_vit(vit_pretrained.read_safetensors(bf16))
  assert loaded['cls_token'].dtype == np.float32
  assert (loaded['cls_token'] == 1.5).all()
  pth = tmp_path / 'dinov2_vits14_pretrain.pth'
  pth.write_bytes(b'')
  with pytest.raises(ValueError, match='safetensors.torch import save_file'):
    vit_pretrained.read_safetensors(str(pth))


def test_layer_decay_adamw_first_step_by_hand():
  from kpseq_jax.training import layer_decay
  depth, decay, lr, wd = 2, 0.5, 0.1, 0.2
  ones = lambda *s: jnp.full(s, 2.0)
  params = {'backbone': {'pos_embed': ones(1, 3, 2),
                         'patch_embed': {'kernel': ones(1, 1, 3, 2)},
                         'blocks_0': {'attn': {'qkv': {'kernel': ones(2, 6)}}},
                         'blocks_1': {'norm1': {'scale': ones(2)}},
                         'norm': {'scale': ones(2)}},
            'decoder': {'kernel': ones(2, 2), 'bias': ones(2)}}
  grads = jax.tree.map(lambda p: -3.0 * jnp.ones_like(p), params)
  tx = layer_decay.layer_decay_adamw(lr, depth, decay, wd)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Step 1: Adam's m/sqrt(v) = g/|g| = -1; update = -lr * scale * (-1 +
  # wd * p * decayed); scale = decay ** (depth + 1 - layer_id).
  want = {('pos_embed',): (decay ** 3, False),
          ('patch_embed', 'kernel'): (decay ** 3, True),
          ('blocks_0', 'attn', 'qkv', 'kernel'): (decay ** 2, True),
          ('blocks_1', 'norm1', 'scale'): (decay, False),
          ('norm', 'scale'): (1.0, False)}
  flat = flax_flatten(updates['backbone'])
  for path, (scale, decayed) in want.items():
    expected = -lr * scale * (-1.0 + (wd * 2.0 if decayed else 0.0))
    np.testing.assert_allclose(flat[path], expected, rtol=1e-4, err_msg=path)
  np.testing.assert_allclose(updates['decoder']['kernel'], -lr * (-1 + wd * 2),
                             rtol=1e-4)
  np.testing.assert_allclose(updates["decoder"]["bias"], lr, rtol=1e-4)


def flax_flatten(tree):
  import flax
  return flax.traverse_util.flatten_dict(tree)


def test_warmup_step_schedule_follows_mmcv_linear_warmup():
  from kpseq_jax.training import layer_decay
  s = layer_decay.warmup_step_schedule(1.0, 10, 0.001, (20,), 0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(19), s(20)],
                             [0.001, 0.5005, 1.0, 1.0, 0.1], rtol=1e-6)


def test_default_fsdp_rules_split_every_large_vit_kernel_on_8_devices():
  # The existing ('.*', 'fsdp') rule reads shapes, so the ViT needs no rule
  # of its own: every ViT-S array >= 2**14 elements is split over 8.
  model = vit_lib.ViT(variant='S', patch_size=14, pos_embed_grid=37)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False),
                          jnp.zeros((1, 56, 56, 3)))
  specs = sharding.state_shardings(shapes, AbstractMesh((1, 8), sharding.MESH_AXES))
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  spec_of = {sharding.leaf_path(p): s.spec for p, s in
             jax.tree_util.tree_leaves_with_path(
                 specs, is_leaf=lambda x: hasattr(x, 'spec'))}
  large = [sharding.leaf_path(p) for p, a in leaves if a.size >= 2**14]
  assert len(large) > 12 * 4
  for path in large:
    assert 'fsdp' in tuple(spec_of[path]), path
  assert spec_of['params/blocks_0/attn/qkv/kernel'] == P(None, 'fsdp')
  assert spec_of['params/pos_embed'] == P(None, None, 'fsdp')  # 1370 % 8 != 0


def test_windowed_attention_sees_only_its_window():
  kw = dict(width=32, depth=1, num_heads=2, patch_size=4, pos_embed_grid=4,
            class_token=False, pos_embed_prefix_tokens=0)
  x = np.random.default_rng(0).standard_normal((1, 16, 24, 3)).astype(np.float32)
  glob = vit_lib.ViT(**kw)
  params = glob.init(jax.random.key(0), x, method=vit_lib.ViT.tokens)
  def tokens(model, x):  # Both inputs in one call.
    return np.asarray(jax.vmap(lambda x: model.apply(
        params, x[None], method=vit_lib.ViT.tokens)[0])(x))
  # One window over the whole 4 x 6 grid (padded to 6 x 6 with zeros, which
  # ViTDet attends to) differs from global attention; a 3 x 3 window: a
  # change in the top-left window leaves the bottom-right one unchanged.
  big = vit_lib.ViT(**kw, window_size=3)
  y = x.copy()
  y[:, :4, :4] += 1.0  # Patch (0, 0).
  a, b = tokens(big, np.concatenate([x, y])).reshape(2, 4, 6, 32)
  assert np.abs(a[3:, 3:] - b[3:, 3:]).max() == 0  # Other window.
  assert np.abs(a[:3, :3] - b[:3, :3]).max() > 1e-3  # Same window.
  g, h = tokens(glob, np.concatenate([x, y])).reshape(2, 4, 6, 32)
  assert np.abs(g[3:, 3:] - h[3:, 3:]).max() > 1e-5  # Global: everywhere.
  assert np.abs(a[:3, :3] - g[:3, :3]).max() > 1e-5


def test_pyramid_levels_and_input_size_error():
  model = vit_lib.ViT(width=32, depth=1, num_heads=2, patch_size=16,
                      pos_embed_grid=2, pyramid_dim=16)
  x = jnp.zeros((2, 64, 96, 3))
  variables = model.init(jax.random.key(0), x, False)
  maps = model.apply(variables, x, False)
  # Strides 8, 16, 32 px as the ResNet's c3..c5: the decoder's levels.
  assert {k: v.shape[1:3] for k, v in maps.items()} == {
      'c3': (8, 12), 'c4': (4, 6), 'c5': (2, 3)}
  with pytest.raises(ValueError, match='not a multiple of the patch size 16'):
    model.apply(variables, jnp.zeros((1, 70, 96, 3)), False)


def test_drop_path_drops_whole_branches_per_example():
  # Depth 2, rate 0.5: block 1 drops each residual branch with p = 0.5 per
  # example (timm's drop_path), so 32 copies of one image give at most the
  # 4 keep/drop combinations of its two branches, and more than one.
  model = vit_lib.ViT(width=32, depth=2, num_heads=2, patch_size=8,
                      pos_embed_grid=2, drop_path_rate=0.5)
  x = jnp.broadcast_to(jnp.asarray(
      np.random.default_rng(0).standard_normal((1, 16, 16, 3)), jnp.float32),
      (32, 16, 16, 3))
  params = model.init(jax.random.key(0), x[:1], method=vit_lib.ViT.tokens)
  out = np.asarray(model.apply(params, x, True, method=vit_lib.ViT.tokens,
                               rngs={'dropout': jax.random.key(1)}))
  distinct = np.unique(out.reshape(32, -1).round(5), axis=0)
  assert 2 <= len(distinct) <= 4
  evaluated = np.asarray(model.apply(params, x, method=vit_lib.ViT.tokens))
  assert np.abs(evaluated - evaluated[:1]).max() == 0
