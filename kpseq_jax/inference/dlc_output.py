"""Pose tables in DeepLabCut's analysis format, and its median filter.

DeepLabCut's ``analyze_videos`` writes ``<video stem><scorer>.h5`` (and
``.csv``): a pandas DataFrame, one row per frame (index 0..N-1), columns a
MultiIndex with levels ``scorer / bodyparts / coords`` and coords
``x, y, likelihood`` per body part, saved with
``to_hdf(path, key='df_with_missing', format='table', mode='w')``
(deeplabcut/pose_estimation_tensorflow/predict_videos.py, ``save_data``).
Tools built on DeepLabCut (its own plotting, SimBA, ...) read exactly that.

``likelihood``: with the workdir's ``calibration.json``, the calibrated
probability that the body part is (visible and) within the map's radius of
the truth (`likelihood.CalibrationMap`); without one, the raw per-keypoint
confidence in [0, 1] (`Prediction.confidence`, times `Prediction.presence`
for a model with an ``<absent>`` token; `analyze.likelihood_of`), as
before. DeepLabCut's tools treat a
likelihood below ``pcutoff`` as not detected. A keypoint the model did not
generate has x = y = likelihood = NaN.

`median_filter` is DeepLabCut's ``filterpredictions(filtertype='median')``:
``scipy.signal.medfilt`` with an odd window over each x and y column
(likelihood unchanged), saved as ``<stem><scorer>_filtered.h5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import signal

H5_KEY = 'df_with_missing'
COORDS = ('x', 'y', 'likelihood')


def pose_table(keypoints_px: np.ndarray, likelihood: np.ndarray,
               bodyparts: Sequence[str], scorer: str) -> pd.DataFrame:
  """DeepLabCut's analysis table.

  Args:
    keypoints_px: float [N, K, 2] image pixels per frame (NaN = not
      generated).
    likelihood: float [N, K], in [0, 1] or NaN (see module docstring).
    bodyparts: the K names.
    scorer: the ``scorer`` level's value (names the model).

  Returns:
    DataFrame [N, 3K] float64, index 0..N-1, columns MultiIndex
    (scorer, bodyparts, coords).

  Raises:
    ValueError: shapes do not agree.
  """
  n, k = np.shape(likelihood)
  if np.shape(keypoints_px) != (n, k, 2) or len(bodyparts) != k:
    raise ValueError(f'keypoints {np.shape(keypoints_px)}, likelihood '
                     f'{np.shape(likelihood)} and {len(bodyparts)} body '
                     'parts do not agree')
  values = np.concatenate([np.asarray(keypoints_px, np.float64),
                           np.asarray(likelihood, np.float64)[..., None]],
                          axis=-1).reshape(n, 3 * k)
  columns = pd.MultiIndex.from_product([[scorer], list(bodyparts), COORDS],
                                       names=['scorer', 'bodyparts', 'coords'])
  return pd.DataFrame(values, columns=columns, index=np.arange(n))


def write_table(df: pd.DataFrame, path_h5: str | Path) -> tuple[Path, Path]:
  """Writes ``path_h5`` (key ``df_with_missing``, table format) and the
  ``.csv`` beside it; returns both paths."""
  path_h5 = Path(path_h5)
  df.to_hdf(path_h5, key=H5_KEY, format='table', mode='w')
  path_csv = path_h5.with_suffix('.csv')
  df.to_csv(path_csv)
  return path_h5, path_csv


def median_filter(df: pd.DataFrame, window: int) -> pd.DataFrame:
  """DeepLabCut's median filter of the x and y columns.

  ``scipy.signal.medfilt(column, window)`` (zero-padded at both ends, as
  there). NaN runs (keypoints not generated) are first filled by linear
  interpolation so that one gap does not spread, then set back to NaN.

  Args:
    df: a `pose_table`.
    window: odd window length in frames, >= 3.

  Raises:
    ValueError: an even or too small window.
  """
  if window < 3 or window % 2 == 0:
    raise ValueError(f'median filter window must be odd and >= 3, got {window}')
  out = df.copy()
  for col in df.columns:
    if col[-1] == 'likelihood':
      continue
    values = df[col].to_numpy(np.float64)
    missing = ~np.isfinite(values)
    if missing.all():
      continue
    filled = pd.Series(values).interpolate(limit_direction='both').to_numpy()
    smooth = signal.medfilt(filled, window)
    smooth[missing] = np.nan
    out[col] = smooth
  return out


def table_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
  """(float [N, K, 2] x/y pixels, float [N, K] likelihood) of a table."""
  k = len(df.columns) // 3
  v = df.to_numpy(np.float64).reshape(len(df), k, 3)
  return v[..., :2], v[..., 2]
