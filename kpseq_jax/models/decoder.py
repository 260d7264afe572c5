"""Transformer decoder: causal self-attention + deformable cross-attention.

Layer structure follows Deformable DETR's ``DeformableTransformerDecoderLayer``
(``fundamentalvision/Deformable-DETR`` ``models/deformable_transformer.py``):
post-LayerNorm after each of self-attention, deformable cross-attention and a
ReLU FFN, each with dropout on the residual branch. Self-attention
(`attention.SelfAttention`, flax's ``MultiHeadDotProductAttention`` with a
chunked key/value cache) takes its mask from the caller: causal over the
token sequence, and with a support prefix (category-agnostic pose, see
`self_attention_mask`) bidirectional among the prefix's valid positions,
which every sequence position also sees.

Autoregressive inference (``decode=True``): the self-attention keeps a
preallocated key/value cache ('cache' collection, [B, Lc, heads, head_dim]
per layer) and each layer's deformable value projection is computed once per
image (``Decoder.project_values``); ``Decoder.step`` then writes a chunk of
positions (the prefix at once, then one token per step). The cache is
created by one abstract full-length call (see ``decoding.init_cache``).

Reference points: as in the single-stage Deformable DETR decoder
(``DeformableTransformer.reference_points = nn.Linear(d_model, 2)``, then
sigmoid, applied to the query embedding), each position's reference point is
``sigmoid(Dense(2)(x_t) + prior_t)`` of its decoder input embedding ``x_t``
(token + coordinate + position embedding), computed once before the first
layer and shared by all layers and levels. ``prior_t`` is 0, or, for a CAPE
model with support proposals, the logit of where the support keypoint that
position t works on was proposed in the query (two-stage Deformable DETR's
proposals as reference points; CapeFormer's proposal generator). It depends
only on position t, so causality is preserved.

Iterative refinement (``refine_points``; Deformable DETR's
``with_box_refine``, the official Raster2Seq's ``poly_refine``): layer l's
output at position t predicts a keypoint point ``p_l = sigmoid(head_l(x_l) +
logit(r_l))`` with its own 3-layer MLP ``point_heads_l`` (Deformable DETR's
``bbox_embed`` per layer) around the reference point ``r_l`` it sampled at,
and the next layer samples around it: ``r_{l+1} = stop_gradient(p_l)``
(Deformable DETR detaches between layers). The last layer's point is the
model's (x, y) output. Each position refines only its own point, so
causality and the cached decoder (``step``: one position through all
layers) are unchanged.

Noisy reference points (``reference_noise``, training only; the "noisy
reference points sampling" of Poseur, Mao et al., ECCV 2022): the first
layer's reference points get Gaussian noise of that standard deviation
(normalised [0, 1] image units), clipped to the image, so the refinement
learns to correct a point it did not choose.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.models.attention import SelfAttention
from kpseq_jax.models.deformable_attention import MultiScaleDeformableAttention
from kpseq_jax.models.deformable_attention import SpatialShapes


def self_attention_mask(query_positions: jax.Array,
                        prefix_valid: jax.Array | None,
                        num_keys: int) -> jax.Array:
  """Who may attend to whom, for a prefix of P positions then a sequence.

  Positions ``0 .. P - 1`` are the (support) prefix, ``P ..`` the token
  sequence. A query position attends to every valid prefix position
  (bidirectional inside the prefix), and a sequence position also to the
  sequence positions up to itself (causal); prefix positions never see the
  sequence. With no prefix (P = 0) this is the plain causal mask.

  Args:
    query_positions: int [T] positions of the queries (0 .. num_keys - 1).
    prefix_valid: bool [B, P] valid prefix positions, or None (P = 0).
    num_keys: Lk, key positions (the sequence or cache length).

  Returns:
    bool [B, 1, T, Lk] (B = 1 without a prefix), True = may attend.
  """
  p = 0 if prefix_valid is None else prefix_valid.shape[1]
  k = jnp.arange(num_keys)[None, :]  # [1, Lk]
  q = jnp.asarray(query_positions)[:, None]  # [T, 1]
  mask = (q >= p) & (k >= p) & (k <= q)  # [T, Lk] causal in the sequence.
  if prefix_valid is None:
    return mask[None, None]
  valid = jnp.pad(prefix_valid, ((0, 0), (0, num_keys - p)))  # [B, Lk]
  return (mask[None] | valid[:, None, :])[:, None]


def inverse_sigmoid(p: jax.Array, eps: float = 1e-5) -> jax.Array:
  """logit(p), float32, with p clipped to [eps, 1 - eps] (Deformable DETR's
  ``inverse_sigmoid``, which clamps with eps = 1e-5)."""
  p = jnp.clip(p.astype(jnp.float32), eps, 1.0 - eps)
  return jnp.log(p) - jnp.log1p(-p)


class PointHead(nn.Module):
  """3-layer ReLU MLP D -> D -> D -> 2 (Deformable DETR's ``MLP(d, d, 4,
  3)`` box head, here for an (x, y) point); float32 output [..., 2]."""
  d_model: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.d_model, dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(self.d_model, dtype=self.dtype)(x))
    return nn.Dense(2, dtype=self.dtype)(x).astype(jnp.float32)


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
    self.self_attn = SelfAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout,
        decode=self.decode, dtype=self.dtype)
    self.norm2 = nn.LayerNorm(dtype=self.dtype)
    self.cross_attn = MultiScaleDeformableAttention(
        self.d_model, self.num_heads, self.num_levels, self.num_points,
        dtype=self.dtype)
    self.norm1 = nn.LayerNorm(dtype=self.dtype)
    self.linear1 = nn.Dense(self.ffn_dim, dtype=self.dtype)
    self.linear2 = nn.Dense(self.d_model, dtype=self.dtype)
    self.norm3 = nn.LayerNorm(dtype=self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def _layer(self, x, reference_points, value, spatial_shapes, mask, train,
             query_pos=None, sampling_transform=None):
    """The layer on projected values; x [B, Lq, D] -> [B, Lq, D]."""
    deterministic = not train
    y = self.self_attn(x, mask, deterministic, query_pos)
    x = self.norm2(x + self.drop(y, deterministic=deterministic))
    query = x if query_pos is None else x + query_pos.astype(x.dtype)
    y = self.cross_attn.attend(query, reference_points, value, spatial_shapes,
                               sampling_transform)
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
      query_pos: Optional[jax.Array] = None,
      sampling_transform: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Applies the layer.

    Args:
      x: [B, L, D] decoder states.
      reference_points: [B, L, 2] (x, y) normalised to [0, 1].
      memory: [B, S, D] image memory, S = sum_l H_l * W_l.
      spatial_shapes: static ((H_l, W_l), ...) of the memory levels.
      mask: boolean self-attention mask broadcastable to [B, heads, L, L]
        (True = may attend), e.g. `self_attention_mask`; None for none.
      train: enables dropout (needs the 'dropout' rng).
      query_pos: [B, L, D] query position embedding added to the
        self-attention queries and keys and to the cross-attention query
        (Deformable DETR's decoder layer ``with_pos_embed(tgt,
        query_pos)``; the object queries of `detector.Model`); None
        (the keypoint decoder, whose inputs carry their position): none.
      sampling_transform: float [B, 2, 3] affine from the reference points'
        frame to the memory's (`MultiScaleDeformableAttention.attend`);
        None: the same frame.

    Returns:
      [B, L, D] in ``dtype``.
    """
    value = self.cross_attn.project_value(memory)  # [B, S, M, Dh]
    return self._layer(x, reference_points, value, spatial_shapes, mask,
                       train, query_pos, sampling_transform)

  def project_value(self, memory: jax.Array) -> jax.Array:
    """This layer's deformable values: [B, S, D] -> [B, S, M, Dh] (dtype)."""
    return self.cross_attn.project_value(memory)

  def step(self, x: jax.Array, reference_points: jax.Array, value: jax.Array,
           spatial_shapes: SpatialShapes, mask: jax.Array,
           sampling_transform: Optional[jax.Array] = None) -> jax.Array:
    """T positions of cached inference (``decode=True``).

    Args:
      x: [B, T, D] the positions' states (T = 1 for a token, P for the
        prefix).
      reference_points: [B, T, 2] their reference points.
      value: [B, S, M, Dh] from ``project_value``.
      spatial_shapes: static ((H_l, W_l), ...).
      mask: bool [B, 1, T, Lc] over the cache positions
        (`self_attention_mask`).
      sampling_transform: as in ``__call__``.

    Returns:
      [B, T, D] in ``dtype``; the 'cache' collection (mutable) gains these
      positions' keys and values.
    """
    return self._layer(x, reference_points, value, spatial_shapes, mask,
                       train=False, sampling_transform=sampling_transform)


