"""Shared layers and data types of the models (`supervised`, `cape`,
`end_to_end`, `detector`, `centroid`).

`ImageEncoder`: a backbone (a ResNet, ``resnet.py``, or a plain ViT with
ViTDet's simple feature pyramid, ``vit.py``) and the Deformable DETR input
stage (``fundamentalvision/Deformable-DETR`` ``models/deformable_detr.py``:
per-level 1x1 conv + GroupNorm(32) ``input_proj``; learned ``level_embed``
from ``models/deformable_transformer.py``) with DETR's 2-D sine position
encoding (``facebookresearch/detr`` ``PositionEmbeddingSine``, normalize=True)
added, flattened into one multi-scale `Memory`. `coordinate_embedding`: the
continuous embedding of a normalised coordinate. `SupportSet` /
`SupportPrefix`: the CAPE model's inputs and support features.

Variables of an encoder: ``params``; ``batch_stats`` when the ResNet's norm
is 'batch' or 'frozen_batch' (apply with ``mutable=['batch_stats']`` in
training with 'batch'); the ViT has none.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.models.conv import Conv
from kpseq_jax.models.resnet import ResNet
from kpseq_jax.models.vit import ViT

# ImageNet statistics in 0..255 pixel units (torchvision normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FEATURE_LEVELS = ('c2', 'c3', 'c4', 'c5')  # ResNet strides 4, 8, 16, 32.
# The backbones (``config.model.encoder``) and the levels each returns: the
# ViT's pyramid has strides 8/16/32 px (patch 16) or 7/14/28 (patch 14).
ENCODERS = ('resnet', 'vit')
ENCODER_LEVELS = {'resnet': FEATURE_LEVELS, 'vit': ('c3', 'c4', 'c5')}
# Deformable DETR ``level_embed``: ``normal_`` (std 1).
LEVEL_EMBED_INIT = nn.initializers.normal(stddev=1.0)


@flax.struct.dataclass
class Memory:
  """Encoded image.

  Attributes:
    features: [B, S, d_model] in the model's ``dtype``: projected feature
      maps of all levels (row-major per level, levels in ``feature_levels``
      order) with sine position encoding and level embedding added.
    spatial_shapes: static ((H_l, W_l), ...), feature-map sizes in cells;
      S = sum_l H_l * W_l. Not a pytree leaf, so ``Memory`` passes through
      ``jax.jit`` with the shapes static.
    from_crop: float32 [B, 2, 3] affine from normalised crop (x, y) (the
      frame of the keypoint tokens) to normalised memory (x, y), when the
      memory is a whole image's and the crop a box in it (PRTR's
      end-to-end variant: the decoder samples inside the box, see
      `deformable_attention.MultiScaleDeformableAttention.attend`); None
      when the memory is the crop's own (the top-down path).
  """
  features: jax.Array
  spatial_shapes: Tuple[Tuple[int, int], ...] = flax.struct.field(
      pytree_node=False)
  from_crop: jax.Array | None = None


@flax.struct.dataclass
class ProjectedMemory:
  """An image's memory as the cached decoder reads it, computed once.

  Attributes:
    values: ``num_layers`` arrays [B, S, num_heads, d_model / num_heads] in
      the model's ``dtype``: each decoder layer's deformable-attention value
      projection of ``Memory.features``.
    spatial_shapes: static ((H_l, W_l), ...), as in ``Memory``.
    from_crop: as in ``Memory``.
  """
  values: Tuple[jax.Array, ...]
  spatial_shapes: Tuple[Tuple[int, int], ...] = flax.struct.field(
      pytree_node=False)
  from_crop: jax.Array | None = None


# Batch field of `Memory.from_crop` for ``full_image_memory`` models: float32
# [B, 2, 3], normalised crop (x, y) -> normalised whole-image (x, y).
FROM_CROP_FIELD = 'memory_from_crop'

# Batch fields of a `SupportSet` (pipeline: `episodes.TokenizeEpisode`).
SUPPORT_FIELDS = ('support_image', 'support_keypoints', 'support_visible',
                  'num_keypoints')


@flax.struct.dataclass
class SupportSet:
  """The support instances of a batch of episodes (category-agnostic pose).

  Attributes:
    images: uint8 [B, S, H, W, 3] support crops (S shots, same size as the
      query crops).
    keypoints: float32 [B, S, Kmax, 2] normalised [0, 1] crop (x, y) of the
      support keypoints, in the order the query's keypoints are wanted.
    visible: bool or float [B, S, Kmax], keypoint labelled and inside the
      support crop.
    num_keypoints: int32 [B], K: keypoints (groups) to find; k >= K is
      padding.
  """
  images: jax.Array
  keypoints: jax.Array
  visible: jax.Array
  num_keypoints: jax.Array

  @classmethod
  def from_batch(cls, batch) -> 'SupportSet':
    """The support set of a batch dict holding `SUPPORT_FIELDS`."""
    return cls(images=batch['support_image'],
               keypoints=batch['support_keypoints'],
               visible=batch['support_visible'],
               num_keypoints=batch['num_keypoints'])


@flax.struct.dataclass
class SupportPrefix:
  """The support keypoint features as the decoder reads them.

  Attributes:
    features: [B, Kmax, d_model] in the model's ``dtype``; zero for a
      keypoint no shot sees.
    valid: bool [B, Kmax], ``k < K``.
    proposals: float32 [B, Kmax, 2] normalised query-crop (x, y) where each
      support keypoint was found (`propose`), or None.
  """
  features: jax.Array
  valid: jax.Array
  proposals: jax.Array | None = None


def sine_position_encoding(height: int, width: int, d_model: int) -> np.ndarray:
  """DETR 2-D sine position encoding of an unpadded map.

  ``PositionEmbeddingSine(num_pos_feats=d_model // 2, temperature=10000,
  normalize=True, scale=2 pi)`` from facebookresearch/detr: cell (i, j)
  (1-based cumulative counts) has y = 2 pi i / H, x = 2 pi j / W (eps 1e-6 in
  the denominator); each half of the channels is interleaved
  sin/cos of y / 10000^(2 floor(k / 2) / (d_model / 2)), y first then x.

  Args:
    height: H, cells.
    width: W, cells.
    d_model: channels, even.

  Returns:
    float32 numpy [H, W, d_model] (a constant; shapes are static).
  """
  if d_model % 2:
    raise ValueError(f'd_model must be even, got {d_model}')
  num_feats = d_model // 2
  eps, scale, temperature = 1e-6, 2 * np.pi, 10000.0
  y_embed = np.arange(1, height + 1, dtype=np.float64) / (height + eps) * scale  # [H]
  x_embed = np.arange(1, width + 1, dtype=np.float64) / (width + eps) * scale  # [W]
  dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)  # [F]

  def interleave(angles):  # [N, F] -> [N, F] as sin, cos, sin, cos, ...
    out = np.empty_like(angles)
    out[:, 0::2] = np.sin(angles[:, 0::2])
    out[:, 1::2] = np.cos(angles[:, 1::2])
    return out

  pos_y = interleave(y_embed[:, None] / dim_t)  # [H, F]
  pos_x = interleave(x_embed[:, None] / dim_t)  # [W, F]
  pos = np.concatenate([
      np.broadcast_to(pos_y[:, None, :], (height, width, num_feats)),
      np.broadcast_to(pos_x[None, :, :], (height, width, num_feats)),
  ], axis=-1)
  return pos.astype(np.float32)  # [H, W, d_model]


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 or float [B, H, W, 3] RGB in 0..255 -> float32 [B, H, W, 3]
  ImageNet-normalised (``IMAGENET_MEAN``, ``IMAGENET_STD``)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def input_projection(feature_levels: Sequence[str], d_model: int,
                     conv_impl: str, dtype: jnp.dtype
                     ) -> Tuple[List[Conv], List[nn.GroupNorm]]:
  """Deformable DETR's per-level ``input_proj`` as submodules.

  ``fundamentalvision/Deformable-DETR`` ``models/deformable_detr.py``: a
  1x1 conv (xavier_uniform kernel, zero bias) then GroupNorm(32) per level.
  Call from a module's ``setup`` (the submodules get that module as parent)
  and pass the two lists to `image_memory`.

  Args:
    feature_levels: non-empty subset of ``FEATURE_LEVELS``.
    d_model: output channels D.
    conv_impl: 'xla' | 'gemm' | 'auto' (``conv.py``).
    dtype: compute dtype.

  Returns:
    (convs named ``input_proj_{level}``, norms named ``input_norm_{level}``),
    one per level in ``feature_levels`` order.

  Raises:
    ValueError: empty ``feature_levels`` or a level not in
      ``FEATURE_LEVELS``.
  """
  unknown = set(feature_levels) - set(FEATURE_LEVELS)
  if unknown or not feature_levels:
    raise ValueError(f'feature_levels must be a non-empty subset of '
                     f'{FEATURE_LEVELS}, got {feature_levels}')
  xavier = nn.initializers.xavier_uniform()
  convs = [Conv(d_model, 1, impl=conv_impl, kernel_init=xavier, use_bias=True,
                dtype=dtype, name=f'input_proj_{level}')
           for level in feature_levels]
  norms = [nn.GroupNorm(num_groups=32, dtype=dtype, name=f'input_norm_{level}')
           for level in feature_levels]
  return convs, norms


def image_memory(feature_maps: Dict[str, jax.Array],
                 feature_levels: Sequence[str],
                 input_proj: Sequence[nn.Module],
                 input_norm: Sequence[nn.Module],
                 level_embed: jax.Array) -> Memory:
  """Backbone feature maps -> flat multi-scale `Memory` (module docstring).

  Level l is ``input_norm[l](input_proj[l](feature_maps[level]))`` plus
  `sine_position_encoding` plus ``level_embed[l]`` (Deformable DETR's
  ``level_embed``, ``models/deformable_transformer.py``), flattened
  row-major; levels are concatenated in ``feature_levels`` order.

  Args:
    feature_maps: `ResNet` output {'c2': [B, H2, W2, C2], ...}.
    feature_levels: the levels to use, in order.
    input_proj, input_norm: `input_projection`'s submodules.
    level_embed: [len(feature_levels), D] parameter.

  Returns:
    ``Memory`` with features [B, S, D] in the projections' dtype.
  """
  d_model = level_embed.shape[-1]
  features, spatial_shapes = [], []
  for i, level in enumerate(feature_levels):
    f = input_norm[i](input_proj[i](feature_maps[level]))  # [B, H_l, W_l, D]
    batch, height, width, _ = f.shape
    pos = sine_position_encoding(height, width, d_model)  # [H_l, W_l, D]
    f = f + (jnp.asarray(pos) + level_embed[i]).astype(f.dtype)
    features.append(f.reshape(batch, height * width, d_model))
    spatial_shapes.append((height, width))
  return Memory(features=jnp.concatenate(features, axis=1),
                spatial_shapes=tuple(spatial_shapes))


def coordinate_embedding(table: jax.Array, coords: jax.Array) -> jax.Array:
  """Linear interpolation of a coordinate-bin embedding table.

  ``p = clip(coords * (num_bins - 1), 0, num_bins - 1)``;
  ``emb = (1 - f) * table[floor(p)] + f * table[ceil(p)]``, f = p - floor(p).
  A coordinate exactly at bin i (``i / (num_bins - 1)``) gives ``table[i]``;
  the embedding is continuous and differentiable in ``coords``.

  Args:
    table: [num_bins, D] embedding rows of the coordinate bins.
    coords: float [...] normalised to [0, 1].

  Returns:
    [..., D] in ``table.dtype``.
  """
  num_bins = table.shape[0]
  pos = jnp.clip(coords.astype(jnp.float32) * (num_bins - 1), 0.0, num_bins - 1)
  lo = jnp.floor(pos)
  frac = (pos - lo)[..., None].astype(table.dtype)  # [..., 1]
  lo_row = jnp.take(table, lo.astype(jnp.int32), axis=0)  # [..., D]
  hi_row = jnp.take(table, jnp.ceil(pos).astype(jnp.int32), axis=0)  # [..., D]
  return (1 - frac) * lo_row + frac * hi_row


def logit(p: jax.Array) -> jax.Array:
  """Inverse sigmoid, float32, with p clipped into [1e-4, 1 - 1e-4]."""
  p = jnp.clip(p.astype(jnp.float32), 1e-4, 1 - 1e-4)
  return jnp.log(p / (1 - p))


class ImageEncoder(nn.Module):
  """Base of the models: images -> `Memory` through the backbone and the
  Deformable DETR input stage (module docstring).

  A subclass declares the fields ``encoder`` ('resnet' | 'vit', `ENCODERS`),
  ``resnet`` (`ResNet`'s arguments but ``dtype``: depth, norm,
  frozen_stages, conv_impl, remat), ``vit`` (`vit.ViT`'s arguments but
  ``dtype``, or None; read only with ``encoder='vit'``), ``feature_levels``
  (subset of `ENCODER_LEVELS[encoder]`), ``d_model`` and ``dtype`` (compute
  dtype name or dtype), and calls `setup_encoder` in its ``setup``; the
  submodules are ``backbone`` (the ResNet or the ViT), ``input_proj_<level>``,
  ``input_norm_<level>`` and the parameter ``level_embed``.
  """

  def setup_encoder(self):
    """Builds ``backbone`` and the input stage.

    Raises:
      ValueError: an unknown ``encoder``, ``encoder='vit'`` without ``vit``
        fields, or a level the backbone does not return (the ViT has no
        'c2').
    """
    conv_impl = self.setup_backbone()
    self.input_proj, self.input_norm = input_projection(
        self.feature_levels, self.d_model, conv_impl, self.dtype)
    self.level_embed = self.param(
        'level_embed', LEVEL_EMBED_INIT,
        (len(self.feature_levels), self.d_model))

  def setup_backbone(self) -> str:
    """Builds ``backbone`` only (`setup_encoder`'s first part; the
    centroid model's own neck reads its maps).

    Returns:
      the backbone's conv implementation ('auto', 'xla' or 'gemm').

    Raises:
      ValueError: as `setup_encoder`.
    """
    if self.encoder not in ENCODERS:
      raise ValueError(f'encoder must be one of {ENCODERS}, got '
                       f'{self.encoder!r}')
    missing = set(self.feature_levels) - set(ENCODER_LEVELS[self.encoder])
    if missing:
      raise ValueError(f'feature_levels {tuple(self.feature_levels)}: the '
                       f'{self.encoder} returns only '
                       f'{ENCODER_LEVELS[self.encoder]}')
    if self.encoder == 'vit':
      if not self.vit:
        raise ValueError("encoder='vit' needs the ViT's fields (model.vit)")
      self.backbone = ViT(**self.vit, dtype=self.dtype)
      return self.vit.get('conv_impl', 'auto')
    self.backbone = ResNet(**self.resnet, dtype=self.dtype)
    return self.resnet['conv_impl']

  def encode(self, images: jax.Array, train: bool) -> Memory:
    """Images -> `Memory`.

    Args:
      images: uint8 or float [B, H, W, 3] RGB in 0..255; H, W pixels,
        multiples of 32 (ResNet) or of the ViT's patch size.
      train: BatchNorm batch statistics (``resnet.norm='batch'``); the
        ViT's drop path (rng 'dropout').

    Returns:
      ``Memory`` with features [B, S, d_model] (``dtype``), S = sum over
      ``feature_levels`` of (H / stride) * (W / stride).
    """
    return self.encode_features(self.backbone_features(images, train))

  def backbone_features(self, images: jax.Array,
                        train: bool) -> Dict[str, jax.Array]:
    """The backbone's feature maps (``dtype``) of ``images`` (as `encode`):
    the ResNet's {'c2': [B, H/4, W/4, C2], ..., 'c5': [B, H/32, W/32, C5]}
    or the ViT's pyramid {'c3': [B, 2H/p, 2W/p, C], 'c4': [B, H/p, W/p, C],
    'c5': [B, H/2p, W/2p, C]} (p the patch, C ``vit.pyramid_dim``)."""
    return self.backbone(normalize_images(images), train)

  def encode_features(self, feature_maps: Dict[str, jax.Array]) -> Memory:
    """Backbone feature maps -> `Memory` (`image_memory`): `encode` after
    the backbone, so that another model's maps of the same backbone (the
    detector's, PRTR's one backbone pass) can be reused.

    Raises:
      KeyError: if a level of ``feature_levels`` is missing.
    """
    return image_memory(feature_maps, self.feature_levels, self.input_proj,
                        self.input_norm, self.level_embed)
