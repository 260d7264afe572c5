"""Training loop: jitted, sharded train step, logging, checkpoints, eval.

`train_and_evaluate` trains ``config`` in ``workdir``, resuming from the
latest checkpoint there, then evaluates the final state on the eval split.
"""

import functools
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from kpseq_jax import checkpointing
from kpseq_jax import config_checks
from kpseq_jax import evaluate
from kpseq_jax import input_pipeline
from kpseq_jax import losses
from kpseq_jax import sharding
from kpseq_jax import train_state as ts

# Batch fields the train step reads (the pipeline also yields eval fields).
TRAIN_FIELDS = ('image', 'input_tokens', 'input_coords', 'target_tokens',
                'target_coords', 'token_weights', 'coord_weights')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def train_step(state: ts.TrainState, batch: dict, *, model,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ce_weight: float, l1_weight: float
               ) -> tuple[ts.TrainState, dict]:
  """One AdamW update on a global batch (see `TRAIN_FIELDS`).

  Returns:
    (new state, metrics): scalars ``loss``, ``ce``, ``l1``, ``grad_norm``
    and ``learning_rate`` (of this update).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (logits, coords), updates = model.apply(
        variables, batch['image'], batch['input_tokens'],
        batch['input_coords'], train=True, rngs={'dropout': rng},
        mutable=['batch_stats'])
    loss, parts = losses.sequence_loss(logits, coords, batch, ce_weight,
                                       l1_weight)
    return loss, (parts, updates.get('batch_stats', state.batch_stats))

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 learning_rate=schedule(state.step), **parts)
  return new_state, metrics


class _MetricsLog:
  """Keeps device metrics until the next log point, then checks and prints.

  Fetching metrics only every ``log_every_steps`` keeps dispatch
  asynchronous; every step's loss is still checked, so a non-finite loss is
  reported with the exact step.
  """

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self.pending: list[tuple[int, dict]] = []
    self.t0, self.step0 = None, None  # Time and step of the last log.

  def add(self, step: int, metrics: dict) -> None:
    if self.step0 is None:  # Rates start after the first (compiling) step.
      self.t0, self.step0 = time.time(), step
    self.pending.append((step, metrics))

  def flush(self, log: bool) -> None:
    """Fetches pending metrics; raises NonFiniteLossError naming the step."""
    fetched = jax.device_get(self.pending)
    self.pending = []
    for step, m in fetched:
      if not np.isfinite(m['loss']):
        raise NonFiniteLossError(
            f'Non-finite loss {m["loss"]} at step {step} (ce={m["ce"]}, '
            f'l1={m["l1"]}, grad_norm={m["grad_norm"]}); stopping. The last '
            'checkpoint before it is intact.')
    if not (log and fetched):
      return
    step, m = fetched[-1]
    now = time.time()
    rate = (step - self.step0) / max(now - self.t0, 1e-9)
    self.t0, self.step0 = now, step
    eta = (self.total_steps - step) / max(rate, 1e-9)
    mean = {k: float(np.mean([f[1][k] for f in fetched])) for k in m}
    logging.info(
        'step %d/%d  loss %.4f (ce %.4f, l1 %.4f)  grad_norm %.3f  lr %.2e  '
        '%.2f steps/s  ETA %s', step, self.total_steps, mean['loss'],
        mean['ce'], mean['l1'], mean['grad_norm'], m['learning_rate'], rate,
        time.strftime('%H:%M:%S', time.gmtime(eta)))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains (resuming from ``workdir``), saves checkpoints, evaluates.

  Returns:
    the evaluation report of `evaluate.evaluate`.

  Raises:
    NonFiniteLossError: on a NaN/inf loss, naming the step.
    ValueError: for an impossible config (see `config_checks`).
  """
  config_checks.check(config)
  info = input_pipeline.load_info(config.dataset_dir)
  train_size = info.split_sizes[config.train_split]
  total_steps = ts.num_train_steps(config, train_size)
  mesh = sharding.create_mesh(config.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config, train_size)
  schedule = ts.learning_rate_schedule(config, train_size)
  logging.info('Train split %r: %d instances, %d steps per epoch, %d steps; '
               'mesh %s', config.train_split, train_size,
               ts.steps_per_epoch(config, train_size), total_steps,
               dict(mesh.shape))

  state = ts.create_train_state(config, model, tx, mesh)
  state_shardings = jax.tree.map(lambda a: a.sharding, state)
  train_iter = iter(input_pipeline.create_train_dataset(config, info))
  ckpt = checkpointing.Checkpointer(workdir, config.max_checkpoints_to_keep)
  start = 0
  if ckpt.latest_step() is not None:
    state, start = ckpt.restore(
        ts.abstract_train_state(config, model, tx, mesh), train_iter)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        ce_weight=config.ce_weight,
                        l1_weight=config.l1_weight),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))

  log = _MetricsLog(total_steps)
  for step in range(start + 1, total_steps + 1):
    local = next(train_iter)
    batch = sharding.global_batch({k: local[k] for k in TRAIN_FIELDS}, mesh)
    state, metrics = step_fn(state, batch)
    log.add(step, metrics)
    is_last = step == total_steps
    if step % config.log_every_steps == 0 or is_last:
      log.flush(log=True)
    if step % config.checkpoint_every_steps == 0 or is_last:
      log.flush(log=False)  # Never save a state that follows a NaN.
      ckpt.save(step, state, train_iter)
  ckpt.wait()
  ckpt.close()
  if start >= total_steps:
    logging.info('Already trained %d/%d steps in %s.', start, total_steps,
                 workdir)
  return evaluate.evaluate(config, workdir, model=model, state=state,
                           step=max(start, total_steps))
