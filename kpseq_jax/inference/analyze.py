r"""Videos -> DeepLabCut-format pose tables, labelled videos, plots (``--mode analyze``).

  python -m kpseq_jax.main --mode analyze --config configs/dlc_openfield.py \
      --workdir DIR --videos VIDEO_OR_FOLDER --out OUT \
      [--boxes track|BOXES.json | --detector_config C --detector_workdir D] \
      [--video_batch_size B] [--filter_window 5] [--nolabeled_video] \
      [--category ID] [--max_animals N]

``--videos``: a video file or a folder of them (not searched recursively).
Frames are decoded and cropped in a background thread
(`video.FramePipeline`) by the boxes of ``--boxes`` (`box_policies`) and
decoded by `batchers.CropBatcher` -> `predictor.Predictor`. Per video,
``OUT/<stem><scorer>`` + ``.h5`` / ``.csv`` (DeepLabCut's table,
`dlc_output`), ``_filtered.h5`` / ``.csv`` (``--filter_window``),
``_labeled.mp4``, ``_trajectories.png`` (`trajectory_plot`),
``_captions.txt``, ``_likelihood_raw.csv`` (the raw likelihood, when the
table's is calibrated by the workdir's ``calibration.json``) and
``_meta.json`` (`VideoSummary`, with the share of frames under the
project's ``pcutoff`` per body part, also logged, and the boxes outside
the training boxes' scale, `box_range`, whose calibrated likelihood is 0
and which are warned about per video); ``<scorer>`` is
``KPSEQ_<backbone>_<category>_step<checkpoint step>`` (backbone e.g.
``resnet18`` or ``vitS16``), as DeepLabCut names its files. A video that
cannot be opened is reported and the others
analysed (`video.VideoDecodeError` if none can be); a video that breaks
off keeps the rows of the frames before, and its summary says where.

``--max_animals N`` (several animals, SLEAP's and DeepLabCut's option; with
a detector or a box file): each frame's N best boxes are posed (one model
batch across boxes and frames), `tracked_poses.TrackedPoses` links the
poses into at most N identities ``track_0`` ..., and per video
``OUT/<stem><scorer>`` + ``.slp`` (SLEAP), ``.h5`` / ``.csv`` (DeepLabCut's
multi-animal table, `multi_animal_output`), ``_labeled.mp4`` (one colour
per identity) and ``_meta.json`` are written (no filtered table, plot or
captions: those are single-animal).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import re
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import pandas as pd
from PIL import Image
import tensorflow_datasets as tfds
import tqdm

from kpseq_jax.data import dataset
from kpseq_jax.data import visualize
from kpseq_jax.inference import batchers
from kpseq_jax.inference import box_policies
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import box_range
from kpseq_jax.inference import captions as captions_lib
from kpseq_jax.inference import dlc_output
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import multi_animal_output
from kpseq_jax.inference import pose_boxes
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import tracked_poses
from kpseq_jax.inference import trajectory_plot
from kpseq_jax.inference import video as video_lib

DEFAULT_PCUTOFF = 0.6  # DeepLabCut's default config.yaml pcutoff.
# `box_policies.Track` follows keypoints with at least this confidence, its
# own threshold rather than pcutoff (DeepLabCut's likelihood scale); why
# 0.2: docs/lab_workflow.md (video analysis).
TRACK_MIN_CONFIDENCE = 0.2


@dataclasses.dataclass
class VideoSummary:
  """One video's analysis (also ``<stem><scorer>_meta.json``).

  Attributes:
    video: the file.
    scorer: the table's scorer level.
    width, height, fps: the video's frame size (pixels) and rate.
    frames_in_header: the container's frame count (0 = unknown).
    frames_decoded: rows written.
    stopped_early: decoding broke off before the end: an FFmpeg error
      (``error`` says which) or fewer frames than the header's count (a
      truncated file often just ends). It stopped at frame
      ``frames_decoded`` (0-based), the first one without a row.
    error: FFmpeg's message then.
    boxes: the box policy's name (`box_policies.BoxPolicy.name`).
    frames_without_box: box file, detector: frames cropped whole for want
      of a box.
    track_lost: track: batches after which the track fell back to the whole
      frame.
    track_reacquired: track without confidence: batches cropped whole to
      find the animal again (`box_policies.Track`).
    seconds: wall time of decode + model (first batch included).
    frames_per_s: frames_decoded / seconds.
    frames_per_s_after_first_batch: the same without the first batch
      (compilation), i.e. the steady rate.
    model_wait_s: time the model loop waited for decoded batches (near 0
      when decoding keeps up).
    labeled_video_s: time to re-decode, draw and encode the labelled video.
    files: output kind -> path.
    below_pcutoff: body part -> share of frames whose table likelihood is
      below the project's pcutoff (hidden by DeepLabCut's tools).
    below_pcutoff_raw: the same for the raw likelihood, when the table's
      is calibrated ({} otherwise).
    boxes_out_of_range: boxes posed whose side is outside the training
      boxes' range (`box_range`; single-animal: frames); their calibrated
      likelihood is 0.
    max_animals: ``--max_animals`` (0: single-animal; the fields below are
      then not in ``_meta.json``).
    animals_per_frame: number of animals tracked in a frame -> frames.
    tracks: the identities' names.
  """

  video: str
  scorer: str
  width: int
  height: int
  fps: float
  frames_in_header: int
  frames_decoded: int = 0
  stopped_early: bool = False
  error: str = ''
  boxes: str = 'whole frame'
  frames_without_box: int = 0
  track_lost: int = 0
  track_reacquired: int = 0
  seconds: float = 0.0
  frames_per_s: float = 0.0
  frames_per_s_after_first_batch: float = 0.0
  model_wait_s: float = 0.0
  labeled_video_s: float = 0.0
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  below_pcutoff: dict[str, float] = dataclasses.field(default_factory=dict)
  below_pcutoff_raw: dict[str, float] = dataclasses.field(
      default_factory=dict)
  boxes_out_of_range: int = 0
  max_animals: int = 0
  animals_per_frame: dict[str, int] = dataclasses.field(default_factory=dict)
  tracks: list[str] = dataclasses.field(default_factory=list)

  def write_meta(self, path: Path) -> None:
    """``_meta.json``: the fields, without the multi-animal ones for a
    single-animal run (its file as before ``--max_animals``)."""
    self.files['meta'] = str(path)
    meta = dataclasses.asdict(self)
    if not self.max_animals:
      for name in ('max_animals', 'animals_per_frame', 'tracks'):
        del meta[name]
    path.write_text(json.dumps(meta, indent=1) + '\n')


def list_videos(videos: str) -> list[Path]:
  """A video file, or the video files of a folder (sorted).

  Raises:
    FileNotFoundError: no such file or folder, or a folder without videos.
  """
  p = Path(videos)
  if p.is_file():
    return [p]
  if not p.is_dir():
    raise FileNotFoundError(f'--videos {videos!r}: no such file or folder.')
  found = sorted(f for f in p.iterdir()
                 if f.is_file() and f.suffix.lower() in video_lib.VIDEO_SUFFIXES)
  if not found:
    raise FileNotFoundError(f'--videos {videos!r}: no video files '
                            f'({", ".join(video_lib.VIDEO_SUFFIXES)}).')
  return found


def scorer_name(config: ml_collections.ConfigDict, category_name: str,
                step: int) -> str:
  """``KPSEQ_<backbone>_<category>_step<step>`` (file-name safe): backbone
  ``resnet<depth>`` or ``vit<variant><patch>``."""
  cat = re.sub(r'[^A-Za-z0-9]+', '', category_name) or 'pose'
  m = config.model
  backbone = (f'vit{m.vit.variant}{m.vit.patch_size}'
              if m.get('encoder', 'resnet') == 'vit'
              else f'resnet{m.resnet.depth}')
  return f'KPSEQ_{backbone}_{cat}_step{int(step)}'


def typical_box_px(dataset_dir: str, split: str) -> float | None:
  """Median of max(w, h) over the split's boxes (pixels; at most
  `box_range.MAX_RECORDS` of them, read once with the box range), None
  when the split is empty."""
  sides = box_range.training_sides_px(dataset_dir, split)
  return float(np.median(sides)) if sides else None


def likelihood_of(pred: predictor_lib.Prediction, k: int) -> np.ndarray:
  """float [b, k] in [0, 1] (NaN where not generated): ``pred.confidence``
  (the probability mass around the decoded coordinates), times
  ``pred.presence`` (the probability that the body part is visible) when
  the model has an ``<absent>`` token."""
  out = np.asarray(pred.confidence, np.float64)[:, :k]
  if pred.presence is not None:
    out = out * np.asarray(pred.presence, np.float64)[:, :k]
  return out


def _pcutoff(dataset_dir: str) -> float:
  """The DeepLabCut project's pcutoff stored by data_prep, else 0.6."""
  meta = tfds.builder_from_directory(dataset_dir).info.metadata or {}
  return float((meta.get('source') or {}).get('pcutoff', DEFAULT_PCUTOFF))


