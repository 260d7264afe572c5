"""--mode analyze: video -> DeepLabCut tables, labelled video, plots, captions."""

import json
import subprocess
import sys

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import signal

import conftest
from kpseq_jax.data import visualize
from kpseq_jax.inference import analyze
from kpseq_jax.inference import box_policies
from kpseq_jax.inference import captions
from kpseq_jax.inference import dlc_output
from kpseq_jax.inference import image_inputs
from kpseq_jax.inference import predict
from kpseq_jax.inference import trajectory_plot
from kpseq_jax.inference import video

VIDEO = ('dlc_projects', 'openfield-Pranav-2018-10-30', 'videos', 'm3v1mp4.mp4')
NAMES = ['snout', 'leftear', 'rightear', 'tailbase']


def _write_clip(path, frames, codec='libx264'):
  """Encodes RGB frames with PyAV (the container follows the suffix)."""
  with av.open(str(path), 'w') as out:
    s = out.add_stream(codec, rate=30)
    s.width, s.height, s.pix_fmt = 640, 480, 'yuv420p'
    for f in frames:
      out.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
    out.mux(s.encode())


@pytest.fixture(scope='module')
def clips(shared_data, tmp_path_factory):
  """The real video's first 8 frames as an mp4, the same truncated (an
  mkv cut at 70% of its bytes) and a file that is not a video."""
  root = tmp_path_factory.mktemp('clips')
  with av.open(str(shared_data.joinpath(*VIDEO))) as c:
    frames = []
    for f in c.decode(video=0):
      frames.append(f.to_ndarray(format='rgb24'))
      if len(frames) == 8:
        break
  _write_clip(root / 'clip.mp4', frames)
  _write_clip(root / 'whole.mkv', frames)
  data = (root / 'whole.mkv').read_bytes()
  (root / 'cut.mkv').write_bytes(data[:int(len(data) * 0.7)])
  (root / 'whole.mkv').unlink()
  (root / 'broken.avi').write_bytes(b'RIFF\x00\x00\x00\x00AVI not really')
  return root


@pytest.fixture(scope='module')
def analysed(trained, clips, tmp_path_factory):
  """One analysis of the clip folder (good, truncated, undecodable)."""
  config, workdir, _ = trained
  out = tmp_path_factory.mktemp('analysis')
  summaries = analyze.analyze(config, str(workdir), str(clips), str(out),
                              filter_window=3)
  return {summary.video.rsplit('/', 1)[-1]: summary for summary in summaries}, out


def test_the_h5_table_is_deeplabcuts_and_holds_the_predictions(analysed, trained, clips, tmp_path):
  """Read back with pandas: scorer/bodyparts/coords columns, one row per
  frame; x, y equal the image path's predictions on the same frames."""
  summaries, _ = analysed
  s = summaries['clip.mp4']
  assert s.frames_decoded == 8 and s.frames_in_header == 8 and not s.stopped_early
  df = pd.read_hdf(s.files['h5'], key='df_with_missing')
  assert list(df.columns.names) == ['scorer', 'bodyparts', 'coords']
  assert list(df.columns) == [(s.scorer, b, c) for b in NAMES for c in ('x', 'y', 'likelihood')]
  assert list(df.index) == list(range(8))
  assert s.scorer.startswith('KPSEQ_resnet18_') and s.files['h5'].endswith(f'clip{s.scorer}.h5')
  csv = pd.read_csv(s.files['csv'], header=[0, 1, 2], index_col=0)
  np.testing.assert_allclose(csv.to_numpy(), df.to_numpy(), rtol=1e-12, equal_nan=True)
  lk = df.xs('likelihood', axis=1, level='coords').to_numpy()
  assert np.all((lk >= 0) & (lk <= 1)) and not np.all(lk == 1)  # The model's confidence.
  # The same frames as PNG images through --mode predict (whole images).
  config, workdir, _ = trained
  with av.open(str(clips / 'clip.mp4')) as c:
    for i, f in enumerate(c.decode(video=0)):
      f.to_image().save(tmp_path / f'{i}.png')
  predict.predict(config, str(workdir), str(tmp_path), str(tmp_path / 'out'))
  results = json.loads((tmp_path / 'out' / 'predictions.json').read_text())
  table_xy = df.xs('x', axis=1, level='coords').to_numpy(), df.xs('y', axis=1, level='coords').to_numpy()
  images = {im['id']: im['file_name'] for im in
            json.loads((tmp_path / 'out' / 'images.json').read_text())['images']}
  lines = (tmp_path / 'out' / 'captions.txt').read_text().splitlines()
  assert len(lines) == len(results) == 8
  for r, line in zip(results, lines):
    name, text = line.split('\t')
    assert name == images[r['image_id']]
    np.testing.assert_allclose(captions.parse_caption(text, NAMES),
                               np.reshape(r['keypoints'], [4, 3])[:, :2], atol=0.051)
  for r in results:
    frame = int(images[r['image_id']].split('.')[0])
    kp = np.reshape(r['keypoints'], [4, 3])
    np.testing.assert_allclose(kp[:, 0], table_xy[0][frame], atol=1e-3)
    np.testing.assert_allclose(kp[:, 1], table_xy[1][frame], atol=1e-3)


