"""SLEAP import (data_prep/sleap_import.py, build --slp) and multi-animal
DeepLabCut import (data_prep/dlc_project.py), on the real fly files.

Records are checked against sleap-io's own reading of the same files. Few
frames each: decoding a 1024x1024 frame costs a tenth of a second.
"""

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image
import pytest
import sleap_io as sio
import yaml

import conftest
from data_prep import build
from data_prep import dlc_project
from data_prep import sleap_import
from data_prep import tfds_builder
from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.data import pipeline

FLY_NODES = ('head', 'thorax', 'abdomen', 'wingL', 'wingR', 'forelegL4', 'forelegR4', 'midlegL4',
             'midlegR4', 'hindlegL4', 'hindlegR4', 'eyeL', 'eyeR')
FLY_PAIRS = [('wingL', 'wingR'), ('forelegL4', 'forelegR4'), ('midlegL4', 'midlegR4'),
             ('hindlegL4', 'hindlegR4'), ('eyeL', 'eyeR')]


@pytest.fixture(scope='module')
def flies(shared_data):
  return shared_data / 'sleap_flies'


def _records(out, split):
  """[(frame index, track, record)] of a split, images included."""
  src = dataset.data_source(str(out), split)
  rows = []
  for i in range(len(src)):
    r = src[i]
    name = r['file_name'].decode()
    rows.append((int(name.rsplit('#', 1)[1]), dataset.instance_track(r), r, name))
  return rows


def _expected_box(xy, width, height):
  """Extent of the labelled points + 25% of it + 16 px per side, clipped
  (the DeepLabCut import's rule, written out here independently)."""
  ok = np.isfinite(xy).all(axis=1)
  lo, hi = xy[ok].min(0), xy[ok].max(0)
  pad = 0.25 * (hi - lo) + 16
  x0, y0 = np.maximum(lo - pad, 0)
  x1, y1 = np.minimum(hi + pad, [width, height])
  return [x0, y0, x1 - x0, y1 - y0]


def _check_against_sleap_io(rows, labels):
  """Each record equals sleap-io's instance of its frame and track; every
  instance of every imported frame is there."""
  by_frame = {lf.frame_idx: lf for lf in labels}
  seen = {}
  for frame_idx, track, r, _ in rows:
    lf = by_frame[frame_idx]
    [inst] = [i for i in lf.user_instances if i.track.name == track]
    xy = inst.numpy()
    ok = np.isfinite(xy).all(axis=1)
    np.testing.assert_allclose(r['keypoints'][ok, :2], xy[ok], atol=1e-4)
    assert (r['keypoints'][:, 2] == np.where(ok, 2, 0)).all()
    assert (r['keypoints'][~ok] == 0).all()
    np.testing.assert_allclose(r['bbox'], _expected_box(xy, 1024, 1024), atol=1e-3)
    seen.setdefault(frame_idx, []).append(track)
  for frame_idx, tracks in seen.items():
    assert sorted(tracks) == sorted(i.track.name for i in by_frame[frame_idx].user_instances)
  return seen


@pytest.fixture(scope='module')
def fly_dataset(flies, tmp_path_factory):
  """clip.slp cut 80/20 by time, every 300th frame; two_flies.slp whole as test, every 64th."""
  out = tmp_path_factory.mktemp('sleap') / 'flies'
  report = build.build_from_slp(
      [(None, flies / 'clip.slp'), ('test', flies / 'two_flies.slp')], out,
      time_split={'train': (0.0, 0.8), 'val': (0.8, 1.0)}, every_nth_frame={'train': 300, 'val': 300, 'test': 64})
  return out, report


