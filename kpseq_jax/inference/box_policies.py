"""Which boxes each video frame is cropped by (``--mode analyze --boxes``).

Every policy is a `BoxPolicy`: `WholeFrame` (default), `BoxFile` (a COCO
detections list, ``image_id`` = 0-based frame index), `Detected` (a
trained detector's boxes, PRTR's two-stage variant) and `Track` (the box
around the previous batch's confident keypoints). `make_policy` builds the
one ``--boxes`` names. A policy gives a list of boxes per frame, best
first; the single-animal policies give one, and the DeepLabCut table keeps
the pose of each frame's first box. With ``max_boxes`` > 1, `BoxFile` and
`Detected` give each frame's several best boxes (``--max_animals``) and
their scores (`BoxPolicy.box_scores`).
"""

import abc
import json
from pathlib import Path

import numpy as np

BBox = tuple[float, float, float, float]  # (x, y, w, h) pixels.


def _whole(width: int, height: int) -> BBox:
  return (0.0, 0.0, float(width), float(height))


class BoxPolicy(abc.ABC):
  """The boxes of each frame of one video.

  Per batch of consecutive frames, the analysis calls `see` (the frames),
  then `boxes` for each frame in order, decodes the crops, then `update`
  (the poses just decoded). A policy with ``depends_on_predictions`` False
  must answer `boxes` without `see` or `update` (from a background thread,
  ahead of the model); otherwise the batch's boxes are asked for after the
  previous batch's `update`.

  Attributes:
    name: written to the video's summary (``boxes``).
    depends_on_predictions: True if `boxes` needs `see` or `update`.
  """

  name: str = ''
  depends_on_predictions: bool = False

  def see(self, start: int, frames: list[np.ndarray]) -> None:
    """Frames ``start``, ``start + 1``, ... (uint8 [H, W, 3] RGB), before
    their `boxes` are asked for. Default: nothing."""
    del start, frames

  @abc.abstractmethod
  def boxes(self, frame_index: int, width: int, height: int) -> list[BBox]:
    """The boxes of frame ``frame_index`` (0-based) of a ``width`` x
    ``height`` video, best first; at least one (the whole frame when the
    policy has none)."""

  def update(self, keypoints_px: list[np.ndarray],
             confidence: list[np.ndarray], width: int, height: int) -> None:
    """The poses just decoded, per frame of the batch in order:
    ``keypoints_px[f]`` float [N_f, K, 2] pixels and ``confidence[f]``
    float [N_f, K] in [0, 1] (NaN: none), one row per box of `boxes`.
    Default: nothing."""
    del keypoints_px, confidence, width, height

  def box_scores(self, frame_index: int) -> list[float] | None:
    """The scores of frame ``frame_index``'s `boxes` (same order), asked
    once after them; None when those boxes are no detections (the whole
    frame, also as a fallback). Default: None."""
    del frame_index
    return None

  def counts(self) -> dict[str, int]:
    """What the policy counted, by `analyze.VideoSummary` field name
    (``frames_without_box``, ``track_lost``, ``track_reacquired``)."""
    return {}


class WholeFrame(BoxPolicy):
  """Every frame is one box: (0, 0, W, H)."""

  name = 'whole frame'

  def boxes(self, frame_index, width, height):
    del frame_index
    return [_whole(width, height)]


class BoxFile(BoxPolicy):
  """Boxes from a COCO detections list, ``image_id`` = 0-based frame index.

  Entries: ``{"image_id": frame, "bbox": [x, y, w, h], "score": s}``
  (pixels; score optional, default 1). A frame gives its ``max_boxes``
  best-scoring boxes (1: single-animal output); a frame with none gives
  the whole frame and is counted in ``frames_without_box``.

  Raises:
    ValueError: the file is not such a list, or an entry (named by its
      index) lacks ``image_id`` or a 4-number ``bbox`` with positive size.
  """

  name = 'box file'

  def __init__(self, path: str | Path, max_boxes: int = 1):
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
      raise ValueError(f'--boxes {path}: a video needs a COCO detections '
                       'list [{"image_id": frame, "bbox": [x, y, w, h]}]')
    found: dict[int, list[tuple[float, int, BBox]]] = {}
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
      found.setdefault(frame, []).append((-score, i, box))
    # Best score first; equal scores in file order.
    best = {f: sorted(v)[:max_boxes] for f, v in found.items()}
    self.by_frame = {f: [b for _, _, b in v] for f, v in best.items()}
    self.scores = {f: [-s for s, _, _ in v] for f, v in best.items()}
    self.frames_without_box = 0

  def boxes(self, frame_index, width, height):
    if frame_index in self.by_frame:
      return list(self.by_frame[frame_index])
    self.frames_without_box += 1
    return [_whole(width, height)]

  def box_scores(self, frame_index):
    return self.scores.get(frame_index)

  def counts(self):
    return {'frames_without_box': self.frames_without_box}