def analyze(config: ml_collections.ConfigDict, workdir: str, videos: str,
            out_dir: str, boxes: str | None = None,
            category_id: int | None = None, batch_size: int | None = None,
            filter_window: int = 0, labeled_video: bool = True,
            detector: box_predictor.ImageDetector | None = None,
            max_animals: int | None = None) -> list[VideoSummary]:
  """Analyses every video; see the module docstring.

  Args:
    config: the run's config.
    workdir: the trained run (latest checkpoint).
    videos: a video file or folder.
    out_dir: output folder (created).
    boxes: None (whole frame), 'track' or a detections file
      (`box_policies.make_policy`).
    category_id: the category of the animal (default: the only one).
    batch_size: frames per model call (default ``config.evals.batch_size``).
    filter_window: odd median filter window in frames; 0 = none.
    labeled_video: write ``_labeled.mp4``.
    detector: with ``boxes`` None, each frame's box is this detector's
      best (`box_policies.Detected`).
    max_animals: several animals (module docstring): each frame's best
      boxes of ``detector`` or ``boxes`` file, tracked into identities.

  Returns:
    The summaries of the videos analysed.

  Raises:
    FileNotFoundError: no checkpoint, data set or video.
    video.VideoDecodeError: no video could be opened.
    ValueError: bad --boxes file, category, filter window or
      --max_animals (`_check_max_animals`).
    NotImplementedError: on more than one process.
  """
  _check_max_animals(max_animals, boxes, detector, filter_window)
  probed, failed = _videos_to_analyze(videos, boxes, filter_window)
  info = dataset.load_info(config.input.dataset_dir)
  category = info.categories[image_inputs.choose_category(info, category_id)]
  batcher, step = batchers.restore_batcher(
      config, workdir, info.category_index(), batch_size,
      None if boxes else detector)
  outputs = _Outputs(category, scorer_name(config, category.name, step),
                     out_dir, filter_window, labeled_video,
                     _pcutoff(config.input.dataset_dir), max_animals or 0)
  os.makedirs(out_dir, exist_ok=True)
  # Track: a box side is at most twice the training boxes' typical side.
  typical = (typical_box_px(config.input.dataset_dir, config.input.train_split)
             if boxes == 'track' else None)
  summaries = []
  for vinfo in probed:
    policy = box_policies.make_policy(boxes, TRACK_MIN_CONFIDENCE,
                                      typical and 2 * typical, detector,
                                      max_boxes=max_animals or 1)
    try:
      summaries.append(analyze_video(vinfo, batcher, policy, outputs))
    except video_lib.VideoDecodeError as e:  # Opens, but no frame decodes.
      logging.error('%s', e)
      failed.append(e)
  return _analysed(summaries, failed)


