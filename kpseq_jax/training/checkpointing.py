"""One Orbax `CheckpointManager` for the train state and the data iterator.

Checkpoints live in ``WORKDIR/checkpoints/<step>/`` with two items:
``state`` (the `TrainState`, restored straight into its shardings) and
``data_iter`` (the Grain iterator's position, one JSON file per process), so
a resumed run sees exactly the batches an uninterrupted run would have seen.
Orbax writes each step to ``<step>.orbax-checkpoint-tmp`` and renames it
when complete, so a save interrupted by a crash is never listed as a step.
A step directory that is listed but cannot be restored (files lost or
damaged after the rename) is renamed to ``<step>.unrestorable`` with a
warning and the previous step is restored instead (`Checkpointer.restore`).
A checkpoint whose train-state tree differs from the config's (another model
size, or a frozen backbone that changes the optimizer state) is not damaged:
restoring raises `CheckpointMismatchError` and leaves it in place. A
checkpoint written before a train-state field existed restores when that
field is empty in the config's state (`TrainState.ema` without
``optim.ema_decay``). Inference reads only the weights it uses
(`restore_variables`: params and batch_stats, or their moving average).

The checkpoint that evaluation, prediction and video analysis use is chosen
on the validation split by `SELECTION_RULE`: each in-training evaluation on
it is saved with its checkpoint as Orbax metrics and recorded in
``WORKDIR/best_checkpoint.json`` (`record_validation`); Orbax keeps that
step beside the ``max_to_keep`` latest ones (a `BestN` preservation
policy), and `chosen_step` names it. A workdir without the file (trained
before it, or without a validation split) uses its latest step.
"""

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from kpseq_jax.runtime import sharding

UNRESTORABLE_SUFFIX = '.unrestorable'
BEST_FILE = 'best_checkpoint.json'
# The metric a checkpoint is chosen by (`pck.PCKEvaluator`'s, pixels).
SELECTION_METRIC = 'mean_error_px'
SELECTION_RULE = ('lowest mean pixel error on the validation split '
                  '(eval_<split>.json mean_error_px; ties: the later step)')


def record_validation(workdir: str, split: str, step: int,
                      value: float) -> dict[str, Any]:
  """Adds one validation figure to ``WORKDIR/best_checkpoint.json``.

  The file: ``rule``, ``split``, ``metric``, ``history`` ([{step, value}]
  by step; a resumed run's re-evaluated step replaces its entry) and the
  chosen ``step`` / ``value`` (`SELECTION_RULE`). Process 0 writes it.

  Args:
    workdir: the run.
    split: the evaluated split ('val').
    step: the checkpoint step evaluated.
    value: its `SELECTION_METRIC` (pixels).

  Returns:
    The file's content.
  """
  path = os.path.join(workdir, BEST_FILE)
  old = read_best(workdir) or {}
  history = {int(h['step']): float(h['value'])
             for h in old.get('history', []) if old.get('split') == split}
  history[int(step)] = float(value)
  best = min(history, key=lambda s: (history[s], -s))  # As Orbax's BestN.
  out = dict(rule=SELECTION_RULE, split=split, metric=SELECTION_METRIC,
             step=best, value=history[best],
             history=[dict(step=s, value=history[s]) for s in sorted(history)])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(out, f, indent=1)
    os.replace(path + '.tmp', path)
  return out


def read_best(workdir: str) -> dict[str, Any] | None:
  """``WORKDIR/best_checkpoint.json`` (`record_validation`), None if absent.

  Raises:
    ValueError: the file is not JSON with an integer ``step`` (names it).
  """
  path = os.path.join(workdir, BEST_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      out = json.load(f)
    int(out['step'])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: not a checkpoint choice ({e}); delete it to '
                     'use the latest checkpoint.') from e
  return out


def chosen_step(workdir: str) -> tuple[int | None, str]:
  """(the step inference uses, why), from ``best_checkpoint.json``.

  Returns:
    (the chosen step, a sentence for the log), or (None, why) when the
    workdir has no choice or its step is no longer on disk: then the
    latest step is used.
  """
  best = read_best(workdir)
  if best is None:
    return None, (f'no {BEST_FILE} (no validation split, or trained before '
                  'it): the latest checkpoint')
  step = int(best['step'])
  if step not in _steps_newest_first(workdir):
    return None, (f'{BEST_FILE} chose step {step}, which is not on disk: the '
                  'latest checkpoint')
  return step, (f'step {step}, chosen by {best["rule"]}: {best["value"]:.2f} '
                f'px on {best["split"]!r} ({BEST_FILE})')