def test_filtered_table_captions_labelled_video_and_plot(analysed):
  summaries, _ = analysed
  s = summaries['clip.mp4']
  raw = pd.read_hdf(s.files['h5'])
  filtered = pd.read_hdf(s.files['filtered_h5'], key='df_with_missing')
  for col in raw.columns:
    expected = raw[col] if col[-1] == 'likelihood' else signal.medfilt(raw[col].to_numpy(), 3)
    np.testing.assert_allclose(filtered[col].to_numpy(), expected, equal_nan=True)
  xy, lk = dlc_output.table_arrays(filtered)
  lines = open(s.files['captions']).read().splitlines()
  assert len(lines) == 8 and lines[0].startswith('snout (')
  for line, pose in zip(lines, xy):
    np.testing.assert_allclose(captions.parse_caption(line, NAMES), pose, atol=0.051)
  with av.open(s.files['labeled_video']) as c:
    frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
  assert len(frames) == 8 and frames[0].shape == (480, 640, 3)
  # The overlay colours: a keypoint's disc centre has (about, after H.264)
  # its colour unless another keypoint is near; one whose likelihood is
  # below pcutoff (0.6 here) is a hollow circle: the frame shows inside.
  colors = visualize.keypoint_colors(4)
  _, hollow = analyze.drawable(xy, lk, analyze.DEFAULT_PCUTOFF)
  drawn = ~hollow
  checked = 0
  for frame, pose, shown in zip(frames, xy, drawn):
    for k, (x, y) in enumerate(pose):
      others = np.delete(pose, k, axis=0)
      if not (8 < x < 632 and 8 < y < 472) or np.min(np.hypot(*(others - [x, y]).T)) < 12:
        continue
      got = frame[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3).mean(0)
      if shown[k]:
        assert np.abs(got - colors[k]).max() < 60, (k, got, colors[k])
      else:  # Hollow: the centre is the frame, far from the colour.
        assert np.abs(got - colors[k]).max() > 100, (k, got, colors[k])
      checked += 1
  assert checked >= 8
  with Image.open(s.files['trajectories']) as png:  # K = 4 columns.
    assert png.format == 'PNG' and png.size == (4 * 320, 600)


def test_trajectory_plot_draws_the_table(tmp_path):
  """Each body part's path, its confident dots and its x, y curves are the
  table's values; a keypoint below pcutoff is on the path but not dotted;
  the colours are the overlays'."""
  xy = np.array([[[10., 20.], [50., 60.]],
                 [[30., 40.], [np.nan, np.nan]],
                 [[90., 15.], [70., 80.]]])  # [N=3, K=2, 2]
  lk = np.array([[0.9, 0.8], [0.1, np.nan], [0.7, 0.95]])
  path = tmp_path / 'plot.png'
  fig = trajectory_plot.plot_trajectories(xy, lk, ['a', 'b'], 100, 90, path,
                                          pcutoff=0.6)
  colors = visualize.keypoint_colors(2)
  for j in range(2):
    top, bottom = fig.axes[j], fig.axes[2 + j]  # Row-major 2 x K.
    line, dots = top.lines
    x, y = bottom.lines
    np.testing.assert_array_equal(line.get_xydata(), xy[:, j])
    dotted = xy[:, j].copy()
    dotted[lk[:, j] < 0.6] = np.nan
    np.testing.assert_array_equal(dots.get_xydata(), dotted)
    np.testing.assert_array_equal(x.get_xydata(),
                                  np.stack([np.arange(3), xy[:, j, 0]], -1))
    np.testing.assert_array_equal(y.get_xydata(),
                                  np.stack([np.arange(3), xy[:, j, 1]], -1))
    assert top.get_xlim() == (0, 100) and top.get_ylim() == (90, 0)  # y down.
    np.testing.assert_allclose(line.get_color(), np.array(colors[j]) / 255)
  assert np.isnan(fig.axes[0].lines[1].get_xydata()[1]).all()  # 0.1 < 0.6.
  with Image.open(path) as png:
    assert png.size == (2 * 320, 600)