def _analysed(summaries: list[VideoSummary],
              failed: list[video_lib.VideoDecodeError]) -> list[VideoSummary]:
  """``summaries`` after logging the videos not analysed; the first error
  is raised when none was."""
  if not summaries:
    raise failed[0]
  for e in failed:
    logging.error('Not analysed: %s', e)
  return summaries


def _check_max_animals(max_animals: int | None, boxes: str | None,
                       detector, filter_window: int) -> None:
  """Raises ValueError unless ``--max_animals`` is unset, or >= 1 with a
  detector or a box file and without ``--filter_window``."""
  if max_animals is None:
    return
  if max_animals < 1:
    raise ValueError(f'--max_animals {max_animals}: must be >= 1.')
  if boxes == 'track' or (not boxes and detector is None):
    raise ValueError(
        '--max_animals needs several boxes per frame: pass '
        '--detector_config/--detector_workdir (or a --boxes detections '
        f'file), not {"--boxes track" if boxes else "the whole frame"}.')
  if filter_window:
    raise ValueError('--filter_window filters the single-animal table; it '
                     'does not combine with --max_animals.')



def _videos_to_analyze(videos: str, boxes: str | None, filter_window: int
                       ) -> tuple[list[video_lib.VideoInfo],
                                  list[video_lib.VideoDecodeError]]:
  """(headers of the videos that open, errors of the others), before the
  model is restored (fail fast).

  Raises:
    NotImplementedError: on more than one process.
    ValueError: bad filter window; a box file with several videos.
    FileNotFoundError: no video (`list_videos`).
    video.VideoDecodeError: none opens (the first one's error).
  """
  if jax.process_count() > 1:
    raise NotImplementedError('--mode analyze runs on one process.')
  if filter_window and (filter_window < 3 or filter_window % 2 == 0):
    raise ValueError(f'--filter_window {filter_window}: odd and >= 3, or 0.')
  paths = list_videos(videos)
  if boxes and boxes != 'track' and len(paths) > 1:
    raise ValueError('--boxes FILE names frames of one video; pass one video '
                     'with it (or --boxes track).')
  probed, failed = [], []
  for path in paths:
    try:
      probed.append(video_lib.probe(path))
    except video_lib.VideoDecodeError as e:
      logging.error('%s', e)
      failed.append(e)
  if not probed:
    raise failed[0]
  return probed, failed


