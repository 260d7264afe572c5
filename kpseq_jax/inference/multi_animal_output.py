"""Tracked multi-animal poses in the files users open in SLEAP and DeepLabCut.

Input, for F analysed frames and at most N animals per frame (slot n of a
frame is whatever instance the tracker gave; ``track_ids`` says who):
  keypoints_px: float [F, N, K, 2] image pixels, NaN = not predicted;
  point_scores: float [F, N, K] per-keypoint confidence in [0, 1] (NaN =
    none measured);
  instance_scores: float [F, N];
  track_ids: int [F, N] index into ``track_names``; -1 = no instance.

* `write_slp`: a SLEAP ``.slp`` written with sleap-io: one `Skeleton`, one
  `Video` (the analysed file, not embedded), one `Track` per identity, a
  `PredictedInstance` per tracked animal with its point scores, instance
  score and ``tracking_score`` (SLEAP's proofreading GUI shows it); SLEAP
  opens it (File > Open) with the video beside it.
* `dlc_tracks_table` / `write_dlc_tracks`: DeepLabCut's multi-animal table:
  one row per frame, columns MultiIndex ``scorer / individuals /
  bodyparts / coords`` with coords ``x, y, likelihood``, individuals named
  after the tracks (DeepLabCut's own default is ``ind1``, ``ind2``, ...),
  saved as ``to_hdf(key='tracks', format='table', mode='w')`` and a
  ``.csv`` with 4 header rows: the layout DeepLabCut's ``stitch_tracklets``
  writes (``TrackletStitcher.format_df`` / ``write_tracks``) and its
  ``create_labeled_video`` / ``filterpredictions`` read.
"""

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import sleap_io

DLC_H5_KEY = 'tracks'
COORDS = ('x', 'y', 'likelihood')


def _check(keypoints_px, point_scores, instance_scores, track_ids,
           track_names, node_names):
  """Raises ValueError naming the field whose shape disagrees."""
  f, n, k, _ = np.shape(keypoints_px)
  expected = {'keypoints_px': (f, n, k, 2), 'point_scores': (f, n, k),
              'instance_scores': (f, n), 'track_ids': (f, n)}
  given = {'keypoints_px': keypoints_px, 'point_scores': point_scores,
           'instance_scores': instance_scores, 'track_ids': track_ids}
  for name, shape in expected.items():
    if np.shape(given[name]) != shape:
      raise ValueError(f'{name}: shape {np.shape(given[name])}, expected '
                       f'{shape}')
  if len(node_names) != k:
    raise ValueError(f'{len(node_names)} node names for {k} keypoints')
  ids = np.asarray(track_ids)
  if ids.size and ids.max() >= len(track_names):
    raise ValueError(f'track id {ids.max()} but {len(track_names)} track '
                     'names')


def write_slp(path: str | Path, video_path: str | Path,
              keypoints_px: np.ndarray, point_scores: np.ndarray,
              instance_scores: np.ndarray, track_ids: np.ndarray,
              track_names: Sequence[str], node_names: Sequence[str],
              edges: Sequence[tuple[int, int]] = (),
              frame_indices: Sequence[int] | None = None) -> Path:
  """Writes the tracked predictions as a SLEAP ``.slp``.

  Args:
    path: the ``.slp`` to write.
    video_path: the analysed video (stored as its absolute path, not
      embedded; SLEAP asks for it if it has moved).
    keypoints_px, point_scores, instance_scores, track_ids: see the module
      docstring.
    track_names: the identities' names.
    node_names: the K skeleton node names; edges: node index pairs.
    frame_indices: the video frame of each of the F rows (default 0..F-1).

  Returns:
    ``path``. Frames with no instance are not written.

  Raises:
    ValueError: shapes, names or ids disagree (`_check`).
  """
  _check(keypoints_px, point_scores, instance_scores, track_ids,
         track_names, node_names)
  skeleton = sleap_io.Skeleton(nodes=list(node_names),
                               edges=[tuple(map(int, e)) for e in edges])
  video = sleap_io.Video(filename=str(Path(video_path).resolve()),
                         open_backend=False)
  tracks = [sleap_io.Track(name=str(n)) for n in track_names]
  frames = []
  rows = range(len(track_ids)) if frame_indices is None else frame_indices
  for f, frame in enumerate(rows):
    instances = [
        sleap_io.PredictedInstance.from_numpy(
            np.asarray(keypoints_px[f, n], np.float64), skeleton=skeleton,
            point_scores=np.nan_to_num(np.asarray(point_scores[f, n],
                                                  np.float64)),
            score=float(instance_scores[f, n]), track=tracks[t],
            tracking_score=1.0)
        for n, t in enumerate(track_ids[f]) if t >= 0]
    if instances:
      frames.append(sleap_io.LabeledFrame(video=video, frame_idx=int(frame),
                                          instances=instances))
  labels = sleap_io.Labels(labeled_frames=frames, videos=[video],
                           skeletons=[skeleton], tracks=tracks)
  sleap_io.save_slp(labels, str(path), verbose=False)
  return Path(path)


