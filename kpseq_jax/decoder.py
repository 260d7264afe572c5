"""Transformer decoder: causal self-attention + deformable cross-attention.

Layer structure follows Deformable DETR's ``DeformableTransformerDecoderLayer``
(``fundamentalvision/Deformable-DETR`` ``models/deformable_transformer.py``):
post-LayerNorm after each of self-attention, deformable cross-attention and a
ReLU FFN, each with dropout on the residual branch. Self-attention is causal
(the decoder generates a token sequence) and uses
``flax.linen.MultiHeadDotProductAttention`` so that ``decode=True`` key/value
caching can be switched on for autoregressive inference.

Reference points: as in the single-stage Deformable DETR decoder
(``DeformableTransformer.reference_points = nn.Linear(d_model, 2)``, then
sigmoid, applied to the query embedding), each position's reference point is
``sigmoid(Dense(2)(x_t))`` of its decoder input embedding ``x_t`` (token +
coordinate + position embedding), computed once before the first layer and
shared by all layers and levels. It depends only on position t, so causality
is preserved.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.deformable_attention import MultiScaleDeformableAttention
from kpseq_jax.deformable_attention import SpatialShapes


class DecoderLayer(nn.Module):
  """One post-LN decoder layer (Deformable DETR decoder layer, causal).

  Attributes:
    d_model: width D.
    num_heads: heads of both attentions.
    ffn_dim: hidden width of the FFN (Deformable DETR: 1024).
    dropout: dropout rate on attention probabilities, residual branches and
      the FFN hidden layer (Deformable DETR: 0.1).
    num_levels: feature levels in the memory.
    num_points: deformable sampling points per head and level (4).
    dtype: compute dtype; parameters float32.
  """
  d_model: int
  num_heads: int
  ffn_dim: int
  dropout: float
  num_levels: int
  num_points: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      reference_points: jax.Array,
      memory: jax.Array,
      spatial_shapes: SpatialShapes,
      mask: Optional[jax.Array],
      train: bool,
  ) -> jax.Array:
    """Applies the layer.

    Args:
      x: [B, L, D] decoder states.
      reference_points: [B, L, 2] (x, y) normalised to [0, 1].
      memory: [B, S, D] image memory, S = sum_l H_l * W_l.
      spatial_shapes: static ((H_l, W_l), ...) of the memory levels.
      mask: boolean self-attention mask broadcastable to [B, heads, L, L]
        (True = may attend), e.g. ``nn.make_causal_mask``; None for none.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      [B, L, D] in ``dtype``.
    """
    deterministic = not train
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout, deterministic=deterministic,
        name='self_attn')(x, x, mask=mask)
    x = nn.LayerNorm(dtype=self.dtype, name='norm2')(
        x + nn.Dropout(self.dropout)(y, deterministic=deterministic))

    y = MultiScaleDeformableAttention(
        self.d_model, self.num_heads, self.num_levels, self.num_points,
        dtype=self.dtype, name='cross_attn')(
            x, reference_points, memory, spatial_shapes)
    x = nn.LayerNorm(dtype=self.dtype, name='norm1')(
        x + nn.Dropout(self.dropout)(y, deterministic=deterministic))

    y = nn.Dense(self.ffn_dim, dtype=self.dtype, name='linear1')(x)
    y = nn.Dropout(self.dropout)(nn.relu(y), deterministic=deterministic)
    y = nn.Dense(self.d_model, dtype=self.dtype, name='linear2')(y)
    x = nn.LayerNorm(dtype=self.dtype, name='norm3')(
        x + nn.Dropout(self.dropout)(y, deterministic=deterministic))
    return x


class Decoder(nn.Module):
  """Stack of ``num_layers`` ``DecoderLayer`` with shared reference points.

  Post-LN layers, so no final LayerNorm. Layer and norm names follow Deformable
  DETR (``norm2`` after self-attention, ``norm1`` after cross-attention,
  ``norm3`` after the FFN); layers are ``layers_0`` ... ``layers_{n-1}``.

  Attributes: as ``DecoderLayer`` plus ``num_layers`` (Deformable DETR: 6).
  """
  num_layers: int = 6
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  num_levels: int = 1
  num_points: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      spatial_shapes: SpatialShapes,
      train: bool,
  ) -> jax.Array:
    """Causal decoding of the whole sequence (teacher forcing).

    Args:
      x: [B, L, D] input embeddings (token + position).
      memory: [B, S, D] image memory.
      spatial_shapes: static ((H_l, W_l), ...) of the memory levels.
      train: enables dropout.

    Returns:
      [B, L, D] in ``dtype``.
    """
    # Deformable DETR initialises this Linear with xavier_uniform, bias 0.
    reference_points = nn.sigmoid(nn.Dense(
        2, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        name='reference_points')(x).astype(jnp.float32))  # [B, L, 2] in [0, 1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))  # [B, 1, L, L]
    for i in range(self.num_layers):
      x = DecoderLayer(
          self.d_model, self.num_heads, self.ffn_dim, self.dropout,
          self.num_levels, self.num_points, dtype=self.dtype,
          name=f'layers_{i}')(x, reference_points, memory, spatial_shapes,
                               mask, train)
    return x