@dataclasses.dataclass(frozen=True)
class _Outputs:
  """What every video's files share (`write_outputs`)."""

  category: object  # dataset.Category: names, skeleton, K.
  scorer: str
  out_dir: str
  filter_window: int
  labeled_video: bool
  pcutoff: float
  max_animals: int = 0  # 0: single-animal outputs.


def _decode_batch(batch: video_lib.FrameBatch, batcher: batchers.CropBatcher,
                  policy: box_policies.BoxPolicy, category_id: int, k: int,
                  width: int, height: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray],
                             list[np.ndarray], list[np.ndarray]]:
  """Boxes (if the pipeline left them to us), crops and decodes a batch:
  all boxes of all its frames in one `batchers.predict_all`,
  cut again from their poses ``batcher.pose_box_passes`` times
  (`pose_boxes`).

  Returns:
    Per frame of the batch, (float [N_f, K, 2] pixels, float [N_f, K]
    likelihood (calibrated when ``batcher.calibration``, 0 for a box out
    of ``batcher.box_range``: `likelihood.calibrate`), float [N_f, K]
    raw likelihood, bool [N_f] box out of range (all False unchecked)):
    the pose of each of its boxes, best box first (pose and raw
    likelihood also given to ``policy.update``).
  """
  if batch.crops is None:  # Boxes from the previous batch's poses
    policy.see(batch.start, batch.frames)  # or from the frames.
    batch.boxes = [policy.boxes(batch.start + j, width, height)
                   for j in range(len(batch.frames))]
    batch.crops = [[batcher.crop(f, b, category_id) for b in bs]
                   for f, bs in zip(batch.frames, batch.boxes)]
  crops = [c for cs in batch.crops for c in cs]
  if batcher.pose_box_passes and batch.boxes is not None:
    images = [f for f, bs in zip(batch.frames, batch.boxes) for _ in bs]
    pred, boxes = pose_boxes.predict(
        batcher, images, np.concatenate(batch.boxes),
        [category_id] * len(images), batcher.pose_box_passes, crops)
    batch.boxes = np.split(boxes, np.cumsum([len(b) for b in batch.boxes]
                                            )[:-1])
  else:
    pred = batchers.predict_all(batcher, crops)
  kp = np.asarray(pred.keypoints_px, np.float64)[:, :k]  # [sum N_f, K, 2]
  raw = likelihood_of(pred, k)  # [sum N_f, K]
  split = np.cumsum([len(cs) for cs in batch.crops])[:-1]
  kp_frames, raw_frames = np.split(kp, split), np.split(raw, split)
  # The box policy's thresholds are on the raw scale (TRACK_MIN_CONFIDENCE).
  policy.update(kp_frames, raw_frames, width, height)
  far = np.zeros(len(raw), bool)  # [sum N_f]
  if batcher.box_range is not None and batch.boxes is not None:
    far = batcher.box_range.out_of_range(
        [b for bs in batch.boxes for b in bs])
  far_frames = np.split(far, split)
  if batcher.calibration is None:
    return kp_frames, raw_frames, raw_frames, far_frames
  calibrated = likelihood.calibrate(batcher.calibration, raw, far)
  return kp_frames, np.split(calibrated, split), raw_frames, far_frames


