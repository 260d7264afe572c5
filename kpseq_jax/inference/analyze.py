r"""Videos -> DeepLabCut-format pose tables, labelled videos, plots (``--mode analyze``).

  python -m kpseq_jax.main --mode analyze --config configs/dlc_openfield.py \
      --workdir DIR --videos VIDEO_OR_FOLDER --out OUT \
      [--boxes track|BOXES.json | --detector_config C --detector_workdir D] \
      [--video_batch_size B] [--filter_window 5] [--nolabeled_video] \
      [--category ID]

``--videos``: a video file (.mp4, .avi, ...; see `video.VIDEO_SUFFIXES`) or
a folder of them (not searched recursively). Every frame is decoded with
PyAV, cropped by its box, and decoded by the model in batches through the
one inference path (`batchers.CropBatcher` -> `predictor.Predictor`), while
a background thread decodes and crops the next batches
(`video.FramePipeline`). Boxes (``--boxes``): none = the whole frame; a
COCO detections list with ``image_id`` = 0-based frame index
(`video.BoxFile`); ``track`` = around the previous batch's confident
keypoints (confidence >= `TRACK_MIN_CONFIDENCE`; `video.Track`), a side at
most twice the median training box side; none with ``--detector_config``
and ``--detector_workdir`` = each frame's best box from the trained
detector (`video.Detected`, PRTR's two-stage variant).

Writes to ``OUT``, per video (``<stem>`` the video's file stem, ``<scorer>``
``KPSEQ_resnet<depth>_<category>_step<checkpoint step>``, as DeepLabCut
names its files ``<stem>DLC_resnet50_...``):
  ``<stem><scorer>.h5`` / ``.csv``: DeepLabCut's table, one row per decoded
    frame (`dlc_output`);
  ``<stem><scorer>_filtered.h5`` / ``.csv``: with ``--filter_window W``, the
    median-filtered table (DeepLabCut's ``filterpredictions``);
  ``<stem><scorer>_labeled.mp4``: the video with the poses drawn as the
    image overlays draw them (`visualize.draw_pose`), from the filtered
    table when there is one; a keypoint whose likelihood is below the
    data set's ``pcutoff`` (DeepLabCut's config; 0.6 otherwise) is a
    hollow circle without its name;
  ``<stem><scorer>_trajectories.png``: `trajectory_plot`;
  ``<stem><scorer>_captions.txt``: one `captions.caption` line per frame
    (filtered table when there is one);
  ``<stem><scorer>_meta.json``: the `VideoSummary` (frames in the header vs
    decoded, where decoding stopped and why, frames/s, boxes used).
A video that cannot be opened is reported (error naming the file) and the
others are analysed; if none can be, `video.VideoDecodeError` is raised. A
video that breaks off mid-stream (truncated file) keeps the rows of the
frames decoded before, and its summary names the frame where it stopped.
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
from PIL import Image
import tensorflow_datasets as tfds
import tqdm

from kpseq_jax.data import dataset
from kpseq_jax.data import visualize
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import captions as captions_lib
from kpseq_jax.inference import dlc_output
from kpseq_jax.inference import batchers
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import trajectory_plot
from kpseq_jax.inference import video as video_lib
from kpseq_jax.runtime import sharding

DEFAULT_PCUTOFF = 0.6  # DeepLabCut's default config.yaml pcutoff.
# `video.Track` follows keypoints with at least this confidence. Measured on
# the open-field video with the 1,500-step dlc_openfield model (2026-11-29):
# on tracked crops the four body parts have median confidences 0.45-0.57
# (quartiles 0.33-0.62); with the track's threshold at DeepLabCut's pcutoff
# of 0.6 it fell back to the (much worse) whole frame most of the time, where
# the head scores 0.3-0.5 and the tail base ~0.01.
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
    boxes: 'whole frame', 'box file', 'track' or 'detector'.
    frames_without_box: box file, detector: frames cropped whole for want
      of a box.
    track_lost: track: batches after which the track fell back to the whole
      frame.
    track_reacquired: track without confidence: batches cropped whole to
      find the animal again (`video.Track`).
    likelihood: 'confidence' (the model's) or 'nan' (none available).
    seconds: wall time of decode + model (first batch included).
    frames_per_s: frames_decoded / seconds.
    frames_per_s_after_first_batch: the same without the first batch
      (compilation), i.e. the steady rate.
    model_wait_s: time the model loop waited for decoded batches (near 0
      when decoding keeps up).
    labeled_video_s: time to re-decode, draw and encode the labelled video.
    files: output kind -> path.
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
  likelihood: str = 'nan'
  seconds: float = 0.0
  frames_per_s: float = 0.0
  frames_per_s_after_first_batch: float = 0.0
  model_wait_s: float = 0.0
  labeled_video_s: float = 0.0
  files: dict[str, str] = dataclasses.field(default_factory=dict)


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
  """``KPSEQ_resnet<depth>_<category>_step<step>`` (file-name safe)."""
  cat = re.sub(r'[^A-Za-z0-9]+', '', category_name) or 'pose'
  return f'KPSEQ_resnet{config.backbone_depth}_{cat}_step{int(step)}'


def make_boxes(boxes: str | None, min_confidence: float,
               max_size_px: float | None = None, detector=None):
  """``--boxes`` -> a box policy of `video` (None, 'track' or a file;
  None with a ``detector``: `video.Detected`)."""
  if not boxes:
    return (video_lib.WholeFrame() if detector is None
            else video_lib.Detected(detector))
  if boxes == 'track':
    return video_lib.Track(min_confidence=min_confidence,
                           max_size_px=max_size_px)
  return video_lib.BoxFile(boxes)


def typical_box_px(dataset_dir: str, split: str,
                   max_records: int = 1000) -> float | None:
  """Median of max(w, h) over the split's boxes (pixels; the first
  ``max_records``), None when the split is empty."""
  src = dataset.records_without_images(
      dataset.data_source(dataset_dir, split))
  sides = [float(np.max(src[i]['bbox'][2:4]))
           for i in range(min(len(src), max_records))]
  return float(np.median(sides)) if sides else None


def likelihood_of(pred: predictor_lib.Prediction, k: int) -> np.ndarray:
  """float [b, k] in [0, 1]: ``pred.confidence`` (the probability mass
  around the decoded coordinates), times ``pred.presence`` (the probability
  that the body part is visible) when the model has an ``<absent>`` token;
  NaN when the model gives no confidence (see `dlc_output`)."""
  conf = getattr(pred, 'confidence', None)
  b = len(pred.num_keypoints)
  if conf is None:
    return np.full([b, k], np.nan)
  out = np.asarray(conf, np.float64)[:, :k]
  presence = getattr(pred, 'presence', None)
  if presence is not None:
    out = out * np.asarray(presence, np.float64)[:, :k]
  return out


def _pcutoff(dataset_dir: str) -> float:
  """The DeepLabCut project's pcutoff stored by data_prep, else 0.6."""
  meta = tfds.builder_from_directory(dataset_dir).info.metadata or {}
  return float((meta.get('source') or {}).get('pcutoff', DEFAULT_PCUTOFF))


