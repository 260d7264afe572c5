"""Plain Vision Transformer encoder (ViTPose / ViTDet style), NHWC, jnp only.

Layout and parameter names follow timm's ``VisionTransformer``
(``timm/models/vision_transformer.py``), which DINOv2
(``facebookresearch/dinov2`` ``dinov2/models/vision_transformer.py``) and MAE
(``facebookresearch/mae`` ``models_vit.py``) share, so a state dict maps
mechanically (`vit_pretrained.py`):

    patch_embed.proj.weight [D, 3, p, p] -> patch_embed/kernel [p, p, 3, D]
    cls_token [1, 1, D], reg_token [1, R, D], pos_embed [1, T + gh*gw, D]
    blocks.3.attn.qkv.weight [3D, D]     -> blocks_3/attn/qkv/kernel [D, 3D]
    blocks.3.ls1.gamma [D]               -> blocks_3/ls1/gamma [D]
    norm.weight / norm.bias              -> norm/scale / norm/bias

Tokens are ``[class, registers..., patches...]`` (timm's and DINOv2's order).
``pos_embed`` holds ``pos_embed_prefix_tokens`` prefix entries then a square
``pos_embed_grid`` x ``pos_embed_grid`` patch grid: 1 for DINOv2's own
files, MAE and timm's plain ViTs (class token only), 0 for timm's
``no_embed_class`` models (timm's DINOv2-with-registers), 1 + R for timm's
register models without ``no_embed_class``. The patch part is resampled to
the input's grid (`resample_weights`) exactly as the reference does it:

* ``'dinov2'``: DINOv2's ``interpolate_pos_encoding``: torch bicubic
  (a = -0.75, ``align_corners=False``) with ``scale_factor = (g + 0.1) / M``
  (its ``interpolate_offset``), no antialiasing; unchanged when the grid is
  square and equal to the stored one.
* ``'timm'``: timm's ``resample_abs_pos_embed``: torch bicubic with
  ``size=(gh, gw)`` and ``antialias=True`` (torch's separable antialiased
  filter, a = -0.5, normalised weights); unchanged at the stored grid.
* ``'mae'``: MAE's ``util/pos_embed.interpolate_pos_embed``: torch bicubic
  with ``size``, no antialiasing.

Blocks are pre-norm (LayerNorm eps 1e-6, exact GELU), with optional
LayerScale (CaiT; DINOv2's ``ls1``/``ls2``) and stochastic depth (drop path,
rate rising linearly over the blocks as timm's and DINOv2's ``dpr``).
With ``window_size > 0`` the blocks not in ``global_blocks`` attend within
non-overlapping windows of the patch grid (ViTDet, Li et al. 2022,
``detectron2/modeling/backbone/vit.py``: the grid is zero-padded to whole
windows after ``norm1``); the class and register tokens are then dropped
after the position embedding, as ViTDet drops the class token.

`ViT.__call__` returns ViTDet's simple feature pyramid
(``SimpleFeaturePyramid``, scale factors 2, 1, 0.5 of the last map, each
followed by 1x1 and 3x3 convs with LayerNorm) as ``{'c3', 'c4', 'c5'}``
[B, H, W, C] maps, the `resnet.ResNet` output form: strides 8, 16, 32 px
for patch 16, 7, 14, 28 px for patch 14 (the deformable decoder reads
normalised positions, so the strides need not be powers of two).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.models.conv import Conv

# ViT-S/B/L (Dosovitskiy et al. 2021; DeiT's S): width D, depth, heads.
PRESETS = {
    'S': dict(width=384, depth=12, num_heads=6),
    'B': dict(width=768, depth=12, num_heads=12),
    'L': dict(width=1024, depth=24, num_heads=16),
}
POS_INTERPOLATIONS = ('dinov2', 'timm', 'mae')
LN_EPS = 1e-6  # timm, DINOv2 and MAE: partial(nn.LayerNorm, eps=1e-6).
DINOV2_OFFSET = 0.1  # DINOv2 ``interpolate_offset``.
# timm's ``init_weights_vit_timm``: trunc_normal(std=.02) linear kernels,
# zero biases; pos_embed trunc_normal(.02); class/register tokens ~1e-6.
_dense_init = nn.initializers.truncated_normal(0.02)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel (torch ``cubic_convolution1/2``)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """torch ``upsample_bicubic2d`` (align_corners=False) as [out, in]:
  source ``scale * (i + 0.5) - 0.5``, taps floor-1..floor+2 clamped to the
  border, a = -0.75."""
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    lo = math.floor(src)
    t = src - lo
    for k, c in zip(range(lo - 1, lo + 3),
                    _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
      w[i, min(max(k, 0), in_size - 1)] += c
  return w


def _antialias_weights(in_size: int, out_size: int) -> np.ndarray:
  """torch ``_upsample_bicubic2d_aa`` as [out, in]: the a = -0.5 cubic
  stretched by the scale when shrinking, window clipped to the input,
  weights normalised to sum 1 (``_compute_index_ranges_weights``)."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1 else 2.0
  invscale = 1.0 / scale if scale >= 1 else 1.0
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
    w[i, lo:hi] = taps / taps.sum() if taps.sum() != 0 else taps
  return w


