"""Keypoint-sequence model: ResNet encoder + deformable transformer decoder.

``encode`` turns a crop into a flat multi-scale memory as the Deformable DETR
input stage does (``fundamentalvision/Deformable-DETR``
``models/deformable_detr.py``: per-level 1x1 conv + GroupNorm(32)
``input_proj``; ``models/deformable_transformer.py``: learned
``level_embed``), with DETR's 2-D sine position encoding
(``facebookresearch/detr`` ``models/position_encoding.py``
``PositionEmbeddingSine``, normalize=True, temperature 10000, scale 2 pi)
added to the features (there is no encoder, so position is folded into the
memory once). ``decode`` embeds the teacher-forced token sequence
``<bos> <coord> x y <sep> ... <eos>`` (see ``sequence/grammar.py``) and predicts the
next token (classifier) and the keypoint's continuous (x, y) (regressor, DETR
``MLP`` box head with 3 layers).

Coordinate inputs use a continuous embedding: a learned table of ``num_bins``
rows interpolated linearly at ``coord * (num_bins - 1)``
(``coordinate_embedding``), plus a learned x/y axis embedding; special tokens
use their own table; a learned absolute position embedding is added.

Category-agnostic pose (``support_conditioning=True``): the model is told
what to find by S support crops of the same category with their keypoints
(`SupportSet`). The support crops go through the same encoder as the query
(one batch, `encode_with_support`); feature k is the support memory
bilinearly sampled at support keypoint k on every level (the cheaper
alternative to CapeFormer's Gaussian pooling,
``capeformer/models/keypoint_heads/two_stage_head.py``), averaged over
levels and over the shots that see the keypoint, projected, and zero where
no shot sees it (`support_prefix`). The decoder reads these K features
twice: as a prefix of K positions in front of the token sequence
(bidirectional among themselves, seen by every sequence position, no
position embedding, so the prefix is a set), and added to group k's
``<coord>`` input, so group k means "find support keypoint k". Nothing in
this path knows a category: K, the order and the meaning of the keypoints
come from the support. With ``support_proposals`` (two-stage Deformable
DETR, CapeFormer's proposal generator), each support feature is also
matched against the query memory (scaled dot product, softmax over all
cells of all levels) and the expected cell centre is its proposal in the
query crop (`propose`, supervised in training); the decoder positions that
work on keypoint k take their reference points around proposal k.

Fast inference: ``project_values`` computes every decoder layer's deformable
values once per image, ``prefill`` writes the support prefix to the
self-attention key/value cache once, and ``decode_step`` advances one
position (model built with ``cache_decoding=True``; see
``kpseq_jax/inference/decoding.py``). ``decode`` stays the teacher-forced
reference.

Variables: ``params``; ``cache`` with ``cache_decoding=True``;
``batch_stats`` when ``backbone_norm`` is 'batch' or
'frozen_batch' (apply with ``mutable=['batch_stats']`` in training with
'batch'); rng ``dropout`` when ``train=True`` and ``dropout > 0``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.sequence import grammar
from kpseq_jax.runtime import sharding
from kpseq_jax.models import deformable_attention
from kpseq_jax.models import conv as conv_lib
from kpseq_jax.models.conv import Conv
from kpseq_jax.models.decoder import Decoder
from kpseq_jax.models.decoder import self_attention_mask
from kpseq_jax.models.resnet import ResNet
from kpseq_jax.sequence import vocab as vocab_lib

# ImageNet statistics in 0..255 pixel units (torchvision normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FEATURE_LEVELS = ('c2', 'c3', 'c4', 'c5')  # ResNet strides 4, 8, 16, 32.
_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # BERT/GPT-style tables.
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


def shared_model_fields(config) -> dict:
  """Constructor fields that `KeypointSequenceModel` and
  `detector.BoxDetector` read the same way from a config (configs/default.py):
  backbone (depth, norm, frozen stages, conv implementation resolved for
  the backend), feature levels, decoder width, heads, layers, FFN width,
  dropout, sampling points, and the compute dtype.

  Args:
    config: an ``ml_collections.ConfigDict`` with those fields.

  Returns:
    dict of keyword arguments for either model.
  """
  return dict(
      backbone_depth=config.backbone_depth,
      backbone_norm=config.backbone_norm,
      backbone_frozen_stages=config.backbone_frozen_stages,
      backbone_conv_impl=conv_lib.resolve_impl(config.backbone_conv_impl),
      feature_levels=tuple(config.feature_levels),
      d_model=config.d_model,
      num_heads=config.num_heads,
      num_layers=config.num_layers,
      ffn_dim=config.ffn_dim,
      dropout=config.dropout,
      num_points=config.num_points,
      dtype=jnp.dtype(config.compute_dtype))


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


def _logit(p: jax.Array) -> jax.Array:
  """Inverse sigmoid, float32, with p clipped into [1e-4, 1 - 1e-4]."""
  p = jnp.clip(p.astype(jnp.float32), 1e-4, 1 - 1e-4)
  return jnp.log(p / (1 - p))


class KeypointSequenceModel(nn.Module):
  """Image crop -> next-token logits and continuous keypoint coordinates.

  Attributes:
    vocab: the token layout (`kpseq_jax.sequence.vocab.Vocab`: coordinate
      bins, special tokens, optional category tokens).
    max_seq_len: length of the learned position table (>= input length L).
    backbone_depth: ResNet depth, 18 / 34 / 50.
    backbone_norm: 'batch', 'group' or 'frozen_batch' (see ``resnet.py``).
    backbone_frozen_stages: -1 (train the whole backbone), 0 (freeze the
      stem) or n (also layer1..layer n); see ``resnet.py``.
    backbone_conv_impl: 'auto', 'xla' or 'gemm': how the backbone and
      ``input_proj`` compute convolutions (see ``conv.py``; same parameters
      and values).
    feature_levels: subset of ('c2', 'c3', 'c4', 'c5') (strides 4, 8, 16,
      32) used as memory levels; several levels give Deformable DETR
      multi-scale attention.
    d_model: transformer width (Deformable DETR: 256).
    num_heads: attention heads (8).
    num_layers: decoder layers (6).
    ffn_dim: FFN hidden width (1024).
    dropout: dropout rate (0.1).
    num_points: deformable sampling points per head and level (4).
    remat_backbone: rematerialise each ResNet block in the backward pass
      (``nn.remat``): less activation memory, about one more forward.
    remat_decoder: the same for each decoder layer.
    cache_decoding: build the self-attention with a key/value cache for
      ``prefill`` / ``decode_step`` (inference only; same parameters).
    support_conditioning: category-agnostic pose: decode in the order of a
      `SupportSet` (module docstring); adds ``support_proj`` and
      ``prefix_embed``.
    support_proposals: with ``support_conditioning``, propose where each
      support keypoint is in the query and lay the reference points there
      (module docstring); adds ``proposal_query`` and ``proposal_key``.
    refine_points: iterative reference-point refinement across decoder
      layers (`decoder.Decoder`, Deformable DETR's ``with_box_refine``):
      the (x, y) output is the last layer's refined point, and
      ``coord_head`` is replaced by the decoder's per-layer
      ``point_heads``.
    reference_noise: std of the training noise on the first reference
      points, normalised [0, 1] units (Poseur); 0 disables.
    full_image_memory: PRTR's end-to-end variant (Li et al., CVPR 2021):
      the images are whole images and each example's keypoints are in a
      box of its image; ``__call__`` then needs ``memory_from_crop``
      (`Memory.from_crop`) and the decoder samples the whole image's
      memory inside the box. One backbone pass serves every box of an
      image.
    intermediate_outputs: ``decode`` also sows the outputs of layers 0 ..
      num_layers - 2 into the 'intermediates' collection for auxiliary
      losses: 'aux_logits' float32 [num_layers - 1, B, L, V] and
      'aux_coords' float32 [num_layers - 1, B, L, 2] (each layer through
      the shared ``class_head`` and ``coord_head``, or its refined point;
      the official Raster2Seq supervises every decoder layer).
    coordinate_scale: a ``scale_head`` (Dense, 2 outputs) reads the last
      layer's states and ``decode`` sows its log Laplace scale of each
      coordinate into 'intermediates' as 'coord_log_scale' float32
      [B, L, 2] (log of the scale b in normalised [0, 1] units) for the
      training loss `losses.sequence_loss` (the Laplace likelihood of
      RLE, Li et al. ICCV 2021, without its flow). The decoders do not read
      it.
    dtype: compute dtype (float32 or bfloat16); parameters are float32,
      logits and coordinates float32.
  """
  vocab: vocab_lib.Vocab
  max_seq_len: int
  backbone_depth: int = 50
  backbone_norm: str = 'batch'
  backbone_frozen_stages: int = -1
  backbone_conv_impl: str = 'auto'
  feature_levels: Tuple[str, ...] = ('c5',)
  d_model: int = 256
  num_heads: int = 8
  num_layers: int = 6
  ffn_dim: int = 1024
  dropout: float = 0.1
  num_points: int = 4
  remat_backbone: bool = False
  remat_decoder: bool = False
  cache_decoding: bool = False
  support_conditioning: bool = False
  full_image_memory: bool = False
  support_proposals: bool = False
  refine_points: bool = False
  reference_noise: float = 0.0
  intermediate_outputs: bool = False
  coordinate_scale: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.backbone = ResNet(self.backbone_depth, self.backbone_norm, self.dtype,
                           remat=self.remat_backbone,
                           conv_impl=self.backbone_conv_impl,
                           frozen_stages=self.backbone_frozen_stages)
    self.input_proj, self.input_norm = input_projection(
        self.feature_levels, self.d_model, self.backbone_conv_impl, self.dtype)
    self.level_embed = self.param(
        'level_embed', LEVEL_EMBED_INIT,
        (len(self.feature_levels), self.d_model))
    self.coord_embed = self.param(
        'coord_embed', _EMBED_INIT, (self.vocab.num_bins, self.d_model))
    self.axis_embed = self.param('axis_embed', _EMBED_INIT, (2, self.d_model))
    self.special_embed = self.param(
        'special_embed', _EMBED_INIT,
        (self.vocab.num_non_coordinate_tokens, self.d_model))
    self.pos_embed = self.param(
        'pos_embed', _EMBED_INIT, (self.max_seq_len, self.d_model))
    self.decoder = Decoder(
        num_layers=self.num_layers, d_model=self.d_model,
        num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
        num_levels=len(self.feature_levels), num_points=self.num_points,
        decode=self.cache_decoding, remat=self.remat_decoder,
        refine_points=self.refine_points,
        reference_noise=self.reference_noise, dtype=self.dtype)
    self.class_head = nn.Dense(self.vocab.vocab_size, dtype=self.dtype)
    if not self.refine_points:  # Refinement: the decoder's point_heads.
      self.coord_head = [nn.Dense(self.d_model, dtype=self.dtype),
                         nn.Dense(self.d_model, dtype=self.dtype),
                         nn.Dense(2, dtype=self.dtype)]
    if self.coordinate_scale:
      self.scale_head = nn.Dense(2, dtype=self.dtype)
    if self.support_conditioning:
      self.support_proj = nn.Dense(self.d_model, dtype=self.dtype)
      # Marks prefix positions (they have no position embedding).
      self.prefix_embed = self.param('prefix_embed', _EMBED_INIT,
                                     (self.d_model,))
      if self.support_proposals:
        self.proposal_query = nn.Dense(self.d_model, dtype=self.dtype)
        self.proposal_key = nn.Dense(self.d_model, dtype=self.dtype)

  def encode(self, images: jax.Array, train: bool) -> Memory:
    """Encodes image crops into the decoder memory.

    Args:
      images: uint8 or float [B, H, W, 3] RGB in 0..255; H, W pixels,
        multiples of 32.
      train: BatchNorm batch statistics (``backbone_norm='batch'``).

    Returns:
      ``Memory`` with features [B, S, d_model] (``dtype``), S = sum over
      ``feature_levels`` of (H / stride) * (W / stride).
    """
    return self.encode_features(self.backbone_features(images, train))

  def backbone_features(self, images: jax.Array,
                        train: bool) -> Dict[str, jax.Array]:
    """The ResNet's feature maps of ``images`` (`ResNet` output).

    Args:
      images: as `encode`.
      train: as `encode`.

    Returns:
      {'c2': [B, H/4, W/4, C2], ..., 'c5': [B, H/32, W/32, C5]}
      (``dtype``); `encode_features` reads ``feature_levels`` of them.
    """
    return self.backbone(normalize_images(images), train)

  def encode_features(self, feature_maps: Dict[str, jax.Array]) -> Memory:
    """Backbone feature maps -> decoder `Memory` (`image_memory`): the part
    of `encode` after the backbone, so that the maps of another model with
    the same backbone (the detector's, PRTR's one backbone pass) can be
    reused.

    Args:
      feature_maps: at least ``feature_levels`` of `backbone_features`'
        output, [B, H_l, W_l, C_l] each.

    Raises:
      KeyError: if a level of ``feature_levels`` is missing.
    """
    return image_memory(feature_maps, self.feature_levels, self.input_proj,
                        self.input_norm, self.level_embed)

  def encode_with_support(self, images: jax.Array,
                          support_images: jax.Array,
                          train: bool) -> Tuple[Memory, Memory]:
    """Encodes query and support crops in one batch (shared BatchNorm
    statistics in training).

    Args:
      images: [B, H, W, 3] query crops.
      support_images: [B, S, H, W, 3] support crops.
      train: as `encode`.

    Returns:
      (query memory [B, ...], support memory [B * S, ...], shot-major
      within an episode).
    """
    b, s = support_images.shape[:2]
    both = jnp.concatenate([
        images, support_images.reshape((b * s,) + support_images.shape[2:])
        .astype(images.dtype)])
    memory = self.encode(both, train)
    return (memory.replace(features=memory.features[:b]),
            memory.replace(features=memory.features[b:]))

  def support_prefix(self, support_memory: Memory, keypoints: jax.Array,
                     visible: jax.Array,
                     num_keypoints: jax.Array) -> SupportPrefix:
    """Support keypoint features (module docstring).

    Args:
      support_memory: `encode_with_support`'s support memory [B * S, ...].
      keypoints: float [B, S, Kmax, 2] normalised crop (x, y).
      visible: [B, S, Kmax] (bool or 0/1).
      num_keypoints: int [B], K.

    Returns:
      `SupportPrefix` with features [B, Kmax, D] and valid [B, Kmax].
    """
    b, s, kmax = visible.shape
    shapes = support_memory.spatial_shapes
    levels = len(shapes)
    value = support_memory.features[:, :, None, :]  # [B*S, Smem, 1, D]
    loc = keypoints.reshape(b * s, kmax, 1, 1, 1, 2).astype(value.dtype)
    loc = jnp.broadcast_to(loc, (b * s, kmax, 1, levels, 1, 2))
    weights = jnp.full((b * s, kmax, 1, levels, 1), 1.0 / levels,
                       value.dtype)  # Mean over levels.
    feats = deformable_attention.ms_deform_attn_sample(
        value, shapes, loc, weights).reshape(b, s, kmax, self.d_model)
    seen = visible.astype(feats.dtype)[..., None]  # [B, S, Kmax, 1]
    count = seen.sum(axis=1)  # [B, Kmax, 1]
    pooled = (feats * seen).sum(axis=1) / jnp.maximum(count, 1)
    features = self.support_proj(pooled) * (count > 0).astype(feats.dtype)
    valid = jnp.arange(kmax)[None, :] < num_keypoints[:, None]
    return SupportPrefix(features=features, valid=valid)

  def propose(self, memory: Memory, prefix: SupportPrefix) -> jax.Array:
    """Where each support keypoint is in the query: the softmax-weighted
    mean of the cell centres of every level, weights from the scaled dot
    product of the projected support feature and query memory cell
    (CapeFormer's similarity proposals, soft-argmax instead of arg-max so
    the proposal is differentiable). Sown as intermediate
    ``support_proposals`` for the training loss.

    Args:
      memory: the query's `encode` output [B, S, D].
      prefix: `support_prefix` output.

    Returns:
      float32 [B, Kmax, 2] normalised query-crop (x, y) in (0, 1).
    """
    q = self.proposal_query(prefix.features).astype(jnp.float32)  # [B, K, D]
    k = self.proposal_key(memory.features).astype(jnp.float32)  # [B, S, D]
    logits = jnp.einsum('bkd,bsd->bks', q, k) / np.sqrt(self.d_model)
    centres = np.concatenate([
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h),
                 axis=-1).reshape(h * w, 2)
        for h, w in memory.spatial_shapes]).astype(np.float32)  # [S, 2]
    proposals = jax.nn.softmax(logits, axis=-1) @ centres  # [B, K, 2]
    self.sow('intermediates', 'support_proposals', proposals)
    return proposals

  def episode_prefix(self, memory: Memory, support_memory: Memory,
                     support: SupportSet) -> SupportPrefix:
    """`support_prefix` of ``support``, with its `propose` proposals in the
    query ``memory`` when ``support_proposals``.

    Args:
      memory: the query's ``encode`` output (B episodes).
      support_memory: the support crops' ``encode`` output (B x S crops).
      support: the episodes' `SupportSet` (keypoints normalised [0, 1] in
        the support crops, visibility, K per episode).

    Returns:
      `SupportPrefix`: features [B, Kmax, d_model] in ``dtype``, valid bool
      [B, Kmax], proposals float32 [B, Kmax, 2] (normalised query-crop
      (x, y)) or None.
    """
    prefix = self.support_prefix(support_memory, support.keypoints,
                                 support.visible, support.num_keypoints)
    if self.support_proposals:
      prefix = prefix.replace(proposals=self.propose(memory, prefix))
    return prefix

  def _reference_prior(self, prefix: SupportPrefix | None,
                       positions: jax.Array) -> jax.Array | None:
    """float32 [B, T, 2] reference-point logits of sequence ``positions``
    [T]: the proposal of the keypoint group each position predicts a token
    of (`grammar.target_role`), 0 outside a group; None without
    proposals."""
    if prefix is None or prefix.proposals is None:
      return None
    kmax = prefix.proposals.shape[1]
    group = grammar.target_role(positions, self.vocab.num_prefix_tokens).group
    prior = jnp.take(_logit(prefix.proposals), jnp.clip(group, 0, kmax - 1),
                     axis=1)  # [B, T, 2]
    inside = ((group >= 0) & (group < kmax))[None, :, None]
    return jnp.where(inside, prior, 0.0)

  def embed_tokens(self, input_tokens: jax.Array, input_coords: jax.Array,
                   positions: jax.Array | None = None,
                   support_features: jax.Array | None = None) -> jax.Array:
    """Decoder input embeddings (without the position embedding).

    Coordinate inputs (`Vocab.is_coordinate`) get
    ``coordinate_embedding(coord_embed, input_coords) + axis_embed[axis]``,
    the axis (x = 0, y = 1) of what the position carries
    (`grammar.input_role`); special and category tokens get
    ``special_embed[vocab.non_coordinate_index(token)]``. With
    ``support_features``, a ``<coord>`` input of group g also gets support
    feature g.

    Args:
      input_tokens: int32 [B, L] token ids.
      input_coords: float32 [B, L] normalised [0, 1] (read at coordinate
        positions only).
      positions: int32 [L] sequence positions of the L inputs (default
        ``0 .. L - 1``; one step of cached decoding passes ``[t]``).
      support_features: [B, Kmax, d_model] (`SupportPrefix.features`).

    Returns:
      float32 [B, L, d_model].
    """
    if positions is None:
      positions = np.arange(input_tokens.shape[1])
    role = grammar.input_role(positions, self.vocab.num_prefix_tokens)
    is_y = (role.phase == grammar.Y).astype(jnp.int32)  # [L]
    coord = coordinate_embedding(self.coord_embed, input_coords)  # [B, L, D]
    coord = coord + jnp.take(self.axis_embed, is_y, axis=0)  # + [L, D]
    special = jnp.take(self.special_embed,
                       self.vocab.non_coordinate_index(input_tokens),
                       axis=0)  # [B, L, D]
    is_coord = self.vocab.is_coordinate(input_tokens)[..., None]  # [B, L, 1]
    x = jnp.where(is_coord, coord, special)
    if support_features is not None:
      group = jnp.clip(role.group, 0, support_features.shape[1] - 1)  # [L]
      feature = jnp.take(support_features, group, axis=1)  # [B, L, D]
      starts = (input_tokens == self.vocab.coord)[..., None]  # [B, L, 1]
      x = x + jnp.where(starts, feature, 0).astype(x.dtype)
    return x

  def decode(self, memory: Memory, input_tokens: jax.Array,
             input_coords: jax.Array, train: bool,
             prefix: SupportPrefix | None = None
             ) -> Tuple[jax.Array, jax.Array]:
    """Teacher-forced decoding of a whole sequence (causal; behind the
    support prefix with ``prefix``).

    Args:
      memory: ``encode`` output.
      input_tokens: int32 [B, L], L <= max_seq_len.
      input_coords: float32 [B, L] normalised [0, 1].
      train: enables dropout.
      prefix: `support_prefix` output (support conditioning only).

    Returns:
      logits: float32 [B, L, V], next-token logits (V = vocab.vocab_size).
      coords: float32 [B, L, 2], predicted (x, y) normalised to [0, 1].
    """
    length = input_tokens.shape[1]
    if length > self.max_seq_len:
      raise ValueError(f'sequence length {length} > max_seq_len '
                       f'{self.max_seq_len}')
    x = self.embed_tokens(input_tokens, input_coords, None,
                          None if prefix is None else prefix.features)
    x = (x + self.pos_embed[:length]).astype(self.dtype)
    mask = prior = None
    if prefix is not None:
      x = jnp.concatenate([self._prefix_inputs(prefix), x], axis=1)
      total = x.shape[1]
      mask = self_attention_mask(jnp.arange(total), prefix.valid, total)
      prior = self._reference_prior(prefix, jnp.arange(length))
      if prior is not None:
        prior = jnp.concatenate([_logit(prefix.proposals), prior], axis=1)
    states, points = self.decoder(
        x, memory.features, memory.spatial_shapes, train, mask, prior,
        memory.from_crop)  # [B, P + L, D] each
    p = x.shape[1] - length
    first = 0 if self.intermediate_outputs else len(states) - 1
    outputs = [self._heads(states[i][:, p:],
                           None if points is None else points[i][:, p:])
               for i in range(first, len(states))]
    if len(outputs) > 1:
      self.sow('intermediates', 'aux_logits',
               jnp.stack([logits for logits, _ in outputs[:-1]]))
      self.sow('intermediates', 'aux_coords',
               jnp.stack([xy for _, xy in outputs[:-1]]))
    if self.coordinate_scale:
      self.sow('intermediates', 'coord_log_scale',
               self.scale_head(states[-1][:, p:]).astype(jnp.float32))
    return outputs[-1]

  def _prefix_inputs(self, prefix: SupportPrefix) -> jax.Array:
    """[B, P, D] decoder inputs of the prefix positions."""
    return (prefix.features + self.prefix_embed).astype(self.dtype)

  def _heads(self, x: jax.Array, point: jax.Array | None = None
             ) -> Tuple[jax.Array, jax.Array]:
    """Decoder states [B, L, D] -> (float32 logits [B, L, V], float32
    sigmoid (x, y) [B, L, 2]); the (x, y) is ``point`` (float32 [B, L, 2],
    a refined point) when given, else ``coord_head``'s."""
    logits = self.class_head(x).astype(jnp.float32)  # [B, L, V]
    if point is not None:
      return logits, point
    h = x
    for i, layer in enumerate(self.coord_head):
      h = layer(h)
      if i < len(self.coord_head) - 1:
        h = nn.relu(h)
    coords = nn.sigmoid(h.astype(jnp.float32))  # [B, L, 2]
    return logits, coords

  def project_values(self, memory: Memory) -> ProjectedMemory:
    """Every decoder layer's deformable values of ``memory``, once per image.

    Returns:
      ``ProjectedMemory`` with ``num_layers`` arrays [B, S, num_heads,
      d_model / num_heads] (``dtype``).
    """
    return ProjectedMemory(
        values=self.decoder.project_values(memory.features),
        spatial_shapes=memory.spatial_shapes, from_crop=memory.from_crop)

  def prefill(self, memory: ProjectedMemory, prefix: SupportPrefix,
              cache_length: int) -> None:
    """Writes the support prefix to cache positions ``0 .. P - 1``
    (``cache_decoding``; apply with ``mutable=['cache']``), once per
    episode, before the first `decode_step`.

    Args:
      memory: ``project_values`` output.
      prefix: `support_prefix` output, P = Kmax positions.
      cache_length: Lc, the cache's positions (P + L).
    """
    p = prefix.features.shape[1]
    mask = self_attention_mask(jnp.arange(p), prefix.valid, cache_length)
    prior = None if prefix.proposals is None else _logit(prefix.proposals)
    self.decoder.step(self._prefix_inputs(prefix), memory.values,
                      memory.spatial_shapes, mask, prior, memory.from_crop)

  def decode_step(self, memory: ProjectedMemory, tokens: jax.Array,
                  coords: jax.Array, position: jax.Array, cache_length: int,
                  prefix: SupportPrefix | None = None
                  ) -> Tuple[jax.Array, jax.Array]:
    """One position of cached autoregressive decoding (``cache_decoding``).

    Equal to position ``position`` of ``decode`` given the same inputs at
    positions 0 .. position - 1 earlier steps appended to the cache (apply
    with ``mutable=['cache']``; positions must be fed in order 0, 1, ...,
    after `prefill` with a prefix).

    Args:
      memory: ``project_values`` output.
      tokens: int32 [B] input token at ``position``.
      coords: float32 [B] its normalised coordinate (coordinate tokens).
      position: int32 scalar, 0 <= position < L (the sequence position;
        the cache position is P + position).
      cache_length: Lc, the cache's positions.
      prefix: the prefilled `SupportPrefix` (support conditioning).

    Returns:
      logits: float32 [B, V], next-token logits.
      coords: float32 [B, 2], predicted (x, y) normalised to [0, 1].
    """
    positions = jnp.reshape(position, [1]).astype(jnp.int32)  # [1]
    x = self.embed_tokens(tokens[:, None], coords[:, None], positions,
                          None if prefix is None else prefix.features)
    x = x + jnp.take(self.pos_embed, positions, axis=0)  # [B, 1, D]
    p = 0 if prefix is None else prefix.features.shape[1]
    mask = self_attention_mask(positions + p,
                               None if prefix is None else prefix.valid,
                               cache_length)
    x, point = self.decoder.step(
        x.astype(self.dtype), memory.values, memory.spatial_shapes, mask,
        self._reference_prior(prefix, positions),
        memory.from_crop)  # [B, 1, D], [B, 1, 2]
    logits, xy = self._heads(x, point)
    return logits[:, 0], xy[:, 0]

  def __call__(self, images: jax.Array, input_tokens: jax.Array,
               input_coords: jax.Array, train: bool,
               support: SupportSet | None = None,
               memory_from_crop: jax.Array | None = None
               ) -> Tuple[jax.Array, jax.Array]:
    """``decode(encode(images), ...)``, with the support prefix when
    ``support`` is given; see those methods for shapes.

    ``memory_from_crop`` (float [B, 2, 3], `Memory.from_crop`) makes
    ``images`` whole images and each example's tokens a box in its image
    (PRTR's end-to-end variant); None: ``images`` are the crops.

    Raises:
      ValueError: if ``support`` is given without ``support_conditioning``
        or missing with it; the same for ``memory_from_crop`` and
        ``full_image_memory``.
    """
    if (support is not None) != self.support_conditioning:
      raise ValueError(
          f'support_conditioning={self.support_conditioning} but the support '
          f'set is {"given" if support is not None else "missing"}.')
    if (memory_from_crop is not None) != self.full_image_memory:
      raise ValueError(
          f'full_image_memory={self.full_image_memory} but memory_from_crop '
          f'is {"given" if memory_from_crop is not None else "missing"}.')
    prefix = None
    if support is None:
      memory = self.encode(images, train)
    else:
      memory, support_memory = self.encode_with_support(
          images, support.images, train)
      prefix = self.episode_prefix(memory, support_memory, support)
    # Keep the memory split by batch under a ('data', 'fsdp') mesh.
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features),
        from_crop=memory_from_crop)
    return self.decode(memory, input_tokens, input_coords, train, prefix)
