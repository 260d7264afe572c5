r"""SLEAP labels files (.slp) -> the same data set as from COCO files.

  python -m data_prep.build --slp clip.slp --slp test=two_flies.slp \
      --slp_split train=0:0.8,val=0.8:1 --every_nth_frame train=4,val=4 --out OUT

Reads each file with ``sleap-io`` (`sleap_io.load_slp`, which finds the
video beside the file) and turns it into `multi_animal.Frame`s, then COCO
dicts that `build.build_from_coco_data` validates and writes (there is one
builder); frames are decoded from the videos while the data set is written
(`VideoFrameLoader`), each stored once however many animals it shows.

* one record per instance: every animal of a frame, its keypoints (SLEAP's
  invisible or unplaced nodes are unlabelled, v = 0: in SLEAP a node marked
  not visible is out of sight, so the data set's ``unlabelled_means`` is
  'absent', as for DeepLabCut), its box (`multi_animal.labelled_box`, the
  DeepLabCut import's rule) and its identity: the track name in the
  record's ``track`` ('' for an untracked instance);
* user instances first: a frame's user instances, plus its predictions that
  no user instance replaced (SLEAP's ``LabeledFrame.unused_predictions``:
  same track, or ``from_predicted`` when untracked); with
  ``user_instances_only`` predictions are never imported;
* the skeleton of the first file: its nodes are the keypoints, its edges the
  skeleton. Left/right flip pairs come from the node names
  (`categories.flip_pairs_from_names`: wingL/wingR, eyeL/eyeR,
  forelegL4/forelegR4, ...), since SLEAP files often declare no symmetries
  (the flies' do not). An instance whose skeleton has the same nodes in
  another order is reordered by name;
* splits: ``SPLIT=FILE`` puts the whole file in SPLIT; a file without a
  name is cut by time (``time_split``, default ``train=0:1``): its labelled
  frames in time order (video by video, frame index within), frame i of n
  in split ``name=a:b`` when ``a <= i / n < b``. Ranges may leave gaps (a
  gap between train and validation keeps neighbouring, nearly identical
  frames apart) but not overlap. Then ``every_nth_frame`` keeps every n-th
  frame of each split in time order, starting with its first.

Bad input is skipped, counted and listed in ``prep_report.json`` under
``source`` (`ImportReport`, every entry naming the file, video and frame),
good frames kept: a missing video (``video_missing``), a video that cannot
be opened (``video_unreadable``), a frame index past the video's end
(``frame_past_video_end``), an instance with no labelled node
(``no_labelled_node``), an instance whose skeleton differs from the first
file's (``skeleton_differs``), a frame already imported from an earlier
file (``duplicate_frame``). A frame that fails to decode while writing is
skipped by the builder (``video_frame_undecodable``, under ``splits``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image

from data_prep import categories as categories_lib
from data_prep import images as images_lib
from data_prep import multi_animal
from data_prep import validate

# `build.UNLABELLED_MEANS` of an imported file: a node SLEAP marks not
# visible is out of sight.
UNLABELLED_MEANS = 'absent'
# sleap-io's video plugin: PyAV (`av`, already a requirement) seeks H.264
# several times faster than its imageio-ffmpeg default.
VIDEO_PLUGIN = 'pyav'
# Up to this many frames ahead, `VideoFrameLoader` reads on through the video
# instead of seeking: sleap-io's PyAV reader seeks to the keyframe before a
# frame and decodes from there, but reads the next frame directly (on
# clip.mp4, every 4th frame: 0.62 s a frame by seeking, 0.05 s reading on,
# on a busy 2-core machine; the pixels are the same).
MAX_READ_AHEAD = 32
_SPLIT_NAME = re.compile(r'^\w+$', re.ASCII)


class SleapImportError(ValueError):
  """SLEAP input that cannot be imported at all; the message says why."""


def parse_slp_argument(arg: str) -> tuple[str | None, Path]:
  """An ``--slp`` value: ``FILE`` (cut by time) or ``SPLIT=FILE`` (whole file).

  Raises:
    SleapImportError: an empty split name or file.
  """
  name, sep, rest = arg.partition('=')
  if sep and _SPLIT_NAME.match(name):
    split, path = name, rest
  else:
    split, path = None, arg
  if not path:
    raise SleapImportError(f'--slp {arg!r}: no file')
  return split, Path(path)


def parse_time_split(text: str) -> dict[str, tuple[float, float]]:
  """``'train=0:0.8,val=0.8:1'`` -> {'train': (0.0, 0.8), 'val': (0.8, 1.0)}.

  Raises:
    SleapImportError: malformed, a bound outside [0, 1], an empty range or
      two ranges that overlap.
  """
  out: dict[str, tuple[float, float]] = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, sep, bounds = part.partition('=')
    lo, colon, hi = bounds.partition(':')
    try:
      a, b = float(lo), float(hi)
    except ValueError:
      a = b = float('nan')
    if not (sep and colon and _SPLIT_NAME.match(name) and 0 <= a < b <= 1) or name in out:
      raise SleapImportError(f'--slp_split {text!r}: {part!r} is not NAME=START:END with '
                             '0 <= START < END <= 1 (fractions of the frames in time order), '
                             'each name once')
    out[name] = (a, b)
  ranges = sorted(out.values())
  for (_, end), (start, _) in zip(ranges, ranges[1:]):
    if start < end:
      raise SleapImportError(f'--slp_split {text!r}: ranges overlap')
  if not out:
    raise SleapImportError(f'--slp_split {text!r}: no range')
  return out


def parse_every_nth(text: str) -> dict[str, int] | int:
  """``'4'`` -> 4 (every split); ``'train=4,val=1'`` -> {'train': 4, 'val': 1}
  (splits not named: 1).

  Raises:
    SleapImportError: not a positive integer.
  """
  def positive(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
      raise SleapImportError(f'--every_nth_frame {text!r}: {value!r} is not a positive integer')
    return int(value)
  if '=' not in text:
    return positive(text)
  return {name.strip(): positive(n) for name, _, n in (p.partition('=') for p in text.split(',') if p)}


@dataclasses.dataclass
class ImportReport:
  """What the import read, kept and skipped (``prep_report.json`` "source").

  Attributes:
    files: the .slp files read (absolute paths), in order, and the split
      each went to ('time' = cut by ``time_split``).
    time_split / every_nth_frame / user_instances_only: the options.
    keypoint_names: the skeleton's nodes (the first file's).
    flip_pairs: left/right node-name pairs found from the names.
    frames_read: labelled frames in the files.
    frames_not_selected: frames outside every split range or left out by
      ``every_nth_frame``.
    user_instances / predicted_instances: instances imported.
    predictions_replaced: predictions left out because a user instance in
      their frame replaced them (or ``user_instances_only``).
    instances_reordered: instances whose skeleton lists the same nodes in
      another order (reordered by name).
    frames_per_split / instances_per_split: what went to each split.
    tracks_per_split: the identities of each split.
    skipped: one entry per skipped frame or instance: file, video, frame
      (index in the video), instance (position in the frame; None = the
      whole frame), track, reason, detail.
  """

  files: list[list[str]] = dataclasses.field(default_factory=list)
  time_split: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  every_nth_frame: dict[str, int] | int = 1
  user_instances_only: bool = False
  keypoint_names: list[str] = dataclasses.field(default_factory=list)
  flip_pairs: list[list[str]] = dataclasses.field(default_factory=list)
  frames_read: int = 0
  frames_not_selected: int = 0
  user_instances: int = 0
  predicted_instances: int = 0
  predictions_replaced: int = 0
  instances_reordered: int = 0
  frames_per_split: dict[str, int] = dataclasses.field(default_factory=dict)
  instances_per_split: dict[str, int] = dataclasses.field(default_factory=dict)
  tracks_per_split: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def skip(self, file: str, video: str, frame: int, reason: str, detail: str,
           instance: int | None = None, track: str = '') -> None:
    self.skipped.append(dict(file=file, video=video, frame=int(frame), instance=instance, track=track,
                             reason=reason, detail=detail))

  def skipped_by_reason(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(s['reason'] for s in self.skipped).items()))

  def to_json(self) -> dict[str, Any]:
    return dict(format='sleap', skipped_by_reason=self.skipped_by_reason(), **dataclasses.asdict(self))

  def warnings(self) -> list[str]:
    """One line per (file, reason) skipped, with the first case's detail."""
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for s in self.skipped:
      groups[s['file'], s['reason']].append(s)
    out = []
    for (file, reason), items in groups.items():
      frames = sorted({s['frame'] for s in items})
      what = (f'{len(items)} instance(s) in {len(frames)} frame(s)' if items[0]['instance'] is not None
              else f'{len(frames)} frame(s)')
      out.append(f'{file}: {what} skipped ({reason}), frames {frames[:5]}{"..." if len(frames) > 5 else ""}: '
                 f'{items[0]["detail"]}')
    return out