class _FirstPoses:
  """Single-animal rows: each frame's first (best) box's pose."""

  def __init__(self):
    self.keypoints, self.likelihood, self.raw = [], [], []

  def add(self, frame: int, kp: np.ndarray, lk: np.ndarray, box_scores,
          raw: np.ndarray | None = None):
    del frame, box_scores
    self.keypoints.append(kp[0])
    self.likelihood.append(lk[0])
    self.raw.append(lk[0] if raw is None else raw[0])


def analyze_video(vinfo: video_lib.VideoInfo,
                  batcher: batchers.CropBatcher,
                  policy: box_policies.BoxPolicy,
                  outputs: _Outputs) -> VideoSummary:
  """One video: decode + model (+ tracking with ``outputs.max_animals``),
  then its files (`write_outputs` or `write_tracked_outputs`).

  Raises:
    video.VideoDecodeError: not one frame decodes.
  """
  category = outputs.category
  w, h = vinfo.width, vinfo.height
  summary = VideoSummary(video=vinfo.path, scorer=outputs.scorer, width=w,
                         height=h, fps=vinfo.fps,
                         frames_in_header=vinfo.num_frames, boxes=policy.name,
                         max_animals=outputs.max_animals)
  pipeline = video_lib.FramePipeline(
      vinfo.path, batcher.batch_size, policy,
      lambda frame, box: batcher.crop(frame, box, category.id), w, h)
  rows = (tracked_poses.TrackedPoses(outputs.max_animals,
                                     category.num_keypoints)
          if outputs.max_animals else _FirstPoses())
  t0, t_first, first = time.perf_counter(), None, 0
  num_boxes = 0  # Boxes posed.
  with tqdm.tqdm(total=vinfo.num_frames or None, desc=Path(vinfo.path).stem,
                 unit='frame') as bar:
    for batch in pipeline:
      kp, lk, raw, far = _decode_batch(batch, batcher, policy, category.id,
                                       category.num_keypoints, w, h)
      summary.boxes_out_of_range += int(sum(f.sum() for f in far))
      num_boxes += sum(len(f) for f in far)
      for j, (kp_f, lk_f) in enumerate(zip(kp, lk)):
        if outputs.max_animals:
          rows.add(batch.start + j, kp_f, lk_f,
                   policy.box_scores(batch.start + j))
        else:
          rows.add(batch.start + j, kp_f, lk_f, None, raw[j])
      t_first, first = t_first or time.perf_counter(), first or len(kp)
      bar.update(len(batch.frames))
  _fill_timing(summary, vinfo, pipeline, t0, t_first, first)
  for name, value in policy.counts().items():
    setattr(summary, name, value)
  if batcher.box_range is not None:
    if warning := box_range.warning(
        batcher.box_range, summary.boxes_out_of_range, num_boxes,
        vinfo.path, batcher.calibration is not None,
        whole_frame=policy.name in ('whole frame', 'track')):
      logging.warning('%s', warning)
  if outputs.max_animals:
    write_tracked_outputs(vinfo, rows, summary, outputs)
  else:
    write_outputs(vinfo, np.stack(rows.keypoints), np.stack(rows.likelihood),
                  summary, outputs, raw=np.stack(rows.raw))
  return summary


