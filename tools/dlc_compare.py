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
from fractions import Fraction
import json
import os
from pathlib import Path
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
           '{run}', '--config.input.dataset_dir={data}',
           '--config.optim.num_train_steps={steps}',
           '--config.checkpoint_every_steps={checkpoint_every}',
           '--config.evals.every_steps=0'],
    eval=['-m', 'kpseq_jax.main', '--config', '{config}', '--workdir',
          '{run}', '--config.input.dataset_dir={data}', '--mode', 'eval'],
    analyze=['-m', 'kpseq_jax.main', '--mode', 'analyze', '--config',
             '{config}', '--workdir', '{run}', '--config.input.dataset_dir={data}',
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


# -- Running a process under the budget --------------------------------------


def run_timed(cmd: list[str], log_path: Path, budget_s: float | None = None,
              env: dict | None = None, cwd: Path = REPO) -> dict:
  """Runs ``cmd`` (its own process group), stopping it at ``budget_s``.

  Returns:
    ``wall_s``, ``cut`` (stopped by the budget: SIGTERM to the group, then
    SIGKILL after 30 s), ``returncode``, ``peak_rss_mb`` (``os.wait4``'s
    ``ru_maxrss``: the largest of the process and the children it waited
    for, KiB on Linux -> MiB) and ``log`` (stdout and stderr).

  Raises:
    RuntimeError: the command failed before the budget (names the log).
  """
  print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
  t0 = time.time()
  with open(log_path, 'w') as log:
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                         env=env, start_new_session=True)
    cut = threading.Event()

    def stop():
      cut.set()
      os.killpg(p.pid, signal.SIGTERM)
      time.sleep(30)
      if p.returncode is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    timer = (threading.Timer(budget_s, stop) if budget_s else None)
    if timer:
      timer.daemon = True
      timer.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if timer:
      timer.cancel()
  out = dict(wall_s=time.time() - t0, cut=cut.is_set(),
             returncode=p.returncode, peak_rss_mb=usage.ru_maxrss / 1024,
             log=str(log_path))
  if p.returncode != 0 and not cut.is_set():
    raise RuntimeError(f'{cmd[:4]} failed ({p.returncode}); see {log_path}')
  return out


def thread_env(threads: int) -> dict:
  """The environment of every run: ``threads`` BLAS/OpenMP threads, no hub.

  JAX on the CPU uses every core it sees; PyTorch follows
  ``OMP_NUM_THREADS`` (and the worker calls ``torch.set_num_threads``).
  ``HF_HUB_OFFLINE=1``: a weight download DeepLabCut would try fails at
  once instead of waiting on the closed network.
  """
  env = dict(os.environ, OMP_NUM_THREADS=str(threads),
             MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1',
             DLClight='True', MPLBACKEND='Agg')
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  return env


# -- DeepLabCut's side (runs under --dlc_python) -----------------------------


def _dlc_create(a) -> dict:
  """DeepLabCut's training set with our frames; resnet_50 from scratch."""
  import deeplabcut  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from deeplabcut.generate_training_dataset import trainingsetmanipulation as tsm  # pylint: disable=g-import-not-at-top
  from deeplabcut.pose_estimation_pytorch.models.model import PoseModel  # pylint: disable=g-import-not-at-top
  from deeplabcut.utils import auxiliaryfunctions  # pylint: disable=g-import-not-at-top
  split = json.loads(Path(a.split).read_text())
  cfg = auxiliaryfunctions.read_config(a.project_config)
  folder = Path(a.project_config).parent / auxiliaryfunctions.get_training_set_folder(cfg)
  folder.mkdir(parents=True, exist_ok=True)
  table = tsm.merge_annotateddatasets(cfg, folder)
  train = dlc_indices(table.index, split['train'])
  test = dlc_indices(table.index, split['test'])
  deeplabcut.create_training_dataset(
      a.project_config, Shuffles=[1], trainIndices=[train],
      testIndices=[test], net_type=a.net_type, engine=deeplabcut.Engine.PYTORCH,
      userfeedback=False)
  # From scratch: train() builds the backbone with ImageNet weights unless it
  # is given a snapshot (pose_estimation_pytorch/apis/training.py, train:
  # `elif snapshot_path is not None: pretrained = False`); a
  # `model.backbone.pretrained: false` in pytorch_config.yaml is overwritten
  # by PoseModel.build. So: DeepLabCut's own random initialisation, saved.
  from deeplabcut.pose_estimation_pytorch.config import read_config_as_dict  # pylint: disable=g-import-not-at-top
  # The folder is named after the fraction of the indices given
  # (trainset<percent>shuffle1), not config.yaml's TrainingFraction.
  folder = max((Path(a.project_config).parent / 'dlc-models-pytorch').glob(
      'iteration-*/*shuffle1'), key=lambda p: p.stat().st_mtime)
  pose_cfg_path = folder / 'train' / 'pytorch_config.yaml'
  pose_cfg = read_config_as_dict(pose_cfg_path)
  torch.manual_seed(pose_cfg['train_settings'].get('seed', 42))
  model = PoseModel.build(pose_cfg['model'], pretrained_backbone=False)
  init = folder / 'train' / 'init-random.pt'
  torch.save(dict(model=model.state_dict()), init)
  rows = list(table.index)
  return dict(train_indices=train, test_indices=test,
              train_frames=[frame_name(rows[i]) for i in train],
              test_frames=[frame_name(rows[i]) for i in test],
              model_folder=str(folder), init_snapshot=str(init),
              pytorch_config=str(pose_cfg_path))