def resample_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """One axis of a position-embedding resampling as a matrix.

  Args:
    in_size: stored grid cells M along the axis.
    out_size: the input's grid cells g along the axis.
    mode: one of `POS_INTERPOLATIONS` (module docstring).

  Returns:
    float64 numpy [out_size, in_size]; ``W @ p`` resamples a column ``p``.

  Raises:
    ValueError: unknown mode, or (``'dinov2'``) a size DINOv2's scale factor
      does not reach (DINOv2 asserts the same).
  """
  if mode == 'timm':
    return _antialias_weights(in_size, out_size)
  if mode == 'mae':
    return _bicubic_weights(in_size, out_size, in_size / out_size)
  if mode == 'dinov2':
    factor = (out_size + DINOV2_OFFSET) / in_size
    if math.floor(in_size * factor) != out_size:
      raise ValueError(f'dinov2 interpolation cannot reach {out_size} cells '
                       f'from {in_size}')
    return _bicubic_weights(in_size, out_size, 1.0 / factor)
  raise ValueError(f'pos_interpolation must be one of {POS_INTERPOLATIONS}, '
                   f'got {mode!r}')


def resample_pos_embed(grid: jax.Array, out_hw: Tuple[int, int],
                       mode: str) -> jax.Array:
  """Patch position embeddings [M, M, D] -> [gh, gw, D] (float32).

  Unchanged at the stored size (both references return them as they are;
  DINOv2 only for a square grid, which the stored one is).
  """
  m = grid.shape[0]
  if tuple(out_hw) == (m, m):
    return grid
  wy = jnp.asarray(resample_weights(m, out_hw[0], mode), jnp.float32)
  wx = jnp.asarray(resample_weights(m, out_hw[1], mode), jnp.float32)
  return jnp.einsum('ih,hwd,jw->ijd', wy, grid.astype(jnp.float32), wx,
                    precision=jax.lax.Precision.HIGHEST)


class LayerScale(nn.Module):
  """x * gamma, gamma [D] initialised to ``init`` (CaiT; DINOv2's ``ls1``)."""
  init: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init),
                       (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """timm's ``Attention``: fused ``qkv`` [D, 3D] (q, k, v then heads in
  torch's reshape order), softmax(q k^T / sqrt(d_head)) in float32, ``proj``."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, N, D]."""
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_dense_init,
                   name='qkv')(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, h, hd]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits * hd ** -0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init,
                    name='proj')(out)


