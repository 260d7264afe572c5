"""Writes the ViT parity fixtures from the reference implementations.

Runs in a SEPARATE virtual environment with torch + timm (never project
dependencies); see tests/fixtures/README.md for the environment and the
exact command. Writes into ``--out`` (tests/fixtures):

* ``vit_<name>.safetensors``: a small randomly initialised ViT (depth 2,
  width 32, 2 heads, patch 14, stored grid 4 x 4) in the reference's own
  state-dict layout, every parameter drawn at random (LayerNorm scales near
  1, LayerScale gammas near 0.5) so that no part of the parity is trivial:
  ``timm`` (timm VisionTransformer, class token, pos_embed over it, timm's
  antialiased bicubic resampling), ``timm_reg`` (timm's DINOv2-with-registers
  form: LayerScale, 2 registers, ``no_embed_class``) and, with
  ``--dinov2_src``, ``dinov2`` (DINOv2's own ``DinoVisionTransformer``:
  LayerScale, 2 ``register_tokens``, ``mask_token``, its interpolation with
  the 0.1 offset).
* ``vit_parity.npz``: the fixed inputs (``input_i``: int8 NHWC; the
  image is ``input_i / 32``, float32) and, per model and
  input, the reference's final-normed tokens (timm ``forward_features``,
  DINOv2's ``x_norm`` = class, registers, patches) and the reference
  resampling matrices (torch ``F.interpolate`` of the identity) of the three
  position-embedding interpolations.
* ``vit_layouts.json``: key -> shape of full-size layouts, random weights:
  timm's ``vit_small_patch14_dinov2`` and ``vit_small_patch14_reg4_dinov2``,
  timm's ``vit_base_patch16_224.mae`` (MAE's encoder) and MAE's pretraining
  file (encoder + ``models_mae.py``'s decoder, built from timm's Block as
  MAE does), and with ``--dinov2_src`` DINOv2's ``dinov2_vits14`` /
  ``dinov2_vitb14`` / ``dinov2_vits14_reg``.

torchvision: timm imports it at start-up but its ViT never calls it. When
no working torchvision is installed (this machine has CPU torch but only
CUDA torchvision wheels), an import stub stands in for it.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types

import numpy as np

WIDTH, DEPTH, HEADS, PATCH, GRID = 32, 2, 2, 14, 4
# Input sizes (H, W) px: grid 5 x 6 (upsampled both ways), 3 x 5 (rows
# downsampled: the antialiased path differs most there), 4 x 4 (stored grid:
# no resampling).
INPUT_SIZES = ((70, 84), (42, 70), (56, 56))
# Resampling pairs (stored cells, wanted cells) for the matrices.
RESAMPLE_PAIRS = ((4, 5), (4, 3), (37, 36), (37, 18), (14, 16), (14, 9))


def _stub_torchvision():
  """Makes ``import torchvision...`` succeed with inert placeholders."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
    return
  except Exception:  # pylint: disable=broad-except
    for name in [m for m in sys.modules if m.startswith('torchvision')]:
      del sys.modules[name]

  class Meta(type):
    def __getattr__(cls, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return f'{cls.__name__}.{name}'

  class Module(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith('__'):
        raise AttributeError(name)
      value = Meta(name, (), {'__init__': lambda self, *a, **k: None})
      setattr(self, name, value)
      return value

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
      if fullname.split('.')[0] == 'torchvision':
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
      return None

    def create_module(self, spec):
      module = Module(spec.name)
      module.__path__ = []
      return module

    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, Finder())


def _randomise(model, torch, seed):
  """Every parameter and buffer drawn at random, reproducibly, and rounded
  to float16 (so the file may hold float16 without changing the model)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if name.endswith('gamma'):
        v = 0.5 + 0.1 * torch.randn(p.shape, generator=g)
      elif 'norm' in name and name.endswith('weight'):
        v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
      else:
        v = 0.2 * torch.randn(p.shape, generator=g)
      p.copy_(v.half().float())
  return model.eval()


def _timm_models(timm):
  common = dict(img_size=PATCH * GRID, patch_size=PATCH, embed_dim=WIDTH,
                depth=DEPTH, num_heads=HEADS, num_classes=0,
                dynamic_img_size=True)
  vt = timm.models.vision_transformer.VisionTransformer
  return {'timm': vt(**common),
          'timm_reg': vt(**common, init_values=1e-5, reg_tokens=2,
                         no_embed_class=True)}


def _dinov2_model(src):
  sys.path.insert(0, src)
  from dinov2.models.vision_transformer import DinoVisionTransformer  # pylint: disable=g-import-not-at-top
  from dinov2.layers import MemEffAttention, NestedTensorBlock  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  # The hub's settings (dinov2/hub/backbones.py): init_values 1.0, no block
  # chunks, interpolate_offset 0.1, no antialiasing; MemEffAttention blocks.
  return DinoVisionTransformer(
      img_size=PATCH * GRID, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
      num_heads=HEADS, mlp_ratio=4, init_values=1.0, block_chunks=0,
      num_register_tokens=2,
      block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention))


def _features(name, model, x):
  if name == 'dinov2':
    out = model.forward_features(x)
    return np.concatenate([out['x_norm_clstoken'][:, None].numpy(),
                           out['x_norm_regtokens'].numpy(),
                           out['x_norm_patchtokens'].numpy()], axis=1)
  return model.forward_features(x).numpy()


def _resample_matrices(torch):
  """Reference [out, in] matrices: F.interpolate of identity columns."""
  f = torch.nn.functional
  out = {}
  for m, g in RESAMPLE_PAIRS:
    eye = torch.eye(m, dtype=torch.float32)  # column j = basis vector j
    grid = eye[None, :, :, None].expand(1, m, m, m).contiguous()  # [1, C=m, H=m, W=m]
    variants = {
        'timm': dict(size=(g, m), mode='bicubic', antialias=True),
        'mae': dict(size=(g, m), mode='bicubic', align_corners=False),
        'dinov2': dict(scale_factor=((g + 0.1) / m, 1.0), mode='bicubic',
                       antialias=False)}
    for mode, kw in variants.items():
      y = f.interpolate(grid, **kw)  # [1, m, g, m]: row-resampled basis
      out[f'resample_{mode}_{m}_{g}'] = y[0, :, :, 0].T.numpy()  # [g, m]
  return out


def _layouts(timm, torch, dinov2_src):
  def keys(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}
  with torch.device('meta'):
    out = {name: keys(timm.create_model(name, pretrained=False, num_classes=0))
           for name in ('vit_small_patch14_dinov2',
                        'vit_small_patch14_reg4_dinov2',
                        'vit_base_patch16_224.mae')}
    mae = dict(out['vit_base_patch16_224.mae'])
    # MAE's pretraining file: models_mae.py mae_vit_base_patch16_dec512d8b's
    # decoder (512 wide, 8 blocks of 16 heads, timm Blocks).
    block = timm.models.vision_transformer.Block
    dec = torch.nn.ModuleDict(dict(
        decoder_embed=torch.nn.Linear(768, 512),
        decoder_blocks=torch.nn.ModuleList(
            [block(512, 16, 4.0, qkv_bias=True) for _ in range(8)]),
        decoder_norm=torch.nn.LayerNorm(512),
        decoder_pred=torch.nn.Linear(512, 16 * 16 * 3)))
    mae.update(keys(dec))
    mae.update(mask_token=[1, 1, 512], decoder_pos_embed=[1, 197, 512])
    out['mae_pretrain_vit_base'] = mae
    if dinov2_src:
      from dinov2.hub import backbones  # pylint: disable=g-import-not-at-top
      for name in ('dinov2_vits14', 'dinov2_vitb14', 'dinov2_vits14_reg'):
        out[name] = keys(getattr(backbones, name)(pretrained=False))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--dinov2_src', default='',
                      help='checkout of facebookresearch/dinov2 (its dinov2/ '
                      'package); without it no DINOv2-own fixture or layout')
  args = parser.parse_args()
  _stub_torchvision()
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  models = _timm_models(timm)
  if args.dinov2_src:
    models['dinov2'] = _dinov2_model(args.dinov2_src)
  rng = np.random.default_rng(0)
  arrays = {}
  for i, (h, w) in enumerate(INPUT_SIZES):  # int8, image = input / 32.
    arrays[f'input_{i}'] = rng.integers(-96, 97, (1, h, w, 3), dtype=np.int8)
  for seed, (name, model) in enumerate(sorted(models.items())):
    _randomise(model, torch, seed)
    # float32 for timm's plain file, float16 for the others (half the size;
    # the loader's float16 -> float32 path).
    dtype = torch.float32 if name == 'timm' else torch.float16
    save_file({k: v.to(dtype).contiguous()
               for k, v in model.state_dict().items()},
              os.path.join(args.out, f'vit_{name}.safetensors'))
    with torch.no_grad():
      for i in range(len(INPUT_SIZES)):
        x = torch.from_numpy(arrays[f'input_{i}'] / np.float32(32))
        x = x.permute(0, 3, 1, 2).contiguous()
        arrays[f'{name}_features_{i}'] = _features(name, model, x)
  arrays.update(_resample_matrices(torch))
  np.savez_compressed(os.path.join(args.out, 'vit_parity.npz'), **arrays)
  with open(os.path.join(args.out, 'vit_layouts.json'), 'w') as f:
    json.dump(_layouts(timm, torch, args.dinov2_src), f, indent=0,
              sort_keys=True)
  print('timm', timm.__version__, 'torch', torch.__version__, 'models',
        sorted(models), 'wrote', args.out)
  assert math.isfinite(sum(float(np.abs(v).sum()) for v in arrays.values()))


if __name__ == '__main__':
  main()