def dlc_tracks_table(keypoints_px: np.ndarray, point_scores: np.ndarray,
                     track_ids: np.ndarray, track_names: Sequence[str],
                     node_names: Sequence[str], scorer: str,
                     num_frames: int | None = None,
                     frame_indices: Sequence[int] | None = None
                     ) -> pd.DataFrame:
  """DeepLabCut's multi-animal table (module docstring).

  Args:
    keypoints_px, point_scores, track_ids: see the module docstring.
    track_names: the ``individuals`` level, in column order.
    node_names: the ``bodyparts`` level.
    scorer: the ``scorer`` level (names the model).
    num_frames: rows of the table (default: last frame + 1); frames not
      analysed and animals not seen are NaN.
    frame_indices: the video frame of each of the F rows (default 0..F-1).

  Returns:
    DataFrame [num_frames, len(track_names) * K * 3] float64, index
    0..num_frames-1.
  """
  f, _, k, _ = np.shape(keypoints_px)
  _check(keypoints_px, point_scores, np.zeros(np.shape(track_ids)),
         track_ids, track_names, node_names)
  frames = np.arange(f) if frame_indices is None else np.asarray(frame_indices)
  num_frames = int(frames.max(initial=-1)) + 1 if num_frames is None \
      else num_frames
  values = np.full((num_frames, len(track_names), k, 3), np.nan)
  for row, frame in enumerate(frames):
    for n, t in enumerate(track_ids[row]):
      if t >= 0:
        values[frame, t, :, :2] = keypoints_px[row, n]
        values[frame, t, :, 2] = point_scores[row, n]
  columns = pd.MultiIndex.from_product(
      [[scorer], list(track_names), list(node_names), COORDS],
      names=['scorer', 'individuals', 'bodyparts', 'coords'])
  return pd.DataFrame(values.reshape(num_frames, -1), columns=columns,
                      index=np.arange(num_frames))


def write_dlc_tracks(df: pd.DataFrame, path_h5: str | Path
                     ) -> tuple[Path, Path]:
  """Writes ``path_h5`` (key ``tracks``, table format) and the ``.csv``
  beside it, as DeepLabCut's ``stitch_tracklets`` does; returns both."""
  path_h5 = Path(path_h5)
  df.to_hdf(path_h5, key=DLC_H5_KEY, format='table', mode='w')
  path_csv = path_h5.with_suffix('.csv')
  df.to_csv(path_csv)
  return path_h5, path_csv


def read_dlc_tracks(path: str | Path) -> pd.DataFrame:
  """Reads a table written by `write_dlc_tracks` (or DeepLabCut)."""
  path = Path(path)
  if path.suffix == '.csv':
    return pd.read_csv(path, header=[0, 1, 2, 3], index_col=0)
  return pd.read_hdf(path, key=DLC_H5_KEY)