def test_truncated_and_undecodable_videos(analysed, clips, trained):
  """A cut file keeps the rows of the frames it has and says where it
  stopped; a non-video is reported by name; the good one is analysed."""
  summaries, out = analysed
  assert set(summaries) == {'clip.mp4', 'cut.mkv'}  # broken.avi: not analysed.
  cut = summaries['cut.mkv']
  assert 0 < cut.frames_decoded < 8 and cut.frames_in_header == 8 and cut.stopped_early
  df = pd.read_hdf(cut.files['h5'])
  assert len(df) == cut.frames_decoded
  assert np.isfinite(df.xs('x', axis=1, level='coords').to_numpy()).all()
  meta = json.loads(open(cut.files['meta']).read())
  assert meta['frames_decoded'] == cut.frames_decoded and meta['stopped_early']
  with pytest.raises(video.VideoDecodeError, match='broken.avi'):
    video.probe(clips / 'broken.avi')
  # The command line with only the broken file: the error names it.
  config, workdir, _ = trained
  run = subprocess.run(
      [sys.executable, '-m', 'kpseq_jax.main', '--mode=analyze',
       f'--config={conftest.REPO / "configs" / "smoke.py"}',
       f'--config.input.dataset_dir={config.input.dataset_dir}',
       f'--workdir={workdir}',
       f'--videos={clips / "broken.avi"}', f'--out={out / "cli"}'],
      cwd=conftest.REPO, capture_output=True, text=True)
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert 'VideoDecodeError' in last and f'{clips / "broken.avi"}: ' in last


def test_predict_mode_points_videos_to_analyze(clips):
  with pytest.raises(ValueError, match='--mode analyze'):
    image_inputs.list_images(str(clips / 'clip.mp4'))


def _per_frame(a):
  """[b, K, ...] batch of one box per frame -> the `BoxPolicy.update`
  layout: per frame, [1, K, ...]."""
  return [x[None] for x in np.asarray(a)]


def test_track_boxes_follow_confident_keypoints_and_fall_back():
  t = box_policies.Track(min_confidence=0.5, min_keypoints=2)
  update = lambda kp, conf: t.update(_per_frame(kp), _per_frame(conf), 640,
                                     480)
  assert t.boxes(0, 640, 480) == [(0, 0, 640, 480)]
  kp = np.array([[[100., 100.], [140., 120.], [np.nan, np.nan]],
                 [[200., 200.], [240., 260.], [600., 20.]]])
  conf = np.array([[1., 1., 1.], [0.9, 0.8, 0.1]])
  update(kp, conf)
  # Last frame; the 0.1 keypoint is left out: extent 40 x 60, padded by
  # 25% + 16 px on each side.
  [box] = t.boxes(5, 640, 480)
  np.testing.assert_allclose(box, (174, 169, 92, 122))
  update(kp[:1], np.array([[0.9, 0.2, 0.2]]))  # One confident: lost.
  assert t.boxes(6, 640, 480) == [(0, 0, 640, 480)]
  update(kp[1:], np.full([1, 3], np.nan))  # No confidence: all count.
  np.testing.assert_allclose(t.boxes(7, 640, 480)[0], (84, 0, 556, 336))
  assert t.counts() == {'track_lost': 1, 'track_reacquired': 0}
  # A stray keypoint cannot blow the box up beyond max_size_px: cut to
  # 100 px around the keypoints' median.
  t = box_policies.Track(max_size_px=100, reacquire_every_batches=2)
  update(kp[1:], np.full([1, 3], np.nan))
  np.testing.assert_allclose(t.boxes(0, 640, 480)[0], (190, 150, 100, 100))
  # Without confidence it restarts from the whole frame every 2 batches.
  update(kp[1:], np.full([1, 3], np.nan))
  assert t.boxes(1, 640, 480) == [(0, 0, 640, 480)] and t.reacquired == 1
  update(kp[1:], np.full([1, 3], 0.9))
  update(kp[1:], np.full([1, 3], 0.9))  # With confidence: no restart.
  assert t.boxes(2, 640, 480) != [(0, 0, 640, 480)] and t.reacquired == 1
  # Several boxes per frame: the track follows each frame's first pose.
  t = box_policies.Track(min_confidence=0.5)
  t.update([np.stack([kp[1], kp[0]])], [np.stack([conf[1], conf[0]])], 640,
           480)
  np.testing.assert_allclose(t.boxes(0, 640, 480)[0], (174, 169, 92, 122))