def test_records_equal_sleap_io_with_identities_and_frames(fly_dataset, flies):
  out, report = fly_dataset
  clip, two = sio.load_slp(str(flies / 'clip.slp')), sio.load_slp(str(flies / 'two_flies.slp'))
  frames = {}
  for split, labels in (('train', clip), ('val', clip), ('test', two)):
    rows = _records(out, split)
    frames[split] = sorted(_check_against_sleap_io(rows, labels))
    # The stored image is the decoded video frame (greyscale -> RGB PNG).
    frame_idx, _, r, _ = rows[0]
    stored = np.asarray(Image.open(io.BytesIO(r['image'])))
    assert stored.shape == (1024, 1024, 3) and (stored[..., 0] == stored[..., 2]).all()
    np.testing.assert_array_equal(stored[..., 0], labels.video[frame_idx][..., 0])
  # Time order: frames 0-1199 train, 1200-1499 val, every 300th from each split's first.
  assert frames == {'train': [0, 300, 600, 900], 'val': [1200], 'test': [0, 64]}
  assert {s: v.written for s, v in report.splits.items()} == {'train': 8, 'val': 2, 'test': 4}
  assert report.source['tracks_per_split'] == {'train': ['female', 'male'], 'val': ['female', 'male'],
                                               'test': ['F', 'M']}
  assert report.source['skipped'] == [] and report.num_skipped == 0


def test_the_data_set_loads_with_identities_flip_pairs_and_one_image_per_frame(fly_dataset):
  out, _ = fly_dataset
  info = dataset.load_info(str(out))
  [cat] = info.categories.values()
  assert cat.keypoint_names == FLY_NODES
  # The fly skeleton declares no symmetries: pairs come from the L/R names.
  assert sorted(cat.flip_pairs) == sorted((FLY_NODES.index(a), FLY_NODES.index(b)) for a, b in FLY_PAIRS)
  assert info.unlabelled_means == 'absent'
  src = dataset.data_source(str(out), 'train')
  groups = detection.image_groups(src)
  assert len(groups) == 4 and all(len(g) == 2 for g in groups)  # Both flies on one stored image.
  records = dataset.records_without_images(src)
  for g in groups:
    assert sorted(dataset.instance_track(records[i]) for i in g) == ['female', 'male']
  assert len(src.images) == 4
  # The training pipeline reads it (all 13 fly keypoints per instance).
  batch = next(iter(pipeline.create_train_dataset(conftest.smoke_config(out, max_num_keypoints=13), info)))
  assert batch['keypoints'].shape[1:] == (13, 3)
  assert set(batch['annotation_id'].tolist()) <= {int(records[i]['annotation_id']) for i in range(len(records))}


def test_frames_read_on_equal_frames_sought(flies):
  """Reading on from frame 2 to 5 (no seek) gives frame 5's pixels."""
  labels = sio.load_slp(str(flies / 'clip.slp'))
  video = labels.video
  video.open(plugin=sleap_import.VIDEO_PLUGIN)
  loader = sleap_import.VideoFrameLoader({1: (video, 2, 'clip.slp'), 2: (video, 5, 'clip.slp')})
  entry = lambda i: type('Entry', (), {'id': i})()
  loader(entry(1))
  image, problem = loader(entry(2))
  assert problem is None
  fresh = sio.load_video(str(flies / 'clip.mp4'), plugin=sleap_import.VIDEO_PLUGIN)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.data)))[..., 0], fresh[5][..., 0])
  assert not np.array_equal(fresh[5], fresh[2])


def _frames_slp(tmp_path, flies, frame_inds, edit=None):
  """A .slp of some clip.slp frames (the real video), optionally edited.

  Read as the import reads (PyAV videos): saving asks the video for its
  frame count, which sleap-io's imageio-ffmpeg default finds by decoding
  all 1500 frames."""
  labels = sleap_import.load_labels(flies / 'clip.slp')
  lfs = [lf for lf in labels if lf.frame_idx in frame_inds]
  if edit:
    edit(labels, lfs)
  path = tmp_path / 'part.slp'
  sio.save_slp(sio.Labels(labeled_frames=lfs, videos=labels.videos, skeletons=labels.skeletons,
                          tracks=labels.tracks), str(path))
  return path


