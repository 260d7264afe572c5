r"""Side by side with DeepLabCut 3 on the same project, frames and CPU.

Runs, one after the other on the same cores: DeepLabCut's default
single-animal model (``resnet_50``, PyTorch engine) and ours on a COPY of a
DeepLabCut project, with exactly the train/test frames our import
(``data_prep/dlc_project.py``) uses; each trains for at most the same
wall-clock budget; then both evaluate the test frames, and (with
``--video``) both analyse a video, alternating DeepLabCut / ours /
DeepLabCut. Setup, the commands and the results: docs/peers.md.

  python tools/dlc_compare.py --dlc_python /work/dlc_venv/bin/python \
      --project ../shared/data/dlc_projects/openfield-Pranav-2018-10-30 \
      --config configs/dlc_openfield.py --budget_s 1800 \
      --video ../shared/data/dlc_projects/openfield-Pranav-2018-10-30/videos/m3v1mp4.mp4 \
      --workdir /tmp/dlc_compare --out /tmp/dlc_compare/openfield.json

Reported (JSON at ``--out``, a Markdown summary on stdout):

* test error in pixels on the same frames: DeepLabCut's own
  ``evaluate_network`` figures ("test rmse" and "test rmse_pcutoff", which
  are, as DeepLabCut computes them, the mean Euclidean distance over
  labelled body parts, not a root of a mean square), our ``eval``'s
  ``mean_error_px``, and both tools' predictions scored by one function
  here (`keypoint_errors`), overall, with the project's ``pcutoff`` and per
  body part; body parts unlabelled in a test frame (absent) and what each
  tool said about them;
* peak RSS of each training process (``os.wait4``'s ``ru_maxrss``, the
  process and the children it waited for), its wall time and whether the
  budget cut it;
* video analysis: frames/s of ``deeplabcut.analyze_videos`` and of our
  ``--mode analyze`` (frames over the command's wall time and each tool's
  own figure), batch sizes, and the median distance in pixels per body part
  between the two tools' trajectories (`trajectory_distance`).

``--holdout F`` is the selection run: F of OUR TRAINING frames become the
"test" split for both tools (the real test frames are left out of both),
so that settings (steps, epochs, batch sizes) are chosen before a test
figure exists. The real run is the same command without ``--holdout``.

This file runs under two interpreters: our environment (the driver) and
DeepLabCut's (``--dlc_python``, the ``_dlc`` sub-command). Its top level
imports only the standard library, numpy and pandas, which both have.
DeepLabCut is never a dependency of the project.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

# Our side: every command this tool runs, in one place, as README.md and
# docs/usage.md / docs/lab_workflow.md give them. Update here when the
# command line changes (/work/notes/config_map.json: config names).
OURS = dict(
    build_dlc=['-m', 'data_prep.build', '--dlc_project', '{project}',
               '--dlc_train_fraction', '{fraction}', '--out', '{data}',
               '--overwrite'],
    build_coco=['-m', 'data_prep.build', '--unlabelled_means=absent',
                '--image-root', '{project}/labeled-data',
                '--annotations', 'train={train_json}',
                '--annotations', 'test={test_json}', '--out', '{data}',
                '--overwrite'],
    train=['-m', 'kpseq_jax.main', '--config', '{config}', '--workdir',
           '{run}', '--config.dataset_dir={data}',
           '--config.num_train_steps={steps}',
           '--config.checkpoint_every_steps={checkpoint_every}',
           '--config.eval_every_steps=0'],
    eval=['-m', 'kpseq_jax.main', '--config', '{config}', '--workdir',
          '{run}', '--config.dataset_dir={data}', '--mode', 'eval'],
    analyze=['-m', 'kpseq_jax.main', '--mode', 'analyze', '--config',
             '{config}', '--workdir', '{run}', '--config.dataset_dir={data}',
             '--videos', '{video}', '--boxes', 'track',
             '--video_batch_size', '{batch}', '--out', '{out}'],
)


def ours_command(name: str, **fields) -> list[str]:
  """``python`` + the `OURS` command ``name`` with ``{fields}`` filled in."""
  return [sys.executable] + [a.format(**fields) for a in OURS[name]]


# -- Pure parts (tests/test_dlc_compare.py) --------------------------------


def frame_name(entry) -> str:
  """A labels-table row's frame as ``'<video>/<img>.png'``.

  ``entry``: ``'labeled-data/m4s1/img0000.png'`` (either slash) or the
  row MultiIndex tuple ``('labeled-data', 'm4s1', 'img0000.png')``; the
  key `data_prep.dlc_project.frame_name` gives our import's frames.
  """
  parts = ([str(p) for p in entry] if isinstance(entry, tuple)
           else str(entry).replace('\\', '/').split('/'))
  parts = [p for p in parts if p]
  if 'labeled-data' in parts:
    parts = parts[parts.index('labeled-data') + 1:]
  return '/'.join(parts[-2:])


def dlc_indices(dlc_index, frames: list[str]) -> list[int]:
  """Row numbers in DeepLabCut's merged labels table of our frames.

  Args:
    dlc_index: the row index of the table DeepLabCut's
      ``merge_annotateddatasets`` returns (what ``create_training_dataset``'s
      ``trainIndices``/``testIndices`` count in), entries as `frame_name`
      takes them.
    frames: our split's frames, ``'<video>/<img>.png'`` (COCO file_name).

  Returns:
    One 0-based row number per frame, in ``frames``' order.

  Raises:
    ValueError: a frame is not in DeepLabCut's table (named), or a frame
      appears in it twice.
  """
  rows = {}
  for i, entry in enumerate(dlc_index):
    name = frame_name(entry)
    if name in rows:
      raise ValueError(f'DeepLabCut table lists frame {name} twice '
                       f'(rows {rows[name]} and {i})')
    rows[name] = i
  missing = [f for f in frames if f not in rows]
  if missing:
    raise ValueError(f'{len(missing)} of our frames are not in DeepLabCut\'s '
                     f'labels table, e.g. {missing[:3]}')
  return [rows[f] for f in frames]


def holdout_split(train: list[str], fraction: float, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
  """The selection run's split of OUR TRAINING frames: (fit, held out).

  ``int(len(train) * fraction)`` frames (at least 1) drawn with
  ``numpy.random.RandomState(seed).permutation`` are held out; both lists
  sorted. Raises ValueError when either part would be empty.
  """
  n_out = max(1, int(len(train) * fraction))
  if not 0 < fraction < 1 or n_out >= len(train):
    raise ValueError(f'--holdout {fraction} of {len(train)} training frames '
                     'leaves a part empty')
  order = np.random.RandomState(seed).permutation(len(train))
  out = sorted(train[i] for i in order[:n_out])
  fit = sorted(train[i] for i in order[n_out:])
  return fit, out


def keypoint_errors(pred: np.ndarray, gt: np.ndarray,
                    score: np.ndarray | None = None,
                    pcutoff: float | None = None) -> dict:
  """Euclidean errors of labelled keypoints, as DeepLabCut scores them.

  DeepLabCut's "RMSE" (``evaluate_network``) is the mean over labelled
  (frame, body part) pairs of ``||pred - gt||`` in pixels, and its
  "rmse_pcutoff" the same over those with likelihood >= pcutoff
  (deeplabcut/pose_estimation_pytorch/apis/evaluation.py); this is that,
  for either tool's predictions.

  Args:
    pred: float [N, K, 2] pixels; NaN = the tool gave no position.
    gt: float [N, K, 2] pixels; NaN = not labelled in that frame.
    score: float [N, K] confidence, needed with ``pcutoff``.
    pcutoff: keep predictions with ``score >= pcutoff`` only.

  Returns:
    ``mean_px`` (NaN if nothing counts), ``rmse_px`` (root of the mean
    square, for reference), ``median_px``, ``per_keypoint_px`` (K means),
    ``counted`` (pairs scored), ``labelled`` (labelled pairs), ``no_position``
    (labelled pairs without a prediction).

  Raises:
    ValueError: shapes differ, or ``pcutoff`` without ``score``.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
    raise ValueError(f'pred {pred.shape} and gt {gt.shape} must both be '
                     '[N, K, 2]')
  labelled = np.isfinite(gt).all(-1)
  has_pred = np.isfinite(pred).all(-1)
  use = labelled & has_pred
  if pcutoff is not None:
    if score is None:
      raise ValueError('pcutoff needs score')
    use &= np.nan_to_num(np.asarray(score, np.float64), nan=-1.0) >= pcutoff
  dist = np.linalg.norm(np.where(use[..., None], pred - gt, 0.0), axis=-1)
  d = dist[use]
  per_k = [float(dist[:, k][use[:, k]].mean()) if use[:, k].any()
           else float('nan') for k in range(gt.shape[1])]
  nan = float('nan')
  return dict(mean_px=float(d.mean()) if d.size else nan,
              rmse_px=float(np.sqrt((d ** 2).mean())) if d.size else nan,
              median_px=float(np.median(d)) if d.size else nan,
              per_keypoint_px=per_k, counted=int(use.sum()),
              labelled=int(labelled.sum()),
              no_position=int((labelled & ~has_pred).sum()))


