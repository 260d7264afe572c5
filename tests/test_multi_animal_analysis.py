"""--mode analyze --max_animals N: every animal posed, tracked into
identities, written as SLEAP .slp, DeepLabCut multi-animal table and a
labelled video coloured by identity (issue 35, items 3 and 4)."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import sleap_io

import conftest
from data_prep.categories import Category
from kpseq_jax.evaluation import identity
from kpseq_jax.inference import analyze
from kpseq_jax.inference import box_policies
from kpseq_jax.inference import multi_animal_output
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import tracked_poses
from kpseq_jax.inference import video

W, H, FRAMES = 640, 480, 10
SIDE = 120  # Box side (pixels) of a fake animal.
NODES = ('a', 'b', 'c')
TWO_FLIES = ('sleap_flies', 'two_flies.mp4')


def _animal_boxes(i: int) -> list[tuple[float, float, float, float]]:
  """Frame i's boxes of animal 0 (left, moving right) and animal 1 (right,
  moving down), far apart (x, y, w, h pixels)."""
  return [(60.0 + 6 * i, 100.0, SIDE, SIDE), (420.0, 80.0 + 5 * i, SIDE, SIDE)]


def _pose_in(box) -> np.ndarray:
  """float [3, 2]: the fake model's pose of a box: two corners inset by 20
  px and the centre."""
  x, y, w, h = box
  return np.array([[x + 20, y + 20], [x + w / 2, y + h / 2],
                   [x + w - 20, y + h - 20]])


class _SwappingDetector:
  """Both animals every frame, in the opposite order each frame (the
  better-scored one first), as a detector may rank two similar animals."""
  threshold = 0.3

  def __init__(self):
    self.calls = 0

  def detect(self, image):
    del image
    boxes = _animal_boxes(self.calls)
    if self.calls % 2:
      boxes = boxes[::-1]
    self.calls += 1
    return [(1, b, s) for b, s in zip(boxes, (0.9, 0.8))]


class _BoxPoser:
  """A stand-in `batchers.CropBatcher`: a crop is its box, its pose
  `_pose_in` the box; counts the calls and the crops per call."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.calls = []
    self.calibration = None  # Raw likelihoods, as a workdir without one.
    self.box_range = None  # Boxes not checked against a training range.
    self.pose_box_passes = 0  # The detector's boxes, not cut again.

  def crop(self, frame, bbox, category_id):
    del frame, category_id
    return {'box': bbox}

  def predict_crops(self, exs):
    assert len(exs) <= self.batch_size
    self.calls.append(len(exs))
    kp = np.stack([_pose_in(e['box']) for e in exs])
    conf = np.full(kp.shape[:2], 0.9, np.float32)
    return predictor_lib.Prediction(
        keypoints=kp / 1000, num_keypoints=np.full(len(exs), 3),
        keypoints_px=kp, confidence=conf, confidence_by_radius=conf[..., None])


def _write_video(path, frames, fps=25):
  with video.VideoWriter(path, frames[0].shape[1], frames[0].shape[0],
                         fps) as w:
    for f in frames:
      w.write(f)


def _labels_slp(path, clip):
  """The fake animals' true poses as a labelled SLEAP file: tracks 'F'
  (animal 0) and 'M' (animal 1), user instances, the same nodes."""
  skeleton = sleap_io.Skeleton(nodes=list(NODES))
  vid = sleap_io.Video(filename=str(clip), open_backend=False)
  tracks = [sleap_io.Track(name='F'), sleap_io.Track(name='M')]
  frames = [sleap_io.LabeledFrame(video=vid, frame_idx=i, instances=[
      sleap_io.Instance.from_numpy(_pose_in(b), skeleton=skeleton, track=t)
      for b, t in zip(_animal_boxes(i), tracks)]) for i in range(FRAMES)]
  sleap_io.save_slp(sleap_io.Labels(labeled_frames=frames, videos=[vid],
                                    skeletons=[skeleton], tracks=tracks),
                    str(path))


@pytest.fixture(scope='module')
def fake_run(tmp_path_factory):
  """analyze_video with --max_animals 2 on a synthetic 10-frame video, the
  swapping detector and the box poser (batches of 4 frames: 8 crops, two
  model calls)."""
  root = tmp_path_factory.mktemp('fake')
  clip = root / 'clip.mp4'
  _write_video(clip, [np.full((H, W, 3), 90, np.uint8)] * FRAMES)
  category = Category(id=1, name='fly', supercategory='', num_keypoints=3,
                      keypoint_names=NODES, skeleton=((0, 1), (1, 2)),
                      flip_pairs=(), num_keypoints_source='keypoint_names')
  outputs = analyze._Outputs(category, 'KPSEQ_test', str(root / 'out'), 0,
                             True, 0.6, max_animals=2)
  (root / 'out').mkdir()
  poser = _BoxPoser(batch_size=4)
  policy = box_policies.make_policy(None, 0.2, detector=_SwappingDetector(),
                                    max_boxes=2)
  summary = analyze.analyze_video(video.probe(clip), poser, policy, outputs)
  return summary, clip, poser