def test_user_instances_win_over_predictions_of_their_track(tmp_path, flies):
  """Frame 0: a prediction of 'female' beside the user 'female' is dropped;
  frame 1: the user 'male' is gone, its prediction stands in for it."""
  moved = {}

  def edit(labels, lfs):
    skel = labels.skeletons[0]
    for lf in lfs:
      user = {i.track.name: i for i in lf.user_instances}
      track = 'female' if lf.frame_idx == 0 else 'male'
      moved[lf.frame_idx] = user[track].numpy() + 3.0
      lf.instances.append(sio.PredictedInstance.from_numpy(moved[lf.frame_idx], skel, track=user[track].track))
      if lf.frame_idx == 1:
        lf.instances.remove(user['male'])
  path = _frames_slp(tmp_path, flies, (0, 1), edit)
  data, report, _ = sleap_import.to_coco([('train', path)])
  anns = {(a['image_id'], a['track']): a for a in data['train']['annotations']}
  ids = {im['file_name']: im['id'] for im in data['train']['images']}
  labels = sio.load_slp(str(flies / 'clip.slp'))
  female0 = labels[0].user_instances[[i.track.name for i in labels[0].user_instances].index('female')].numpy()
  kps = np.asarray(anns[ids['clip.mp4#0'], 'female']['keypoints']).reshape(-1, 3)
  ok = np.isfinite(female0).all(1)
  np.testing.assert_allclose(kps[ok, :2], female0[ok])  # The user's points, not the +3 px prediction.
  kps = np.asarray(anns[ids['clip.mp4#1'], 'male']['keypoints']).reshape(-1, 3)
  ok = np.isfinite(moved[1]).all(1)
  np.testing.assert_allclose(kps[ok, :2], moved[1][ok])
  assert (report.user_instances, report.predicted_instances, report.predictions_replaced) == (3, 1, 1)
  data, report, _ = sleap_import.to_coco([('train', path)], user_instances_only=True)
  assert sorted((a['image_id'], a['track']) for a in data['train']['annotations']) == [
      (ids['clip.mp4#0'], 'female'), (ids['clip.mp4#0'], 'male'), (ids['clip.mp4#1'], 'female')]
  assert report.predictions_replaced == 2


def test_bad_input_is_skipped_named_and_counted_good_frames_kept(tmp_path, flies):
  (tmp_path / 'broken.mp4').write_bytes(b'not a video' * 100)

  def edit(labels, lfs):
    skel, tracks = labels.skeletons[0], labels.tracks
    male = [i for i in lfs[1].instances if i.track.name == 'male']
    female = [t for t in tracks if t.name == 'female'][0]
    empty = sio.Instance.from_numpy(np.full((13, 2), np.nan), skel, track=female)
    lfs[1].instances[:] = male + [empty]  # The female without any labelled node.
    pts = lfs[0].instances[0].numpy()
    missing = sio.Video(filename=str(tmp_path / 'gone.mp4'), open_backend=False)
    broken = sio.Video(filename=str(tmp_path / 'broken.mp4'), open_backend=False)
    for video, idx in ((labels.video, 5000), (missing, 3), (broken, 0)):
      lfs.append(sio.LabeledFrame(video=video, frame_idx=idx,
                                  instances=[sio.Instance.from_numpy(pts, skel, track=tracks[0])]))
    labels.videos.extend([missing, broken])
  part = _frames_slp(tmp_path, flies, (0, 1), edit)
  out = tmp_path / 'ds'
  # clip.predictions.slp: a 2-node skeleton (frames 0 and 1 are already imported from part.slp).
  report = build.build_from_slp([('train', part), ('train', flies / 'clip.predictions.slp')], out)
  src = report.source
  counts = src['skipped_by_reason']
  assert counts['video_missing'] == counts['video_unreadable'] == counts['frame_past_video_end'] == 1
  assert counts['no_labelled_node'] == 1 and counts['duplicate_frame'] == 2
  assert counts['skeleton_differs'] == sum(len(lf.predicted_instances) for lf in sio.load_slp(
      str(flies / 'clip.predictions.slp')) if lf.frame_idx > 1)
  for entry in src['skipped']:
    assert entry['detail'].startswith(f"{entry['file']} frame {entry['frame']}: "), entry
  by_reason = {e['reason']: e for e in src['skipped']}
  assert by_reason['frame_past_video_end']['frame'] == 5000 and '1500 frames' in by_reason[
      'frame_past_video_end']['detail']
  assert 'gone.mp4' in by_reason['video_missing']['detail']
  assert 'broken.mp4' in by_reason['video_unreadable']['detail']
  # The good frames are kept: both flies of frame 0, the labelled fly of frame 1.
  rows = _records(out, 'train')
  assert sorted((f, t) for f, t, _, _ in rows) == [(0, 'female'), (0, 'male'), (1, 'male')]
  on_disk = json.loads((out / 'prep_report.json').read_text())['source']
  assert on_disk['skipped_by_reason'] == counts


