"""Category-agnostic pose (CAPE): the sequence model told what to find by
support crops of the same category with their keypoints (`SupportSet`).

Query and support crops go through the same encoder in one batch
(`Model.encode_with_support`); feature k is the support memory bilinearly
sampled at support keypoint k on every level (the cheaper alternative to
CapeFormer's Gaussian pooling, ``capeformer/models/keypoint_heads/
two_stage_head.py``), averaged over levels and over the shots that see the
keypoint, projected, and zero where no shot sees it (`Model.support_prefix`).
The decoder reads these K features twice: as a prefix of K positions in
front of the token sequence (bidirectional among themselves, seen by every
sequence position, no position embedding, so the prefix is a set), and
added to group k's ``<coord>`` input, so group k means "find support
keypoint k". With ``proposals`` (two-stage Deformable DETR, CapeFormer's
proposal generator) each support feature is also matched against the query
memory and the expected cell centre is its proposal (`Model.propose`,
supervised in training); the positions that work on keypoint k take their
reference points around proposal k. `Model.prefill` writes the prefix to
the key/value cache once per episode.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.models import deformable_attention
from kpseq_jax.models import model as model_lib
from kpseq_jax.models import supervised
from kpseq_jax.models.decoder import self_attention_mask
from kpseq_jax.runtime import sharding
from kpseq_jax.sequence import grammar

SupportPrefix = model_lib.SupportPrefix
# Targets of the proposals' L1 (`losses.proposal_loss`).
PROPOSAL_FIELDS = ('query_keypoints', 'query_keypoint_weights')


class Model(supervised.Model):
  """`supervised.Model` conditioned on a `SupportSet` (module docstring).

  Attributes (besides `supervised.Model`'s):
    proposals: propose where each support keypoint is in the query and lay
      the reference points there; adds ``proposal_query`` and
      ``proposal_key``.
  """
  proposals: bool = True

  support_conditioning = True

  @property
  def train_fields(self) -> tuple[str, ...]:
    return (supervised.TRAIN_FIELDS + model_lib.SUPPORT_FIELDS +
            (PROPOSAL_FIELDS if self.proposals else ()))

  def setup(self):
    super().setup()
    self.support_proj = nn.Dense(self.d_model, dtype=self.dtype)
    # Marks prefix positions (they have no position embedding).
    self.prefix_embed = self.param('prefix_embed', supervised.EMBED_INIT,
                                   (self.d_model,))
    if self.proposals:
      self.proposal_query = nn.Dense(self.d_model, dtype=self.dtype)
      self.proposal_key = nn.Dense(self.d_model, dtype=self.dtype)

  @staticmethod
  def inputs(batch: dict) -> dict:
    return dict(supervised.Model.inputs(batch),
                support=model_lib.SupportSet.from_batch(batch))

  def encode_with_support(self, images: jax.Array, support_images: jax.Array,
                          train: bool
                          ) -> Tuple[model_lib.Memory, model_lib.Memory]:
    """Query crops [B, H, W, 3] and support crops [B, S, H, W, 3] encoded in
    one batch (shared BatchNorm statistics in training) -> (query memory
    [B, ...], support memory [B * S, ...], shot-major within an episode)."""
    b, s = support_images.shape[:2]
    both = jnp.concatenate([
        images, support_images.reshape((b * s,) + support_images.shape[2:])
        .astype(images.dtype)])
    memory = self.encode(both, train)
    return (memory.replace(features=memory.features[:b]),
            memory.replace(features=memory.features[b:]))

  def support_prefix(self, support_memory: model_lib.Memory,
                     keypoints: jax.Array, visible: jax.Array,
                     num_keypoints: jax.Array) -> SupportPrefix:
    """Support keypoint features (module docstring).

    Args:
      support_memory: the support memory [B * S, ...].
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

  def propose(self, memory: model_lib.Memory,
              prefix: SupportPrefix) -> jax.Array:
    """Where each support keypoint is in the query: the softmax-weighted
    mean of the cell centres of every level, weights from the scaled dot
    product of projected support feature and query cell (CapeFormer's
    similarity proposals, soft-argmax so that it is differentiable). Sown
    as intermediate ``support_proposals`` for the training loss.

    Returns:
      float32 [B, Kmax, 2] normalised query-crop (x, y) in (0, 1).
    """
    q = self.proposal_query(prefix.features).astype(jnp.float32)  # [B, K, D]
    k = self.proposal_key(memory.features).astype(jnp.float32)  # [B, S, D]
    logits = jnp.einsum('bkd,bsd->bks', q, k) / np.sqrt(self.d_model)
    centres = np.concatenate([
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w,
                             (np.arange(h) + 0.5) / h),
                 axis=-1).reshape(h * w, 2)
        for h, w in memory.spatial_shapes]).astype(np.float32)  # [S, 2]
    proposals = jax.nn.softmax(logits, axis=-1) @ centres  # [B, K, 2]
    self.sow('intermediates', 'support_proposals', proposals)
    return proposals

  def episode_prefix(self, memory: model_lib.Memory,
                     support_memory: model_lib.Memory,
                     support: model_lib.SupportSet) -> SupportPrefix:
    """`support_prefix` of ``support`` (B episodes, B x S support crops),
    with its `propose` proposals in the query ``memory`` when
    ``proposals``."""
    prefix = self.support_prefix(support_memory, support.keypoints,
                                 support.visible, support.num_keypoints)
    if self.proposals:
      prefix = prefix.replace(proposals=self.propose(memory, prefix))
    return prefix

  def reference_prior(self, prefix: SupportPrefix,
                      positions: jax.Array) -> jax.Array | None:
    """float32 [B, T, 2] reference-point logits of sequence ``positions``
    [T]: the proposal of the keypoint group each position predicts a token
    of (`grammar.target_role`), 0 outside a group; None without
    proposals."""
    if prefix.proposals is None:
      return None
    kmax = prefix.proposals.shape[1]
    group = grammar.target_role(positions, self.vocab.num_prefix_tokens).group
    prior = jnp.take(model_lib.logit(prefix.proposals),
                     jnp.clip(group, 0, kmax - 1), axis=1)  # [B, T, 2]
    inside = ((group >= 0) & (group < kmax))[None, :, None]
    return jnp.where(inside, prior, 0.0)

  def embed_tokens(self, input_tokens, input_coords, positions=None,
                   prefix: SupportPrefix | None = None) -> jax.Array:
    """`supervised.Model.embed_tokens`, plus support feature g added to a
    ``<coord>`` input of group g."""
    x = super().embed_tokens(input_tokens, input_coords, positions)
    if positions is None:
      positions = np.arange(input_tokens.shape[1])
    role = grammar.input_role(positions, self.vocab.num_prefix_tokens)
    features = prefix.features  # [B, Kmax, D]
    group = jnp.clip(role.group, 0, features.shape[1] - 1)  # [L]
    feature = jnp.take(features, group, axis=1)  # [B, L, D]
    starts = (input_tokens == self.vocab.coord)[..., None]  # [B, L, 1]
    return x + jnp.where(starts, feature, 0).astype(x.dtype)

  def prefix_inputs(self, prefix: SupportPrefix) -> jax.Array:
    """[B, P, D] decoder inputs of the prefix positions."""
    return (prefix.features + self.prefix_embed).astype(self.dtype)

  def attention_inputs(self, x: jax.Array, prefix: SupportPrefix,
                       length: int):
    """The prefix in front of the sequence ``x`` [B, L, D]: inputs
    [B, P + L, D], the prefix-aware mask and the proposals' prior."""
    x = jnp.concatenate([self.prefix_inputs(prefix), x], axis=1)
    total = x.shape[1]
    mask = self_attention_mask(jnp.arange(total), prefix.valid, total)
    prior = self.reference_prior(prefix, jnp.arange(length))
    if prior is not None:
      prior = jnp.concatenate([model_lib.logit(prefix.proposals), prior],
                              axis=1)
    return x, mask, prior

  def prefill(self, memory: model_lib.ProjectedMemory, prefix: SupportPrefix,
              cache_length: int) -> None:
    """Writes the prefix to cache positions 0 .. P - 1 (``cache_decoding``,
    ``mutable=['cache']``), once per episode, before the first
    `decode_step`; ``cache_length`` Lc = P + L."""
    p = prefix.features.shape[1]
    mask = self_attention_mask(jnp.arange(p), prefix.valid, cache_length)
    prior = (None if prefix.proposals is None
             else model_lib.logit(prefix.proposals))
    self.decoder.step(self.prefix_inputs(prefix), memory.values,
                      memory.spatial_shapes, mask, prior, memory.from_crop)

  def step_attention(self, positions: jax.Array, prefix: SupportPrefix,
                     cache_length: int):
    """Mask and prior of a cached step behind the P prefix positions."""
    p = prefix.features.shape[1]
    mask = self_attention_mask(positions + p, prefix.valid, cache_length)
    return mask, self.reference_prior(prefix, positions)

  def __call__(self, images: jax.Array, input_tokens: jax.Array,
               input_coords: jax.Array, train: bool,
               support: model_lib.SupportSet | None = None
               ) -> Tuple[jax.Array, jax.Array]:
    """``decode`` of the query ``images`` behind ``support``'s prefix.

    Raises:
      ValueError: ``support`` missing.
    """
    if support is None:
      raise ValueError('support is missing: a CAPE model needs the support '
                       'set.')
    memory, support_memory = self.encode_with_support(
        images, support.images, train)
    prefix = self.episode_prefix(memory, support_memory, support)
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features))
    return self.decode(memory, input_tokens, input_coords, train, prefix)
