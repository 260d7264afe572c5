"""TensorBoard metric writer that needs no TensorFlow.

`clu.metric_writers` imports TensorFlow, which this project does not
install, so events are written with tensorboardX's ``SummaryWriter`` behind
the same method names as clu's ``MetricWriter`` (``write_scalars``,
``write_images``, ``flush``, ``close``). Event files go to
``WORKDIR/tensorboard``; ``tensorboard --logdir WORKDIR/tensorboard`` shows
them. Only process 0 writes; on other processes every call is a no-op.
"""

import os
import re
from typing import Mapping

import jax
import numpy as np
import tensorboardX

SUBDIR = 'tensorboard'


def tag(name: str) -> str:
  r"""A legal TensorBoard tag: characters other than ``[\w./-]`` become _."""
  return re.sub(r'[^\w./-]', '_', name)


def logdir(workdir: str) -> str:
  """The event-file directory of ``workdir``."""
  return os.path.join(workdir, SUBDIR)


class MetricWriter:
  """Scalars and images to TensorBoard event files (process 0 only).

  Usable as a context manager; `close` flushes.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    """Opens (appends to) ``logdir(workdir)``.

    Args:
      workdir: the run's workdir.
      enabled: write events; default: only on process 0.
    """
    if enabled is None:
      enabled = jax.process_index() == 0
    self._writer = (tensorboardX.SummaryWriter(logdir(workdir), flush_secs=30)
                    if enabled else None)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One scalar event per name (made a legal `tag`) at ``step``."""
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(tag(name), float(value), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """One image event per tag; images are uint8 [H, W, 3]."""
    if self._writer is None:
      return
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'image {name!r}: expected uint8 [H, W, 3], got '
                         f'{image.dtype} {image.shape}.')
      self._writer.add_image(tag(name), image, int(step), dataformats='HWC')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
