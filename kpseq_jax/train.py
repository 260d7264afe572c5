"""Training loop: jitted, sharded train step, logging, checkpoints, eval.

`train_and_evaluate` trains ``config`` in ``workdir``, resuming from the
latest checkpoint there, then evaluates the final state on the eval split.

Reliability: every step's scalars go to ``WORKDIR/metrics.jsonl``
(`scalar_log`); a resumed run repeats the batches, dropout keys and losses of
an uninterrupted one exactly (the checkpoint holds the train state with its
rng, and the Grain iterator position; augmentation is seeded per element by
Grain). SIGTERM (preemption) finishes the current step, saves and returns.
A non-finite loss or gradient stops training naming the step, or, with
``config.skip_nonfinite_updates``, leaves the state unchanged for that step
and counts it (``update_skipped``).
"""

import functools
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kpseq_jax import checkpointing
from kpseq_jax import config_checks
from kpseq_jax import evaluate
from kpseq_jax import input_pipeline
from kpseq_jax import losses
from kpseq_jax import metric_writer
from kpseq_jax import scalar_log
from kpseq_jax import sharding
from kpseq_jax import train_state as ts

# Batch fields the train step reads (the pipeline also yields eval fields).
TRAIN_FIELDS = ('image', 'input_tokens', 'input_coords', 'target_tokens',
                'target_coords', 'token_weights', 'coord_weights')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or gradient."""


def train_step(state: ts.TrainState, batch: dict, *, model,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ce_weight: float, l1_weight: float,
               skip_nonfinite: bool = False
               ) -> tuple[ts.TrainState, dict]:
  """One AdamW update on a global batch (see `TRAIN_FIELDS`).

  With ``skip_nonfinite``, an update whose loss or gradient norm is not
  finite is not applied: params, batch_stats and opt_state stay as they
  were (``jnp.where`` on the finite flag); only ``step`` advances.

  Returns:
    (new state, metrics): scalars ``loss``, ``ce``, ``l1``, ``grad_norm``,
    ``learning_rate`` (of this update) and ``update_skipped`` (1 if the
    update was skipped, else 0).
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
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  skipped = jnp.zeros([], jnp.int32)
  if skip_nonfinite:
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    params, batch_stats, opt_state = jax.tree.map(
        keep, (params, batch_stats, opt_state),
        (state.params, state.batch_stats, state.opt_state))
    skipped = 1 - finite.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  metrics = dict(loss=loss, grad_norm=grad_norm,
                 learning_rate=schedule(state.step), update_skipped=skipped,
                 **parts)
  return new_state, metrics


class _MetricsLog:
  """Keeps device metrics until the next log point, then checks and prints.

  Fetching metrics only every ``log_every_steps`` keeps dispatch
  asynchronous; every step's loss and gradient norm are still checked, so a
  non-finite one is reported with the exact step (or, when updates with one
  are skipped, counted in ``skipped_updates``), and every step's scalars are
  appended to ``jsonl``.
  """

  def __init__(self, total_steps: int, jsonl: scalar_log.JsonlWriter,
               skip_nonfinite: bool = False,
               writer: metric_writer.MetricWriter | None = None,
               max_consecutive_skipped: int = 0):
    self.total_steps = total_steps
    self.jsonl = jsonl
    self.writer = writer  # TensorBoard: means over the log interval.
    self.skip_nonfinite = skip_nonfinite
    self.max_consecutive_skipped = max_consecutive_skipped  # <= 0: no cap.
    self.skipped_updates = 0
    self.consecutive_skipped = 0
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
      self.jsonl.write_scalars(step, m)
    self.jsonl.flush()
    for step, m in fetched:
      skipped = int(m['update_skipped'])
      self.skipped_updates += skipped
      self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
      if 0 < self.max_consecutive_skipped <= self.consecutive_skipped:
        raise NonFiniteLossError(
            f'{self.consecutive_skipped} consecutive updates up to step '
            f'{step} had a non-finite loss or gradient and were skipped '
            f'(loss={m["loss"]}, grad_norm={m["grad_norm"]}); training is '
            'not progressing, stopping. The last checkpoint is intact; see '
            'config.max_consecutive_skipped_updates.')
      if not self.skip_nonfinite and not (np.isfinite(m['loss']) and
                                          np.isfinite(m['grad_norm'])):
        raise NonFiniteLossError(
            f'Non-finite loss or gradient at step {step} (loss={m["loss"]}, '
            f'ce={m["ce"]}, l1={m["l1"]}, grad_norm={m["grad_norm"]}); '
            'stopping. The last checkpoint before it is intact; '
            '--config.skip_nonfinite_updates=True skips such updates.')
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
        '%.2f steps/s  ETA %s%s', step, self.total_steps, mean['loss'],
        mean['ce'], mean['l1'], mean['grad_norm'], m['learning_rate'], rate,
        time.strftime('%H:%M:%S', time.gmtime(eta)),
        f'  skipped updates {self.skipped_updates}'
        if self.skipped_updates else '')
    if self.writer is not None:
      self.writer.write_scalars(step, {
          **{f'train/{k}': v for k, v in mean.items()},
          'train/learning_rate': m['learning_rate'],
          'train/steps_per_sec': rate})


