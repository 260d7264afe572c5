"""Transformer decoder: causal self-attention + deformable cross-attention.

Layer structure follows Deformable DETR's ``DeformableTransformerDecoderLayer``
(``fundamentalvision/Deformable-DETR`` ``models/deformable_transformer.py``):
post-LayerNorm after each of self-attention, deformable cross-attention and a
ReLU FFN, each with dropout on the residual branch. Self-attention is causal
(the decoder generates a token sequence) and uses
``flax.linen.MultiHeadDotProductAttention`` so that ``decode=True`` key/value
caching can be switched on for autoregressive inference.

Autoregressive inference (``decode=True``): the self-attention keeps a
preallocated key/value cache (flax ``MultiHeadDotProductAttention`` 'cache'
collection, [B, L_max, heads, head_dim] per layer) and each layer's
deformable value projection is computed once per image
(``Decoder.project_values``); ``Decoder.step`` then advances one position.
The cache is created by one abstract full-length call (see
``decoding.init_cache``).

Reference points: as in the single-stage Deformable DETR decoder
(``DeformableTransformer.reference_points = nn.Linear(d_model, 2)``, then
sigmoid, applied to the query embedding), each position's reference point is
``sigmoid(Dense(2)(x_t))`` of its decoder input embedding ``x_t`` (token +
coordinate + position embedding), computed once before the first layer and
shared by all layers and levels. It depends only on position t, so causality
is preserved.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.models.deformable_attention import MultiScaleDeformableAttention
from kpseq_jax.models.deformable_attention import SpatialShapes


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
    decode: autoregressive mode: self-attention reads and appends to the
      'cache' collection; ``step`` is then the way to call the layer.
    dtype: compute dtype; parameters float32.
  """
  d_model: int
  num_heads: int
  ffn_dim: int
  dropout: float
  num_levels: int
  num_points: int
  decode: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.self_attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout, decode=self.decode)
    self.norm2 = nn.LayerNorm(dtype=self.dtype)
    self.cross_attn = MultiScaleDeformableAttention(
        self.d_model, self.num_heads, self.num_levels, self.num_points,
        dtype=self.dtype)
    self.norm1 = nn.LayerNorm(dtype=self.dtype)
    self.linear1 = nn.Dense(self.ffn_dim, dtype=self.dtype)
    self.linear2 = nn.Dense(self.d_model, dtype=self.dtype)
    self.norm3 = nn.LayerNorm(dtype=self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def _layer(self, x, reference_points, value, spatial_shapes, mask, train):
    """The layer on projected values; x [B, Lq, D] -> [B, Lq, D]."""
    deterministic = not train
    y = self.self_attn(x, x, mask=mask, deterministic=deterministic)
    x = self.norm2(x + self.drop(y, deterministic=deterministic))
    y = self.cross_attn.attend(x, reference_points, value, spatial_shapes)
    x = self.norm1(x + self.drop(y, deterministic=deterministic))
    y = self.drop(nn.relu(self.linear1(x)), deterministic=deterministic)
    y = self.linear2(y)
    return self.norm3(x + self.drop(y, deterministic=deterministic))

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
    value = self.cross_attn.project_value(memory)  # [B, S, M, Dh]
    return self._layer(x, reference_points, value, spatial_shapes, mask,
                       train)

  def project_value(self, memory: jax.Array) -> jax.Array:
    """This layer's deformable values: [B, S, D] -> [B, S, M, Dh] (dtype)."""
    return self.cross_attn.project_value(memory)

  def step(self, x: jax.Array, reference_points: jax.Array, value: jax.Array,
           spatial_shapes: SpatialShapes) -> jax.Array:
    """One autoregressive position (``decode=True``, inference).

    Args:
      x: [B, 1, D] the current position's states.
      reference_points: [B, 1, 2] its reference point.
      value: [B, S, M, Dh] from ``project_value``.
      spatial_shapes: static ((H_l, W_l), ...).

    Returns:
      [B, 1, D] in ``dtype``; the 'cache' collection (mutable) gains this
      position's key and value.
    """
    return self._layer(x, reference_points, value, spatial_shapes, None,
                       train=False)


class Decoder(nn.Module):
  """Stack of ``num_layers`` ``DecoderLayer`` with shared reference points.

  Post-LN layers, so no final LayerNorm. Layer and norm names follow Deformable
  DETR (``norm2`` after self-attention, ``norm1`` after cross-attention,
  ``norm3`` after the FFN); layers are ``layers_0`` ... ``layers_{n-1}``.

  Attributes: as ``DecoderLayer`` plus ``num_layers`` (Deformable DETR: 6)
  and ``remat`` (rematerialise each layer's activations in the backward
  pass, ``nn.remat``; forward values are unchanged).
  """
  num_layers: int = 6
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  num_levels: int = 1
  num_points: int = 4
  decode: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    # Deformable DETR initialises this Linear with xavier_uniform, bias 0.
    self.reference_points = nn.Dense(
        2, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    # __call__(self, x, reference_points, memory, spatial_shapes, mask, train):
    # spatial_shapes (4) and train (6) are static.
    layer_cls = (nn.remat(DecoderLayer, static_argnums=(4, 6)) if self.remat
                 else DecoderLayer)
    self.layers = [
        layer_cls(self.d_model, self.num_heads, self.ffn_dim, self.dropout,
                  self.num_levels, self.num_points, decode=self.decode,
                  dtype=self.dtype, name=f'layers_{i}')
        for i in range(self.num_layers)]

  def _reference_points(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> float32 [B, L, 2] in [0, 1], from each position alone."""
    return nn.sigmoid(self.reference_points(x).astype(jnp.float32))

  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      spatial_shapes: SpatialShapes,
      train: bool,
  ) -> jax.Array:
    """Causal decoding of the whole sequence (teacher forcing).

    With ``decode=True`` this call only serves to create the 'cache'
    collection (shapes [B, L, heads, head_dim]); see ``step``.

    Args:
      x: [B, L, D] input embeddings (token + position).
      memory: [B, S, D] image memory.
      spatial_shapes: static ((H_l, W_l), ...) of the memory levels.
      train: enables dropout.

    Returns:
      [B, L, D] in ``dtype``.
    """
    reference_points = self._reference_points(x)  # [B, L, 2] in [0, 1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))  # [B, 1, L, L]
    for layer in self.layers:
      x = layer(x, reference_points, memory, spatial_shapes, mask, train)
    return x

  def project_values(self, memory: jax.Array) -> Tuple[jax.Array, ...]:
    """Every layer's deformable values, once per image.

    Args:
      memory: [B, S, D] image memory.

    Returns:
      ``num_layers`` arrays [B, S, heads, D / heads] in ``dtype``.
    """
    return tuple(layer.project_value(memory) for layer in self.layers)

  def step(self, x: jax.Array, values: Tuple[jax.Array, ...],
           spatial_shapes: SpatialShapes) -> jax.Array:
    """One autoregressive position through all layers (``decode=True``).

    Args:
      x: [B, 1, D] input embedding of the current position.
      values: ``project_values(memory)``.
      spatial_shapes: static ((H_l, W_l), ...).

    Returns:
      [B, 1, D] in ``dtype``; appends to each layer's 'cache'.
    """
    reference_points = self._reference_points(x)  # [B, 1, 2]
    for layer, value in zip(self.layers, values):
      x = layer.step(x, reference_points, value, spatial_shapes)
    return x
