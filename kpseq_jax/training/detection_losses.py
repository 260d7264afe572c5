"""Set-prediction loss of the box detector: Hungarian matching + focal/L1/GIoU.

Follows Deformable DETR (Zhu et al., ICLR 2021;
``fundamentalvision/Deformable-DETR``):

* ``models/matcher.py`` ``HungarianMatcher``: the cost of assigning query q
  to ground-truth box j is ``cost_class * focal(q, label_j) + cost_l1 *
  |box_q - box_j|_1 - cost_giou * GIoU(box_q, box_j)`` (boxes cxcywh
  normalised; GIoU on their corners), the focal class cost being
  ``alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma
  (-log(1 - p + 1e-8))`` with p the query's sigmoid probability of the
  box's class; ``scipy.optimize.linear_sum_assignment`` solves it per image.
  Defaults (``main.py``): set_cost_class 2, set_cost_bbox 5, set_cost_giou
  2; alpha 0.25 and gamma 2 as the matcher hard-codes them.
* ``models/deformable_detr.py`` ``SetCriterion``: ``loss_labels`` is the
  sigmoid focal loss (Lin et al., ICCV 2017; ``models/segmentation.py``
  ``sigmoid_focal_loss``) of every query and class against a target that is
  one-hot at the matched queries and zero elsewhere (no background class),
  as ``loss.mean(1).sum() / num_boxes * num_queries``, i.e. the sum over
  images, queries and classes divided by ``num_boxes``; ``loss_boxes`` sums
  L1 over the 4 coordinates and ``1 - GIoU`` over matched pairs, each
  divided by ``num_boxes``, the number of ground-truth boxes in the batch
  clamped to at least 1. Loss coefficients (``main.py``): cls_loss_coef 2,
  bbox_loss_coef 5, giou_loss_coef 2, focal_alpha 0.25. Every decoder layer
  is matched and weighted the same (DETR ``aux_loss``).

``num_boxes``: Deformable DETR all-reduces the count over processes and
divides by the world size, then averages the gradients over processes; the
loss here is computed on the global batch inside ``jax.jit``, which is the
same quantity.

Targets are padded to M boxes per image: ``gt_valid`` marks the real ones.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from kpseq_jax.models import box_ops

# Replaces a non-finite matching cost on the host, so a model producing NaN
# reaches the loss (and the train step's non-finite guard) instead of
# failing inside scipy.
_BAD_COST = 1e8


def matching_cost(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array,
                  gt_labels: jax.Array, *, cost_class: float = 2.0,
                  cost_l1: float = 5.0, cost_giou: float = 2.0,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0
                  ) -> jax.Array:
  """Deformable DETR's ``HungarianMatcher`` cost of every (query, box) pair.

  Args:
    logits: float [B, Q, C] class logits (sigmoid, no background class).
    boxes: float [B, Q, 4] predicted cxcywh, normalised.
    gt_boxes: float [B, M, 4] ground-truth cxcywh, normalised.
    gt_labels: int [B, M] 0-based class of each box (any value for
      padding; the cost of a padding column is meaningless).
    cost_class, cost_l1, cost_giou: weights of the three costs.
    focal_alpha, focal_gamma: focal class-cost parameters.

  Returns:
    float32 [B, Q, M], lower is a better match; gradients stopped.
  """
  logits, boxes, gt_boxes = jax.lax.stop_gradient(
      (logits.astype(jnp.float32), boxes.astype(jnp.float32),
       gt_boxes.astype(jnp.float32)))
  num_classes = logits.shape[-1]
  prob = jax.nn.sigmoid(logits)  # [B, Q, C]
  neg = ((1 - focal_alpha) * prob ** focal_gamma
         * -jnp.log(1 - prob + 1e-8))
  pos = focal_alpha * (1 - prob) ** focal_gamma * -jnp.log(prob + 1e-8)
  labels = jnp.clip(gt_labels, 0, num_classes - 1)  # [B, M]
  # class_cost[b, q, m] = (pos - neg)[b, q, labels[b, m]].
  class_cost = jnp.take_along_axis(pos - neg, labels[:, None, :], axis=2)
  l1 = jnp.abs(boxes[:, :, None, :] - gt_boxes[:, None, :, :]).sum(-1)
  giou = box_ops.pairwise_generalized_iou(
      box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(gt_boxes))
  return cost_class * class_cost + cost_l1 * l1 - cost_giou * giou


def _assign(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side of `hungarian_match`: cost [N, Q, M], valid bool [N, M] ->
  int32 [N, M], the query of each valid column, -1 for padding."""
  cost = np.nan_to_num(np.asarray(cost, np.float64), nan=_BAD_COST,
                       posinf=_BAD_COST, neginf=-_BAD_COST)
  valid = np.asarray(valid, bool)
  out = np.full(valid.shape, -1, np.int32)
  for n in range(cost.shape[0]):
    cols = np.flatnonzero(valid[n])
    if cols.size:
      rows, matched = optimize.linear_sum_assignment(cost[n][:, cols])
      out[n, cols[matched]] = rows
  return out


