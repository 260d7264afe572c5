"""Raster2Seq training loss: ``ce_weight * CE + l1_weight * L1``.

Cross-entropy over the target tokens (``token_weights`` masks padding and
the x/y of unlabelled keypoints) plus L1 between the regression head's
normalised (x, y) and the keypoint at the x and y target positions of
labelled keypoints (``coord_weights``). Weights 1.0 and 5.0 come from the
Raster2Seq paper; each term is a mean over its own weighted positions.
`intermediate_layer_loss` applies the same terms to every earlier decoder
layer (auxiliary losses, reference-point refinement).
"""

import jax
import jax.numpy as jnp
import optax


def sequence_loss(logits: jax.Array, coords: jax.Array, batch: dict,
                  ce_weight: float, l1_weight: float,
                  log_scale: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted CE + L1 (or Laplace negative log-likelihood) of one batch.

  Args:
    logits: float32 [B, L, V] classifier output.
    coords: float32 [B, L, 2] regression output, normalised (x, y).
    batch: holds ``target_tokens`` int32 [B, L], ``target_coords`` float32
      [B, L, 2], ``token_weights`` and ``coord_weights`` float32 [B, L].
    ce_weight, l1_weight: loss weights.
    log_scale: float32 [B, L, 2], log of a predicted Laplace scale b of
      each coordinate (normalised units; ``coordinate_loss=laplace``).
      Given, the coordinate term is `laplace_nll` instead of the L1 (the
      same weight and positions), and 'l1' is still reported.

  Returns:
    (loss scalar, {'ce', 'l1'(, 'laplace_nll')}: scalars); a term with no
    weighted position is 0.
  """
  xent = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch['target_tokens'])  # [B, L]
  tw = batch['token_weights']
  ce = jnp.sum(xent * tw) / jnp.maximum(jnp.sum(tw), 1.0)
  err = jnp.abs(coords.astype(jnp.float32) - batch['target_coords'])
  cw = batch['coord_weights']
  mean = lambda per_coord: (jnp.sum(per_coord.mean(-1) * cw)
                            / jnp.maximum(jnp.sum(cw), 1.0))
  l1 = mean(err)
  if log_scale is None:
    return ce_weight * ce + l1_weight * l1, {'ce': ce, 'l1': l1}
  nll = mean(laplace_nll(err, log_scale))
  return ce_weight * ce + l1_weight * nll, {'ce': ce, 'l1': l1,
                                            'laplace_nll': nll}


def laplace_nll(abs_error: jax.Array, log_scale: jax.Array) -> jax.Array:
  """Negative log-likelihood of a Laplace density, elementwise:
  ``|e| / b + log(2 b)`` with ``b = exp(log_scale)`` (the scale-aware
  regression loss of RLE, Li et al., ICCV 2021, eq. 9, with a Laplace
  prior and no flow). Minimised over b at ``b = |e|``, where it is
  ``1 + log(2 |e|)``; the error's gradient is ``sign(e) / b``, so examples
  the model is unsure of weigh less.

  Args:
    abs_error: float32 [...], |prediction - target| (normalised units).
    log_scale: float32 [...], log b.
  """
  log_scale = log_scale.astype(jnp.float32)
  return abs_error * jnp.exp(-log_scale) + log_scale + jnp.log(2.0)


def intermediate_layer_loss(aux_logits: jax.Array, aux_coords: jax.Array,
                            batch: dict, ce_weight: float, l1_weight: float
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sequence_loss` of every intermediate decoder layer, summed.

  The official Raster2Seq (``SetCriterion`` with ``aux_outputs``) and DETR
  add each earlier layer's loss with the last layer's weights; a refined
  point (Deformable DETR ``with_box_refine``) is trained the same way.
  ``ce_weight = 0`` supervises only the points.

  Args:
    aux_logits: float32 [N, B, L, V], layers 0 .. N - 1 of N + 1.
    aux_coords: float32 [N, B, L, 2] normalised (x, y).
    batch, ce_weight, l1_weight: as `sequence_loss`.

  Returns:
    (sum over the N layers of their weighted losses, {'aux_ce', 'aux_l1':
    the layers' mean CE and mean L1}).
  """
  def one_layer(logits, coords):
    loss, parts = sequence_loss(logits, coords, batch, ce_weight, l1_weight)
    return loss, parts['ce'], parts['l1']

  loss, ce, l1 = jax.vmap(one_layer)(aux_logits, aux_coords)  # [N] each
  return jnp.sum(loss), {'aux_ce': jnp.mean(ce), 'aux_l1': jnp.mean(l1)}


def proposal_loss(proposals: jax.Array, keypoints: jax.Array,
                  weights: jax.Array) -> jax.Array:
  """L1 between CAPE support proposals and the query's keypoints.

  Args:
    proposals: float32 [B, Kmax, 2] normalised (x, y) (`model.propose`).
    keypoints: float32 [B, Kmax, 2] the query keypoints in the same order.
    weights: float32 [B, Kmax], 1 where the keypoint counts (visible in the
      query and every support).

  Returns:
    scalar: the weighted mean over keypoints of the mean |dx|, |dy|; 0 with
    no weighted keypoint.
  """
  err = jnp.abs(proposals.astype(jnp.float32) - keypoints).mean(-1)
  return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)