class Decoder(nn.Module):
  """Stack of ``num_layers`` ``DecoderLayer`` with shared reference points.

  Post-LN layers, so no final LayerNorm. Layer and norm names follow Deformable
  DETR (``norm2`` after self-attention, ``norm1`` after cross-attention,
  ``norm3`` after the FFN); layers are ``layers_0`` ... ``layers_{n-1}``.

  Attributes: as ``DecoderLayer`` plus ``num_layers`` (Deformable DETR: 6),
  ``remat`` (rematerialise each layer's activations in the backward pass,
  ``nn.remat``; forward values are unchanged), ``refine_points`` (iterative
  reference-point refinement with ``point_heads_0 ..
  point_heads_{n-1}``, module docstring) and ``reference_noise`` (std of
  the training noise on the first reference points, normalised units; 0
  disables; needs the 'dropout' rng).
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
  refine_points: bool = False
  reference_noise: float = 0.0
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
    if self.refine_points:
      self.point_heads = [PointHead(self.d_model, self.dtype,
                                    name=f'point_heads_{i}')
                          for i in range(self.num_layers)]

  def _reference_points(self, x: jax.Array, prior: Optional[jax.Array],
                        train: bool = False) -> jax.Array:
    """[B, L, D] (+ float32 [B, L, 2] logit prior) -> float32 [B, L, 2] in
    [0, 1], from each position alone (plus the training noise)."""
    logits = self.reference_points(x).astype(jnp.float32)
    if prior is not None:
      logits = logits + prior
    points = nn.sigmoid(logits)
    if train and self.reference_noise > 0:
      noise = jax.random.normal(self.make_rng('dropout'), points.shape)
      points = jnp.clip(points + self.reference_noise * noise, 0.0, 1.0)
    return points

  def _refine(self, i: int, x: jax.Array, reference_points: jax.Array
              ) -> Tuple[jax.Array, jax.Array]:
    """Layer i's point and the next layer's reference points.

    Args:
      i: layer index.
      x: [B, L, D] layer i's output.
      reference_points: float32 [B, L, 2] where layer i sampled.

    Returns:
      (point float32 [B, L, 2] in [0, 1], with gradients; the next
      reference points, the same values with gradients stopped).
    """
    point = nn.sigmoid(self.point_heads[i](x) +
                       inverse_sigmoid(reference_points))
    return point, jax.lax.stop_gradient(point)

  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      spatial_shapes: SpatialShapes,
      train: bool,
      mask: Optional[jax.Array] = None,
      reference_prior: Optional[jax.Array] = None,
      sampling_transform: Optional[jax.Array] = None,
  ) -> Tuple[Tuple[jax.Array, ...], Optional[Tuple[jax.Array, ...]]]:
    """Decoding of the whole sequence (teacher forcing).

    With ``decode=True`` this call only serves to create the 'cache'
    collection (shapes [B, L, heads, head_dim]); see ``step``.

    Args:
      x: [B, L, D] input embeddings (token + position; a prefix first).
      memory: [B, S, D] image memory.
      spatial_shapes: static ((H_l, W_l), ...) of the memory levels.
      train: enables dropout.
      mask: bool [B, 1, L, L] (`self_attention_mask`); None: causal.
      reference_prior: float32 [B, L, 2] logits added to the reference
        points' (module docstring); None: none.
      sampling_transform: float [B, 2, 3] affine from the frame of the
        reference points (and of the points the layers predict) to the
        memory's (`MultiScaleDeformableAttention.attend`); None: the same.

    Returns:
      (states, points): every layer's output [B, L, D] in ``dtype``
      (``num_layers`` of them, the last is the decoder's output) and, with
      ``refine_points``, every layer's point float32 [B, L, 2] in [0, 1],
      else None.
    """
    reference_points = self._reference_points(
        x, reference_prior, train)  # [B, L, 2]
    if mask is None:
      mask = self_attention_mask(jnp.arange(x.shape[1]), None, x.shape[1])
    states, points = [], []
    for i, layer in enumerate(self.layers):
      x = layer(x, reference_points, memory, spatial_shapes, mask, train,
                None, sampling_transform)
      states.append(x)
      if self.refine_points:
        point, reference_points = self._refine(i, x, reference_points)
        points.append(point)
    return tuple(states), (tuple(points) if self.refine_points else None)

  def project_values(self, memory: jax.Array) -> Tuple[jax.Array, ...]:
    """Every layer's deformable values, once per image.

    Args:
      memory: [B, S, D] image memory.

    Returns:
      ``num_layers`` arrays [B, S, heads, D / heads] in ``dtype``.
    """
    return tuple(layer.project_value(memory) for layer in self.layers)

  def step(self, x: jax.Array, values: Tuple[jax.Array, ...],
           spatial_shapes: SpatialShapes, mask: jax.Array,
           reference_prior: Optional[jax.Array] = None,
           sampling_transform: Optional[jax.Array] = None) -> jax.Array:
    """T positions through all layers with the cache (``decode=True``).

    Args:
      x: [B, T, D] input embeddings of the positions (a token, or the
        whole prefix).
      values: ``project_values(memory)``.
      spatial_shapes: static ((H_l, W_l), ...).
      mask: bool [B, 1, T, Lc] over the cache (`self_attention_mask`).
      reference_prior: float32 [B, T, 2] as in ``__call__``.
      sampling_transform: as in ``__call__``.

    Returns:
      (x, point): the last layer's output [B, T, D] in ``dtype`` and, with
      ``refine_points``, its point float32 [B, T, 2] (else None); writes
      each layer's cache at the positions.
    """
    reference_points = self._reference_points(x, reference_prior)  # [B, T, 2]
    point = None
    for i, (layer, value) in enumerate(zip(self.layers, values)):
      x = layer.step(x, reference_points, value, spatial_shapes, mask,
                     sampling_transform)
      if self.refine_points:
        point, reference_points = self._refine(i, x, reference_points)
    return x, point
