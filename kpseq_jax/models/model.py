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

Fast inference: ``project_values`` computes every decoder layer's deformable
values once per image and ``decode_step`` advances one position with a
self-attention key/value cache (model built with ``cache_decoding=True``;
see ``decoding.py``). ``decode`` stays the teacher-forced reference.

Variables: ``params``; ``cache`` with ``cache_decoding=True``;
``batch_stats`` when ``backbone_norm`` is 'batch' or
'frozen_batch' (apply with ``mutable=['batch_stats']`` in training with
'batch'); rng ``dropout`` when ``train=True`` and ``dropout > 0``.
"""

from __future__ import annotations

from typing import Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.sequence import grammar
from kpseq_jax.runtime import sharding
from kpseq_jax.models.conv import Conv
from kpseq_jax.models.decoder import Decoder
from kpseq_jax.models.resnet import ResNet
from kpseq_jax.sequence import vocab as vocab_lib

# ImageNet statistics in 0..255 pixel units (torchvision normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_LEVELS = ('c3', 'c4', 'c5')  # ResNet strides 8, 16, 32.
_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # BERT/GPT-style tables.


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
  """
  features: jax.Array
  spatial_shapes: Tuple[Tuple[int, int], ...] = flax.struct.field(
      pytree_node=False)


@flax.struct.dataclass
class ProjectedMemory:
  """An image's memory as the cached decoder reads it, computed once.

  Attributes:
    values: ``num_layers`` arrays [B, S, num_heads, d_model / num_heads] in
      the model's ``dtype``: each decoder layer's deformable-attention value
      projection of ``Memory.features``.
    spatial_shapes: static ((H_l, W_l), ...), as in ``Memory``.
  """
  values: Tuple[jax.Array, ...]
  spatial_shapes: Tuple[Tuple[int, int], ...] = flax.struct.field(
      pytree_node=False)


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
    feature_levels: subset of ('c3', 'c4', 'c5') used as memory levels;
      several levels give Deformable DETR multi-scale attention.
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
      ``decode_step`` (inference only; parameters are the same).
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
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    unknown = set(self.feature_levels) - set(_LEVELS)
    if unknown or not self.feature_levels:
      raise ValueError(f'feature_levels must be a non-empty subset of '
                       f'{_LEVELS}, got {self.feature_levels}')
    self.backbone = ResNet(self.backbone_depth, self.backbone_norm, self.dtype,
                           remat=self.remat_backbone,
                           conv_impl=self.backbone_conv_impl,
                           frozen_stages=self.backbone_frozen_stages)
    xavier = nn.initializers.xavier_uniform()  # Deformable DETR input_proj.
    self.input_proj = [
        Conv(self.d_model, 1, impl=self.backbone_conv_impl,
             kernel_init=xavier, use_bias=True, dtype=self.dtype,
             name=f'input_proj_{level}') for level in self.feature_levels]
    self.input_norm = [
        nn.GroupNorm(num_groups=32, dtype=self.dtype,
                     name=f'input_norm_{level}') for level in self.feature_levels]
    self.level_embed = self.param(
        'level_embed', nn.initializers.normal(stddev=1.0),
        (len(self.feature_levels), self.d_model))  # Deformable DETR normal_.
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
        decode=self.cache_decoding, remat=self.remat_decoder, dtype=self.dtype)
    self.class_head = nn.Dense(self.vocab.vocab_size, dtype=self.dtype)
    self.coord_head = [nn.Dense(self.d_model, dtype=self.dtype),
                       nn.Dense(self.d_model, dtype=self.dtype),
                       nn.Dense(2, dtype=self.dtype)]

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
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std  # [B, H, W, 3]
    feature_maps = self.backbone(x, train)
    features, spatial_shapes = [], []
    for i, level in enumerate(self.feature_levels):
      f = self.input_norm[i](self.input_proj[i](feature_maps[level]))  # [B, H_l, W_l, D]
      batch, height, width, _ = f.shape
      pos = sine_position_encoding(height, width, self.d_model)  # [H_l, W_l, D]
      f = f + (jnp.asarray(pos) + self.level_embed[i]).astype(f.dtype)
      features.append(f.reshape(batch, height * width, self.d_model))
      spatial_shapes.append((height, width))
    return Memory(features=jnp.concatenate(features, axis=1),
                  spatial_shapes=tuple(spatial_shapes))

  def embed_tokens(self, input_tokens: jax.Array, input_coords: jax.Array,
                   positions: jax.Array | None = None) -> jax.Array:
    """Decoder input embeddings (without the position embedding).

    Coordinate inputs (`Vocab.is_coordinate`) get
    ``coordinate_embedding(coord_embed, input_coords) + axis_embed[axis]``,
    the axis (x = 0, y = 1) of what the position carries
    (`grammar.input_role`); special and category tokens get
    ``special_embed[vocab.non_coordinate_index(token)]``.

    Args:
      input_tokens: int32 [B, L] token ids.
      input_coords: float32 [B, L] normalised [0, 1] (read at coordinate
        positions only).
      positions: int32 [L] sequence positions of the L inputs (default
        ``0 .. L - 1``; one step of cached decoding passes ``[t]``).

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
    return jnp.where(is_coord, coord, special)

  def decode(self, memory: Memory, input_tokens: jax.Array,
             input_coords: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
    """Teacher-forced causal decoding of a whole sequence.

    Args:
      memory: ``encode`` output.
      input_tokens: int32 [B, L], L <= max_seq_len.
      input_coords: float32 [B, L] normalised [0, 1].
      train: enables dropout.

    Returns:
      logits: float32 [B, L, V], next-token logits (V = vocab.vocab_size).
      coords: float32 [B, L, 2], predicted (x, y) normalised to [0, 1].
    """
    length = input_tokens.shape[1]
    if length > self.max_seq_len:
      raise ValueError(f'sequence length {length} > max_seq_len '
                       f'{self.max_seq_len}')
    x = self.embed_tokens(input_tokens, input_coords) + self.pos_embed[:length]
    x = self.decoder(x.astype(self.dtype), memory.features,
                     memory.spatial_shapes, train)  # [B, L, D]
    return self._heads(x)

  def _heads(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Decoder states [B, L, D] -> (float32 logits [B, L, V], float32
    sigmoid (x, y) [B, L, 2])."""
    logits = self.class_head(x).astype(jnp.float32)  # [B, L, V]
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
        spatial_shapes=memory.spatial_shapes)

  def decode_step(self, memory: ProjectedMemory, tokens: jax.Array,
                  coords: jax.Array, position: jax.Array
                  ) -> Tuple[jax.Array, jax.Array]:
    """One position of cached autoregressive decoding (``cache_decoding``).

    Equal to position ``position`` of ``decode`` given the same inputs at
    positions 0 .. position - 1 earlier steps appended to the cache (apply
    with ``mutable=['cache']``; positions must be fed in order 0, 1, ...).

    Args:
      memory: ``project_values`` output.
      tokens: int32 [B] input token at ``position``.
      coords: float32 [B] its normalised coordinate (coordinate tokens).
      position: int32 scalar, 0 <= position < cache length.

    Returns:
      logits: float32 [B, V], next-token logits.
      coords: float32 [B, 2], predicted (x, y) normalised to [0, 1].
    """
    positions = jnp.reshape(position, [1]).astype(jnp.int32)  # [1]
    x = self.embed_tokens(tokens[:, None], coords[:, None], positions)
    x = x + jnp.take(self.pos_embed, positions, axis=0)  # [B, 1, D]
    x = self.decoder.step(x.astype(self.dtype), memory.values,
                          memory.spatial_shapes)  # [B, 1, D]
    logits, xy = self._heads(x)
    return logits[:, 0], xy[:, 0]

  def __call__(self, images: jax.Array, input_tokens: jax.Array,
               input_coords: jax.Array, train: bool
               ) -> Tuple[jax.Array, jax.Array]:
    """``decode(encode(images), ...)``; see those methods for shapes."""
    memory = self.encode(images, train)
    # Keep the memory split by batch under a ('data', 'fsdp') mesh.
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features))
    return self.decode(memory, input_tokens, input_coords, train)