class VideoFrameLoader:
  """Decodes a frame per image id (`records.ImageLoader` of the SLEAP import).

  Calling it with a `coco.ImageEntry` returns (`images.EncodedImage` of the
  frame as 8-bit RGB PNG, the image store's encoding of a greyscale image,
  None) or (None, `validate.Problem` 'video_frame_undecodable' naming the
  file, video and frame). The last frame is remembered (a frame's instances
  come one after another); a frame at most `MAX_READ_AHEAD` after the last
  one read from its video is reached by reading on, not seeking.

  Args:
    frames: image id -> (sleap-io `Video`, frame index, labels file).
  """

  def __init__(self, frames: Mapping[int, tuple[Any, int, str]]):
    self._frames = dict(frames)
    self._last: tuple[int | None, Any] = (None, None)
    self._position: dict[int, int] = {}  # id(video) -> last frame index read.

  def __call__(self, entry):
    if self._last[0] != entry.id:
      self._last = (entry.id, self._load(entry))
    return self._last[1]

  def _load(self, entry):
    video, frame_idx, labels_file = self._frames[entry.id]
    try:
      pixels = self._read(video, frame_idx)  # uint8 [H, W, C], C = 1 (grey) or 3.
      image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    except Exception as e:  # pylint: disable=broad-except  (any backend error = this frame lost)
      return None, validate.Problem('file_name', 'video_frame_undecodable',
                                    f'{labels_file} frame {frame_idx} of {video.filename}: '
                                    f'{type(e).__name__}: {e}')
    rgb = images_lib.to_rgb8(image)
    return images_lib.EncodedImage(images_lib.encode_png(rgb), rgb.height, rgb.width, kept_original=False,
                                   exif_rotated=False, source_mode=image.mode), None

  def _read(self, video, frame_idx: int) -> np.ndarray:
    last = self._position.pop(id(video), None)
    if last is not None and 0 < frame_idx - last <= MAX_READ_AHEAD:
      for i in range(last + 1, frame_idx):
        video[i]  # pylint: disable=pointless-statement  (reads on: no seek)
    pixels = np.asarray(video[frame_idx])
    self._position[id(video)] = frame_idx
    return pixels