def _dlc_train(a) -> dict:
  import deeplabcut  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  deeplabcut.train_network(
      a.project_config, shuffle=1, trainingsetindex=0, device='cpu',
      snapshot_path=a.init_snapshot, epochs=a.epochs,
      save_epochs=a.save_epochs, batch_size=a.batch_size,
      display_iters=a.display_iters, max_snapshots_to_keep=2)
  return {}


def _dlc_evaluate(a) -> dict:
  """evaluate_network on the latest snapshot: its figures, its predictions."""
  import deeplabcut  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  folder = Path(a.model_folder)
  snaps = sorted((folder / 'train').glob('snapshot-*.pt'),
                 key=lambda p: p.stat().st_mtime)
  snaps = [s for s in snaps if 'detector' not in s.name]
  if not snaps:
    raise FileNotFoundError(f'{folder}/train: no snapshot-*.pt (did training '
                            'save one within the budget? lower --dlc_save_epochs)')
  deeplabcut.evaluate_network(a.project_config, shuffles=[1],
                              snapshots_to_evaluate=[snaps[-1].stem],
                              device='cpu', plotting=False)
  root = Path(a.project_config).parent / 'evaluation-results-pytorch'
  newest = lambda pat: max(root.rglob(pat), key=lambda p: p.stat().st_mtime)
  scores = pd.read_csv(newest('*-results.csv'))
  preds = pd.read_hdf(newest('*.h5'))
  return dict(snapshot=snaps[-1].name, scores=scores.iloc[0].to_dict(),
              predictions_h5=str(newest('*.h5')),
              frames=[frame_name(i) for i in preds.index])


def _dlc_analyze(a) -> dict:
  import deeplabcut  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  Path(a.out).mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  scorer = deeplabcut.analyze_videos(
      a.project_config, [a.video], shuffle=1, device='cpu', destfolder=a.out,
      batch_size=a.batch_size, save_as_csv=False, overwrite=True,
      auto_track=False)
  wall = time.time() - t0
  h5 = max((p for p in Path(a.out).glob('*.h5') if '_filtered' not in p.name),
           key=lambda p: p.stat().st_mtime)
  return dict(call_s=wall, h5=str(h5), scorer=str(scorer),
              frames=len(pd.read_hdf(h5)))


def dlc_main(argv: list[str]) -> None:
  """``_dlc STAGE --json OUT ...``: one DeepLabCut stage, its JSON to OUT."""
  p = argparse.ArgumentParser(prog='dlc_compare.py _dlc')
  p.add_argument('stage', choices=['create', 'train', 'evaluate', 'analyze'])
  p.add_argument('--json', required=True)
  p.add_argument('--project_config', required=True)
  p.add_argument('--split')
  p.add_argument('--net_type', default='resnet_50')
  p.add_argument('--model_folder')
  p.add_argument('--init_snapshot')
  p.add_argument('--epochs', type=int)
  p.add_argument('--save_epochs', type=int)
  p.add_argument('--batch_size', type=int)
  p.add_argument('--display_iters', type=int, default=10)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--video')
  p.add_argument('--out')
  a = p.parse_args(argv)
  stage = dict(create=_dlc_create, train=_dlc_train, evaluate=_dlc_evaluate,
               analyze=_dlc_analyze)[a.stage]
  Path(a.json).write_text(json.dumps(stage(a), indent=1, default=str))