class _Preemption:
  """Turns SIGTERM into a request to save and stop after the current step.

  One process: a SIGTERM handler sets a flag (installed while the context
  is open, on the main thread). Several processes: JAX's preemption sync
  point, so all hosts stop at the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> '_Preemption':
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after the current step, '
                    'then stopping.')
    self.requested = True

  def reached(self, step: int) -> bool:
    """True if training should save and stop after ``step``."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains (resuming from ``workdir``), saves checkpoints, evaluates.

  Returns:
    the evaluation report of `evaluate.evaluate`, or None if training was
    preempted (SIGTERM): then the current step was saved and nothing
    evaluated; running again resumes.

  Raises:
    NonFiniteLossError: on a NaN/inf loss or gradient, naming the step
      (unless ``config.skip_nonfinite_updates``; then after
      ``config.max_consecutive_skipped_updates`` skipped updates in a row).
    ValueError: for an impossible config (see `config_checks`).
  """
  config_checks.check(config)
  if warning := config_checks.frozen_without_weights(config):
    logging.warning('%s', warning)
  info = input_pipeline.load_info(config.dataset_dir)
  config_checks.check_dataset(config, info)
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
                        l1_weight=config.l1_weight,
                        skip_nonfinite=config.skip_nonfinite_updates),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))

  writer = metric_writer.MetricWriter(workdir)
  log = _MetricsLog(total_steps, scalar_log.JsonlWriter(workdir),
                    config.skip_nonfinite_updates, writer,
                    config.max_consecutive_skipped_updates)
  decode_fn = evaluate.make_eval_decode_fn(config, model, state, mesh)
  preempted = False
  with _Preemption() as preemption, jax.set_mesh(mesh):
    for step in range(start + 1, total_steps + 1):
      local = next(train_iter)
      batch = sharding.global_batch({k: local[k] for k in TRAIN_FIELDS},
                                    mesh)
      state, metrics = step_fn(state, batch)
      log.add(step, metrics)
      is_last = step == total_steps
      preempted = preemption.reached(step) and not is_last
      if step % config.log_every_steps == 0 or is_last or preempted:
        log.flush(log=True)
      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        log.flush(log=False)  # Never save a state that follows a NaN.
        ckpt.save(step, state, train_iter)
      if preempted:
        logging.warning('Preempted: saved step %d/%d in %s; run again to '
                        'resume.', step, total_steps, workdir)
        break
      if (config.eval_every_steps > 0 and step % config.eval_every_steps == 0
          and not is_last):  # The last step is evaluated below.
        log.flush(log=False)  # Never evaluate a state that follows a NaN.
        evaluate.evaluate(config, workdir, model=model, state=state,
                          step=step, writer=writer, decode_fn=decode_fn)
    ckpt.wait()
  ckpt.close()
  log.jsonl.close()
  if preempted:
    writer.close()
    return None
  if start >= total_steps:
    logging.info('Already trained %d/%d steps in %s.', start, total_steps,
                 workdir)
  report = evaluate.evaluate(config, workdir, model=model, state=state,
                             step=max(start, total_steps), writer=writer,
                             decode_fn=decode_fn)
  writer.close()
  return report