def test_identities_do_not_follow_the_detectors_order(fake_run, tmp_path):
  """The detector lists the two animals in swapped order every frame; the
  .slp, the table and the identity scorer see each animal keep one track
  (bypassing the tracker would swap the identities every frame)."""
  summary, clip, poser = fake_run
  assert poser.calls == [4, 4, 4, 4, 4]  # 2 boxes x 10 frames, 4 per call.
  labels = sleap_io.load_slp(summary.files['slp'], open_videos=False)
  assert [t.name for t in labels.tracks] == ['track_0', 'track_1']
  assert [lf.frame_idx for lf in labels.labeled_frames] == list(range(FRAMES))
  owner = {}  # track name -> animal.
  for lf in labels.labeled_frames:
    assert len(lf.instances) == 2
    for inst in lf.instances:
      animal = int(np.argmin([np.abs(inst.numpy() - _pose_in(b)).max()
                              for b in _animal_boxes(lf.frame_idx)]))
      np.testing.assert_allclose(inst.numpy(),
                                 _pose_in(_animal_boxes(lf.frame_idx)[animal]))
      assert owner.setdefault(inst.track.name, animal) == animal
      assert inst.score == pytest.approx(0.9 if (lf.frame_idx % 2) == animal
                                         else 0.8)
  assert sorted(owner.values()) == [0, 1]
  table = multi_animal_output.read_dlc_tracks(summary.files['h5'])
  assert list(table.columns.get_level_values('individuals').unique()) == [
      'track_0', 'track_1']
  for name, animal in owner.items():
    xs = table.xs((name, 'b', 'x'), axis=1, level=(1, 2, 3)).to_numpy()[:, 0]
    np.testing.assert_allclose(
        xs, [_animal_boxes(i)[animal][0] + SIDE / 2 for i in range(FRAMES)])
  # The identity scorer reads our .slp directly: no wrong identity, no
  # change, nothing missed; our track names are mapped to F and M.
  _labels_slp(tmp_path / 'truth.slp', clip)
  result = identity.main(['--labels', str(tmp_path / 'truth.slp'),
                          '--predictions', summary.files['slp'],
                          '--nodes', 'a,b,c', '--out_dir', str(tmp_path)])
  assert result['labelled_instances'] == 2 * FRAMES
  assert (result['wrong_identity'], result['identity_changes'],
          result['misses']) == (0, 0, 0)


def test_summary_and_labelled_video_coloured_by_identity(fake_run):
  summary, _, _ = fake_run
  meta = json.loads(open(summary.files['meta']).read())
  assert meta['max_animals'] == 2 and meta['animals_per_frame'] == {'2': 10}
  assert meta['tracks'] == ['track_0', 'track_1']
  assert meta['frames_decoded'] == FRAMES and meta['frames_per_s'] > 0
  assert set(meta['files']) == {'slp', 'h5', 'csv', 'labeled_video', 'meta'}
  labels = sleap_io.load_slp(summary.files['slp'], open_videos=False)
  colors = analyze.identity_colors(2)
  with av.open(summary.files['labeled_video']) as c:
    frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
  assert len(frames) == FRAMES
  for lf, frame in zip(labels.labeled_frames, frames):
    for inst in lf.instances:
      t = int(inst.track.name.split('_')[1])
      for x, y in inst.numpy():  # Every keypoint in its identity's colour.
        got = frame[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2]
        assert np.abs(got.reshape(-1, 3).mean(0) - colors[t]).max() < 60


def test_max_animals_needs_several_boxes(tmp_path):
  config, workdir = conftest.smoke_config(tmp_path / 'data'), tmp_path / 'run'
  with pytest.raises(ValueError, match='--max_animals needs several boxes'):
    analyze.analyze(config, str(workdir), 'nothing.mp4', '/tmp/x',
                    max_animals=2)
  with pytest.raises(ValueError, match='--max_animals needs several boxes'):
    analyze.analyze(config, str(workdir), 'nothing.mp4', '/tmp/x',
                    boxes='track', max_animals=2)
  # The flag reaches analyze() (the same error from the command line), and
  # --help documents it.
  run = subprocess.run(
      [sys.executable, '-m', 'kpseq_jax.main', '--mode=analyze',
       f'--config={conftest.REPO / "configs" / "smoke.py"}',
       f'--config.input.dataset_dir={config.input.dataset_dir}',
       f'--workdir={workdir}',
       '--videos=nothing.mp4', '--out=/tmp/x', '--max_animals=2'],
      cwd=conftest.REPO, capture_output=True, text=True)
  assert run.returncode != 0
  assert '--max_animals needs several boxes' in run.stderr.splitlines()[-1]
  helps = subprocess.run([sys.executable, '-m', 'kpseq_jax.main', '--help'],
                         cwd=conftest.REPO, capture_output=True, text=True)
  assert '--max_animals' in helps.stdout