def read_backbone(workdir: str, backbone_key: str = 'backbone'
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The backbone of a trained workdir's latest checkpoint, as numpy.

  Reads only ``params[backbone_key]`` and ``batch_stats[backbone_key]``
  (partial restore; from ``ema`` when the run kept a moving average of its
  weights, which it evaluates with), whatever model wrote the checkpoint:
  a detector (`detector.Model`) or a keypoint model, any config.
  Used by ``config.model_init`` when it names a workdir
  (`train_state.create_train_state`), e.g. to put a keypoint model on the
  backbone of the detector trained on the same frames.

  Args:
    workdir: a ``--workdir`` with ``checkpoints/<step>/state``.
    backbone_key: the backbone's module name in both models.

  Returns:
    (params, batch_stats): nested dicts of float32 numpy arrays in the Flax
    layout of `resnet.ResNet`; batch_stats is {} for GroupNorm.

  Raises:
    FileNotFoundError: no checkpoint step in ``workdir``.
    ValueError: the checkpoint has no ``params[backbone_key]``.
  """
  root = os.path.join(workdir, 'checkpoints')
  steps = _steps_newest_first(workdir)
  if not steps:
    raise FileNotFoundError(
        f'{workdir}: no checkpoint to take a backbone from (expected '
        f'{root}/<step>/state; train that workdir first).')
  path = os.path.join(root, str(steps[0]), 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path)
    saved = getattr(saved, 'item_metadata', saved)
    saved = getattr(saved, 'tree', saved)
    if backbone_key not in saved.get('params', {}):
      raise ValueError(f'{path}: no params[{backbone_key!r}] in this '
                       f'checkpoint (its params: {sorted(saved["params"])})')
    # The weights that workdir evaluates with: their moving average if it
    # kept one (`TrainState.inference_variables`).
    averaged = backbone_key in saved.get('ema', {}).get('params', {})
    source = saved['ema'] if averaged else saved
    item = {c: {backbone_key: source[c][backbone_key]}
            for c in ('params', 'batch_stats')
            if backbone_key in source.get(c, {})}
    if averaged:
      item = {'ema': item}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, partial_restore=True, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
    if averaged:
      restored = restored['ema']
  logging.info('Backbone of checkpoint step %d read from %s', steps[0],
               workdir)
  as_f32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  return (as_f32(restored['params'][backbone_key]),
          as_f32(restored.get('batch_stats', {}).get(backbone_key, {})))


def _absent_empty_fields(abstract_state: Any, saved: Any) -> tuple[str, ...]:
  """Fields of a dataclass ``abstract_state`` that hold no arrays (e.g.
  `TrainState.ema` ``{}`` without a moving average) and that the saved
  tree ``saved`` (`Checkpointer._saved_tree`) lacks: it was written before
  the field existed, and restores without it. () for other states."""
  if not dataclasses.is_dataclass(abstract_state) or not hasattr(
      saved, 'keys'):
    return ()
  return tuple(f.name for f in dataclasses.fields(abstract_state)
               if f.name not in saved
               and not jax.tree.leaves(getattr(abstract_state, f.name)))


class CheckpointMismatchError(ValueError):
  """The checkpoint's train state has other arrays than the config's."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{`sharding.leaf_path`: shape} of a pytree's leaves (Orbax stores
  dataclasses and named tuples as dicts, tuples as lists; the path names
  are the same)."""
  return {sharding.leaf_path(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _describe_mismatch(saved: dict, wanted: dict, limit: int = 5) -> str:
  """Which leaf paths one side lacks or has with another shape; '' if none."""
  show = lambda ps: ', '.join(sorted(ps)[:limit]) + (
      f' (+{len(ps) - limit} more)' if len(ps) > limit else '')
  parts = []
  if missing := set(wanted) - set(saved):
    parts.append(f'{len(missing)} arrays of this config are not in the '
                 f'checkpoint: {show(missing)}')
  if extra := set(saved) - set(wanted):
    parts.append(f'{len(extra)} arrays of the checkpoint are not in this '
                 f'config: {show(extra)}')
  if shape := {p for p in set(saved) & set(wanted) if saved[p] != wanted[p]}:
    p = sorted(shape)[0]
    parts.append(f'{len(shape)} arrays differ in shape, e.g. {p}: '
                 f'{saved[p]} in the checkpoint, {wanted[p]} in this config')
  return '; '.join(parts)


def _steps_newest_first(workdir: str) -> list[int]:
  """The step directories under ``workdir/checkpoints``, newest first."""
  root = os.path.join(workdir, 'checkpoints')
  names = os.listdir(root) if os.path.isdir(root) else []
  return sorted((int(d) for d in names if d.isdigit()), reverse=True)


def _read_metadata(path: str) -> Any:
  """The saved tree of a ``state`` item (dicts of array metadata); None if
  it cannot be read."""
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      saved = checkpointer.metadata(path)
  except Exception:  # pylint: disable=broad-except
    return None
  saved = getattr(saved, 'item_metadata', saved)
  return getattr(saved, 'tree', saved)


def restore_variables(workdir: str, abstract_variables: dict,
                      shardings_of: Callable[[Any], Any],
                      step: int | None = None) -> tuple[dict, int]:
  """The weights a run evaluates with, and nothing else, from ``step``
  or else its latest restorable checkpoint (Orbax partial restore: the
  optimizer state, step and rng are not read).

  The weights are those of `TrainState.inference_variables`: the moving
  average (``ema``) when the checkpoint holds one, else ``params`` and
  ``batch_stats``. A step that cannot be read is skipped with a warning
  (left in place: inference does not change the workdir).

  Args:
    workdir: a ``--workdir`` with ``checkpoints/<step>/state``.
    abstract_variables: {'params', 'batch_stats'} of `jax.ShapeDtypeStruct`
      (the model's, e.g. by `jax.eval_shape` of its init).
    shardings_of: maps a pytree of `jax.ShapeDtypeStruct` laid out as the
      saved state (``{'params', 'batch_stats'}`` or ``{'ema': {...}}``) to
      its shardings (`sharding.state_shardings`), so that each array is
      placed as training placed it.
    step: this step (e.g. `chosen_step`) first, then the latest ones.

  Returns:
    ({'params', 'batch_stats'} of jax.Array on their shardings, step).

  Raises:
    FileNotFoundError: no (restorable) checkpoint step.
    CheckpointMismatchError: the saved weights have other arrays (paths or
      shapes) than ``abstract_variables``: written with another config.
  """
  # Orbax 0.12.8 reads no item metadata through a relative path.
  workdir = os.path.abspath(workdir)
  steps = _steps_newest_first(workdir)
  if step is not None and step in steps:
    steps = [step] + [s for s in steps if s != step]
  for step in steps:
    path = os.path.join(workdir, 'checkpoints', str(step), 'state')
    try:
      restored = _restore_weights(path, abstract_variables, shardings_of)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # Orbax/TensorStore raise many types here.
      logging.warning('Checkpoint step %d in %s cannot be read (%s: %s); '
                      'trying an older one.', step, workdir,
                      type(e).__name__, str(e)[:500])
      continue
    return restored, step
  raise FileNotFoundError(
      f'No restorable checkpoint in {os.path.join(workdir, "checkpoints")} '
      f'(steps {steps}); train first (--mode train) with this --workdir.')


def _restore_weights(path: str, abstract_variables: dict,
                     shardings_of: Callable[[Any], Any]) -> dict:
  """`restore_variables` of one step's ``state`` item at ``path``."""
  saved = _read_metadata(path)
  if saved is None or not hasattr(saved, 'keys'):
    raise FileNotFoundError(f'{path}: no readable state')
  averaged = bool(jax.tree.leaves(saved.get('ema', {})))
  source = saved['ema'] if averaged else saved
  # Empty collections (batch_stats without BatchNorm) hold nothing to read.
  wanted = {k: v for k, v in abstract_variables.items() if jax.tree.leaves(v)}
  have = {k: source.get(k, {}) for k in wanted}
  if mismatch := _describe_mismatch(_leaf_shapes(have), _leaf_shapes(wanted)):
    raise CheckpointMismatchError(
        f'{path} was written with another config: {mismatch}. Run with the '
        'config it was trained with (model size and model.resnet.norm '
        'change the arrays), or use another --workdir.')
  item = {'ema': wanted} if averaged else wanted
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      item, shardings_of(item))
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  restored = restored['ema'] if averaged else restored
  logging.info('Restored the %s of %s (no optimizer state).',
               'moving average of the weights' if averaged else 'weights',
               path)
  return {k: restored.get(k, v) for k, v in abstract_variables.items()}