def test_a_split_left_empty_and_bad_options_are_clear_errors(tmp_path, flies):
  part = _frames_slp(tmp_path, flies, (0, 1, 2, 3, 4))
  with pytest.raises(sleap_import.SleapImportError, match="split 'test' has no frame.*skeleton_differs"):
    sleap_import.to_coco([(None, part), ('test', flies / 'clip.predictions.slp')])
  with pytest.raises(sleap_import.SleapImportError, match='no such SLEAP labels file'):
    sleap_import.to_coco([(None, tmp_path / 'nothing.slp')])
  with pytest.raises(sleap_import.SleapImportError, match='overlap'):
    sleap_import.parse_time_split('train=0:0.8,val=0.7:1')
  with pytest.raises(sleap_import.SleapImportError, match='START:END'):
    sleap_import.parse_time_split('train=0:1.5')
  with pytest.raises(sleap_import.SleapImportError, match='positive integer'):
    sleap_import.parse_every_nth('train=0')
  with pytest.raises(sleap_import.SleapImportError, match=r"names split\(s\) \['trian'\]"):
    sleap_import.to_coco([(None, part)], every_nth_frame={'trian': 2})
  assert sleap_import.parse_slp_argument('test=a/b=c.slp') == ('test', sleap_import.Path('a/b=c.slp'))
  assert sleap_import.parse_slp_argument('a/b.slp') == (None, sleap_import.Path('a/b.slp'))
  # A gap between the ranges: frames 0-1 train, 2 in none, 3-4 val (i / n in [0.6, 1)).
  data, report, _ = sleap_import.to_coco([(None, part)], {'train': (0, 0.4), 'val': (0.6, 1)})
  assert [[im['file_name'] for im in data[s]['images']] for s in ('train', 'val')] == [
      ['clip.mp4#0', 'clip.mp4#1'], ['clip.mp4#3', 'clip.mp4#4']]
  assert report.frames_not_selected == 1


def _dlc_project_from_slp(root, flies, frame_inds):
  """A multi-animal DeepLabCut project written from clip.slp's labels of
  some frames: config.yaml, labeled-data/clip/img<frame>.png and the
  scorer / individuals / bodyparts / coords table (.h5)."""
  labels = sio.load_slp(str(flies / 'clip.slp'))
  folder = root / 'labeled-data' / 'clip'
  folder.mkdir(parents=True)
  rows, index = [], []
  for idx in frame_inds:
    lf = labels[[lf.frame_idx for lf in labels].index(idx)]
    Image.fromarray(lf.image[..., 0]).save(folder / f'img{idx:04d}.png')
    by_track = {i.track.name: i.numpy() for i in lf.user_instances}
    rows.append(np.concatenate([by_track[t].ravel() for t in ('female', 'male')]))
    index.append(('labeled-data', 'clip', f'img{idx:04d}.png'))
  columns = pd.MultiIndex.from_tuples([('me', t, n, c) for t in ('female', 'male') for n in FLY_NODES
                                       for c in ('x', 'y')],
                                      names=['scorer', 'individuals', 'bodyparts', 'coords'])
  table = pd.DataFrame(np.asarray(rows), index=pd.MultiIndex.from_tuples(index), columns=columns)
  skel = labels.skeletons[0]
  config = dict(Task='flies', scorer='me', multianimalproject=True, identity=True, bodyparts='MULTI!',
                individuals=['female', 'male'], uniquebodyparts=[], multianimalbodyparts=list(FLY_NODES),
                skeleton=[[skel.node_names[i], skel.node_names[j]] for i, j in skel.edge_inds],
                TrainingFraction=[0.5])
  (root / 'config.yaml').write_text(yaml.safe_dump(config))
  return table, folder / 'CollectedData_me.h5', labels


