"""Trajectory figure of a video's poses (matplotlib's Agg canvas, no pyplot).

One column per body part: on top its path in the image (x, y pixels, y
down as in the frame, the frame's extent), below x and y against the frame
number. Colours are the overlays' (`visualize.keypoint_colors`), so a body
part has the same colour here and in the labelled video. The line joins
every generated keypoint; dots mark those with a likelihood of at least
``pcutoff`` (the points DeepLabCut's ``plot_trajectories`` keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TYPE_CHECKING

import numpy as np

from kpseq_jax.data import visualize

if TYPE_CHECKING:
  from matplotlib import figure


def plot_trajectories(keypoints_px: np.ndarray, likelihood: np.ndarray,
                      names: Sequence[str], width: int, height: int,
                      path: str | Path, pcutoff: float = 0.6,
                      title: str = '') -> figure.Figure:
  """Draws the figure and saves it as a PNG (100 dpi, 320 K x 600 pixels).

  Args:
    keypoints_px: float [N, K, 2] pixels per frame (NaN = not generated).
    likelihood: float [N, K] in [0, 1] or NaN.
    names: K body part names.
    width, height: the frame size in pixels (axis extent).
    path: the PNG to write.
    pcutoff: likelihood threshold (see module docstring).
    title: figure title, e.g. the video's name.

  Returns:
    The figure; ``fig.axes[j]`` holds body part j's path and dots,
    ``fig.axes[K + j]`` its x and y against the frame number.
  """
  n, k = likelihood.shape
  xy = np.array(keypoints_px, np.float64)
  with np.errstate(invalid='ignore'):
    hide = ~np.isnan(likelihood) & (likelihood < pcutoff)
  sure = xy.copy()
  sure[hide] = np.nan
  colors = [tuple(c / 255 for c in rgb) for rgb in visualize.keypoint_colors(k)]
  frames = np.arange(n)
  from matplotlib import figure  # Here: matplotlib costs ~1 s to import.
  fig = figure.Figure(figsize=(3.2 * k, 6.0))
  axes = fig.subplots(2, k, squeeze=False,
                      gridspec_kw=dict(height_ratios=[1.3, 1]))
  for j in range(k):
    top, bottom = axes[0, j], axes[1, j]
    top.plot(xy[:, j, 0], xy[:, j, 1], '-', color=colors[j], lw=0.6, alpha=0.6)
    top.plot(sure[:, j, 0], sure[:, j, 1], '.', color=colors[j], ms=2)
    top.set(xlim=(0, width), ylim=(height, 0), aspect='equal', title=names[j],
            xlabel='x (px)')
    if j == 0:
      top.set_ylabel('y (px)')
    bottom.plot(frames, xy[:, j, 0], '-', color=colors[j], lw=0.8, label='x')
    bottom.plot(frames, xy[:, j, 1], '--', color=colors[j], lw=0.8, label='y')
    bottom.set(xlabel='frame', xlim=(0, max(n - 1, 1)))
    if j == 0:
      bottom.set_ylabel('pixels')
      bottom.legend(loc='upper right', fontsize='small')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)  # Agg: Figure.savefig needs no pyplot.
  return fig
