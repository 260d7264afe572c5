"""Video frames in and out (PyAV), and the box each frame is cropped by.

* `probe` / `decode_frames`: a video file -> its frames, uint8 [H, W, 3] RGB,
  in display order, with PyAV (FFmpeg inside the wheel). A file that cannot
  be opened raises `VideoDecodeError` naming it; a stream that breaks off
  (truncated file, corrupt packet) ends the frames there and the
  `DecodeStatus` says at which frame and why, so the frames before it keep
  their rows.
* Boxes per frame (``--boxes``): `WholeFrame` (default), `BoxFile` (a
  COCO detections list whose ``image_id`` is the 0-based frame index) and
  `Track` (the box around the previous batch's confident keypoints).
* `FramePipeline`: a background thread that decodes, boxes and crops
  frames into batches on a bounded queue, so the compiled model is not
  idle while the next batch is prepared.
* `VideoWriter`: encodes RGB frames (the labelled video) with libx264.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np

VIDEO_SUFFIXES = ('.avi', '.mkv', '.mov', '.mp4', '.mpeg', '.mpg', '.webm')


class VideoDecodeError(OSError):
  """A video file that cannot be opened or has no decodable video stream."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container says about a video.

  Attributes:
    path: the file.
    width, height: frame size in pixels.
    fps: average frame rate (frames per second; 30 when unknown).
    num_frames: frame count from the header (``stream.frames``), or from
      duration x rate when the header has none; 0 when neither is known.
    codec: the decoder's name, e.g. 'h264'.
  """

  path: str
  width: int
  height: int
  fps: float
  num_frames: int
  codec: str


@dataclasses.dataclass
class DecodeStatus:
  """How decoding went.

  Attributes:
    frames_decoded: frames produced (rows of the output).
    stopped_early: True if the stream broke off before its end (an FFmpeg
      error, e.g. a truncated file); the frames before stay.
    error: FFmpeg's message when ``stopped_early``.
  """

  frames_decoded: int = 0
  stopped_early: bool = False
  error: str = ''


def _open(path: str | Path):
  try:
    container = av.open(str(path))
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoDecodeError(f'{path}: cannot open the video ({e})') from e
  if not container.streams.video:
    container.close()
    raise VideoDecodeError(f'{path}: no video stream in the file')
  return container, container.streams.video[0]


def probe(path: str | Path) -> VideoInfo:
  """Reads a video's header.

  Raises:
    VideoDecodeError: the file is missing, not a video, or has no video
      stream (the message names the file).
  """
  container, stream = _open(path)
  try:
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 30.0
    n = int(stream.frames or 0)
    if not n and stream.duration and stream.time_base:
      n = int(round(float(stream.duration * stream.time_base) * fps))
    elif not n and container.duration:
      n = int(round(container.duration / av.time_base * fps))
    return VideoInfo(path=str(path), width=stream.codec_context.width,
                     height=stream.codec_context.height, fps=fps,
                     num_frames=n, codec=stream.codec_context.name)
  finally:
    container.close()


def decode_frames(path: str | Path, status: DecodeStatus
                  ) -> Iterator[np.ndarray]:
  """Yields every frame of a video as uint8 [H, W, 3] RGB.

  Decoding uses FFmpeg's frame threads. An FFmpeg error while decoding ends
  the iteration (``status.stopped_early``, ``status.error``) instead of
  raising: the frames before it are good.

  Args:
    path: the video file.
    status: updated as frames are produced.

  Raises:
    VideoDecodeError: the file cannot be opened, or not one frame decodes.
  """
  container, stream = _open(path)
  stream.thread_type = 'AUTO'
  try:
    frames = container.decode(stream)
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        break
      except (av.error.FFmpegError, EOFError) as e:
        status.stopped_early, status.error = True, f'{type(e).__name__}: {e}'
        break
      status.frames_decoded += 1
      yield frame.to_ndarray(format='rgb24')
  finally:
    container.close()
  if status.frames_decoded == 0:
    raise VideoDecodeError(f'{path}: no frame could be decoded'
                           + (f' ({status.error})' if status.error else ''))


# -- Boxes --------------------------------------------------------------------


class WholeFrame:
  """Every frame is one box: (0, 0, W, H)."""

  name = 'whole frame'
  depends_on_predictions = False

  def box(self, frame_index: int, width: int, height: int
          ) -> tuple[float, float, float, float]:
    del frame_index
    return (0.0, 0.0, float(width), float(height))

  def update(self, keypoints_px: np.ndarray, confidence: np.ndarray,
             width: int, height: int) -> None:
    del keypoints_px, confidence, width, height


class BoxFile:
  """Boxes from a COCO detections list, ``image_id`` = 0-based frame index.

  Entries: ``{"image_id": frame, "bbox": [x, y, w, h], "score": s}``
  (pixels; score optional). A frame with several boxes uses the one with
  the highest score (single-animal output); a frame with none uses the
  whole frame and is counted in `frames_without_box`.

  Raises:
    ValueError: the file is not such a list, or an entry lacks
      ``image_id`` or a 4-number ``bbox`` with positive size.
  """

  name = 'box file'
  depends_on_predictions = False

  def __init__(self, path: str | Path):
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
      raise ValueError(f'--boxes {path}: a video needs a COCO detections '
                       'list [{"image_id": frame, "bbox": [x, y, w, h]}]')
    self.boxes: dict[int, tuple[float, tuple]] = {}
    for i, e in enumerate(data):
      try:
        frame, box = int(e['image_id']), tuple(float(v) for v in e['bbox'])
        score = float(e.get('score', 1.0))
      except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f'--boxes {path}: entry {i} needs image_id (frame '
                         f'index) and bbox [x, y, w, h] ({err!r})') from err
      if len(box) != 4 or not (box[2] > 0 and box[3] > 0):
        raise ValueError(f'--boxes {path}: entry {i} bbox {list(box)} has '
                         'no area')
      if frame not in self.boxes or score > self.boxes[frame][0]:
        self.boxes[frame] = (score, box)
    self.frames_without_box = 0

  def box(self, frame_index, width, height):
    if frame_index in self.boxes:
      return self.boxes[frame_index][1]
    self.frames_without_box += 1
    return (0.0, 0.0, float(width), float(height))

  def update(self, keypoints_px, confidence, width, height):
    del keypoints_px, confidence, width, height


class Detected:
  """Boxes from a trained detector (PRTR's two-stage variant), per frame.

  `see` runs ``detector.detect`` (`box_predictor.ImageDetector`) on every
  frame of a batch before it is cropped; a frame uses its best-scoring box
  at or above the detector's threshold (single-animal output), or the
  whole frame when there is none (counted in `frames_without_box`). The
  boxes need the frames, so the crops are made in the main loop
  (``depends_on_predictions``).
  """

  name = 'detector'
  depends_on_predictions = True

  def __init__(self, detector):
    self.detector = detector
    self.boxes: dict[int, tuple | None] = {}
    self.frames_without_box = 0

  def see(self, start: int, frames: list[np.ndarray]) -> None:
    """Detects on frames ``start``, ``start + 1``, ... (uint8 [H, W, 3])."""
    for j, frame in enumerate(frames):
      found = self.detector.detect(frame)
      self.boxes[start + j] = found[0][1] if found else None

  def box(self, frame_index, width, height):
    b = self.boxes.pop(frame_index, None)
    if b is None:
      self.frames_without_box += 1
      return (0.0, 0.0, float(width), float(height))
    return b

  def update(self, keypoints_px, confidence, width, height):
    del keypoints_px, confidence, width, height


class Track:
  """The box around the last confident pose seen, else the whole frame.

  After each batch, `update` takes the batch's last frame with at least
  ``min_keypoints`` confident keypoints (confidence >= ``min_confidence``;
  with no confidence from the model, NaN, every generated keypoint inside
  the frame counts) and boxes them by data_prep's rule for DeepLabCut
  labels (extent padded by ``pad_fraction`` + ``pad_px`` on each side). A
  side longer than ``max_size_px`` (e.g. twice the training boxes' typical
  size, so that one stray keypoint cannot blow the crop up) is cut to it,
  centred on the keypoints' median. The box is clipped to the frame; the
  next batch's frames are all cropped by it, so it lags by up to one batch:
  a smaller ``--video_batch_size`` follows fast motion more closely. A
  batch with no such frame switches back to the whole frame (counted in
  `lost`). Without a confidence (all NaN) the track cannot tell that it
  lost the animal (it then follows the background, e.g. a corner the animal
  left); so it then starts again from the whole frame every
  ``reacquire_every_batches`` batches (counted in `reacquired`), which
  costs those frames the whole-frame accuracy.
  """

  name = 'track'
  depends_on_predictions = True

  def __init__(self, min_confidence: float = 0.4, min_keypoints: int = 2,
               pad_fraction: float = 0.25, pad_px: float = 16.0,
               max_size_px: float | None = None,
               reacquire_every_batches: int = 30):
    self.min_confidence = min_confidence
    self.reacquire_every_batches = reacquire_every_batches
    self.batches = 0
    self.reacquired = 0  # Batches cropped whole for want of a confidence.
    self.min_keypoints = min_keypoints
    self.pad_fraction = pad_fraction
    self.pad_px = pad_px
    self.max_size_px = max_size_px
    self.current: tuple[float, float, float, float] | None = None
    self.lost = 0  # Batches after which the track fell back to whole frame.

  def box(self, frame_index, width, height):
    del frame_index
    return self.current or (0.0, 0.0, float(width), float(height))

  def confident(self, keypoints_px: np.ndarray, confidence: np.ndarray,
                width: int, height: int) -> np.ndarray:
    """bool [..., K]: keypoints the track may follow (see class doc)."""
    xy = keypoints_px
    ok = (np.all(np.isfinite(xy), axis=-1) & (xy[..., 0] >= 0)
          & (xy[..., 0] <= width) & (xy[..., 1] >= 0) & (xy[..., 1] <= height))
    with np.errstate(invalid='ignore'):
      sure = np.isnan(confidence) | (confidence >= self.min_confidence)
    return ok & sure

  def update(self, keypoints_px, confidence, width, height):
    """Args: keypoints_px float [b, K, 2] pixels, confidence float [b, K]
    in [0, 1] or NaN, of the batch just decoded (frames in order)."""
    self.batches += 1
    if (self.reacquire_every_batches and np.all(np.isnan(confidence))
        and self.batches % self.reacquire_every_batches == 0):
      self.current = None
      self.reacquired += 1
      return
    ok = self.confident(keypoints_px, confidence, width, height)
    for xy, good in zip(keypoints_px[::-1], ok[::-1]):
      if good.sum() >= self.min_keypoints:
        pts = xy[good]
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        pad = self.pad_fraction * (hi - lo) + self.pad_px
        lo, hi = lo - pad, hi + pad
        if self.max_size_px:
          centre = np.median(pts, axis=0)
          half = self.max_size_px / 2
          big = hi - lo > self.max_size_px
          lo = np.where(big, centre - half, lo)
          hi = np.where(big, centre + half, hi)
        x0, y0 = np.maximum(lo, 0.0)
        x1, y1 = np.minimum(hi, [width, height])
        if x1 > x0 and y1 > y0:
          self.current = (float(x0), float(y0), float(x1 - x0),
                          float(y1 - y0))
          return
    if self.current is not None:
      self.lost += 1
    self.current = None


# -- Background decoding ------------------------------------------------------


@dataclasses.dataclass
class FrameBatch:
  """Consecutive frames and, unless the boxes depend on predictions, their
  crops.

  Attributes:
    start: index of the first frame.
    frames: uint8 [H, W, 3] RGB frames.
    boxes: (x, y, w, h) pixels per frame (None: to be chosen by the
      consumer, as for `Track`).
    crops: crop examples (`batchers.CropBatcher.crop`) or None.
  """

  start: int
  frames: list[np.ndarray]
  boxes: list[tuple] | None = None
  crops: list[dict] | None = None


class FramePipeline:
  """Decodes, boxes and crops a video in a background thread.

  Batches of ``batch_size`` frames go through a queue of ``queue_size``
  batches (bounded, so memory stays at a few batches); iterate over the
  pipeline to get `FrameBatch` es. For a box policy that does not depend
  on predictions, the thread also crops; otherwise (`Track`) the consumer
  crops, after the previous batch's keypoints are known. Exceptions in the
  thread are re-raised by the iterator.

  Args:
    path: the video.
    batch_size: frames per batch.
    boxes: `WholeFrame`, `BoxFile` or `Track`.
    crop: ``crop(frame, bbox) -> example`` (thread-safe).
    width, height: the frame size (from `probe`).
    queue_size: batches decoded ahead.
  """

  def __init__(self, path: str | Path, batch_size: int, boxes,
               crop: Callable[[np.ndarray, tuple], dict], width: int,
               height: int, queue_size: int = 3):
    self.path = path
    self.batch_size = batch_size
    self.boxes = boxes
    self.crop = crop
    self.size = (width, height)
    self.status = DecodeStatus()
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='decode-frames')
    self.wait_s = 0.0  # Time the consumer waited for a batch.

  _DONE = object()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      batch = FrameBatch(start=0, frames=[])
      for i, frame in enumerate(decode_frames(self.path, self.status)):
        batch.frames.append(frame)
        if len(batch.frames) == self.batch_size:
          if not self._put(self._prepare(batch)):
            return
          batch = FrameBatch(start=i + 1, frames=[])
      if batch.frames and not self._put(self._prepare(batch)):
        return
      self._put(self._DONE)
    except BaseException as e:  # Re-raised in the consumer.
      self._put(e)

  def _prepare(self, batch: FrameBatch) -> FrameBatch:
    if not self.boxes.depends_on_predictions:
      batch.boxes = [self.boxes.box(batch.start + j, *self.size)
                     for j in range(len(batch.frames))]
      batch.crops = [self.crop(f, b) for f, b in zip(batch.frames,
                                                     batch.boxes)]
    return batch

  def __iter__(self) -> Iterator[FrameBatch]:
    self._thread.start()
    try:
      while True:
        t = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t
        if item is self._DONE:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      self._stop.set()
      self._thread.join()


# -- Writing ------------------------------------------------------------------


class VideoWriter:
  """Encodes RGB frames to an H.264 MP4 (libx264, yuv420p, CRF 23).

  Odd frame sizes are padded by one black row/column (yuv420p needs even
  sizes). Use as a context manager; `write` takes uint8 [H, W, 3].
  """

  def __init__(self, path: str | Path, width: int, height: int, fps: float):
    self.container = av.open(str(path), mode='w')
    rate = fractions.Fraction(fps).limit_denominator(1001)
    self.stream = self.container.add_stream('libx264', rate=rate)
    self.stream.width, self.stream.height = width + width % 2, height + height % 2
    self.stream.pix_fmt = 'yuv420p'
    self.stream.options = {'crf': '23', 'preset': 'veryfast'}

  def write(self, frame: np.ndarray) -> None:
    h, w = frame.shape[:2]
    if (w, h) != (self.stream.width, self.stream.height):
      frame = np.pad(frame, [(0, self.stream.height - h),
                             (0, self.stream.width - w), (0, 0)])
    for packet in self.stream.encode(av.VideoFrame.from_ndarray(
        np.ascontiguousarray(frame), format='rgb24')):
      self.container.mux(packet)

  def close(self) -> None:
    for packet in self.stream.encode():  # Flush.
      self.container.mux(packet)
    self.container.close()

  def __enter__(self) -> 'VideoWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
