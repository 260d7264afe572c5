"""Pretrained ViT weights (timm, DINOv2, MAE) from a ``.safetensors`` file.

Nothing is downloaded and torch is never imported: the user gives a
``.safetensors`` file, read with the ``safetensors`` package's numpy API.
A torch file (``.pth``/``.pt``/``.bin``, e.g. DINOv2's
``dinov2_vits14_pretrain.pth`` or MAE's ``mae_pretrain_vit_base.pth``) is
refused with the one-line conversion to run where torch is installed.

Layouts read (key names as the reference code's ``state_dict()``; the
full-size lists are in tests/fixtures/vit_layouts.json):

* timm ``VisionTransformer`` (``vit_*``, incl. ``vit_small_patch14_dinov2``,
  ``*_reg4_dinov2`` with ``reg_token`` and ``no_embed_class``, and
  ``vit_base_patch16_224.mae``);
* DINOv2's own (``dinov2_vits14`` / ``vitb14`` / ``vitl14``, ``_reg``):
  ``register_tokens`` -> ``reg_token``; chunked blocks ``blocks.c.i.`` ->
  ``blocks.i.``; ``mask_token`` (iBOT's masking, training only) ignored;
* MAE's (encoder keys as timm's): ``decoder_*`` and ``mask_token`` (the
  pixel decoder, pretraining only) ignored.

float16 and bfloat16 files are read as they are (bfloat16 as ml_dtypes'
numpy type) and converted to float32.

Also ignored: the classifier (``head.*``, ``fc_norm.*``). Prefixes
``module.``, ``backbone.``, ``model.`` and ``encoder.`` are stripped. Any
other key is an error that lists it; so is a model parameter the file does
not hold, or a shape that differs (with the `vit_fields` the file implies).

Mapping (`vit.py` names; torch Linear [out, in] -> Dense [in, out]):

    patch_embed.proj.weight [D, 3, p, p] -> patch_embed/kernel [p, p, 3, D]
    blocks.i.attn.qkv.weight [3D, D]     -> blocks_i/attn/qkv/kernel [D, 3D]
    blocks.i.norm1.weight / .bias        -> blocks_i/norm1/scale / bias
    blocks.i.ls1.gamma                   -> blocks_i/ls1/gamma
    cls_token, reg_token, pos_embed      -> same names
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

from flax import traverse_util
import numpy as np

from kpseq_jax.models import vit as vit_lib

_PREFIXES = ('module.', 'backbone.', 'model.', 'encoder.')
_IGNORED = re.compile(r'(mask_token|decoder_.*|head\..*|fc_norm\..*)')
_LINEAR = re.compile(r'blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)'
                     r'\.(weight|bias)')
_NORM = re.compile(r'(?:blocks\.(\d+)\.)?(norm1|norm2|norm)\.(weight|bias)')
_GAMMA = re.compile(r'blocks\.(\d+)\.(ls1|ls2)\.gamma')
_TOKENS = {'cls_token': 'cls_token', 'reg_token': 'reg_token',
           'register_tokens': 'reg_token', 'pos_embed': 'pos_embed'}
_TORCH_EXTS = ('.pth', '.pt', '.bin')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A ``.safetensors`` state dict as name -> numpy array.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a torch file (with the conversion command) or another
      extension.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'ViT weights file {path!r} not found')
  ext = os.path.splitext(path)[1].lower()
  if ext in _TORCH_EXTS:
    raise ValueError(
        f'{path} is a torch file; kpseq_jax reads ViT weights from '
        '.safetensors only (no torch at run time). Convert it once where '
        'torch is installed: python -c "import torch; from safetensors.torch '
        f'import save_file; sd = torch.load({path!r}, map_location=\'cpu\'); '
        "sd = sd.get('model', sd); save_file({k: v.contiguous() for k, v in "
        "sd.items()}, 'vit.safetensors')\" and pass vit.safetensors.")
  if ext != '.safetensors':
    raise ValueError(f'{path}: expected a .safetensors file')
  import ml_dtypes  # pylint: disable=g-import-not-at-top,unused-import
  # (ml_dtypes, a JAX dependency, teaches numpy the name 'bfloat16'.)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return dict(load_file(path))


def _strip(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      name = name[len(p):]
  # DINOv2 BlockChunk: blocks.<chunk>.<index>. -> blocks.<index>.
  return re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', name)


def _flax_key(name: str) -> str | None:
  """`vit.ViT` parameter path of a (stripped) state-dict key, or None."""
  if name in _TOKENS:
    return _TOKENS[name]
  if name in ('patch_embed.proj.weight', 'patch_embed.proj.bias'):
    return 'patch_embed/' + ('kernel' if name.endswith('weight') else 'bias')
  if m := _LINEAR.fullmatch(name):
    leaf = 'kernel' if m[3] == 'weight' else 'bias'
    return f'blocks_{m[1]}/{m[2].replace(".", "/")}/{leaf}'
  if m := _NORM.fullmatch(name):
    if (m[1] is None) != (m[2] == 'norm'):
      return None
    leaf = 'scale' if m[3] == 'weight' else 'bias'
    return (f'blocks_{m[1]}/' if m[1] is not None else '') + f'{m[2]}/{leaf}'
  if m := _GAMMA.fullmatch(name):
    return f'blocks_{m[1]}/{m[2]}/gamma'
  return None


def convert_vit(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A timm/DINOv2/MAE state dict -> flat {'blocks_0/attn/qkv/kernel': ...}.

  Returns:
    float32 numpy arrays keyed by `vit.ViT` parameter paths ('/'-joined),
    the pyramid excluded (the file has none).

  Raises:
    ValueError: listing every key that is neither mapped nor ignored.
  """
  out, unknown = {}, []
  for raw, value in state_dict.items():
    name = _strip(raw)
    if _IGNORED.fullmatch(name):
      continue
    key = _flax_key(name)
    if key is None:
      unknown.append(raw)
      continue
    value = np.asarray(value, np.float32)
    if key == 'patch_embed/kernel':
      value = value.transpose(2, 3, 1, 0)  # [D, 3, p, p] -> [p, p, 3, D]
    elif key.endswith('kernel'):
      value = value.T  # torch Linear [out, in] -> [in, out]
    out[key] = value
  if unknown:
    raise ValueError(f'{len(unknown)} keys are not a timm/DINOv2/MAE ViT '
                     f'entry: {sorted(unknown)}')
  return out