@dataclasses.dataclass(frozen=True)
class _Candidate:
  """A labelled frame picked for a split, before its checks."""

  labels_file: str
  labeled_frame: Any  # sleap_io.LabeledFrame
  split: str


def load_labels(path: Path):
  """`sleap_io.load_slp` with a clear error.

  Raises:
    SleapImportError: the file is missing or not a SLEAP labels file.
  """
  import sleap_io  # pylint: disable=g-import-not-at-top  (a heavy import, only for --slp)
  if not path.is_file():
    raise SleapImportError(f'{path}: no such SLEAP labels file')
  # The videos open with `VIDEO_PLUGIN` from the start: opened with
  # sleap-io's imageio-ffmpeg default, the first `video.open(plugin=...)`
  # closes that backend, and closing asks it for the frame count, which it
  # finds by decoding the whole video in an ffmpeg process (clip.slp's 1500
  # frames: 5 to 9 s per file, against 0.6 s for PyAV's count from the
  # container).
  default = sleap_io.get_default_video_plugin()
  sleap_io.set_default_video_plugin(VIDEO_PLUGIN)
  try:
    return sleap_io.load_slp(str(path))
  except Exception as e:  # pylint: disable=broad-except  (h5py/sleap-io raise many kinds)
    raise SleapImportError(f'{path}: cannot read it as a SLEAP labels file: {type(e).__name__}: {e}') from e
  finally:
    sleap_io.set_default_video_plugin(default)


def select_frames(labels, labels_file: str, split: str | None, time_split: Mapping[str, tuple[float, float]],
                  every_nth: Mapping[str, int] | int, report: ImportReport) -> list[_Candidate]:
  """The file's labelled frames in time order, assigned to splits (module
  docstring: whole-file split, else the time ranges; then every n-th)."""
  order = {id(v): i for i, v in enumerate(labels.videos)}
  frames = sorted(labels.labeled_frames, key=lambda lf: (order.get(id(lf.video), len(order)), lf.frame_idx))
  report.frames_read += len(frames)
  n = len(frames)
  by_split: dict[str, list] = collections.defaultdict(list)
  for i, lf in enumerate(frames):
    if split is not None:
      by_split[split].append(lf)
      continue
    for name, (a, b) in time_split.items():
      if a <= i / n < b:
        by_split[name].append(lf)
        break
  out = []
  for name, lfs in by_split.items():
    step = every_nth if isinstance(every_nth, int) else every_nth.get(name, 1)
    out.extend(_Candidate(labels_file, lf, name) for lf in lfs[::step])
  report.frames_not_selected += n - len(out)
  return out