def _fill_timing(summary: VideoSummary, vinfo: video_lib.VideoInfo,
                 pipeline: video_lib.FramePipeline, t0: float,
                 t_first: float, first: int) -> None:
  """Frames decoded, where decoding stopped, and rates (frames/s) of the
  whole run and after the first batch (``first`` frames, compilation)."""
  t1 = time.perf_counter()
  status = pipeline.status
  n = status.frames_decoded
  summary.frames_decoded = n
  summary.stopped_early = status.stopped_early or 0 < n < vinfo.num_frames
  summary.error = status.error
  summary.seconds = t1 - t0
  summary.frames_per_s = n / max(summary.seconds, 1e-9)
  summary.frames_per_s_after_first_batch = (
      (n - first) / max(t1 - t_first, 1e-9) if n > first else 0.0)
  summary.model_wait_s = pipeline.wait_s
  logging.info('%s: %d frames in %.1f s, %.1f frames/s (%.1f after the first '
               'batch; model waited %.1f s for frames)', vinfo.path, n,
               summary.seconds, summary.frames_per_s,
               summary.frames_per_s_after_first_batch, summary.model_wait_s)
  if summary.stopped_early:
    logging.warning('%s: decoding stopped at frame %d (0-based) of %d in the '
                    'header%s; the %d frames before it are analysed.',
                    vinfo.path, n, vinfo.num_frames,
                    f' ({status.error})' if status.error else '', n)


