"""The ViT encoder (models/vit.py) and its weights (models/vit_pretrained.py)
against the reference implementations' outputs in tests/fixtures (made by
tools/vit_parity_fixture.py with timm and DINOv2's code; see
tests/fixtures/README.md)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
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
  pth = tmp_path / 'dinov2_vits14_pretrain.pth'
  pth.write_bytes(b'')
  with pytest.raises(ValueError, match='safetensors.torch import save_file'):
    vit_pretrained.read_safetensors(str(pth))