def _video_check(video, cache: dict) -> tuple[tuple[str, str] | None, tuple | None]:
  """((reason, detail) when the video cannot be read, else None; its shape
  (frames, H, W, C)), found once per video: sleap-io's ``Video.shape`` opens
  and closes the file on every call (imageio's PyAV plugin then runs
  ``gc.collect``, 0.1-1 s)."""
  key = id(video)
  if key not in cache:
    if not video.exists():
      cache[key] = (('video_missing', f'video {video.filename} does not exist (sleap-io looks for it at the '
                     'path stored in the file and beside the file)'), None)
      return cache[key]
    try:
      video.open(plugin=VIDEO_PLUGIN)
      shape = video.shape  # (frames, H, W, C); None when the backend cannot read it.
    except Exception as e:  # pylint: disable=broad-except
      shape, why = None, f'{type(e).__name__}: {e}'
    else:
      why = 'no frame could be read'
    cache[key] = (None, shape)
    if shape is None or shape[0] < 1:
      cache[key] = (('video_unreadable', f'video {video.filename} cannot be read ({why})'), None)
  return cache[key]


def _instances(lf, user_only: bool, report: ImportReport) -> list:
  """The frame's instances to import: user ones, plus predictions no user
  instance replaced (SLEAP's ``unused_predictions``) unless ``user_only``."""
  kept = list(lf.user_instances)
  unused = [] if user_only else list(lf.unused_predictions)
  report.predictions_replaced += len(lf.predicted_instances) - len(unused)
  return kept + unused


def _keypoints(inst, names: Sequence[str]) -> np.ndarray | None:
  """float64 [K, 2] of ``inst`` in the order of ``names`` (NaN = not
  labelled), or None when its skeleton has other nodes."""
  own = list(inst.skeleton.node_names)
  if sorted(own) != sorted(names):
    return None
  xy = np.asarray(inst.numpy(), np.float64)[:, :2]
  return xy if own == list(names) else xy[[own.index(n) for n in names]]


def check_frame(cand: _Candidate, names: Sequence[str], user_only: bool, report: ImportReport,
                video_cache: dict) -> multi_animal.Frame | None:
  """One candidate frame -> the `multi_animal.Frame` to write, or None when
  nothing of it is kept (each problem recorded on ``report``)."""
  lf, file = cand.labeled_frame, cand.labels_file
  video, idx = lf.video, int(lf.frame_idx)
  problem, shape = _video_check(video, video_cache)
  if problem is None and idx >= shape[0]:
    problem = ('frame_past_video_end', f'past the end of {video.filename} ({shape[0]} frames)')
  if problem is not None:
    report.skip(file, video.filename, idx, problem[0], f'{file} frame {idx}: {problem[1]}')
    return None
  animals = []
  for i, inst in enumerate(_instances(lf, user_only, report)):
    track = inst.track.name if inst.track is not None else ''
    xy = _keypoints(inst, names)
    if xy is None:
      report.skip(file, video.filename, idx, 'skeleton_differs',
                  f'{file} frame {idx}: instance skeleton nodes {list(inst.skeleton.node_names)} differ from '
                  f'the first file\'s {list(names)}', i, track)
    elif not np.all(np.isfinite(xy), axis=1).any():
      report.skip(file, video.filename, idx, 'no_labelled_node',
                  f'{file} frame {idx}: instance {i} (track {track!r}) has no labelled node', i, track)
    else:
      report.instances_reordered += list(inst.skeleton.node_names) != list(names)
      predicted = type(inst).__name__ == 'PredictedInstance'
      report.predicted_instances += predicted
      report.user_instances += not predicted
      animals.append(multi_animal.AnimalInstance(xy=xy, track=track, predicted=predicted))
  if not animals:
    return None
  _, height, width, _ = shape
  return multi_animal.Frame(file_name=f'{Path(video.filename).name}#{idx}', width=int(width),
                            height=int(height), instances=tuple(animals), source=file)


def category_name(skeleton) -> str:
  """The skeleton's name, or 'animal' for SLEAP's default 'Skeleton-<n>'."""
  name = skeleton.name or ''
  return 'animal' if not name or re.fullmatch(r'Skeleton-\d+', name) else name