def hungarian_match(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array,
                    gt_labels: jax.Array, gt_valid: jax.Array, *,
                    cost_class: float = 2.0, cost_l1: float = 5.0,
                    cost_giou: float = 2.0, focal_alpha: float = 0.25,
                    focal_gamma: float = 2.0) -> jax.Array:
  """Optimal one-to-one assignment of ground-truth boxes to queries.

  The cost (`matching_cost`) is computed on the device; the assignment by
  ``scipy.optimize.linear_sum_assignment`` on the host through
  ``jax.pure_callback`` (under ``jax.jit`` on any backend; a ``vmap``
  calls it once per mapped element). Minimises the summed cost over the
  valid boxes of each image.

  Args:
    logits: float [B, Q, C] class logits.
    boxes: float [B, Q, 4] predicted cxcywh, normalised.
    gt_boxes: float [B, M, 4] ground-truth cxcywh, normalised.
    gt_labels: int [B, M] 0-based classes.
    gt_valid: bool [B, M], False for padding rows.
    cost_class, cost_l1, cost_giou, focal_alpha, focal_gamma: as
      `matching_cost`.

  Returns:
    int32 [B, M]: the query index (0 .. Q - 1) matched to each valid box,
    distinct within an image; -1 for padding rows.

  Raises:
    ValueError: (at trace time) if M > Q.
  """
  batch, num_queries = logits.shape[:2]
  num_gt = gt_boxes.shape[1]
  if num_gt > num_queries:
    raise ValueError(f'{num_gt} ground-truth slots per image but only '
                     f'{num_queries} queries: every box needs its own query '
                     f'(raise num_queries or lower the boxes kept).')
  cost = matching_cost(logits, boxes, gt_boxes, gt_labels,
                       cost_class=cost_class, cost_l1=cost_l1,
                       cost_giou=cost_giou, focal_alpha=focal_alpha,
                       focal_gamma=focal_gamma)  # [B, Q, M]
  return jax.pure_callback(
      _assign, jax.ShapeDtypeStruct((batch, num_gt), jnp.int32), cost,
      jnp.asarray(gt_valid, bool), vmap_method='sequential')


