"""The supervised keypoint-sequence model (Raster2Seq on a top-down crop).

A crop goes through `model.ImageEncoder` into a multi-scale memory; the
deformable decoder (``decoder.py``) reads the teacher-forced sequence
``<bos> <coord> x y <sep> ... <eos>`` (``sequence/grammar.py``) and predicts
the next token (``class_head``) and the keypoint's continuous (x, y)
(``coord_head``, DETR's 3-layer ``MLP``, or with refinement the decoder's
per-layer points). Coordinate inputs use `model.coordinate_embedding` plus a
learned x/y axis embedding; special tokens their own table; a learned
absolute position embedding is added.

Fast inference: `Model.project_values` computes every decoder layer's
deformable values once per image and `Model.decode_step` advances one
position (built with ``cache_decoding=True``; ``inference/decoding.py``).
`Model.decode` is the teacher-forced reference. `cape.Model` and
`end_to_end.Model` extend this class.
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.models import model as model_lib
from kpseq_jax.models.decoder import Decoder
from kpseq_jax.models.decoder import self_attention_mask
from kpseq_jax.runtime import sharding
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

EMBED_INIT = nn.initializers.normal(stddev=0.02)  # BERT/GPT-style tables.
TRAIN_FIELDS = ('image', 'input_tokens', 'input_coords', 'target_tokens',
                'target_coords', 'token_weights', 'coord_weights')


class Model(model_lib.ImageEncoder):
  """Crop -> next-token logits and continuous keypoint coordinates.

  Attributes:
    vocab: the token layout (`vocab.Vocab`).
    max_seq_len: rows of the learned position table (>= input length L).
    resnet: `ResNet`'s arguments but dtype (``configs/default.py``).
    encoder: the backbone, 'resnet' or 'vit' (`model.ImageEncoder`).
    vit: `vit.ViT`'s arguments but dtype, read with ``encoder='vit'``.
    transformer: `decoder.Decoder`'s arguments but d_model, num_levels,
      decode and dtype: num_layers, num_heads, ffn_dim, dropout,
      num_points, remat, refine_points (Deformable DETR's with_box_refine:
      the (x, y) output is the last layer's refined point and
      ``coord_head`` is not built), reference_noise (Poseur).
    feature_levels: memory levels, subset of ('c2', 'c3', 'c4', 'c5').
    d_model: transformer width.
    aux_loss: ``decode`` also sows layers 0 .. num_layers - 2 through the
      shared heads as 'aux_logits' float32 [num_layers - 1, B, L, V] and
      'aux_coords' [num_layers - 1, B, L, 2] (DETR's aux_loss); so does
      refinement (its intermediate points are trained).
    coordinate_loss: 'l1' or 'laplace': a ``scale_head`` sows the last
      layer's log Laplace scale per coordinate as 'coord_log_scale'
      float32 [B, L, 2] (normalised units; RLE without its flow).
    dtype: compute dtype; parameters, logits and coordinates are float32.
    cache_decoding: key/value-cached self-attention for `decode_step`
      (inference only; same parameters).
  """
  vocab: vocab_lib.Vocab
  max_seq_len: int
  resnet: Mapping[str, Any]
  transformer: Mapping[str, Any]
  feature_levels: Tuple[str, ...] = ('c5',)
  d_model: int = 256
  aux_loss: bool = False
  coordinate_loss: str = 'l1'
  encoder: str = 'resnet'
  vit: Mapping[str, Any] | None = None
  dtype: Any = 'float32'
  cache_decoding: bool = False

  # What the system reads (class constants, not fields): the batch fields
  # of the train step, support crops (`cape.Model`), whole images with a
  # box per example (`end_to_end.Model`).
  train_fields = TRAIN_FIELDS
  support_conditioning = False
  full_image_memory = False

  def setup(self):
    self.setup_encoder()
    self.coord_embed = self.param(
        'coord_embed', EMBED_INIT, (self.vocab.num_bins, self.d_model))
    self.axis_embed = self.param('axis_embed', EMBED_INIT, (2, self.d_model))
    self.special_embed = self.param(
        'special_embed', EMBED_INIT,
        (self.vocab.num_non_coordinate_tokens, self.d_model))
    self.pos_embed = self.param(
        'pos_embed', EMBED_INIT, (self.max_seq_len, self.d_model))
    self.decoder = Decoder(
        **self.transformer, d_model=self.d_model,
        num_levels=len(self.feature_levels), decode=self.cache_decoding,
        dtype=self.dtype)
    self.class_head = nn.Dense(self.vocab.vocab_size, dtype=self.dtype)
    if not self.transformer['refine_points']:
      self.coord_head = [nn.Dense(self.d_model, dtype=self.dtype),
                         nn.Dense(self.d_model, dtype=self.dtype),
                         nn.Dense(2, dtype=self.dtype)]
    if self.coordinate_loss == 'laplace':
      self.scale_head = nn.Dense(2, dtype=self.dtype)

  @property
  def intermediate_outputs(self) -> bool:
    """Whether `decode` sows the earlier layers' outputs (aux_loss or
    refinement)."""
    return self.aux_loss or self.transformer['refine_points']

  def for_cached_decoding(self) -> 'Model':
    """This model with the key/value cache and without rematerialisation
    (same parameters)."""
    vit = self.vit and flax.core.freeze({**self.vit, 'remat': False})
    return self.clone(
        cache_decoding=True,
        resnet=flax.core.freeze({**self.resnet, 'remat': False}), vit=vit,
        transformer=flax.core.freeze({**self.transformer, 'remat': False}))

  @staticmethod
  def inputs(batch: dict) -> dict:
    """``__call__``'s array arguments from a batch of the pipeline."""
    return dict(images=batch['image'], input_tokens=batch['input_tokens'],
                input_coords=batch['input_coords'])

  def embed_tokens(self, input_tokens: jax.Array, input_coords: jax.Array,
                   positions: jax.Array | None = None,
                   prefix: model_lib.SupportPrefix | None = None
                   ) -> jax.Array:
    """Decoder input embeddings without the position embedding.

    Coordinate inputs (`Vocab.is_coordinate`) get
    ``coordinate_embedding(coord_embed, input_coords) + axis_embed[axis]``
    (x = 0, y = 1, from `grammar.input_role`); special and category
    tokens ``special_embed[vocab.non_coordinate_index(token)]``.

    Args:
      input_tokens: int32 [B, L] token ids.
      input_coords: float32 [B, L] normalised [0, 1] (read at coordinate
        positions only).
      positions: int32 [L] sequence positions (default 0 .. L - 1).
      prefix: unused here (`cape.Model` adds support features).

    Returns:
      float32 [B, L, d_model].
    """
    del prefix
    if positions is None:
      positions = np.arange(input_tokens.shape[1])
    role = grammar.input_role(positions, self.vocab.num_prefix_tokens)
    is_y = (role.phase == grammar.Y).astype(jnp.int32)  # [L]
    coord = model_lib.coordinate_embedding(self.coord_embed, input_coords)
    coord = coord + jnp.take(self.axis_embed, is_y, axis=0)  # [B, L, D]
    special = jnp.take(self.special_embed,
                       self.vocab.non_coordinate_index(input_tokens),
                       axis=0)  # [B, L, D]
    is_coord = self.vocab.is_coordinate(input_tokens)[..., None]  # [B, L, 1]
    return jnp.where(is_coord, coord, special)

  def attention_inputs(self, x: jax.Array, prefix, length: int):
    """(decoder inputs, self-attention mask, reference prior) of the
    sequence embeddings ``x`` [B, L, D]: ``x``, None (causal), None."""
    if prefix is not None:
      raise ValueError('a supervised model has no support prefix.')
    return x, None, None

  def decode(self, memory: model_lib.Memory, input_tokens: jax.Array,
             input_coords: jax.Array, train: bool,
             prefix: model_lib.SupportPrefix | None = None
             ) -> Tuple[jax.Array, jax.Array]:
    """Teacher-forced decoding of a whole sequence (causal).

    Args:
      memory: `encode` output.
      input_tokens: int32 [B, L], L <= max_seq_len.
      input_coords: float32 [B, L] normalised [0, 1].
      train: enables dropout.
      prefix: the support prefix of `cape.Model` (None here).

    Returns:
      logits: float32 [B, L, V], next-token logits.
      coords: float32 [B, L, 2], predicted (x, y) normalised to [0, 1].

    Raises:
      ValueError: L > max_seq_len.
    """
    length = input_tokens.shape[1]
    if length > self.max_seq_len:
      raise ValueError(f'sequence length {length} > max_seq_len '
                       f'{self.max_seq_len}')
    x = self.embed_tokens(input_tokens, input_coords, None, prefix)
    x = (x + self.pos_embed[:length]).astype(self.dtype)
    x, mask, prior = self.attention_inputs(x, prefix, length)
    states, points = self.decoder(
        x, memory.features, memory.spatial_shapes, train, mask, prior,
        memory.from_crop)  # [B, P + L, D] each
    return self.outputs(states, points, x.shape[1] - length)

  def outputs(self, states, points, p: int) -> Tuple[jax.Array, jax.Array]:
    """The last layer's (logits, coords) of positions ``p ..`` of the
    decoder's per-layer ``states`` (and refined ``points``); sows the
    intermediate outputs (`intermediate_outputs`) and the Laplace scale."""
    first = 0 if self.intermediate_outputs else len(states) - 1
    outs = [self.heads(states[i][:, p:],
                       None if points is None else points[i][:, p:])
            for i in range(first, len(states))]
    if len(outs) > 1:
      self.sow('intermediates', 'aux_logits',
               jnp.stack([logits for logits, _ in outs[:-1]]))
      self.sow('intermediates', 'aux_coords',
               jnp.stack([xy for _, xy in outs[:-1]]))
    if self.coordinate_loss == 'laplace':
      self.sow('intermediates', 'coord_log_scale',
               self.scale_head(states[-1][:, p:]).astype(jnp.float32))
    return outs[-1]

  def heads(self, x: jax.Array, point: jax.Array | None = None
            ) -> Tuple[jax.Array, jax.Array]:
    """States [B, L, D] -> (float32 logits [B, L, V], float32 sigmoid
    (x, y) [B, L, 2]); the (x, y) is ``point`` (a refined point) when
    given, else ``coord_head``'s."""
    logits = self.class_head(x).astype(jnp.float32)  # [B, L, V]
    if point is not None:
      return logits, point
    h = x
    for i, layer in enumerate(self.coord_head):
      h = layer(h)
      if i < len(self.coord_head) - 1:
        h = nn.relu(h)
    return logits, nn.sigmoid(h.astype(jnp.float32))  # [B, L, 2]

  def project_values(self, memory: model_lib.Memory
                     ) -> model_lib.ProjectedMemory:
    """Every decoder layer's deformable values of ``memory`` (num_layers
    arrays [B, S, heads, d_model / heads], ``dtype``), once per image."""
    return model_lib.ProjectedMemory(
        values=self.decoder.project_values(memory.features),
        spatial_shapes=memory.spatial_shapes, from_crop=memory.from_crop)

  def step_attention(self, positions: jax.Array, prefix, cache_length: int):
    """(self-attention mask over the cache, reference prior) of one
    cached step at ``positions`` [1]: causal, no prior."""
    del prefix
    return self_attention_mask(positions, None, cache_length), None

  def decode_step(self, memory: model_lib.ProjectedMemory, tokens: jax.Array,
                  coords: jax.Array, position: jax.Array, cache_length: int,
                  prefix: model_lib.SupportPrefix | None = None
                  ) -> Tuple[jax.Array, jax.Array]:
    """One position of cached decoding (``cache_decoding``; apply with
    ``mutable=['cache']``, positions fed in order 0, 1, ...): equal to
    position ``position`` of `decode` given the same earlier inputs.

    Args:
      memory: `project_values` output.
      tokens: int32 [B] input token at ``position``.
      coords: float32 [B] its normalised coordinate.
      position: int32 scalar, 0 <= position < L.
      cache_length: Lc, the cache's positions.
      prefix: the prefilled prefix of `cape.Model` (None here).

    Returns:
      logits float32 [B, V]; coords float32 [B, 2] normalised [0, 1].
    """
    positions = jnp.reshape(position, [1]).astype(jnp.int32)  # [1]
    x = self.embed_tokens(tokens[:, None], coords[:, None], positions, prefix)
    x = x + jnp.take(self.pos_embed, positions, axis=0)  # [B, 1, D]
    mask, prior = self.step_attention(positions, prefix, cache_length)
    x, point = self.decoder.step(
        x.astype(self.dtype), memory.values, memory.spatial_shapes, mask,
        prior, memory.from_crop)  # [B, 1, D], [B, 1, 2]
    logits, xy = self.heads(x, point)
    return logits[:, 0], xy[:, 0]

  def __call__(self, images: jax.Array, input_tokens: jax.Array,
               input_coords: jax.Array, train: bool
               ) -> Tuple[jax.Array, jax.Array]:
    """``decode(encode(images), ...)``: crops uint8 [B, S, S, 3]; see
    those methods for the other shapes."""
    memory = self.encode(images, train)
    # Keep the memory split by batch under a ('data', 'fsdp') mesh.
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features))
    return self.decode(memory, input_tokens, input_coords, train)