def trajectory_distance(a: np.ndarray, b: np.ndarray) -> dict:
  """Per body part, the median distance between two tools' trajectories.

  Args:
    a, b: float [T, K, 2] pixels per video frame (frame t of both is the
      same frame); NaN where a tool has no position.

  Returns:
    ``median_px`` (K floats; NaN where no frame has both), ``frames_both``
    (K ints), ``frames`` (T). Raises ValueError on different shapes.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 3:
    raise ValueError(f'trajectories {a.shape} and {b.shape} differ')
  both = np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
  dist = np.linalg.norm(a - b, axis=-1)
  med = [float(np.median(dist[both[:, k], k])) if both[:, k].any()
         else float('nan') for k in range(a.shape[1])]
  return dict(median_px=med, frames_both=both.sum(0).tolist(),
              frames=int(a.shape[0]))


def dlc_table_xy(df: pd.DataFrame, bodyparts: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(xy float [T, K, 2], likelihood float [T, K]) from a DeepLabCut table.

  ``df``: columns ``scorer / bodyparts / coords`` (x, y[, likelihood]), as
  ``analyze_videos`` and our ``--mode analyze`` write them, or as a labels
  table. A missing likelihood column is NaN. Raises KeyError naming a body
  part without x/y columns.
  """
  cols = df.columns
  xy = np.full((len(df), len(bodyparts), 2), np.nan)
  like = np.full((len(df), len(bodyparts)), np.nan)
  for k, bp in enumerate(bodyparts):
    sel = {c[-1]: c for c in cols if c[-2] == bp}
    if 'x' not in sel or 'y' not in sel:
      raise KeyError(f'table has no x/y columns for body part {bp!r}')
    xy[:, k, 0] = pd.to_numeric(df[sel['x']], errors='coerce')
    xy[:, k, 1] = pd.to_numeric(df[sel['y']], errors='coerce')
    if 'likelihood' in sel:
      like[:, k] = pd.to_numeric(df[sel['likelihood']], errors='coerce')
  return xy, like


def coco_prediction_xy(results: list[dict], image_ids: list[int], k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Our ``predictions_<split>.json`` as (xy [N, K, 2], score [N, K]).

  Rows follow ``image_ids``; a keypoint with v = 0 (not generated, or
  predicted absent) is NaN, as DeepLabCut has no position for it; an image
  without a result is all NaN. ``keypoint_scores`` missing: scores NaN.
  """
  by_id = {int(r['image_id']): r for r in results}
  xy = np.full((len(image_ids), k, 2), np.nan)
  score = np.full((len(image_ids), k), np.nan)
  for i, image_id in enumerate(image_ids):
    r = by_id.get(int(image_id))
    if r is None:
      continue
    kp = np.asarray(r['keypoints'], np.float64).reshape(k, 3)
    vis = kp[:, 2] > 0
    xy[i][vis] = kp[vis, :2]
    if 'keypoint_scores' in r:
      score[i] = r['keypoint_scores']
  return xy, score