def _layer_terms(logits: jax.Array, boxes: jax.Array, match: jax.Array,
                 gt_boxes: jax.Array, gt_labels: jax.Array,
                 gt_valid: jax.Array, num_boxes: jax.Array,
                 focal_alpha: float, focal_gamma: float
                 ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """One layer's (class, L1, GIoU) losses, each a float32 scalar divided by
  ``num_boxes`` (module docstring); ``match`` int32 [B, M] from
  `hungarian_match`, the other arguments as `set_loss`'s for one layer."""
  num_queries, num_classes = logits.shape[1:]
  valid = gt_valid.astype(jnp.float32)  # [B, M]
  # Query q of image b is the target of box m: [B, M, Q].
  assigned = (match[..., None] == jnp.arange(num_queries)) * valid[..., None]
  labels = jax.nn.one_hot(gt_labels, num_classes)  # [B, M, C]
  targets = jnp.einsum('bmq,bmc->bqc', assigned, labels)  # [B, Q, C] 0/1
  focal = optax.sigmoid_focal_loss(logits, targets, alpha=focal_alpha,
                                   gamma=focal_gamma)  # [B, Q, C]
  class_loss = jnp.sum(focal) / num_boxes
  query = jnp.clip(match, 0, num_queries - 1)  # [B, M], padding -> 0.
  matched = jnp.take_along_axis(boxes, query[..., None], axis=1)  # [B, M, 4]
  l1 = jnp.abs(matched - gt_boxes).sum(-1)  # [B, M]
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(matched),
                                 box_ops.cxcywh_to_xyxy(gt_boxes))  # [B, M]
  return (class_loss, jnp.sum(l1 * valid) / num_boxes,
          jnp.sum((1 - giou) * valid) / num_boxes)


def set_loss(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array,
             gt_labels: jax.Array, gt_valid: jax.Array, *,
             class_weight: float = 2.0, l1_weight: float = 5.0,
             giou_weight: float = 2.0, focal_alpha: float = 0.25,
             focal_gamma: float = 2.0
             ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Deformable DETR's set loss of every decoder layer, summed.

  Each layer is matched on its own (`hungarian_match` with the loss weights
  as matching costs, as Deformable DETR's defaults make them equal) and
  contributes ``class_weight * class + l1_weight * l1 + giou_weight *
  giou`` (module docstring); the last layer's plus the earlier ones'
  (auxiliary losses, equal weight, DETR ``aux_loss``).

  Args:
    logits: float [L, B, Q, C] class logits of the L decoder layers.
    boxes: float [L, B, Q, 4] their cxcywh boxes, normalised.
    gt_boxes: float [B, M, 4] ground-truth cxcywh, normalised; M <= Q.
    gt_labels: int [B, M] 0-based classes.
    gt_valid: bool [B, M], False for padding (an image may have none).
    class_weight, l1_weight, giou_weight: loss (and matching) weights.
    focal_alpha, focal_gamma: focal loss parameters.

  Returns:
    (loss float32 scalar, parts): parts 'class', 'l1', 'giou' are the last
    layer's unweighted terms, 'aux' the sum of the earlier layers' weighted
    losses (0 with one layer); ``loss = class_weight * class + l1_weight *
    l1 + giou_weight * giou + aux``.
  """
  num_layers, batch = logits.shape[:2]
  logits = logits.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  gt_boxes = gt_boxes.astype(jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)

  def tile(x):  # [B, ...] -> [L * B, ...], layer-major as the predictions.
    return jnp.broadcast_to(x, (num_layers,) + x.shape).reshape(
        (num_layers * batch,) + x.shape[1:])

  # One host call matches every layer: [L * B, M] -> [L, B, M].
  match = hungarian_match(
      logits.reshape((num_layers * batch,) + logits.shape[2:]),
      boxes.reshape((num_layers * batch,) + boxes.shape[2:]),
      tile(gt_boxes), tile(gt_labels), tile(gt_valid),
      cost_class=class_weight, cost_l1=l1_weight, cost_giou=giou_weight,
      focal_alpha=focal_alpha, focal_gamma=focal_gamma,
  ).reshape((num_layers, batch, -1))
  num_boxes = jnp.maximum(jnp.sum(gt_valid.astype(jnp.float32)), 1.0)

  def layer_terms(layer_logits, layer_boxes, layer_match):
    return _layer_terms(layer_logits, layer_boxes, layer_match, gt_boxes,
                        gt_labels, gt_valid, num_boxes, focal_alpha,
                        focal_gamma)

  class_loss, l1, giou = jax.vmap(layer_terms)(logits, boxes, match)  # [L]
  weighted = class_weight * class_loss + l1_weight * l1 + giou_weight * giou
  parts = {'class': class_loss[-1], 'l1': l1[-1], 'giou': giou[-1],
           'aux': jnp.sum(weighted[:-1])}
  return jnp.sum(weighted), parts