def write_outputs(vinfo: video_lib.VideoInfo, xy: np.ndarray,
                  lk: np.ndarray, summary: VideoSummary,
                  outputs: _Outputs, raw: np.ndarray | None = None) -> None:
  """Writes a video's files (module docstring) and lists them in
  ``summary.files``; the summary itself last, as ``_meta.json``.

  Args:
    xy: float [N, K, 2] pixels per decoded frame; lk: float [N, K]
      likelihood (calibrated when the workdir has a map, else
      `likelihood_of`).
    raw: float [N, K] the raw likelihood (`likelihood_of`), written as
      ``_likelihood_raw.csv`` when it differs from ``lk``.
  """
  category, pcutoff = outputs.category, outputs.pcutoff
  names = captions_lib.keypoint_names(category.keypoint_names,
                                      category.num_keypoints)
  base = Path(outputs.out_dir) / f'{Path(vinfo.path).stem}{summary.scorer}'
  with_suffix = lambda tail: base.with_name(base.name + tail)
  table = dlc_output.pose_table(xy, lk, names, summary.scorer)
  h5, csv = dlc_output.write_table(table, base.with_suffix('.h5'))
  summary.files.update(h5=str(h5), csv=str(csv))
  summary.below_pcutoff = below_pcutoff(lk, names, pcutoff)
  calibrated = raw is not None and not np.array_equal(raw, lk, equal_nan=True)
  if calibrated:
    summary.below_pcutoff_raw = below_pcutoff(raw, names, pcutoff)
    raw_path = with_suffix('_likelihood_raw.csv')
    pd.DataFrame(raw, columns=list(names)).to_csv(raw_path,
                                                  index_label='frame')
    summary.files['likelihood_raw'] = str(raw_path)
  logging.info('%s: share of frames with likelihood%s below pcutoff %.2f per '
               'body part: %s%s', vinfo.path,
               ' (calibrated)' if calibrated else ' (raw, uncalibrated)',
               pcutoff, _shares(summary.below_pcutoff),
               f'; raw: {_shares(summary.below_pcutoff_raw)}' if calibrated
               else '')
  if outputs.filter_window:
    table = dlc_output.median_filter(table, outputs.filter_window)
    fh5, fcsv = dlc_output.write_table(table, with_suffix('_filtered.h5'))
    summary.files.update(filtered_h5=str(fh5), filtered_csv=str(fcsv))
    xy, lk = dlc_output.table_arrays(table)
  captions_path = with_suffix('_captions.txt')
  captions_path.write_text(''.join(captions_lib.caption(p, names) + '\n'
                                   for p in xy))
  summary.files['captions'] = str(captions_path)
  plot = with_suffix('_trajectories.png')
  trajectory_plot.plot_trajectories(
      xy, lk, names, vinfo.width, vinfo.height, plot, pcutoff,
      title=f'{Path(vinfo.path).name} ({summary.scorer})')
  summary.files['trajectories'] = str(plot)
  if outputs.labeled_video:
    out = with_suffix('_labeled.mp4')
    t = time.perf_counter()
    write_labeled_video(vinfo, xy, lk, category, out, pcutoff)
    summary.labeled_video_s = time.perf_counter() - t
    logging.info('%s: labelled video in %.1f s -> %s', vinfo.path,
                 summary.labeled_video_s, out)
    summary.files['labeled_video'] = str(out)
  summary.write_meta(with_suffix('_meta.json'))


def write_tracked_outputs(vinfo: video_lib.VideoInfo,
                          tracked: tracked_poses.TrackedPoses,
                          summary: VideoSummary, outputs: _Outputs) -> None:
  """A multi-animal video's files (module docstring): ``.slp``, the
  DeepLabCut multi-animal ``.h5``/``.csv``, ``_labeled.mp4`` (colour by
  identity), ``_meta.json`` last; each listed in ``summary.files``."""
  category = outputs.category
  names = captions_lib.keypoint_names(category.keypoint_names,
                                      category.num_keypoints)
  base = Path(outputs.out_dir) / f'{Path(vinfo.path).stem}{summary.scorer}'
  with_suffix = lambda tail: base.with_name(base.name + tail)
  xy, point_scores, instance_scores, ids = tracked.arrays()
  tracks = tracked.track_names()
  summary.tracks = tracks
  summary.animals_per_frame = {
      str(n): c for n, c in sorted(tracked.animals_per_frame.items())}
  slp = multi_animal_output.write_slp(
      base.with_suffix('.slp'), vinfo.path, xy, point_scores,
      instance_scores, ids, tracks, names, category.skeleton,
      tracked.frame_indices)
  table = multi_animal_output.dlc_tracks_table(
      xy, point_scores, ids, tracks, names, summary.scorer,
      num_frames=len(xy), frame_indices=tracked.frame_indices)
  h5, csv = multi_animal_output.write_dlc_tracks(table,
                                                 base.with_suffix('.h5'))
  summary.files.update(slp=str(slp), h5=str(h5), csv=str(csv))
  logging.info('%s: animals per frame %s, tracks %s -> %s', vinfo.path,
               summary.animals_per_frame, tracks, slp)
  if outputs.labeled_video:
    out = with_suffix('_labeled.mp4')
    t = time.perf_counter()
    write_labeled_video(vinfo, xy, point_scores, category, out,
                        outputs.pcutoff, track_ids=ids)
    summary.labeled_video_s = time.perf_counter() - t
    summary.files['labeled_video'] = str(out)
  summary.write_meta(with_suffix('_meta.json'))


