"""Training loop: the jitted, sharded train step, logging, checkpoints, eval.

`train_and_evaluate` trains ``config`` in ``workdir``, resuming from the
latest checkpoint there, evaluating on the validation split every
``evals.every_steps`` and after the last step (the evaluators of
`kpseq_jax.evaluation.evaluate.from_config`); then it fits the likelihood
calibration of the checkpoint chosen on validation and reports the test
split once (docs/uncertainty.md).

Reliability: every step's scalars go to ``WORKDIR/metrics.jsonl``
(`training.metrics_log`); a resumed run repeats the batches, dropout keys
and losses of an uninterrupted one exactly (the checkpoint holds the train
state with its rng, and the Grain iterator position; augmentation is seeded
per element by Grain). SIGTERM (preemption) finishes the current step,
saves and returns. A non-finite loss or gradient stops training naming the
step, or, with ``config.optim.skip_nonfinite_updates``, leaves the state
unchanged for that step and counts it (``update_skipped``).
"""

from absl import logging
import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.data import pipeline
from kpseq_jax.evaluation import common as eval_common
from kpseq_jax.evaluation import evaluate
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import box_range
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import host_memory
from kpseq_jax.runtime import in_flight as in_flight_lib
from kpseq_jax.runtime import metric_writer
from kpseq_jax.runtime import preemption as preemption_lib
from kpseq_jax.runtime import scalar_log
from kpseq_jax.runtime import sharding
from kpseq_jax.training import checkpointing
from kpseq_jax.training import config_checks
from kpseq_jax.training import metrics_log
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, dict] | None:
  """Trains (resuming from ``workdir``), saves checkpoints, evaluates.

  Evaluation during training and after the last step runs on the
  selection split (``config.evals.split``, 'val'; recorded in
  ``best_checkpoint.json``). The checkpoint chosen on it
  (`checkpointing.chosen_step`) gets its likelihood calibration
  (``calibration.json``) and one evaluation on the report split
  (``config.evals.report_split``, 'test'), which chooses nothing. Without a
  selection split the run falls back, logged: the report split is
  evaluated, the last checkpoint used, nothing calibrated.

  Returns:
    report name -> its JSON (``{'val': eval_val.json, 'test': ...}``), or
    None if preempted (SIGTERM: the step saved, nothing evaluated).

  Raises:
    metrics_log.NonFiniteLossError: on a NaN/inf loss or gradient (see
      ``config.optim.skip_nonfinite_updates``), naming the step.
    ValueError: for an impossible config (see `config_checks`).
  """
  info, selection, report_split = _checked_inputs(config)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  # Before anything compiles: a bad CAPE episode or baseline stops here.
  evaluators = evaluate.from_config(config, info, selection or report_split)
  final_evaluators = (evaluate.from_config(config, info, report_split)
                      if selection and report_split else [])
  train_data, predictor_cls = system_parts(config, info, mesh)
  train_iter = iter(train_data())
  ckpt = checkpointing.Checkpointer(workdir, config.max_checkpoints_to_keep)
  state, start = _initial_state(config, model, tx, mesh, ckpt, train_iter)
  step_fn = step_lib.make_train_step(
      config, model, tx, ts.learning_rate_schedule(config),
      jax.tree.map(lambda a: a.sharding, state), mesh)
  writer = metric_writer.MetricWriter(workdir)
  predictor = predictor_cls.from_state(config, model, state, mesh)
  reports = {}

  def evaluate_state(s, step):
    """Evaluates on the selection split; its checkpoint metrics or None."""
    reports.update(eval_common.run(  # The moving average, if any.
        evaluators,
        eval_common.Inputs(predictor, s.inference_variables(), step),
        workdir, writer))
    return _record_selection(workdir, selection, reports, step)

  state, preempted = train_loop(
      config, workdir, state, start, train_iter, step_fn, model, mesh, ckpt,
      writer, evaluate_state)
  if not preempted:
    if start >= config.optim.num_train_steps:  # Nothing left to train.
      evaluate_state(state, start)
    reports.update(_calibrate_and_report(
        config, info, workdir, mesh, predictor, state, start, selection,
        final_evaluators, writer))
  writer.close()
  return None if preempted else reports


def _initial_state(config, model, tx, mesh, ckpt, train_iter):
  """(train state, its step): the latest checkpoint's (``train_iter``
  moved to its position), else a fresh initialisation at step 0."""
  if ckpt.latest_step() is None:
    return ts.create_train_state(config, model, tx, mesh), 0
  return ckpt.restore(ts.abstract_train_state(config, model, tx, mesh),
                      train_iter)


def _checked_inputs(config: ml_collections.ConfigDict
                    ) -> tuple[dataset.DatasetInfo, str | None, str | None]:
  """(data set info, selection split, report split) of ``config``, checked
  (`config_checks`); a fallback without a selection split is logged.

  Raises:
    ValueError: for an impossible config or data set (`config_checks`).
  """
  config_checks.check(config)
  if warning := config_checks.frozen_without_weights(config):
    logging.warning('%s', warning)
  info = dataset.load_info(config.input.dataset_dir)
  config_checks.check_dataset(config, info)
  selection, report_split, fallback = config_checks.evaluation_splits(
      config, info)
  if fallback:
    logging.warning('%s', fallback)
  return info, selection, report_split