class Detected(BoxPolicy):
  """Boxes from a trained detector (`box_predictor.ImageDetector`) per frame.

  `see` runs ``detector.detect`` on every frame of a batch before it is
  cropped; a frame gives its ``max_boxes`` best boxes at or above the
  detector's threshold (1: single-animal output), or the whole frame when
  there is none (counted in ``frames_without_box``).
  """

  name = 'detector'
  depends_on_predictions = True  # The boxes need the frames (`see`).

  def __init__(self, detector, max_boxes: int = 1):
    self.detector = detector
    self.max_boxes = max_boxes
    self.found: dict[int, list[tuple[BBox, float]]] = {}
    self.scores: dict[int, list[float] | None] = {}
    self.frames_without_box = 0

  def see(self, start, frames):
    for j, frame in enumerate(frames):
      self.found[start + j] = [
          (bbox, score)
          for _, bbox, score in self.detector.detect(frame)[:self.max_boxes]]

  def boxes(self, frame_index, width, height):
    found = self.found.pop(frame_index, None)
    if not found:
      self.frames_without_box += 1
      self.scores[frame_index] = None
      return [_whole(width, height)]
    self.scores[frame_index] = [score for _, score in found]
    return [bbox for bbox, _ in found]

  def box_scores(self, frame_index):
    return self.scores.pop(frame_index, None)

  def counts(self):
    return {'frames_without_box': self.frames_without_box}


class Track(BoxPolicy):
  """The box around the last confident pose seen, else the whole frame.

  After each batch, `update` takes the batch's last frame whose first pose
  has at least ``min_keypoints`` confident keypoints (confidence >=
  ``min_confidence``; with no confidence from the model, NaN, every
  generated keypoint inside the frame counts) and boxes them by
  data_prep's rule for DeepLabCut labels (extent padded by
  ``pad_fraction`` + ``pad_px`` on each side). A side longer than
  ``max_size_px`` (so that one stray keypoint cannot blow the crop up) is
  cut to it, centred on the keypoints' median. The box is clipped to the
  frame; the next batch's frames are all cropped by it, so it lags by up
  to one batch. A batch with no such frame switches back to the whole
  frame (counted in ``lost``). Without a confidence (all NaN) the track
  cannot tell that it lost the animal, so it then starts again from the
  whole frame every ``reacquire_every_batches`` batches (counted in
  ``reacquired``).
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
    self.current: BBox | None = None
    self.lost = 0  # Batches after which the track fell back to whole frame.

  def boxes(self, frame_index, width, height):
    del frame_index
    return [self.current or _whole(width, height)]

  def counts(self):
    return {'track_lost': self.lost, 'track_reacquired': self.reacquired}

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
    # The first (best) box's pose of each frame: [b, K, 2] and [b, K].
    kp = np.stack([np.asarray(p)[0] for p in keypoints_px])
    conf = np.stack([np.asarray(c)[0] for c in confidence])
    self.batches += 1
    if (self.reacquire_every_batches and np.all(np.isnan(conf))
        and self.batches % self.reacquire_every_batches == 0):
      self.current = None
      self.reacquired += 1
      return
    ok = self.confident(kp, conf, width, height)
    for xy, good in zip(kp[::-1], ok[::-1]):
      if good.sum() >= self.min_keypoints:
        box = self._box_around(xy[good], width, height)
        if box is not None:
          self.current = box
          return
    if self.current is not None:
      self.lost += 1
    self.current = None

  def _box_around(self, pts: np.ndarray, width: int, height: int
                  ) -> BBox | None:
    """The padded, size-capped, clipped box of points [n, 2]; None if
    nothing of it is inside the frame."""
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
      return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
    return None


def make_policy(boxes: str | None, min_confidence: float,
                max_size_px: float | None = None, detector=None,
                max_boxes: int = 1) -> BoxPolicy:
  """``--boxes`` -> its policy: None = `WholeFrame` (`Detected` with a
  ``detector``), 'track' = `Track`, else a `BoxFile` path; ``max_boxes``
  per frame for `Detected` and `BoxFile` (``--max_animals``).

  Raises:
    ValueError, OSError: a bad or missing box file (`BoxFile`).
  """
  if not boxes:
    return (WholeFrame() if detector is None
            else Detected(detector, max_boxes=max_boxes))
  if boxes == 'track':
    return Track(min_confidence=min_confidence, max_size_px=max_size_px)
  return BoxFile(boxes, max_boxes=max_boxes)