def _window_partition(x: jax.Array, hw: Tuple[int, int], ws: int
                      ) -> Tuple[jax.Array, Tuple[int, int]]:
  """[B, H*W, D] -> ([B * nW, ws*ws, D], padded (Hp, Wp)); zero padding at
  the bottom/right as ViTDet's ``window_partition``."""
  b, _, d = x.shape
  h, w = hw
  hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
  x = jnp.pad(x.reshape(b, h, w, d), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  x = x.reshape(b, hp // ws, ws, wp // ws, ws, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws * ws, d), (hp, wp)


def _window_unpartition(x: jax.Array, hw: Tuple[int, int], padded: Tuple[int, int],
                        ws: int, batch: int) -> jax.Array:
  """Inverse of `_window_partition`: -> [B, H*W, D], padding removed."""
  (h, w), (hp, wp), d = hw, padded, x.shape[-1]
  x = x.reshape(batch, hp // ws, wp // ws, ws, ws, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, hp, wp, d)[:, :h, :w].reshape(batch, h * w, d)


class Mlp(nn.Module):
  """timm's ``Mlp``: fc1 -> exact GELU -> fc2, [..., D] -> [..., D]."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init,
                 name='fc1')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_dense_init,
                    name='fc2')(nn.gelu(y, approximate=False))


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x)),
  each residual branch dropped per example with rate ``drop_path``."""
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale_init: float = 0.0  # 0: no LayerScale.
  drop_path: float = 0.0
  window_size: int = 0  # 0: global attention.
  dtype: jnp.dtype = jnp.float32

  def _branch(self, y: jax.Array, name: str, train: bool) -> jax.Array:
    if self.layer_scale_init:
      y = LayerScale(self.layer_scale_init, name=name)(y)
    if train and self.drop_path > 0:  # timm drop_path, scale_by_keep.
      keep = 1.0 - self.drop_path
      mask = jax.random.bernoulli(self.make_rng('dropout'), keep,
                                  (y.shape[0],) + (1,) * (y.ndim - 1))
      y = y * mask.astype(y.dtype) / keep
    return y

  @nn.compact
  def __call__(self, x: jax.Array, grid_hw: Tuple[int, int],
               train: bool) -> jax.Array:
    """x [B, N, D]; grid_hw the patch grid (windowed attention: N = gh*gw,
    no prefix tokens)."""
    d = x.shape[-1]
    y = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='norm1')(x)
    attn = Attention(self.num_heads, self.dtype, name='attn')
    if self.window_size:
      y, padded = _window_partition(y, grid_hw, self.window_size)
      y = _window_unpartition(attn(y), grid_hw, padded, self.window_size,
                              x.shape[0])
    else:
      y = attn(y)
    x = x + self._branch(y, 'ls1', train)
    y = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + self._branch(y, 'ls2', train)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> D channels: timm's ``patch_embed.proj``
  (a stride-p conv) as one matmul; ``kernel`` [p, p, 3, D] (conv layout)."""
  patch_size: int
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W multiples of p) -> [B, H/p, W/p, D]."""
    p, (b, h, w, c) = self.patch_size, x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (p, p, c, self.width), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.width,),
                      jnp.float32)
    x = x.reshape(b, h // p, p, w // p, p, c).astype(self.dtype)
    y = jnp.einsum('bipjqc,pqcd->bijd', x, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple feature pyramid (``detectron2/modeling/backbone/vit.py``
  ``SimpleFeaturePyramid``, scale factors 2, 1, 0.5): the last map
  up-sampled by a 2x2 stride-2 transposed conv (D -> D/2; here a matmul and
  depth-to-space), as is, and 2x2 max-pooled; each then a bias-free 1x1 and
  3x3 conv, each followed by LayerNorm (detectron2's ``norm='LN'``)."""
  out_dim: int = 256
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    """[B, h, w, D] -> {'c3': [B, 2h, 2w, out_dim], 'c4': [B, h, w, out_dim],
    'c5': [B, floor(h/2), floor(w/2), out_dim]}."""
    b, h, w, d = x.shape
    up = nn.Dense(4 * (d // 2), dtype=self.dtype, name='c3_up')(x)
    up = up.reshape(b, h, w, 2, 2, d // 2).transpose(0, 1, 3, 2, 4, 5)
    maps = {'c3': up.reshape(b, 2 * h, 2 * w, d // 2), 'c4': x,
            'c5': nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')}
    out = {}
    for level, y in maps.items():
      for kernel, name in ((1, f'{level}_lateral'), (3, f'{level}_output')):
        y = Conv(self.out_dim, kernel, impl=self.conv_impl, dtype=self.dtype,
                 name=name)(y)
        y = nn.LayerNorm(LN_EPS, dtype=self.dtype, name=f'{name}_norm')(y)
      out[level] = y
    return out


class ViT(nn.Module):
  """Plain ViT encoder with ViTDet's pyramid (module docstring).

  Attributes:
    variant: 'S' | 'B' | 'L' (`PRESETS`); ``width``, ``depth``,
      ``num_heads`` > 0 override it.
    patch_size: p, pixels (14: DINOv2, 16: MAE / ViTPose).
    class_token: a learned class token first (DINOv2, MAE, timm).
    num_registers: R register tokens after it (Darcet et al. 2024).
    pos_embed_grid: M, cells per side of the stored position embeddings
      (DINOv2: 518 / 14 = 37; MAE and timm at 224: 224 / p).
    pos_embed_prefix_tokens: prefix tokens with a position embedding (1:
      DINOv2's files, MAE, timm; 0: timm's ``no_embed_class``).
    pos_interpolation: `POS_INTERPOLATIONS` (module docstring).
    layer_scale_init: LayerScale's initial gamma; 0 for none (DINOv2 files:
      LayerScale, init 1.0 in DINOv2's hub, 1e-5 in timm).
    drop_path_rate: stochastic depth of the last block (0 for the first).
    window_size: windowed attention (ViTDet; 0: global everywhere).
    global_blocks: blocks kept global when ``window_size > 0`` (ViTDet:
      2, 5, 8, 11 for 12 blocks; 5, 11, 17, 23 for 24).
    pyramid_dim: channels of the pyramid's maps (ViTDet: 256).
    conv_impl: the pyramid's convs ('xla' | 'gemm' | 'auto', ``conv.py``).
    remat: recompute each block in the backward pass.
    dtype: compute dtype (name or dtype); parameters stay float32.
  """
  variant: str = 'S'
  patch_size: int = 16
  width: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_ratio: float = 4.0
  class_token: bool = True
  num_registers: int = 0
  pos_embed_grid: int = 14
  pos_embed_prefix_tokens: int = 1
  pos_interpolation: str = 'dinov2'
  layer_scale_init: float = 0.0
  drop_path_rate: float = 0.0
  window_size: int = 0
  global_blocks: Sequence[int] = ()
  pyramid_dim: int = 256
  conv_impl: str = 'auto'
  remat: bool = False
  dtype: str | jnp.dtype = jnp.float32

  def dims(self) -> Tuple[int, int, int]:
    """(width, depth, num_heads) after the preset and overrides.

    Raises:
      ValueError: unknown variant, or heads not dividing the width.
    """
    if self.variant not in PRESETS:
      raise ValueError(f'ViT variant must be one of {sorted(PRESETS)}, got '
                       f'{self.variant!r}')
    p = PRESETS[self.variant]
    width = self.width or p['width']
    depth = self.depth or p['depth']
    heads = self.num_heads or p['num_heads']
    if width % heads:
      raise ValueError(f'ViT width {width} not divisible by {heads} heads')
    return width, depth, heads

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token) + self.num_registers

  def setup(self):
    width, depth, heads = self.dims()
    if not 0 <= self.pos_embed_prefix_tokens <= self.num_prefix_tokens:
      raise ValueError(f'pos_embed_prefix_tokens {self.pos_embed_prefix_tokens}'
                       f' not in 0..{self.num_prefix_tokens} (prefix tokens)')
    if self.pos_interpolation not in POS_INTERPOLATIONS:
      raise ValueError(f'pos_interpolation must be one of '
                       f'{POS_INTERPOLATIONS}, got {self.pos_interpolation!r}')
    dtype = jnp.dtype(self.dtype)
    tiny = nn.initializers.normal(1e-6)
    self.patch_embed = PatchEmbed(self.patch_size, width, dtype)
    if self.class_token:
      self.cls_token = self.param('cls_token', tiny, (1, 1, width))
    if self.num_registers:
      self.reg_token = self.param('reg_token', tiny,
                                  (1, self.num_registers, width))
    self.pos_embed = self.param(
        'pos_embed', _dense_init,
        (1, self.pos_embed_prefix_tokens + self.pos_embed_grid ** 2, width))
    block = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    rates = np.linspace(0.0, self.drop_path_rate, depth)
    self.blocks = [
        block(heads, self.mlp_ratio, self.layer_scale_init, float(rates[i]),
              self.window_size if i not in tuple(self.global_blocks) else 0,
              dtype, name=f'blocks_{i}') for i in range(depth)]
    self.norm = nn.LayerNorm(LN_EPS, dtype=dtype)
    self.pyramid = SimpleFeaturePyramid(self.pyramid_dim, self.conv_impl, dtype)

  def grid(self, height: int, width: int) -> Tuple[int, int]:
    """Patch grid (H / p, W / p) of an input, cells.

    Raises:
      ValueError: a size that is not a multiple of ``patch_size``.
    """
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'ViT input {height} x {width} px is not a multiple of '
                       f'the patch size {p}: choose image sizes divisible by {p}')
    return height // p, width // p

  def embed(self, x: jax.Array) -> jax.Array:
    """Patches + position embeddings, prefix tokens first.

    Args:
      x: float [B, H, W, 3] normalised image.

    Returns:
      [B, P + gh*gw, D] in ``dtype``; P = `num_prefix_tokens`, 0 with
      windowed attention (ViTDet drops them).
    """
    dtype = jnp.dtype(self.dtype)
    gh, gw = self.grid(*x.shape[1:3])
    t = self.pos_embed_prefix_tokens
    pos = self.pos_embed[0]  # [T + M*M, D]
    m, width = self.pos_embed_grid, pos.shape[-1]
    grid = resample_pos_embed(pos[t:].reshape(m, m, width), (gh, gw),
                              self.pos_interpolation)  # [gh, gw, D]
    patches = self.patch_embed(x) + grid.astype(dtype)  # [B, gh, gw, D]
    patches = patches.reshape(x.shape[0], gh * gw, width)
    if self.window_size or not self.num_prefix_tokens:
      return patches
    prefix = []
    if self.class_token:
      prefix.append(self.cls_token)
    if self.num_registers:
      prefix.append(self.reg_token)
    prefix = jnp.concatenate(prefix, axis=1)  # [1, P, D]
    prefix = prefix.at[0, :t].add(pos[:t])
    prefix = jnp.broadcast_to(prefix.astype(dtype),
                              (x.shape[0],) + prefix.shape[1:])
    return jnp.concatenate([prefix, patches], axis=1)

  def tokens(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Final-normed tokens (timm's ``forward_features``).

    Args:
      x: float [B, H, W, 3] normalised (ImageNet mean/std) image; H, W
        pixels, multiples of ``patch_size``.
      train: drop path on (rng 'dropout').

    Returns:
      [B, P + gh*gw, D] in ``dtype``: prefix tokens (class, registers; none
      with windowed attention) then patches row-major.
    """
    grid_hw = self.grid(*x.shape[1:3])
    h = self.embed(x)
    for block in self.blocks:
      h = block(h, grid_hw, train)
    return self.norm(h)

  def __call__(self, x: jax.Array, train: bool) -> Dict[str, jax.Array]:
    """Runs the encoder (`tokens`) and the pyramid.

    Returns:
      {'c3': [B, 2gh, 2gw, C], 'c4': [B, gh, gw, C],
       'c5': [B, floor(gh/2), floor(gw/2), C]} in ``dtype``, C =
      ``pyramid_dim``, (gh, gw) = (H, W) / patch_size.
    """
    gh, gw = self.grid(*x.shape[1:3])
    h = self.tokens(x, train)[:, -gh * gw:]  # patch tokens [B, gh*gw, D]
    return self.pyramid(h.reshape(x.shape[0], gh, gw, h.shape[-1]))
