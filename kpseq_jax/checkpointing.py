"""One Orbax `CheckpointManager` for the train state and the data iterator.

Checkpoints live in ``WORKDIR/checkpoints/<step>/`` with two items:
``state`` (the `TrainState`, restored straight into its shardings) and
``data_iter`` (the Grain iterator's position, one JSON file per process), so
a resumed run sees exactly the batches an uninterrupted run would have seen.
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save is never listed as a step.
"""

import os
from typing import Any

from absl import logging
import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, data iterator) pairs in ``workdir``.

  Args:
    workdir: run directory; checkpoints go to ``workdir/checkpoints``.
    max_to_keep: number of most recent checkpoints kept.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=('state', 'data_iter'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any,
           data_iter: grain.DatasetIterator | None = None) -> None:
    """Saves asynchronously; call `wait` before reading the files."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None,
              step: int | None = None) -> tuple[Any, int]:
    """Restores ``step`` (default: latest) into ``abstract_state``'s layout.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings
        (`train_state.abstract_train_state`): the restore target.
      data_iter: if given, its position is restored in place too.
      step: checkpoint step; None for the latest.

    Returns:
      (state, step).

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}; train '
                              'first (--mode train) with this --workdir.')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return restored['state'], step

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