def analyze(config: ml_collections.ConfigDict, workdir: str, videos: str,
            out_dir: str, boxes: str | None = None,
            category_id: int | None = None, batch_size: int | None = None,
            filter_window: int = 0, labeled_video: bool = True,
            detector: box_predictor.ImageDetector | None = None
            ) -> list[VideoSummary]:
  """Analyses every video; see the module docstring.

  Args:
    config: the run's config.
    workdir: the trained run (latest checkpoint).
    videos: a video file or folder.
    out_dir: output folder (created).
    boxes: None (whole frame), 'track' or a detections file.
    category_id: the category of the animal (default: the only one).
    batch_size: frames per model call (default ``config.eval_batch_size``).
    filter_window: odd median filter window in frames; 0 = none.
    labeled_video: write ``_labeled.mp4``.
    detector: with ``boxes`` None, each frame's box is this detector's
      best (`video.Detected`).

  Returns:
    The summaries of the videos analysed.

  Raises:
    FileNotFoundError: no checkpoint, data set or video.
    video.VideoDecodeError: no video could be opened.
    ValueError: bad --boxes file, category or filter window.
    NotImplementedError: on more than one process.
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
  for path in paths:  # Before the model is restored: fail fast.
    try:
      probed.append(video_lib.probe(path))
    except video_lib.VideoDecodeError as e:
      logging.error('%s', e)
      failed.append(e)
  if not probed:
    raise failed[0]
  info = dataset.load_info(config.dataset_dir)
  cid = image_inputs.choose_category(info, category_id)
  category = info.categories[cid]
  pcutoff = _pcutoff(config.dataset_dir)
  mesh = sharding.create_mesh(config.mesh_shape)
  model, variables, step = predictor_lib.restore_variables(config, workdir,
                                                          mesh)
  batcher = batchers.make_batcher(
      config, predictor_lib.Predictor(config, model, variables, mesh),
      info.category_index(), batch_size,
      detector=None if boxes else detector)
  scorer = scorer_name(config, category.name, step)
  os.makedirs(out_dir, exist_ok=True)
  # Track: a box side is at most twice the training boxes' typical side.
  # Its confidence threshold is its own (`TRACK_MIN_CONFIDENCE`), not the
  # project's pcutoff, which is on DeepLabCut's likelihood scale.
  typical = (typical_box_px(config.dataset_dir, config.train_split)
             if boxes == 'track' else None)
  summaries = []
  for vinfo in probed:
    try:
      summaries.append(analyze_video(
          vinfo, batcher,
          make_boxes(boxes, TRACK_MIN_CONFIDENCE, typical and 2 * typical,
                     detector),
          category, scorer, out_dir, filter_window, labeled_video, pcutoff))
    except video_lib.VideoDecodeError as e:  # Opens, but no frame decodes.
      logging.error('%s', e)
      failed.append(e)
  if not summaries:
    raise failed[0]
  for e in failed:
    logging.error('Not analysed: %s', e)
  return summaries


def analyze_video(vinfo: video_lib.VideoInfo,
                  batcher: batchers.CropBatcher, policy,
                  category, scorer: str, out_dir: str, filter_window: int,
                  labeled_video: bool, pcutoff: float) -> VideoSummary:
  """One video: decode + model, then tables, labelled video, plot, captions.

  Raises:
    video.VideoDecodeError: not one frame decodes.
  """
  k = category.num_keypoints
  w, h = vinfo.width, vinfo.height
  stem = Path(vinfo.path).stem
  summary = VideoSummary(video=vinfo.path, scorer=scorer, width=w, height=h,
                         fps=vinfo.fps, frames_in_header=vinfo.num_frames,
                         boxes=policy.name)
  pipeline = video_lib.FramePipeline(
      vinfo.path, batcher.batch_size, policy,
      lambda frame, box: batcher.crop(frame, box, category.id), w, h)
  keypoints, likelihood = [], []
  bar = tqdm.tqdm(total=vinfo.num_frames or None, desc=stem, unit='frame')
  t0 = time.perf_counter()
  t_first = None
  try:
    for batch in pipeline:
      if batch.crops is None:  # Boxes from the previous batch's poses
        if isinstance(policy, video_lib.Detected):  # or from the frames.
          policy.see(batch.start, batch.frames)
        batch.boxes = [policy.box(batch.start + j, w, h)
                       for j in range(len(batch.frames))]
        batch.crops = [batcher.crop(f, b, category.id)
                       for f, b in zip(batch.frames, batch.boxes)]
      pred = batcher.predict_crops(batch.crops)
      kp = np.asarray(pred.keypoints_px, np.float64)[:, :k]  # [b, K, 2]
      lk = likelihood_of(pred, k)  # [b, K]
      policy.update(kp, lk, w, h)
      keypoints.append(kp)
      likelihood.append(lk)
      if t_first is None:
        t_first = time.perf_counter()
        summary.likelihood = ('nan' if getattr(pred, 'confidence', None) is None
                              else 'confidence')
      bar.update(len(batch.frames))
  finally:
    bar.close()
  t1 = time.perf_counter()
  status = pipeline.status
  n = status.frames_decoded
  summary.frames_decoded = n
  summary.stopped_early = status.stopped_early or 0 < n < vinfo.num_frames
  summary.error = status.error
  summary.seconds = t1 - t0
  summary.frames_per_s = n / max(summary.seconds, 1e-9)
  first = len(keypoints[0])
  summary.frames_per_s_after_first_batch = (
      (n - first) / max(t1 - t_first, 1e-9) if n > first else 0.0)
  summary.model_wait_s = pipeline.wait_s
  summary.frames_without_box = getattr(policy, 'frames_without_box', 0)
  summary.track_lost = getattr(policy, 'lost', 0)
  summary.track_reacquired = getattr(policy, 'reacquired', 0)
  logging.info('%s: %d frames in %.1f s, %.1f frames/s (%.1f after the first '
               'batch; model waited %.1f s for frames)', vinfo.path, n,
               summary.seconds, summary.frames_per_s,
               summary.frames_per_s_after_first_batch, summary.model_wait_s)
  if summary.stopped_early:
    logging.warning('%s: decoding stopped at frame %d (0-based) of %d in the '
                    'header%s; the %d frames before it are analysed.',
                    vinfo.path, n, vinfo.num_frames,
                    f' ({status.error})' if status.error else '', n)

  write_outputs(vinfo, np.concatenate(keypoints), np.concatenate(likelihood),
                category, summary, out_dir, filter_window, labeled_video,
                pcutoff)
  return summary


def write_outputs(vinfo: video_lib.VideoInfo, xy: np.ndarray,
                  lk: np.ndarray, category, summary: VideoSummary,
                  out_dir: str, filter_window: int, labeled_video: bool,
                  pcutoff: float) -> None:
  """Writes a video's files (module docstring) and lists them in
  ``summary.files``; the summary itself last, as ``_meta.json``.

  Args:
    xy: float [N, K, 2] pixels per decoded frame; lk: float [N, K]
      likelihood (confidence or NaN).
  """
  names = captions_lib.keypoint_names(category.keypoint_names,
                                      category.num_keypoints)
  scorer, w, h = summary.scorer, vinfo.width, vinfo.height
  stem = Path(vinfo.path).stem
  base = Path(out_dir) / f'{stem}{scorer}'
  table = dlc_output.pose_table(xy, lk, names, scorer)
  h5, csv = dlc_output.write_table(table, base.with_suffix('.h5'))
  summary.files.update(h5=str(h5), csv=str(csv))
  if filter_window:
    table = dlc_output.median_filter(table, filter_window)
    fh5, fcsv = dlc_output.write_table(
        table, base.with_name(base.name + '_filtered.h5'))
    summary.files.update(filtered_h5=str(fh5), filtered_csv=str(fcsv))
    xy, lk = dlc_output.table_arrays(table)
  captions_path = base.with_name(base.name + '_captions.txt')
  captions_path.write_text(''.join(captions_lib.caption(p, names) + '\n'
                                   for p in xy))
  summary.files['captions'] = str(captions_path)
  plot = base.with_name(base.name + '_trajectories.png')
  trajectory_plot.plot_trajectories(xy, lk, names, w, h, plot, pcutoff,
                                    title=f'{Path(vinfo.path).name} ({scorer})')
  summary.files['trajectories'] = str(plot)
  if labeled_video:
    out = base.with_name(base.name + '_labeled.mp4')
    t = time.perf_counter()
    write_labeled_video(vinfo, xy, lk, category, out, pcutoff)
    summary.labeled_video_s = time.perf_counter() - t
    logging.info('%s: labelled video in %.1f s -> %s', vinfo.path,
                 summary.labeled_video_s, out)
    summary.files['labeled_video'] = str(out)
  meta = base.with_name(base.name + '_meta.json')
  summary.files['meta'] = str(meta)
  meta.write_text(json.dumps(dataclasses.asdict(summary), indent=1) + '\n')


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
                        pcutoff: float) -> int:
  """Re-decodes the video and draws row i of the table on frame i.

  Args:
    vinfo: the video (`video.probe`).
    xy: float [N, K, 2] pixels; likelihood: float [N, K].
    category: skeleton and names (`visualize.draw_pose`).
    out: the .mp4 to write.
    pcutoff: see `drawable`.

  Returns:
    Frames written (min(N, frames decodable)).
  """
  poses, hollow = drawable(xy, likelihood, pcutoff)
  status = video_lib.DecodeStatus()
  written = 0
  with video_lib.VideoWriter(out, vinfo.width, vinfo.height, vinfo.fps) as w:
    for i, frame in enumerate(video_lib.decode_frames(vinfo.path, status)):
      if i >= len(poses):
        break
      w.write(np.asarray(visualize.draw_pose(Image.fromarray(frame), poses[i],
                                             category, absent=hollow[i])))
      written += 1
  return written