# -- The driver (our environment) --------------------------------------------


def prepare_project(src: Path, dst: Path, fraction: float | None) -> Path:
  """Copies the project to ``dst`` and points its config.yaml there.

  ``project_path`` -> ``dst``; ``video_sets`` -> one entry per
  ``labeled-data`` folder (DeepLabCut finds the labels by the video's
  stem); ``TrainingFraction`` -> ``[fraction]`` when given (DeepLabCut
  finds the model folder through it; the split itself is ours). Returns
  the config path.
  """
  import yaml  # pylint: disable=g-import-not-at-top
  if dst.exists():
    shutil.rmtree(dst)
  shutil.copytree(src, dst)
  for folder, _, files in os.walk(dst):  # The copy keeps read-only modes.
    os.chmod(folder, 0o755)
    for f in files:
      os.chmod(os.path.join(folder, f), 0o644)
  path = dst / 'config.yaml'
  cfg = yaml.safe_load(path.read_text())
  crop = next(iter((cfg.get('video_sets') or {}).values()), None) or {}
  cfg['project_path'] = str(dst)
  cfg['video_sets'] = {
      str(dst / 'videos' / f'{d.name}.mp4'): crop
      for d in sorted((dst / 'labeled-data').iterdir()) if d.is_dir()}
  if fraction is not None:
    cfg['TrainingFraction'] = [float(fraction)]
  path.write_text(yaml.safe_dump(cfg, sort_keys=False))
  return path


def our_split(project: Path, fraction: float | None, holdout: float | None,
              work: Path) -> dict:
  """Our import's frames (or the selection run's) and their ground truth.

  Returns ``train``/``test`` frame lists, ``gt`` (frame -> [K, 3] x, y, v
  pixels), ``image_id`` (frame -> our id), ``bodyparts``, ``pcutoff``;
  with ``holdout`` also writes ``work/holdout_{train,test}.json`` (COCO)
  for `OURS` ``build_coco``.
  """
  sys.path.insert(0, str(REPO))
  from data_prep import dlc_project  # pylint: disable=g-import-not-at-top
  data, _, config = dlc_project.to_coco(project, fraction)
  gt, ids, anns = {}, {}, {}
  for split in ('train', 'test'):
    for im, ann in zip(data[split]['images'], data[split]['annotations']):
      gt[im['file_name']] = np.asarray(ann['keypoints'],
                                       np.float64).reshape(-1, 3).tolist()
      ids[im['file_name']] = im['id']
      anns[im['file_name']] = (im, ann)
  train = [im['file_name'] for im in data['train']['images']]
  test = [im['file_name'] for im in data['test']['images']]
  if holdout:
    train, test = holdout_split(train, holdout)
    cats = data['train']['categories']
    for name, frames in (('train', train), ('test', test)):
      coco = dict(images=[anns[f][0] for f in frames],
                  annotations=[anns[f][1] for f in frames], categories=cats)
      (work / f'holdout_{name}.json').write_text(json.dumps(coco))
  return dict(train=train, test=test, gt=gt, image_id=ids,
              bodyparts=list(config.bodyparts), pcutoff=config.pcutoff)


def score_test(split: dict, dlc_eval: dict, ours_dir: Path) -> dict:
  """Both tools' test predictions scored by `keypoint_errors`."""
  frames, k = split['test'], len(split['bodyparts'])
  gt = np.array([split['gt'][f] for f in frames]).reshape(len(frames), k, 3)
  gt_xy = np.where(gt[..., 2:] > 0, gt[..., :2], np.nan)
  df = pd.read_hdf(dlc_eval['predictions_h5'])
  rows = dlc_indices(df.index, frames)
  dlc_xy, dlc_like = dlc_table_xy(df.iloc[rows], split['bodyparts'])
  results = json.loads((ours_dir / 'predictions_test.json').read_text())
  our_xy, our_score = coco_prediction_xy(
      results, [split['image_id'][f] for f in frames], k)
  pc = split['pcutoff']
  absent = gt[..., 2] == 0
  return dict(
      frames=len(frames), pcutoff=pc,
      deeplabcut=dict(all=keypoint_errors(dlc_xy, gt_xy),
                      pcutoff=keypoint_errors(dlc_xy, gt_xy, dlc_like, pc),
                      unlabelled_reported=int((absent & (dlc_like >= pc)).sum())),
      ours=dict(all=keypoint_errors(our_xy, gt_xy),
                pcutoff=keypoint_errors(our_xy, gt_xy, our_score, pc),
                unlabelled_reported=int((absent & np.isfinite(our_xy).all(-1)
                                         & (np.nan_to_num(our_score) >= pc)).sum())),
      unlabelled=int(absent.sum()))