def test_multi_animal_deeplabcut_project_imports_identities(tmp_path, flies):
  table, path, labels = _dlc_project_from_slp(tmp_path / 'proj', flies, (0, 10, 20, 30))
  table.loc[('labeled-data', 'clip', 'img0030.png'), ('me', 'male')] = np.nan  # The male not labelled.
  table.to_hdf(path, key='df_with_missing', mode='w')
  out = tmp_path / 'ds'
  report = build.build_from_dlc_project(tmp_path / 'proj', out)
  assert report.source['individuals'] == ['female', 'male'] and report.source['individuals_not_labelled'] == 1
  assert report.source['train_frames'] == report.source['test_frames'] == 2
  by_frame = {lf.frame_idx: lf for lf in labels}
  got = []
  for split in ('train', 'test'):
    src = dataset.data_source(str(out), split)
    for i in range(len(src)):
      r = src[i]
      idx, track = int(r['file_name'].decode()[-8:-4]), dataset.instance_track(r)
      [inst] = [x for x in by_frame[idx].user_instances if x.track.name == track]
      xy = inst.numpy()
      ok = np.isfinite(xy).all(1)
      np.testing.assert_allclose(r['keypoints'][ok, :2], xy[ok], atol=1e-4)
      assert (r['keypoints'][:, 2] == np.where(ok, 2, 0)).all()
      np.testing.assert_allclose(r['bbox'], _expected_box(xy, 1024, 1024), atol=1e-3)
      got.append((idx, track))
  assert sorted(got) == [(0, 'female'), (0, 'male'), (10, 'female'), (10, 'male'), (20, 'female'),
                         (20, 'male'), (30, 'female')]
  [cat] = dataset.load_info(str(out)).categories.values()
  assert cat.name == 'flies' and cat.keypoint_names == FLY_NODES and len(cat.flip_pairs) == 5
  # The same table as DeepLabCut's .csv (4 header rows) reads the same.
  from_h5, _, _ = dlc_project.to_coco(tmp_path / 'proj')
  table.to_csv(path.with_suffix('.csv'))
  path.unlink()
  from_csv, _, _ = dlc_project.to_coco(tmp_path / 'proj')
  assert from_csv == from_h5


def test_data_sets_without_track_still_read(tmp_path, flies, monkeypatch):
  """A data set built before the track feature (2.0.0): records read, track ''."""
  table, path, _ = _dlc_project_from_slp(tmp_path / 'proj', flies, (0, 10))
  table.to_hdf(path, key='df_with_missing', mode='w')
  new_features, new_example = tfds_builder.features, tfds_builder.make_example
  monkeypatch.setattr(tfds_builder, 'features', lambda: tfds_builder.tfds.features.FeaturesDict(
      {k: v for k, v in new_features().items() if k != 'track'}))
  monkeypatch.setattr(tfds_builder, 'make_example', lambda *a: {
      k: v for k, v in new_example(*a).items() if k != 'track'})
  monkeypatch.setattr(tfds_builder.KeypointDatasetBuilder, 'VERSION', tfds_builder.tfds.core.Version('2.0.0'))
  build.build_from_dlc_project(tmp_path / 'proj', tmp_path / 'old')
  src = dataset.data_source(str(tmp_path / 'old'), 'train')
  assert 'track' not in src[0] and dataset.instance_track(src[0]) == ''
  assert src[0]['keypoints'].shape == (13, 3)


def test_command_line_names_the_split_of_a_whole_file(tmp_path, flies):
  part = _frames_slp(tmp_path, flies, (0, 1))
  out = tmp_path / 'cli'
  done = subprocess.run([sys.executable, '-m', 'data_prep.build', f'--slp=test={part}', f'--out={out}'],
                        cwd=conftest.REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'wrote 4 records on 2 frames' in done.stdout
  assert dataset.load_info(str(out)).split_sizes == {'test': 4}
  bad = subprocess.run([sys.executable, '-m', 'data_prep.build', f'--slp={part}', '--slp_split=train=0:2',
                        f'--out={tmp_path / "x"}'], cwd=conftest.REPO, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode != 0 and 'START:END' in bad.stderr
