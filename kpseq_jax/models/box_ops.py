"""Box conversions and generalized IoU in pure ``jnp``.

Boxes are float [..., 4], either (cx, cy, w, h) ("cxcywh", the detector's
output and the targets, normalised [0, 1] image units) or (x0, y0, x1, y1)
("xyxy", corners, any consistent unit). The formulas follow DETR's
``util/box_ops.py`` (``facebookresearch/detr``): ``box_cxcywh_to_xyxy``,
``box_xyxy_to_cxcywh``, ``box_iou``, ``generalized_box_iou``.

Generalized IoU (Rezatofighi et al., "Generalized Intersection over Union",
CVPR 2019, Algorithm 1): ``GIoU = IoU - (|C| - |A u B|) / |C|`` with C the
smallest box enclosing A and B; in [-1, 1], 1 for identical boxes,
approaching -1 for small boxes far apart. DETR asserts that the boxes are
not degenerate (x1 >= x0, y1 >= y0); here an inverted box has zero width or
height in the areas (its intersection is clipped at 0) and the divisions are
guarded by ``_EPS``, so padding boxes of zeros give finite values and
finite gradients (callers mask them).
"""

import jax
import jax.numpy as jnp

_EPS = 1e-9  # Smallest union / enclosing area divided by (area units^2).


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) [..., 4] -> (x0, y0, x1, y1) [..., 4], same dtype."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(x0, y0, x1, y1) [..., 4] -> (cx, cy, w, h) [..., 4], same dtype."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _area(boxes: jax.Array) -> jax.Array:
  """xyxy [..., 4] -> [...] area, 0 for an inverted box."""
  wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return wh[..., 0] * wh[..., 1]


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise GIoU of two broadcastable sets of xyxy boxes.

  Args:
    a: float [..., 4] (x0, y0, x1, y1).
    b: float [..., 4], broadcastable against ``a``.

  Returns:
    float32 [...] (the broadcast batch shape), GIoU in [-1, 1].
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  lo = jnp.maximum(a[..., :2], b[..., :2])  # [..., 2] intersection corner.
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter_wh = jnp.maximum(hi - lo, 0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]  # [...]
  union = _area(a) + _area(b) - inter
  iou = inter / jnp.maximum(union, _EPS)
  enc_wh = jnp.maximum(jnp.maximum(a[..., 2:], b[..., 2:]) -
                       jnp.minimum(a[..., :2], b[..., :2]), 0.0)
  enclosing = enc_wh[..., 0] * enc_wh[..., 1]  # [...] |C|
  return iou - (enclosing - union) / jnp.maximum(enclosing, _EPS)


def pairwise_generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """GIoU of every box of ``a`` with every box of ``b`` (DETR's
  ``generalized_box_iou``).

  Args:
    a: float [..., N, 4] xyxy.
    b: float [..., M, 4] xyxy, same leading dimensions.

  Returns:
    float32 [..., N, M]: entry (n, m) is ``generalized_iou(a[n], b[m])``.
  """
  return generalized_iou(a[..., :, None, :], b[..., None, :, :])