def slice_video(src: Path, dst: Path, frames: int) -> Path:
  """The first ``frames`` frames of ``src`` re-encoded to ``dst`` (PyAV,
  H.264 at CRF 12: both tools read the same re-encoded frames)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(src)) as inp, av.open(str(dst), 'w') as out:
    vin = inp.streams.video[0]
    # The source's rate (1000000/33333 here) has too large a denominator
    # for some encoders.
    rate = Fraction(vin.average_rate or 30).limit_denominator(1001)
    vout = out.add_stream('libx264', rate=rate, options={'crf': '12'})
    vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, 'yuv420p'
    for i, frame in enumerate(inp.decode(vin)):
      if i >= frames:
        break
      for pkt in vout.encode(frame.reformat(format='yuv420p')):
        out.mux(pkt)
    for pkt in vout.encode():
      out.mux(pkt)
  return dst


def dlc_stage(args, stage: str, work: Path, budget_s: float | None = None,
              tag: str = '', **flags) -> tuple[dict, dict]:
  """One ``_dlc`` stage under ``--dlc_python``: (its JSON, `run_timed`);
  ``work/dlc_<stage><tag>.json`` and ``.log``."""
  out = work / f'dlc_{stage}{tag}.json'
  cmd = [args.dlc_python, str(Path(__file__).resolve()), '_dlc', stage,
         '--json', str(out), '--threads', str(args.threads)]
  for key, value in flags.items():
    if value is not None:
      cmd += [f'--{key}', str(value)]
  run = run_timed(cmd, work / f'dlc_{stage}{tag}.log', budget_s,
                  thread_env(args.threads))
  return (json.loads(out.read_text()) if out.exists() else {}), run


def train_and_evaluate(args, work: Path, project_cfg: Path, split: dict
                       ) -> dict:
  """Creates both training sets, trains both under the budget, evaluates."""
  env = thread_env(args.threads)
  (work / 'split.json').write_text(json.dumps(
      dict(train=split['train'], test=split['test'])))
  created, _ = dlc_stage(args, 'create', work, project_config=project_cfg,
                         split=work / 'split.json', net_type=args.net_type)
  for name in ('train', 'test'):
    if created[f'{name}_frames'] != split[name]:
      raise RuntimeError(f'DeepLabCut\'s {name} frames differ from ours')
  data, run = work / 'ours_data', work / 'ours_run'
  fields = dict(project=project_cfg.parent, data=data, run=run,
                config=REPO / args.config, steps=args.our_steps,
                checkpoint_every=args.our_checkpoint_every,
                fraction=split['fraction'],
                train_json=work / 'holdout_train.json',
                test_json=work / 'holdout_test.json')
  build = 'build_coco' if args.holdout else 'build_dlc'
  run_timed(ours_command(build, **fields), work / 'ours_build.log', env=env)
  if run.exists():
    shutil.rmtree(run)
  _, dlc_train = dlc_stage(
      args, 'train', work, args.budget_s, project_config=project_cfg,
      init_snapshot=created['init_snapshot'], epochs=args.dlc_epochs,
      save_epochs=args.dlc_save_epochs, batch_size=args.dlc_batch_size)
  our_train = run_timed(ours_command('train', **fields),
                        work / 'ours_train.log', args.budget_s, env)
  dlc_eval, _ = dlc_stage(args, 'evaluate', work, project_config=project_cfg,
                          model_folder=created['model_folder'])
  if our_train['cut'] or not (run / 'eval_test.json').exists():
    # Training evaluates at its end (eval_every_steps=0: end only); a run
    # the budget stopped is evaluated here, from its last checkpoint.
    run_timed(ours_command('eval', **fields), work / 'ours_eval.log', env=env)
  ours_eval = json.loads((run / 'eval_test.json').read_text())
  scored = score_test(split, dlc_eval, run)
  # The scorer here must give each tool's own figure back (DeepLabCut's
  # rounds to 2 decimals); a difference means the frames or the
  # definitions differ.
  own_dlc = dlc_eval['scores'].get('test rmse')
  check = dict(deeplabcut=abs(scored['deeplabcut']['all']['mean_px'] - own_dlc)
               if own_dlc is not None else None,
               ours=abs(scored['ours']['all']['mean_px']
                        - ours_eval.get('mean_error_px', float('nan'))))
  return dict(own_vs_here_px=check,
      split=dict(train=len(split['train']), test=len(split['test']),
                 holdout=args.holdout, test_frames=split['test']),
      training=dict(deeplabcut=dlc_train, ours=our_train),
      deeplabcut_own=dlc_eval['scores'], deeplabcut_snapshot=dlc_eval['snapshot'],
      ours_own=dict(mean_error_px=ours_eval.get('mean_error_px'),
                    step=ours_eval.get('step')),
      scored_here=scored,
      _fields=fields, _created=created)


def compare_video(args, work: Path, project_cfg: Path, fields: dict,
                  bodyparts: list[str]) -> dict:
  """analyze_videos / ours / analyze_videos on one video, then distances."""
  env = thread_env(args.threads)
  video = Path(args.video).resolve()
  if args.video_frames:
    video = slice_video(video, work / f'clip{args.video_frames}.mp4',
                        args.video_frames)
  runs, dlc_h5, our_h5 = [], None, None
  for i, tool in enumerate(('deeplabcut', 'ours', 'deeplabcut')):
    out = work / f'video_{i}_{tool}'
    if tool == 'deeplabcut':
      res, timed = dlc_stage(args, 'analyze', work, tag=str(i),
                             project_config=project_cfg,
                             video=video, out=out,
                             batch_size=args.dlc_video_batch)
      dlc_h5 = Path(res['h5'])
      runs.append(dict(tool=tool, batch=args.dlc_video_batch,
                       frames=res['frames'], command_s=timed['wall_s'],
                       call_s=res['call_s'],
                       frames_per_s_command=res['frames'] / timed['wall_s'],
                       frames_per_s_call=res['frames'] / res['call_s']))
    else:
      timed = run_timed(ours_command('analyze', **fields, video=video, out=out,
                                     batch=args.our_video_batch),
                        work / f'ours_analyze{i}.log', env=env)
      meta = json.loads(next(out.glob('*_meta.json')).read_text())
      our_h5 = next(p for p in out.glob('*.h5') if '_filtered' not in p.name)
      n = len(pd.read_hdf(our_h5))
      runs.append(dict(tool=tool, batch=args.our_video_batch, frames=n,
                       command_s=timed['wall_s'],
                       frames_per_s_command=n / timed['wall_s'],
                       frames_per_s_own=meta.get('frames_per_s'), meta=meta))
  a, _ = dlc_table_xy(pd.read_hdf(dlc_h5), bodyparts)
  b, _ = dlc_table_xy(pd.read_hdf(our_h5), bodyparts)
  n = min(len(a), len(b))
  dist = trajectory_distance(a[:n], b[:n])
  ref = np.mean([r['frames_per_s_command'] for r in runs if r['tool'] == 'deeplabcut'])
  return dict(video=str(video), runs=runs, bodyparts=bodyparts,
              trajectory_distance=dist,
              ratio_frames_per_s_command=runs[1]['frames_per_s_command'] / ref)


def summary(result: dict) -> str:
  """The Markdown lines docs/peers.md's tables take."""
  lines = []
  t = result.get('test')
  if t:
    s, own = t['scored_here'], t['deeplabcut_own']
    get = lambda key: next((v for k, v in own.items() if k.strip() == key), None)
    lines.append(f"split: {t['split']['train']} train / {t['split']['test']} "
                 f"test frames (holdout {t['split']['holdout']})")
    lines.append('| tool | own figure (px) | here, all (px) | here, pcutoff '
                 f"{s['pcutoff']} (px, kept) | train wall s (cut) | peak RSS MB |")
    lines.append('|---|---|---|---|---|---|')
    for tool, fig in (('deeplabcut', f"{get('test rmse')} / {get('test rmse_pcutoff')}"),
                      ('ours', f"{t['ours_own']['mean_error_px']:.2f}")):
      tr = t['training'][tool]
      lines.append(
          f"| {tool} | {fig} | {s[tool]['all']['mean_px']:.2f} | "
          f"{s[tool]['pcutoff']['mean_px']:.2f} ({s[tool]['pcutoff']['counted']}"
          f"/{s[tool]['all']['labelled']}) | {tr['wall_s']:.0f} ({tr['cut']}) | "
          f"{tr['peak_rss_mb']:.0f} |")
    lines.append(f"own figure - here (px, should be ~0): {t['own_vs_here_px']}")
    lines.append(f"unlabelled (absent) test keypoints: {s['unlabelled']}; "
                 f"reported above pcutoff: deeplabcut "
                 f"{s['deeplabcut']['unlabelled_reported']}, ours "
                 f"{s['ours']['unlabelled_reported']}")
  v = result.get('video')
  if v:
    for r in v['runs']:
      lines.append(f"video {r['tool']} batch {r['batch']}: {r['frames']} frames, "
                   f"{r['frames_per_s_command']:.2f} frames/s (command)")
    lines.append(f"ours / deeplabcut frames/s: {v['ratio_frames_per_s_command']:.2f}")
    lines.append('median px between trajectories: ' + ', '.join(
        f'{b} {d:.1f}' for b, d in zip(v['bodyparts'],
                                        v['trajectory_distance']['median_px'])))
  return '\n'.join(lines)


