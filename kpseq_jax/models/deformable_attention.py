"""Multi-scale deformable attention in pure ``jnp``.

Deformable DETR (Zhu et al., ICLR 2021), eq. 2 (single scale) and its
multi-scale form:

    MSDeformAttn(z_q, p_q, {x^l}) =
        sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + Delta p_mlqk) ]

The sampling core mirrors the reference PyTorch implementation
``fundamentalvision/Deformable-DETR``
``models/ops/functions/ms_deform_attn_func.py::ms_deform_attn_core_pytorch``,
which calls ``F.grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)`` once per level. Here the bilinear sample is written as a
gather of the four neighbouring pixels (``jnp.take_along_axis``) with masks for
corners outside the map, so it runs unchanged on CPU, GPU and TPU and is
differentiable with respect to the values, the sampling locations and the
attention weights.

Shape letters used throughout: ``B`` batch, ``Lq`` queries, ``S`` flattened
memory length ``sum_l H_l * W_l`` (levels concatenated in order, each level
flattened row-major), ``M`` heads, ``Dh`` head dim, ``L`` levels, ``P`` points.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SpatialShapes = Tuple[Tuple[int, int], ...]


def _bilinear_sample_level(
    value_l: jax.Array,
    height: int,
    width: int,
    locations: jax.Array,
    weights: jax.Array,
) -> jax.Array:
  """Weighted sum of bilinear samples from one level.

  Args:
    value_l: [B, M, H*W, Dh] values of one level, row-major over (H, W).
    height: H, pixels (static).
    width: W, pixels (static).
    locations: [B, M, Lq, P, 2] float32, (x, y) normalised to [0, 1] over the
      level; 0 is the left/top edge of the first pixel, 1 the right/bottom edge
      of the last (``align_corners=False``).
    weights: [B, M, Lq, P] float32 attention weights of these points.

  Returns:
    [B, M, Lq, Dh] = sum_p weights[..., p] * bilinear(value_l, locations[..., p]),
    in ``value_l.dtype``; corners outside the map contribute zero
    (``padding_mode='zeros'``).
  """
  batch, heads, num_queries, num_points, _ = locations.shape
  # Pixel coordinates with pixel centres at integers (align_corners=False).
  x = locations[..., 0] * width - 0.5  # [B, M, Lq, P]
  y = locations[..., 1] * height - 0.5  # [B, M, Lq, P]
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0  # weight of the right neighbour, [B, M, Lq, P]
  fy = y - y0  # weight of the lower neighbour, [B, M, Lq, P]
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)

  out = None
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx  # [B, M, Lq, P] int32
      yi = y0 + dy
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      flat = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
      flat = flat.reshape(batch, heads, num_queries * num_points, 1)
      corner = jnp.take_along_axis(value_l, flat, axis=2)  # [B, M, Lq*P, Dh]
      corner = corner.reshape(batch, heads, num_queries, num_points, -1)
      w = jnp.where(inside, wx * wy * weights, 0.0)  # [B, M, Lq, P]
      term = jnp.einsum('bmqpd,bmqp->bmqd', corner, w.astype(value_l.dtype))
      out = term if out is None else out + term
  return out  # [B, M, Lq, Dh]


def ms_deform_attn_sample(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
  """Multi-scale deformable attention core (no projections).

  Same semantics as ``ms_deform_attn_core_pytorch`` in Deformable-DETR:
  bilinear sampling with ``align_corners=False`` and zero padding, weighted by
  ``attention_weights`` and summed over levels and points.

  Args:
    value: [B, S, M, Dh] projected values, S = sum_l H_l * W_l, levels
      concatenated in the order of ``spatial_shapes``, each row-major.
    spatial_shapes: static tuple of (H_l, W_l) per level, pixels of that level.
    sampling_locations: [B, Lq, M, L, P, 2] (x, y) normalised to [0, 1] per
      level (0 = left/top border, 1 = right/bottom border). Points outside
      [0, 1] are allowed; they read zeros.
    attention_weights: [B, Lq, M, L, P] (usually a softmax over L*P).

  Returns:
    [B, Lq, M * Dh] in ``value.dtype``, heads major (head 0's Dh channels
    first), as in the reference.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  batch, total, heads, head_dim = value.shape
  expected = sum(h * w for h, w in spatial_shapes)
  if total != expected:
    raise ValueError(
        f'value has S={total} positions but spatial_shapes {spatial_shapes} '
        f'sum to {expected}.')
  num_queries = sampling_locations.shape[1]
  # Heads next to batch so each (b, m) gathers from its own [H*W, Dh] map.
  value = jnp.transpose(value, (0, 2, 1, 3))  # [B, M, S, Dh]
  locations = jnp.transpose(
      sampling_locations.astype(jnp.float32), (0, 2, 3, 1, 4, 5))  # [B, M, L, Lq, P, 2]
  weights = jnp.transpose(
      attention_weights.astype(jnp.float32), (0, 2, 3, 1, 4))  # [B, M, L, Lq, P]

  out = jnp.zeros((batch, heads, num_queries, head_dim), value.dtype)
  start = 0
  for level, (height, width) in enumerate(spatial_shapes):
    value_l = value[:, :, start:start + height * width]  # [B, M, H_l*W_l, Dh]
    start += height * width
    out = out + _bilinear_sample_level(
        value_l, height, width, locations[:, :, level], weights[:, :, level])
  out = jnp.transpose(out, (0, 2, 1, 3))  # [B, Lq, M, Dh]
  return out.reshape(batch, num_queries, heads * head_dim)