class Checkpointer:
  """Saves and restores (state, data iterator) pairs in ``workdir``.

  Args:
    workdir: run directory; checkpoints go to ``workdir/checkpoints``.
    max_to_keep: number of most recent checkpoints kept; the step saved
      with the lowest `SELECTION_METRIC` (`save`'s ``metrics``) is kept
      too (Orbax ``LatestN`` or ``BestN(n=1)``).
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    policies = ocp.checkpoint_managers
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=max_to_keep),
        policies.BestN(get_metric_fn=lambda m: m[SELECTION_METRIC],
                       reverse=True, n=1,  # Lowest last: the kept one.
                       keep_checkpoints_without_metrics=False)])
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=keep,
                                             create=True),
        item_names=('state', 'data_iter'))

  def latest_step(self) -> int | None:
    """The newest saved step, None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step (those kept by ``max_to_keep``), increasing."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any,
           data_iter: grain.DatasetIterator | None = None,
           metrics: dict[str, float] | None = None) -> None:
    """Saves asynchronously; call `wait` before reading the files.

    ``metrics``: {`SELECTION_METRIC`: value} of a validation evaluation of
    this state, which decides which step is kept as the best.
    """
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                       metrics=metrics)

  def restore(self, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None,
              step: int | None = None) -> tuple[Any, int]:
    """Restores ``step`` (default: latest restorable) into ``abstract_state``.

    With ``step`` None, a step that fails to restore (a file missing or
    damaged) is logged as a warning, renamed to ``<step>.unrestorable``
    (kept for inspection, no longer listed, so training can save that step
    again) and the next older step is tried.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings
        (`train_state.abstract_train_state`): the restore target.
      data_iter: if given, its position is restored in place too.
      step: checkpoint step; None for the latest restorable one.

    Returns:
      (state, step).

    Raises:
      FileNotFoundError: if there is no (restorable) checkpoint.
      CheckpointMismatchError: the checkpoint's state is readable but has
        other arrays (paths or shapes) than ``abstract_state``: it was
        written with another config. Nothing is renamed.
    """
    if step is not None:
      return self._restore_step(step, abstract_state, data_iter), step
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {self.directory}; train '
                              'first (--mode train) with this --workdir.')
    for i, s in enumerate(steps):
      try:
        return self._restore_step(s, abstract_state, data_iter), s
      except Exception as e:  # Orbax/TensorStore raise many types here.
        self._raise_if_mismatch(s, abstract_state)
        nxt = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) \
            else 'no older checkpoint'
        logging.warning('Checkpoint step %d in %s cannot be restored (%s: '
                        '%s); %s.', s, self.directory, type(e).__name__,
                        str(e)[:500], nxt)
        self._set_aside(s)
    raise FileNotFoundError(f'No restorable checkpoint in {self.directory} '
                            f'(tried steps {steps}).')

  def _restore_step(self, step: int, abstract_state: Any,
                    data_iter: grain.DatasetIterator | None) -> Any:
    absent = _absent_empty_fields(abstract_state, self._saved_tree(step))
    target = abstract_state
    if absent:  # Written before these (empty) fields existed.
      target = {f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state)
                if f.name not in absent}
    items = {'state': ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    if absent:
      return abstract_state.replace(**restored['state'])
    return restored['state']

  def _saved_tree(self, step: int) -> Any:
    """The metadata tree of step's saved state (dicts of array metadata);
    None if it cannot be read."""
    path = os.path.join(self.directory, str(step), 'state')
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path)
      return getattr(saved, 'item_metadata', saved)
    except Exception:  # pylint: disable=broad-except
      return None

  def _raise_if_mismatch(self, step: int, abstract_state: Any) -> None:
    """Raises `CheckpointMismatchError` if step's saved state tree is
    readable and differs from ``abstract_state``; returns if it matches or
    cannot be read (then the step is damaged, not mismatched)."""
    saved = self._saved_tree(step)
    if saved is None:
      return
    saved = _leaf_shapes(saved)
    if not saved:  # Orbax reads a missing or emptied item as empty.
      return
    if mismatch := _describe_mismatch(saved, _leaf_shapes(abstract_state)):
      raise CheckpointMismatchError(
          f'Checkpoint step {step} in {self.directory} was written with '
          f'another config: {mismatch}. Run with the config it was trained '
          'with (model size, model.resnet.norm, model.resnet.frozen_stages and '
          'optim.ema_decay change the arrays; a frozen backbone also changes the '
          'optimizer state), '
          'or use another --workdir.')

  def _set_aside(self, step: int) -> None:
    """Renames an unrestorable step directory so it is no longer listed."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = src + UNRESTORABLE_SUFFIX
      n = 1
      while os.path.exists(dst):
        dst, n = f'{src}{UNRESTORABLE_SUFFIX}.{n}', n + 1
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_checkpoint_{step}')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