def test_box_file_takes_the_best_boxes_per_frame(tmp_path):
  f = tmp_path / 'boxes.json'
  f.write_text(json.dumps([{'image_id': 0, 'bbox': [1, 2, 30, 40], 'score': 0.5},
                           {'image_id': 0, 'bbox': [5, 6, 70, 80], 'score': 0.9},
                           {'image_id': 2, 'bbox': [0, 0, 10, 10]}]))
  b = box_policies.BoxFile(f)
  assert b.boxes(0, 640, 480) == [(5, 6, 70, 80)]
  assert b.boxes(1, 640, 480) == [(0, 0, 640, 480)]
  assert b.counts() == {'frames_without_box': 1}
  assert box_policies.BoxFile(f, max_boxes=3).boxes(0, 640, 480) == [
      (5, 6, 70, 80), (1, 2, 30, 40)]  # Best first.
  f.write_text(json.dumps([{'image_id': 0, 'bbox': [0, 0, 0, 5]}]))
  with pytest.raises(ValueError, match='entry 0 .* no area'):
    box_policies.BoxFile(f)


def test_every_policy_is_a_box_policy(tmp_path):
  f = tmp_path / 'boxes.json'
  f.write_text('[]')
  made = [box_policies.make_policy(None, 0.2),
          box_policies.make_policy('track', 0.2),
          box_policies.make_policy(str(f), 0.2),
          box_policies.make_policy(None, 0.2, detector=_EveryOtherFrame())]
  assert [type(p) for p in made] == [
      box_policies.WholeFrame, box_policies.Track, box_policies.BoxFile,
      box_policies.Detected]
  assert all(isinstance(p, box_policies.BoxPolicy) for p in made)
  assert made[0].boxes(3, 64, 48) == [(0, 0, 64, 48)]


def test_median_filter_keeps_gaps_and_likelihood():
  xy = np.stack([np.arange(10.), np.arange(10.) * 2], -1)[:, None].repeat(2, 1)  # [10, 2, 2]
  xy[3, 0, 0] = 100.0  # A spike.
  xy[6, 1] = np.nan  # A frame where keypoint 1 was not generated.
  lk = np.linspace(0, 1, 20).reshape(10, 2)
  df = dlc_output.pose_table(xy, lk, ['a', 'b'], 'me')
  out = dlc_output.median_filter(df, 3)
  a_x = out[('me', 'a', 'x')].to_numpy()
  assert a_x[3] == 4.0  # The spike is gone: median(2, 100, 4).
  np.testing.assert_array_equal(out[('me', 'a', 'likelihood')], lk[:, 0])
  b_x = out[('me', 'b', 'x')].to_numpy()
  assert np.isnan(b_x[6]) and b_x[5] == 5.0 and b_x[7] == 7.0
  with pytest.raises(ValueError, match='odd'):
    dlc_output.median_filter(df, 4)


class _EveryOtherFrame:
  """A stand-in detector: two boxes on even calls (the better first),
  nothing on odd ones."""
  threshold = 0.3

  def __init__(self):
    self.calls = 0

  def detect(self, image):
    self.calls += 1
    if self.calls % 2 == 0:
      return []
    h, w = image.shape[:2]
    return [(1, (10.0, 20.0, w / 2, h / 2), 0.9), (1, (0, 0, 5, 5), 0.4)]


def test_detected_boxes_crop_each_frame_or_fall_back_to_it_whole(
    trained, clips, tmp_path):
  policy = box_policies.Detected(_EveryOtherFrame())
  policy.see(4, [np.zeros([480, 640, 3], np.uint8)] * 2)
  assert policy.boxes(4, 640, 480) == [(10.0, 20.0, 320.0, 240.0)]
  assert policy.boxes(5, 640, 480) == [(0, 0, 640, 480)]
  assert policy.counts() == {'frames_without_box': 1}
  several = box_policies.Detected(_EveryOtherFrame(), max_boxes=2)
  several.see(0, [np.zeros([480, 640, 3], np.uint8)])
  assert several.boxes(0, 640, 480) == [(10.0, 20.0, 320.0, 240.0),
                                        (0, 0, 5, 5)]
  # In a whole analysis: every frame is detected once, in order.
  config, workdir, _ = trained
  detector = _EveryOtherFrame()
  [summary] = analyze.analyze(config, str(workdir), str(clips / 'clip.mp4'),
                              str(tmp_path), labeled_video=False,
                              detector=detector)
  assert summary.boxes == 'detector' and detector.calls == 8
  assert summary.frames_without_box == 4
