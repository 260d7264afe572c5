"""The train step: one AdamW update of the `TrainState` on a global batch.

`make_train_step` is the only place that compiles it: training, the
benchmark and the multi-device tests all call the same jitted function,
with the state's shardings in and out, the batch split over the mesh and
the state donated.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kpseq_jax.models import centroid as centroid_lib
from kpseq_jax.models import detector as detector_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.training import centroid_losses
from kpseq_jax.training import detection_losses
from kpseq_jax.training import losses
from kpseq_jax.training import train_state as ts


def train_fields(model) -> tuple[str, ...]:
  """The batch fields the train step of ``model`` reads (its system's
  ``train_fields``: `supervised.TRAIN_FIELDS`, plus the support set and
  proposal targets of `cape.Model`, the box of `end_to_end.Model`; the
  detector's boxes and labels)."""
  return tuple(model.train_fields)


def train_step(state: ts.TrainState, batch: dict, *, model,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ce_weight: float, l1_weight: float,
               proposal_l1_weight: float = 0.0,
               aux_ce_weight: float = 0.0,
               skip_nonfinite: bool = False,
               ema_decay: float = 0.0
               ) -> tuple[ts.TrainState, dict]:
  """One AdamW update of a keypoint model on a global batch
  (`train_fields`); skipping and the moving average as `apply_gradients`.

  The loss is `losses.sequence_loss`, plus ``proposal_l1_weight`` x
  `losses.proposal_loss` when the model sows support proposals
  (`cape.Model`), plus, when it sows intermediate outputs (aux_loss or
  refinement), `losses.intermediate_layer_loss` of the earlier decoder
  layers with ``aux_ce_weight`` and ``l1_weight`` (``aux_ce_weight`` = 0:
  only the refined points are supervised). With ``coordinate_loss=
  'laplace'`` the last layer's coordinates are trained by the Laplace
  likelihood (`losses.laplace_nll`) instead of the L1.

  Returns:
    (new state, metrics): scalars ``loss``, ``ce``, ``l1`` (and
    ``proposal_l1`` with support proposals, ``aux_ce`` and ``aux_l1``
    with intermediate outputs), ``grad_norm``,
    ``learning_rate`` (of this update) and ``update_skipped`` (1 if the
    update was skipped, else 0).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (logits, coords), updates = model.apply(
        variables, **model.inputs(batch), train=True, rngs={'dropout': rng},
        mutable=['batch_stats', 'intermediates'])
    inter = updates.get('intermediates', {})
    log_scale = (inter['coord_log_scale'][0]
                 if model.coordinate_loss == 'laplace' else None)
    loss, parts = losses.sequence_loss(logits, coords, batch, ce_weight,
                                       l1_weight, log_scale)
    if 'support_proposals' in inter:  # `cape.Model` with proposals.
      [proposals] = inter['support_proposals']
      parts['proposal_l1'] = losses.proposal_loss(
          proposals, batch['query_keypoints'],
          batch['query_keypoint_weights'])
      loss = loss + proposal_l1_weight * parts['proposal_l1']
    if 'aux_logits' in inter:  # Intermediate outputs of >= 2 layers.
      [aux_logits] = inter['aux_logits']
      [aux_coords] = inter['aux_coords']
      aux, aux_parts = losses.intermediate_layer_loss(
          aux_logits, aux_coords, batch, aux_ce_weight, l1_weight)
      loss = loss + aux
      parts.update(aux_parts)
    return loss, (parts, updates.get('batch_stats', state.batch_stats))

  return apply_gradients(state, loss_fn, tx=tx, schedule=schedule,
                         skip_nonfinite=skip_nonfinite, ema_decay=ema_decay)


def update_ema(ema: dict, params, batch_stats, step: jax.Array,
               decay: float) -> dict:
  """One step of the moving average of the weights (`TrainState.ema`).

  ``ema <- d * ema + (1 - d) * new`` per leaf with
  ``d = min(decay, (1 + step) / (10 + step))``
  (tf.train.ExponentialMovingAverage with ``num_updates``; also timm's
  ModelEmaV2 averages the BatchNorm statistics with the parameters).

  Args:
    ema: ``{'params', 'batch_stats'}``, float32 trees; ``{}`` (no average)
      is returned as it is.
    params, batch_stats: the weights after this step's update.
    step: int32 scalar, the number of updates before this one.
    decay: ``config.optim.ema_decay`` in (0, 1).

  Returns:
    the new average, same tree, shapes and dtypes as ``ema``.
  """
  if not ema:
    return ema
  step = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  new = {'params': params, 'batch_stats': batch_stats}
  return jax.tree.map(lambda e, w: (d * e + (1 - d) * w).astype(e.dtype),
                      ema, new)


def apply_gradients(state: ts.TrainState, loss_fn, *,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, skip_nonfinite: bool,
                    ema_decay: float = 0.0
                    ) -> tuple[ts.TrainState, dict]:
  """One optimizer update of ``state`` from ``loss_fn``'s gradient.

  Args:
    state: the train state.
    loss_fn: ``params -> (loss, (parts, batch_stats))``: a scalar loss, a
      dict of scalar metrics and the updated BatchNorm statistics.
    tx: the optimizer; schedule: its learning rate (for the metrics).
    skip_nonfinite: leave params, batch_stats, opt_state and ema unchanged
      when the loss or the gradient norm is not finite (``jnp.where`` on
      the flag); only ``step`` advances.
    ema_decay: the moving average's decay (`update_ema`); used only when
      ``state.ema`` holds one.

  Returns:
    (new state, metrics): ``loss``, ``grad_norm``, ``learning_rate``,
    ``update_skipped`` and ``parts``.
  """
  (loss, (parts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = update_ema(state.ema, params, batch_stats, state.step, ema_decay)
  skipped = jnp.zeros([], jnp.int32)
  if skip_nonfinite:
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    params, batch_stats, opt_state, ema = jax.tree.map(
        keep, (params, batch_stats, opt_state, ema),
        (state.params, state.batch_stats, state.opt_state, state.ema))
    skipped = 1 - finite.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            ema=ema)
  metrics = dict(loss=loss, grad_norm=grad_norm,
                 learning_rate=schedule(state.step), update_skipped=skipped,
                 **parts)
  return new_state, metrics


def detection_train_step(state: ts.TrainState, batch: dict, *, model,
                         tx: optax.GradientTransformation,
                         schedule: optax.Schedule, class_weight: float,
                         l1_weight: float, giou_weight: float,
                         skip_nonfinite: bool = False,
                         ema_decay: float = 0.0
                         ) -> tuple[ts.TrainState, dict]:
  """One AdamW update of a `detector.Model` on whole images.

  The loss is `detection_losses.set_loss` (Deformable DETR: Hungarian
  matching, focal class loss, L1 and GIoU on every decoder layer) of
  ``batch`` = ``model.train_fields`` (`kpseq_jax/data/detection.py`).

  Returns:
    (new state, metrics): as `apply_gradients`, with the set loss's parts
    (``class``, ``l1``, ``giou`` of the last layer, ``aux``).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (logits, boxes), updates = model.apply(
        variables, **model.inputs(batch), train=True, rngs={'dropout': rng},
        mutable=['batch_stats'])
    loss, parts = detection_losses.set_loss(
        logits, boxes, batch['boxes'], batch['labels'], batch['box_valid'],
        class_weight=class_weight, l1_weight=l1_weight,
        giou_weight=giou_weight)
    return loss, (parts, updates.get('batch_stats', state.batch_stats))

  return apply_gradients(state, loss_fn, tx=tx, schedule=schedule,
                         skip_nonfinite=skip_nonfinite, ema_decay=ema_decay)


def centroid_train_step(state: ts.TrainState, batch: dict, *, model,
                        tx: optax.GradientTransformation,
                        schedule: optax.Schedule, heatmap_weight: float,
                        offset_weight: float, size_weight: float,
                        skip_nonfinite: bool = False,
                        ema_decay: float = 0.0
                        ) -> tuple[ts.TrainState, dict]:
  """One AdamW update of a `centroid.Model` on whole images: CenterNet's
  loss (`centroid_losses.centroid_loss`) of ``batch`` =
  ``model.train_fields``.

  Returns:
    (new state, metrics): as `apply_gradients`, with the loss's parts
    (``heatmap``, ``offset``, ``size``).
  """

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (heatmap, offset, size), updates = model.apply(
        variables, **model.inputs(batch), train=True, mutable=['batch_stats'])
    loss, parts = centroid_losses.centroid_loss(
        heatmap, offset, size, batch['boxes'], batch['labels'],
        batch['box_valid'], heatmap_weight=heatmap_weight,
        offset_weight=offset_weight, size_weight=size_weight)
    return loss, (parts, updates.get('batch_stats', state.batch_stats))

  return apply_gradients(state, loss_fn, tx=tx, schedule=schedule,
                         skip_nonfinite=skip_nonfinite, ema_decay=ema_decay)


def make_train_step(config: ml_collections.ConfigDict, model, tx,
                    schedule: optax.Schedule, state_shardings,
                    mesh: jax.sharding.Mesh, donate: bool = True):
  """The train step of ``model`` compiled with shardings: `train_step` for
  a keypoint model, `detection_train_step` for `detector.Model`,
  `centroid_train_step` for `centroid.Model`.

  Args:
    config: ``config.loss`` is passed to the step as keyword arguments
      (``ce_weight``, ``l1_weight``, CAPE's ``proposal_l1_weight``; the
      detector's ``class_weight``, ``l1_weight``, ``giou_weight``); with
      ``model.aux_loss`` the earlier layers' CE weighs ``ce_weight`` (else
      0); ``optim.skip_nonfinite_updates``, ``optim.ema_decay``.
    model: a ``Model`` of ``kpseq_jax/models/`` (`train_state.create_model`).
    tx: the optimizer (`train_state.create_optimizer`).
    schedule: its learning-rate schedule (for the logged rate).
    state_shardings: pytree of the state's shardings (in and out).
    mesh: the device mesh; the batch is split over it, metrics replicated.
    donate: donate the input state's buffers (training; False keeps them,
      e.g. to run one state on several steps in a test).

  Returns:
    ``step(state, batch) -> (state, metrics)`` with ``batch`` a dict of
    global arrays holding `train_fields`.
  """
  box_steps = {detector_lib.Model: detection_train_step,
               centroid_lib.Model: centroid_train_step}
  if type(model) in box_steps:
    step = functools.partial(
        box_steps[type(model)], model=model, tx=tx, schedule=schedule,
        **config.loss.to_dict(),
        skip_nonfinite=config.optim.skip_nonfinite_updates,
        ema_decay=config.optim.ema_decay)
  else:
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule,
        **config.loss.to_dict(),
        aux_ce_weight=config.loss.ce_weight if config.model.aux_loss else 0.0,
        skip_nonfinite=config.optim.skip_nonfinite_updates,
        ema_decay=config.optim.ema_decay)
  return jax.jit(
      step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,) if donate else ())