def _calibrate_and_report(config, info, workdir, mesh, predictor, state,
                          start, selection, final_evaluators, writer
                          ) -> dict[str, dict]:
  """After training: the checkpoint chosen on ``selection``
  (`checkpointing.chosen_step`, logged) gets its likelihood calibration
  (keypoint systems only) and is evaluated once by ``final_evaluators``
  (the report split). Returns their reports (name -> JSON)."""
  final_step = max(start, config.optim.num_train_steps)
  chosen, why = checkpointing.chosen_step(workdir)
  logging.info('Checkpoint for calibration, the report and inference: %s.',
               why)
  variables, step = state.inference_variables(), final_step
  if chosen is not None and chosen != final_step:
    _, variables, step = predictor_lib.restore_variables(config, workdir,
                                                         mesh)
  keypoints = config.model_name not in detection.BOX_MODELS
  calibration = None
  if selection and keypoints:
    calibration = evaluate.calibrate_and_save(
        config, info, selection, predictor, variables, step, workdir)
  if not final_evaluators:
    return {}
  return eval_common.run(
      final_evaluators, eval_common.Inputs(
          predictor, variables, step, calibration=calibration,
          box_range=box_range.from_config(config) if keypoints else None),
      workdir, writer)


def _record_selection(workdir: str, selection: str | None,
                      reports: dict[str, dict], step: int
                      ) -> dict[str, float] | None:
  """Records the selection split's `checkpointing.SELECTION_METRIC` of
  ``step`` (``best_checkpoint.json``, logged) and returns it as the
  checkpoint's Orbax metrics; None without a selection split or figure."""
  if not selection:
    return None
  figures = [r.get(checkpointing.SELECTION_METRIC)
             for name, r in reports.items()
             if name in (selection, f'{selection}_permuted')]
  value = next((float(v) for v in figures
                if isinstance(v, (int, float)) and np.isfinite(v)), None)
  if value is None:
    return None
  best = checkpointing.record_validation(workdir, selection, step, value)
  logging.info('Validation (%r) at step %d: %.2f px mean error; best step '
               '%d (%.2f px) by %s.', selection, step, value, best['step'],
               best['value'], checkpointing.SELECTION_RULE)
  return {checkpointing.SELECTION_METRIC: value}


def system_parts(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
                 mesh: jax.sharding.Mesh):
  """(train data set factory, predictor class) of ``config``'s system:
  the detector's whole images and boxes, or the keypoint pipeline (crops,
  whole images or episodes) and keypoints. Logs the train split's size and
  what a crop pixel covers."""
  if config.model_name in detection.BOX_MODELS:
    parts = (lambda: detection.create_train_dataset(config, info),
             box_predictor.BoxPredictor)
    size = detection.num_images(config, config.input.train_split)
  else:
    if resolution := dataset.crop_resolution(
        config.input.dataset_dir, config.input.train_split,
        config.input.image_size_px, config.input.bbox_scale):
      logging.info('Top-down crops: %s.', resolution)
    parts = (lambda: pipeline.create_train_dataset(config, info),
             predictor_lib.Predictor)
    size = info.split_sizes[config.input.train_split]
  logging.info('Train split %r: %d examples, %d steps per epoch, %d steps; '
               'mesh %s', config.input.train_split, size,
               ts.steps_per_epoch(config, size),
               config.optim.num_train_steps, dict(mesh.shape))
  return parts


def train_loop(config, workdir, state, start, train_iter, step_fn, model,
               mesh, ckpt, writer, evaluate_state):
  """Steps ``start + 1 .. optim.num_train_steps``: log, the periodic and
  last evaluation (``evaluate_state(state, step)``, returning the
  checkpoint's metrics or None), checkpoint (a step evaluated is saved,
  with its metrics) and preemption.

  Returns:
    (state, preempted).
  """
  total_steps = config.optim.num_train_steps
  if start >= total_steps:
    logging.info('Already trained %d/%d steps in %s.', start, total_steps,
                 workdir)
  log = metrics_log.MetricsLog(
      total_steps, scalar_log.JsonlWriter(workdir),
      config.optim.skip_nonfinite_updates, writer,
      config.optim.max_consecutive_skipped_updates)
  preempted, compiled_step = False, None
  # At most two steps in flight: a SIGTERM's save waits for one step only.
  in_flight = in_flight_lib.InFlight(max_in_flight=2)
  with preemption_lib.Preemption() as preemption, jax.set_mesh(mesh):
    for step in range(start + 1, total_steps + 1):
      local = next(train_iter)
      batch = sharding.global_batch(
          {k: local[k] for k in step_lib.train_fields(model)}, mesh)
      if compiled_step is None:
        # Compiled ahead of the first step, so that what the state's
        # initialisation and the compiler freed goes back to the kernel
        # before the step's own buffers are allocated (host_memory.py).
        compiled_step = step_fn.lower(state, batch).compile()
        logging.info('Host memory: %s', host_memory.release_free_memory())
      state, metrics = compiled_step(state, batch)
      in_flight.push(metrics['loss'])  # Waits for the previous step.
      log.add(step, metrics)
      is_last = step == total_steps
      preempted = preemption.reached(step) and not is_last
      if step % config.log_every_steps == 0 or is_last or preempted:
        log.flush(log=True)
      checkpoint_metrics = None
      if not preempted and (is_last or (
          config.evals.every_steps > 0
          and step % config.evals.every_steps == 0)):
        log.flush(log=False)  # Never evaluate a state that follows a NaN.
        # Before the save, which keeps the step with the best validation
        # figure (checkpointing.Checkpointer).
        checkpoint_metrics = evaluate_state(state, step)
        host_memory.release_free_memory()  # What evaluation freed.
      if (step % config.checkpoint_every_steps == 0 or is_last or preempted
          or checkpoint_metrics is not None):
        log.flush(log=False)  # Never save a state that follows a NaN.
        ckpt.save(step, state, train_iter, checkpoint_metrics)
      if preempted:
        logging.warning('Preempted: saved step %d/%d in %s; run again to '
                        'resume.', step, total_steps, workdir)
        break
    ckpt.wait()
  ckpt.close()
  log.jsonl.close()
  return state, preempted