def test_two_flies_with_a_trained_detector(trained, tiny_detector,
                                           shared_data, tmp_path):
  """The first 8 frames of two_flies.mp4, a detector and the smoke keypoint
  model (2 training steps each): a .slp sleap-io reads with 2 tracks, at
  most 2 instances per frame on the video's frame indices (the labelled
  file's), DeepLabCut's table with 2 individuals, an 8-frame labelled
  video."""
  from kpseq_jax.inference import box_predictor
  from kpseq_jax.runtime import sharding
  with av.open(str(shared_data.joinpath(*TWO_FLIES))) as c:
    frames = []
    for f in c.decode(video=0):
      frames.append(f.to_ndarray(format='rgb24'))
      if len(frames) == 8:
        break
  clip = tmp_path / 'two_flies_8.mp4'
  _write_video(clip, frames)
  # The session's tiny detector (conftest.py), every box kept (threshold 0:
  # 2 training steps score nothing high).
  det_config, det_workdir, _ = tiny_detector
  det_config = det_config.copy_and_resolve_references()
  det_config.detector.score_threshold = 0.0
  detector = box_predictor.ImageDetector(
      det_config, str(det_workdir),
      sharding.create_mesh(det_config.sharding.mesh_shape))
  config, workdir, _ = trained
  [s] = analyze.analyze(config, str(workdir), str(clip), str(tmp_path / 'out'),
                        detector=detector, max_animals=2)
  assert s.boxes == 'detector' and s.frames_decoded == 8
  labels = sleap_io.load_slp(s.files['slp'], open_videos=False)
  assert [t.name for t in labels.tracks] == ['track_0', 'track_1']
  assert labels.videos[0].filename == str(clip.resolve())
  found = {lf.frame_idx: len(lf.instances) for lf in labels.labeled_frames}
  assert set(found) <= set(range(8)) and max(found.values()) <= 2
  assert sum(found.values()) == sum(
      int(n) * c for n, c in s.animals_per_frame.items())
  assert sum(s.animals_per_frame.values()) == 8
  assert list(labels.skeletons[0].node_names) == [
      'snout', 'leftear', 'rightear', 'tailbase']
  # two_flies.slp labels the same frame indices of the same video.
  truth = sleap_io.load_slp(str(shared_data / 'sleap_flies' / 'two_flies.slp'),
                            open_videos=False)
  assert set(found) <= {lf.frame_idx for lf in truth.labeled_frames}
  table = multi_animal_output.read_dlc_tracks(s.files['csv'])
  assert list(table.columns.names) == ['scorer', 'individuals', 'bodyparts',
                                       'coords']
  assert list(table.columns.get_level_values(1).unique()) == ['track_0',
                                                               'track_1']
  assert len(table) == 8
  with av.open(s.files['labeled_video']) as c:
    assert sum(1 for _ in c.decode(video=0)) == 8


def test_box_scores_come_with_the_boxes_and_none_for_the_whole_frame(
    tmp_path):
  """The instance scores of --max_animals: each box's detection score in
  the boxes' order; None where the policy fell back to the whole frame
  (that pose is then no animal)."""
  f = tmp_path / 'boxes.json'
  f.write_text(json.dumps([
      {'image_id': 0, 'bbox': [1, 2, 30, 40], 'score': 0.5},
      {'image_id': 0, 'bbox': [5, 6, 70, 80], 'score': 0.9},
      {'image_id': 0, 'bbox': [9, 9, 9, 9], 'score': 0.1}]))
  files = box_policies.make_policy(str(f), 0.2, max_boxes=2)
  assert files.boxes(0, W, H) == [(5, 6, 70, 80), (1, 2, 30, 40)]
  assert files.box_scores(0) == [0.9, 0.5]
  assert files.boxes(1, W, H) == [(0, 0, W, H)] and files.box_scores(1) is None
  detected = box_policies.make_policy(None, 0.2, detector=_SwappingDetector(),
                                      max_boxes=2)
  detected.see(0, [None, None])
  assert detected.boxes(1, W, H) == _animal_boxes(1)[::-1]
  assert detected.box_scores(1) == [0.9, 0.8]
  detected.boxes(2, W, H)  # Not seen: the whole frame.
  assert detected.box_scores(2) is None
  # The tracker drops a frame without detections.
  tracked = tracked_poses.TrackedPoses(2, 3)
  ids = tracked.add(0, np.ones((1, 3, 2)), np.ones((1, 3)), None)
  assert len(ids) == 0 and tracked.animals_per_frame == {0: 1}
  assert (tracked.arrays()[3] == -1).all()