def main():
  if len(sys.argv) > 1 and sys.argv[1] == '_dlc':
    return dlc_main(sys.argv[2:])
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dlc_python', required=True,
                 help='python of the virtual environment with deeplabcut')
  p.add_argument('--project', required=True, help='DeepLabCut project (read only)')
  p.add_argument('--config', default='configs/dlc_openfield.py')
  p.add_argument('--workdir', required=True, help='scratch folder (replaced)')
  p.add_argument('--out', required=True, help='result JSON')
  p.add_argument('--dlc_train_fraction', type=float, default=None,
                 help='our import\'s --dlc_train_fraction (default: config.yaml)')
  p.add_argument('--holdout', type=float, default=None,
                 help='selection run: this fraction of the TRAINING frames is '
                      'the test split of both tools')
  p.add_argument('--budget_s', type=float, default=1800,
                 help='wall-clock seconds each training may take')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--net_type', default='resnet_50')
  p.add_argument('--dlc_epochs', type=int, default=200)
  p.add_argument('--dlc_save_epochs', type=int, default=5)
  p.add_argument('--dlc_batch_size', type=int, default=None,
                 help='default: pytorch_config.yaml\'s (8)')
  p.add_argument('--our_steps', type=int, default=1500)
  p.add_argument('--our_checkpoint_every', type=int, default=100)
  p.add_argument('--video', default=None)
  p.add_argument('--video_frames', type=int, default=0,
                 help='first N frames only (0: the whole video)')
  p.add_argument('--dlc_video_batch', type=int, default=8)
  p.add_argument('--our_video_batch', type=int, default=8)
  args = p.parse_args()
  work = Path(args.workdir).resolve()
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  project = Path(args.project).resolve()
  split = our_split(project, args.dlc_train_fraction, args.holdout, work)
  split['fraction'] = args.dlc_train_fraction or _fraction(
      project / 'config.yaml')
  # DeepLabCut names the model folder after round(train / all, 2) of the
  # indices it is given and finds it through TrainingFraction[0]: set both.
  n_train, n_test = len(split['train']), len(split['test'])
  project_cfg = prepare_project(project, work / 'project',
                                round(n_train / (n_train + n_test), 2))
  result = dict(command=' '.join(sys.argv), date=time.strftime('%Y-%m-%d'),
                ours=OURS)
  test = train_and_evaluate(args, work, project_cfg, split)
  fields = test.pop('_fields')
  test.pop('_created')
  result['test'] = test
  if args.video:
    result['video'] = compare_video(args, work, project_cfg, fields,
                                    split['bodyparts'])
  result.update(wall_s=time.time() - t0,
                load_average_at_end=list(os.getloadavg()))
  Path(args.out).write_text(json.dumps(result, indent=1, default=str))
  print(summary(result))


def _fraction(project_cfg: Path) -> float:
  import yaml  # pylint: disable=g-import-not-at-top
  f = yaml.safe_load(project_cfg.read_text()).get('TrainingFraction') or [0.95]
  return float(f[0] if isinstance(f, list) else f)


if __name__ == '__main__':
  main()