def to_coco(slp_files: Sequence[tuple[str | None, str | Path]],
            time_split: Mapping[str, tuple[float, float]] | None = None,
            every_nth_frame: Mapping[str, int] | int = 1, user_instances_only: bool = False,
            ) -> tuple[dict[str, dict[str, Any]], ImportReport, VideoFrameLoader]:
  """Converts SLEAP files into one COCO keypoint dict per split.

  Args:
    slp_files: (split or None = cut by ``time_split``, .slp path), in order.
    time_split: split -> (start, end) fractions of a file's frames in time
      order (default {'train': (0, 1)}).
    every_nth_frame: n for all splits, or split -> n (others 1).
    user_instances_only: never import predicted instances.

  Returns:
    ({split: COCO dict} with image/annotation ids unique over all splits and
    a ``track`` per annotation, the report, the loader decoding each image
    id's frame).

  Raises:
    SleapImportError: a file is missing or unreadable, has no skeleton, or
      a split ends up with no frame (the message gives the skip counts).
  """
  time_split = dict(time_split or {'train': (0.0, 1.0)})
  named = set(time_split) | {s for s, _ in slp_files if s}
  if isinstance(every_nth_frame, Mapping) and set(every_nth_frame) - named:
    raise SleapImportError(f'--every_nth_frame names split(s) {sorted(set(every_nth_frame) - named)} '
                           f'that no file goes to (splits: {sorted(named)})')
  report = ImportReport(time_split={k: list(v) for k, v in time_split.items()},
                        every_nth_frame=every_nth_frame, user_instances_only=user_instances_only)
  candidates, skeleton = [], None
  for split, path in slp_files:
    labels = load_labels(Path(path))
    if skeleton is None:
      if not labels.skeletons:
        raise SleapImportError(f'{path}: no skeleton')
      skeleton = labels.skeletons[0]
    report.files.append([str(Path(path).resolve()), split or 'time'])
    candidates += select_frames(labels, str(path), split, time_split, every_nth_frame, report)
  names = list(skeleton.node_names)
  report.keypoint_names = names
  report.flip_pairs = [[names[i], names[j]] for i, j in categories_lib.flip_pairs_from_names(names)]
  by_split = _checked_frames(candidates, names, user_instances_only, report)
  for line in report.warnings():
    logging.warning('SLEAP import: %s', line)
  category = multi_animal.category(category_name(skeleton), names, skeleton.edge_inds)
  return _coco_splits(by_split, category, report)


def _checked_frames(candidates, names, user_only, report) -> dict[str, list[tuple[multi_animal.Frame, Any]]]:
  """split -> [(frame, its sleap-io LabeledFrame)] that passed the checks."""
  video_cache: dict = {}
  seen: dict[tuple[str, int], str] = {}
  by_split: dict[str, list] = collections.defaultdict(list)
  for cand in candidates:
    lf = cand.labeled_frame
    key = (str(Path(lf.video.filename).resolve()), int(lf.frame_idx))
    if key in seen:
      report.skip(cand.labels_file, lf.video.filename, lf.frame_idx, 'duplicate_frame',
                  f'{cand.labels_file} frame {lf.frame_idx}: this frame of {lf.video.filename} was already '
                  f'imported from {seen[key]} (first kept)')
      continue
    seen[key] = cand.labels_file
    frame = check_frame(cand, names, user_only, report, video_cache)
    if frame is not None:
      by_split[cand.split].append((frame, lf))
  return by_split


def _coco_splits(by_split, category, report):
  timed = any(s == 'time' for _, s in report.files)
  splits = list(dict.fromkeys((list(report.time_split) if timed else [])
                              + [s for _, s in report.files if s != 'time']))
  for split in splits:
    if not by_split.get(split):
      raise SleapImportError(f'split {split!r} has no frame to import (skipped over all files: '
                             f'{report.skipped_by_reason()}; frames not selected by --slp_split/'
                             f'--every_nth_frame: {report.frames_not_selected})')
  out, sources = {}, {}
  image_id, ann_id = 1, 1
  for split in splits:
    frames = [f for f, _ in by_split[split]]
    out[split] = multi_animal.to_coco(frames, category, image_id, ann_id)
    for offset, (_, lf) in enumerate(by_split[split]):
      sources[image_id + offset] = (lf.video, int(lf.frame_idx), frames[offset].source)
    image_id += len(frames)
    ann_id += len(out[split]['annotations'])
    report.frames_per_split[split] = len(frames)
    report.instances_per_split[split] = len(out[split]['annotations'])
    report.tracks_per_split[split] = sorted({a['track'] for a in out[split]['annotations']})
  return out, report, VideoFrameLoader(sources)


def dataset_metadata(report: ImportReport) -> dict[str, Any]:
  """The data set's extra ``info.metadata``: ``source`` (format 'sleap',
  files and their splits, options, keypoint names, tracks per split)."""
  return dict(source=dict(format='sleap', files=report.files, time_split=report.time_split,
                          every_nth_frame=report.every_nth_frame,
                          user_instances_only=report.user_instances_only,
                          keypoint_names=report.keypoint_names, tracks_per_split=report.tracks_per_split))
