"""Video frames in and out (PyAV).

* `probe` / `decode_frames`: a video file -> its frames, uint8 [H, W, 3] RGB,
  in display order. A file that cannot be opened raises `VideoDecodeError`
  naming it; a stream that breaks off (truncated file, corrupt packet) ends
  the frames there and `DecodeStatus` says at which frame and why.
* `FramePipeline`: a background thread that decodes, boxes (a
  `box_policies.BoxPolicy`) and crops frames into batches on a bounded
  queue, so the compiled model is not idle while the next batch is prepared.
* `VideoWriter`: encodes RGB frames (the labelled video) with libx264.
"""

from __future__ import annotations

import dataclasses
import fractions
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


# -- Background decoding ------------------------------------------------------


@dataclasses.dataclass
class FrameBatch:
  """Consecutive frames and, unless the boxes depend on predictions, their
  crops.

  Attributes:
    start: index of the first frame.
    frames: uint8 [H, W, 3] RGB frames.
    boxes: per frame, its (x, y, w, h) pixel boxes (`BoxPolicy.boxes`);
      None: to be chosen by the consumer (``depends_on_predictions``).
    crops: per frame, the crop examples of its boxes
      (`batchers.CropBatcher.crop`), or None likewise.
  """

  start: int
  frames: list[np.ndarray]
  boxes: list[list[tuple]] | None = None
  crops: list[list[dict]] | None = None


class FramePipeline:
  """Decodes, boxes and crops a video in a background thread.

  Batches of ``batch_size`` frames go through a queue of ``queue_size``
  batches (bounded, so memory stays at a few batches); iterate over the
  pipeline to get `FrameBatch` es. For a box policy that does not depend
  on predictions, the thread also crops; otherwise (`box_policies.Track`,
  `box_policies.Detected`) the consumer crops, after the previous batch's
  keypoints are known. Exceptions in the
  thread are re-raised by the iterator.

  Args:
    path: the video.
    batch_size: frames per batch.
    boxes: a `box_policies.BoxPolicy`.
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
      batch.boxes = [self.boxes.boxes(batch.start + j, *self.size)
                     for j in range(len(batch.frames))]
      batch.crops = [[self.crop(f, b) for b in bs]
                     for f, bs in zip(batch.frames, batch.boxes)]
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