def below_pcutoff(likelihood: np.ndarray, names, pcutoff: float
                  ) -> dict[str, float]:
  """Per body part, the share of frames whose likelihood (float [N, K],
  NaN = not generated, counted as below) is under ``pcutoff``: the points
  DeepLabCut's tools hide. {} without frames."""
  lk = np.asarray(likelihood, np.float64)
  if not len(lk):
    return {}
  with np.errstate(invalid='ignore'):
    hidden = ~(lk >= pcutoff)
  return {str(n): float(hidden[:, j].mean()) for j, n in enumerate(names)}


def _shares(shares: dict[str, float]) -> str:
  return ', '.join(f'{n} {100 * v:.1f}%' for n, v in shares.items())


def drawable(xy: np.ndarray, likelihood: np.ndarray,
             pcutoff: float) -> tuple[np.ndarray, np.ndarray]:
  """What `visualize.draw_pose` draws for a table.

  Returns:
    (float [N, K, 3] (x, y, score): score 1 where the keypoint was
    generated, else 0; bool [N, K] ``hollow``: likelihood below
    ``pcutoff``, drawn as a hollow circle without name, as the overlays
    draw a keypoint predicted absent). NaN likelihood counts as above.
  """
  with np.errstate(invalid='ignore'):
    hollow = ~np.isnan(likelihood) & (likelihood < pcutoff)
  made = np.all(np.isfinite(xy), axis=-1)
  return (np.concatenate([xy, made[..., None].astype(np.float64)], axis=-1),
          hollow)


def write_labeled_video(vinfo: video_lib.VideoInfo, xy: np.ndarray,
                        likelihood: np.ndarray, category, out: str | Path,
                        pcutoff: float, track_ids: np.ndarray | None = None
                        ) -> int:
  """Re-decodes the video and draws row i of the table on frame i.

  Args:
    vinfo: the video (`video.probe`).
    xy: float [N, K, 2] pixels; likelihood: float [N, K]. With
      ``track_ids``: [N, A, K, 2] and [N, A, K], A animals per frame.
    category: skeleton and names (`visualize.draw_pose`).
    out: the .mp4 to write.
    pcutoff: see `drawable`.
    track_ids: int [N, A] identity of each animal (-1: none): every
      keypoint of identity t in `identity_colors` t; without it keypoint k
      in colour k.

  Returns:
    Frames written (min(N, frames decodable)).
  """
  poses, hollow = drawable(xy, likelihood, pcutoff)
  palette = identity_colors(
      0 if track_ids is None else int(np.max(track_ids, initial=-1)) + 1)
  colors = lambda i: (None if track_ids is None else
                      [palette[t] if t >= 0 else (0, 0, 0)
                       for t in track_ids[i]])
  status = video_lib.DecodeStatus()
  written = 0
  with video_lib.VideoWriter(out, vinfo.width, vinfo.height, vinfo.fps) as w:
    for i, frame in enumerate(video_lib.decode_frames(vinfo.path, status)):
      if i >= len(poses):
        break
      w.write(np.asarray(visualize.draw_pose(
          Image.fromarray(frame), poses[i], category, absent=hollow[i],
          pose_colors=colors(i))))
      written += 1
  return written


def identity_colors(num_tracks: int) -> list[tuple[int, int, int]]:
  """RGB colour of identity t: hues evenly spaced (`keypoint_colors`)."""
  return visualize.keypoint_colors(num_tracks)