def sampling_offsets_bias_init(num_heads: int, num_levels: int, num_points: int):
  """Bias initialiser of the sampling-offset projection.

  Deformable-DETR ``MSDeformAttn._reset_parameters``: head m points in
  direction theta_m = 2 pi m / M, scaled so the larger of |cos|, |sin| is 1,
  and point k (0-based) is at distance k + 1 (pixels of its level, since the
  offsets are later divided by (W_l, H_l)); identical for every level.

  Returns:
    An initialiser producing float [M * L * P * 2] laid out as (M, L, P, 2).
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # [M, 2]
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))  # [M, L, P, 2]
    grid = grid * np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]
    grid = grid.reshape(-1)
    if grid.shape != tuple(shape):
      raise ValueError(f'bias shape {shape} != {grid.shape}')
    return jnp.asarray(grid, dtype)

  return init


class MultiScaleDeformableAttention(nn.Module):
  """Multi-scale deformable attention module (Deformable DETR ``MSDeformAttn``).

  Projections and initialisation follow Deformable-DETR
  ``models/ops/modules/ms_deform_attn.py``: ``value_proj`` and ``output_proj``
  Xavier-uniform with zero bias; ``sampling_offsets`` zero weight and the
  directional-grid bias (``sampling_offsets_bias_init``); ``attention_weights``
  zero weight and bias (uniform attention at init). Submodule names match the
  PyTorch ones.

  The value projection depends only on the image memory, so it is exposed as
  ``project_value`` and the rest as ``attend``; a cached decoder calls
  ``project_value`` once per image and ``attend`` per step. ``__call__`` is
  both. There is no value padding mask: memory comes from fixed-size crops.

  Attributes:
    d_model: model width D (divisible by ``num_heads``).
    num_heads: M.
    num_levels: L, number of feature levels in the memory.
    num_points: P, sampling points per head and level (Deformable DETR: 4).
    dtype: compute dtype; parameters are float32.
  """
  d_model: int
  num_heads: int
  num_levels: int
  num_points: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.d_model % self.num_heads:
      raise ValueError(f'd_model {self.d_model} not divisible by num_heads '
                       f'{self.num_heads}')
    xavier = nn.initializers.xavier_uniform()
    self.value_proj = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=xavier)
    self.sampling_offsets = nn.Dense(
        self.num_heads * self.num_levels * self.num_points * 2,
        dtype=self.dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=sampling_offsets_bias_init(
            self.num_heads, self.num_levels, self.num_points))
    self.attention_weights = nn.Dense(
        self.num_heads * self.num_levels * self.num_points,
        dtype=self.dtype,
        kernel_init=nn.initializers.zeros)
    self.output_proj = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=xavier)

  def project_value(self, value_input: jax.Array) -> jax.Array:
    """Projects the memory once: [B, S, D] -> [B, S, M, Dh] in ``dtype``."""
    value = self.value_proj(value_input)  # [B, S, D]
    batch, total, _ = value.shape
    return value.reshape(batch, total, self.num_heads,
                         self.d_model // self.num_heads)

  def attend(
      self,
      query: jax.Array,
      reference_points: jax.Array,
      value: jax.Array,
      spatial_shapes: SpatialShapes,
      sampling_transform: jax.Array | None = None,
  ) -> jax.Array:
    """Deformable attention of ``query`` into already projected ``value``.

    Args:
      query: [B, Lq, D].
      reference_points: [B, Lq, 2] (x, y) normalised to [0, 1]; shared by all
        levels (no padding, so Deformable DETR's valid ratios are 1).
      value: [B, S, M, Dh] from ``project_value``.
      spatial_shapes: static ((H_l, W_l), ...) with len == ``num_levels``.
      sampling_transform: float [B, 2, 3] affine map applied to every
        sampling location (reference point + offset) before sampling:
        ``(x, y) -> A[:, :2] @ (x, y) + A[:, 2]``, normalised units. It lets
        reference points and offsets live in a box's frame while the value
        is a whole image's memory (PRTR's end-to-end variant: the sampling
        pattern follows the box's position and scale). None: identity.

    Returns:
      [B, Lq, D] in ``dtype``.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if len(spatial_shapes) != self.num_levels:
      raise ValueError(f'{len(spatial_shapes)} levels given, module built for '
                       f'{self.num_levels}')
    batch, num_queries, _ = query.shape
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    offsets = self.sampling_offsets(query).astype(jnp.float32)
    offsets = offsets.reshape(batch, num_queries, heads, levels, points, 2)
    logits = self.attention_weights(query).astype(jnp.float32)
    logits = logits.reshape(batch, num_queries, heads, levels * points)
    weights = jax.nn.softmax(logits, axis=-1).reshape(
        batch, num_queries, heads, levels, points)  # [B, Lq, M, L, P]
    # Offsets are in pixels of each level: divide by (W_l, H_l).
    normalizer = jnp.asarray([(w, h) for h, w in spatial_shapes],
                             jnp.float32)  # [L, 2]
    locations = (
        reference_points.astype(jnp.float32)[:, :, None, None, None, :]
        + offsets / normalizer[None, None, None, :, None, :]
    )  # [B, Lq, M, L, P, 2]
    if sampling_transform is not None:
      a = sampling_transform.astype(jnp.float32)  # [B, 2, 3]
      locations = (jnp.einsum('bqmlpj,bij->bqmlpi', locations, a[:, :, :2])
                   + a[:, None, None, None, None, :, 2])
    out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
    return self.output_proj(out)  # [B, Lq, D]

  def __call__(
      self,
      query: jax.Array,
      reference_points: jax.Array,
      value_input: jax.Array,
      spatial_shapes: SpatialShapes,
  ) -> jax.Array:
    """``attend(query, reference_points, project_value(value_input), ...)``.

    Args:
      query: [B, Lq, D].
      reference_points: [B, Lq, 2] (x, y) normalised to [0, 1].
      value_input: [B, S, D] memory, S = sum_l H_l * W_l.
      spatial_shapes: static ((H_l, W_l), ...).

    Returns:
      [B, Lq, D] in ``dtype``.
    """
    value = self.project_value(value_input)
    return self.attend(query, reference_points, value, spatial_shapes)