def vit_fields(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The `vit.ViT` fields a state dict implies (``variant`` by width).

  Returns:
    dict(variant, width, depth, num_heads, patch_size, class_token,
    num_registers, pos_embed_grid, pos_embed_prefix_tokens,
    layer_scale=bool) -- set ``layer_scale_init`` > 0 when True.
    ``num_heads`` is not in a state dict: width / 64, the head width of
    ViT-S/B/L (DINOv2, MAE, timm).

  Raises:
    ValueError: the file has no ``pos_embed`` / ``patch_embed`` (not a ViT).
  """
  flat = convert_vit(state_dict)
  for need in ('pos_embed', 'patch_embed/kernel'):
    if need not in flat:
      raise ValueError(f'not a ViT state dict: no {need}')
  p, _, _, width = flat['patch_embed/kernel'].shape
  length = flat['pos_embed'].shape[1]
  grid = math.isqrt(length)
  depth = 1 + max(int(k.split('/')[0][len('blocks_'):])
                  for k in flat if k.startswith('blocks_'))
  variant = next((v for v, d in vit_lib.PRESETS.items()
                  if d['width'] == width), 'S')
  return dict(
      variant=variant, width=width, depth=depth,
      num_heads=max(1, width // 64),  # Head width 64 in ViT-S/B/L.
      patch_size=p, class_token='cls_token' in flat,
      num_registers=flat['reg_token'].shape[1] if 'reg_token' in flat else 0,
      pos_embed_grid=grid, pos_embed_prefix_tokens=length - grid * grid,
      layer_scale='blocks_0/ls1/gamma' in flat)



def place_vit(target: Mapping[str, Any], flat: Mapping[str, np.ndarray],
              source: str, fields: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """``target`` (a `vit.ViT`'s params) with every non-pyramid leaf from
  ``flat`` (`convert_vit`); the pyramid keeps its values.

  Raises:
    ValueError: listing the model's parameters the file lacks, the file's
      the model lacks, and shape mismatches, with the file's `vit_fields`.
  """
  t = {k: v for k, v in traverse_util.flatten_dict(target, sep='/').items()
       if not k.startswith('pyramid/')}
  missing = sorted(set(t) - set(flat))
  unexpected = sorted(set(flat) - set(t))
  bad = sorted(f'{k}: file {flat[k].shape} vs model {tuple(t[k].shape)}'
               for k in set(t) & set(flat)
               if flat[k].shape != tuple(t[k].shape))
  if missing or unexpected or bad:
    raise ValueError(
        f'ViT weights {source} do not match the model: missing {missing}, '
        f'unexpected {unexpected}, shape mismatches {bad}; the file implies '
        f'ViT fields {fields}')
  out: dict[str, Any] = {}
  for k, v in traverse_util.flatten_dict(target, sep='/').items():
    node = out
    *path, leaf = k.split('/')
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = flat.get(k, v)
  return out


def load_vit(path: str, params: Mapping[str, Any],
             backbone_key: str = 'backbone') -> dict[str, Any]:
  """``params`` with ``params[backbone_key]`` (a `vit.ViT`) from a file.

  Args:
    path: ``.safetensors`` in a timm, DINOv2 or MAE layout (module
      docstring).
    params: the model's params (structure and shapes are used under
      ``backbone_key``; other entries are returned unchanged).
    backbone_key: the ViT's module name in the model.

  Returns:
    a new params dict; the ViT's leaves are float32 numpy arrays.

  Raises:
    FileNotFoundError, ValueError: as `read_safetensors`, `convert_vit`,
      `place_vit`.
  """
  state_dict = read_safetensors(path)
  flat = convert_vit(state_dict)
  out = dict(params)
  out[backbone_key] = place_vit(params[backbone_key], flat, path,
                                vit_fields(state_dict))
  return out
