"""CenterNet's loss for `models/centroid.py`: centre heatmaps, offsets, sizes.

"Objects as Points" (Zhou et al. 2019; ``xingyizhou/CenterNet``,
``src/lib/models/losses.py`` and ``src/lib/trains/ctdet.py``):

* Targets on the output grid (h, w cells): each box puts a Gaussian on its
  class's heatmap, peaking at 1 on the cell holding its centre; a cell
  takes the largest Gaussian over the boxes of its class. The Gaussian is
  TTFNet's elliptical one (Liu et al., AAAI 2020): standard deviations
  ``alpha * box_w / 6`` and ``alpha * box_h / 6`` cells, alpha 0.54, which
  follows the box's aspect (CenterNet's radius assumes a square-ish box).
* Heatmap: the penalty-reduced focal loss (CenterNet's ``_neg_loss``,
  alpha 2, beta 4): ``-(1 - p)^2 log p`` on centre cells, ``-(1 - y)^4 p^2
  log(1 - p)`` elsewhere, summed and divided by the number of boxes.
* Offset and size: L1 at each box's centre cell against the centre's
  sub-cell offset and the box's (w, h) in cells (``RegL1Loss``: the mean
  over boxes and the 2 coordinates).
* Weights (``opts.py``): hm_weight 1, off_weight 1, wh_weight 0.1.

Targets are padded to M boxes per image: ``gt_valid`` marks the real ones.
The sums run over the global batch inside ``jax.jit`` (one loss for any
mesh).
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

# TTFNet's Gaussian: sigma = alpha * size / 6.
GAUSSIAN_ALPHA = 0.54


def centre_targets(gt_boxes: jax.Array, gt_labels: jax.Array,
                   gt_valid: jax.Array, grid_hw: Tuple[int, int],
                   num_classes: int) -> Dict[str, jax.Array]:
  """The dense and per-box targets of a padded batch of boxes.

  Args:
    gt_boxes: float [B, M, 4] normalised (cx, cy, w, h) of the input.
    gt_labels: int [B, M] class index.
    gt_valid: bool [B, M].
    grid_hw: (h, w) output cells.
    num_classes: C.

  Returns:
    heatmap: float32 [B, h, w, C] in [0, 1], exactly 1 at centre cells.
    cell: int32 [B, M] row-major index of each box's centre cell.
    offset: float32 [B, M, 2] the centre's (x, y) offset from that cell's
      top-left corner, cells.
    size: float32 [B, M, 2] the box's (w, h), cells.
  """
  h, w = grid_hw
  scale = jnp.asarray([w, h], jnp.float32)
  centre = gt_boxes[..., :2].astype(jnp.float32) * scale  # [B, M, 2] cells
  size = gt_boxes[..., 2:].astype(jnp.float32) * scale
  corner = jnp.clip(jnp.floor(centre), 0, scale - 1)  # [B, M, 2] (col, row)
  sigma = jnp.maximum(GAUSSIAN_ALPHA * size / 6.0, 1e-2)  # [B, M, 2]
  cols = jnp.arange(w, dtype=jnp.float32)
  rows = jnp.arange(h, dtype=jnp.float32)
  gx = ((cols[None, None, :] - corner[..., :1]) / sigma[..., :1]) ** 2
  gy = ((rows[None, None, :] - corner[..., 1:]) / sigma[..., 1:]) ** 2
  g = jnp.exp(-0.5 * (gy[..., :, None] + gx[..., None, :]))  # [B, M, h, w]
  onehot = jax.nn.one_hot(gt_labels, num_classes) * gt_valid[..., None]
  heatmap = jnp.max(g[..., None] * onehot[:, :, None, None, :], axis=1)
  cell = (corner[..., 1] * w + corner[..., 0]).astype(jnp.int32)
  return dict(heatmap=heatmap, cell=cell, offset=centre - corner, size=size)


def heatmap_focal_loss(logits: jax.Array, target: jax.Array,
                       num_boxes: jax.Array) -> jax.Array:
  """CenterNet's penalty-reduced focal loss (module docstring).

  Args:
    logits: float [B, h, w, C].
    target: float [B, h, w, C] Gaussian heatmap, 1 at centres.
    num_boxes: scalar, boxes in the batch (clamped to >= 1 here).

  Returns:
    float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  centre = target >= 1.0
  pos = -((1 - p) ** 2) * jax.nn.log_sigmoid(logits)
  neg = -((1 - target) ** 4) * p ** 2 * jax.nn.log_sigmoid(-logits)
  total = jnp.where(centre, pos, neg).sum()
  return total / jnp.maximum(num_boxes, 1.0)


def centroid_loss(heatmap: jax.Array, offset: jax.Array, size: jax.Array,
                  gt_boxes: jax.Array, gt_labels: jax.Array,
                  gt_valid: jax.Array, *, heatmap_weight: float = 1.0,
                  offset_weight: float = 1.0, size_weight: float = 0.1
                  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The weighted loss of `centroid.Model`'s outputs (module docstring).

  Args:
    heatmap: float [B, h, w, C] logits.
    offset, size: float [B, h, w, 2] (cells).
    gt_boxes, gt_labels, gt_valid: as `centre_targets`.
    heatmap_weight, offset_weight, size_weight: CenterNet's 1, 1, 0.1.

  Returns:
    (loss, {'heatmap', 'offset', 'size'}) float32 scalars, unweighted parts.
  """
  b, h, w, c = heatmap.shape
  t = centre_targets(gt_boxes, gt_labels, gt_valid, (h, w), c)
  valid = gt_valid.astype(jnp.float32)  # [B, M]
  num_boxes = valid.sum()

  def at_centres(x):  # [B, h, w, 2] -> [B, M, 2]
    return jnp.take_along_axis(x.reshape(b, h * w, 2), t['cell'][..., None],
                               axis=1)

  def l1(pred, target):
    err = jnp.abs(pred - target).sum(-1) * valid
    return err.sum() / (2.0 * num_boxes + 1e-4)

  parts = dict(heatmap=heatmap_focal_loss(heatmap, t['heatmap'], num_boxes),
               offset=l1(at_centres(offset), t['offset']),
               size=l1(at_centres(size), t['size']))
  loss = (heatmap_weight * parts['heatmap'] + offset_weight * parts['offset']
          + size_weight * parts['size'])
  return loss, parts
