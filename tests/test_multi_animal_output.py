"""Tracked predictions written as SLEAP .slp and DeepLabCut multi-animal
tables (kpseq_jax/inference/multi_animal_output.py) and read back."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sleap_io

from kpseq_jax.inference import multi_animal_output as out

NODES = ['head', 'thorax', 'abdomen']
NAMES = ['female', 'male']


def predictions():
  rng = np.random.default_rng(0)
  kp = rng.uniform(0, 1024, (3, 2, 3, 2)).astype(np.float32)
  kp[0, 1, 2] = np.nan  # Abdomen of one fly not predicted.
  point_scores = rng.uniform(0, 1, (3, 2, 3)).astype(np.float32)
  instance_scores = rng.uniform(0, 1, (3, 2)).astype(np.float32)
  ids = np.array([[0, 1], [1, 0], [1, -1]])  # Slots in any order; a gap.
  return kp, point_scores, instance_scores, ids


def test_slp_round_trip(tmp_path):
  kp, ps, inst, ids = predictions()
  video = tmp_path / 'flies.mp4'
  path = out.write_slp(tmp_path / 'tracked.slp', video, kp, ps, inst, ids,
                       NAMES, NODES, edges=[(1, 0), (1, 2)],
                       frame_indices=[10, 11, 15])
  labels = sleap_io.load_slp(str(path), open_videos=False)
  assert labels.skeletons[0].node_names == NODES
  assert [(e.source.name, e.destination.name)
          for e in labels.skeletons[0].edges] == [('thorax', 'head'),
                                                  ('thorax', 'abdomen')]
  assert [t.name for t in labels.tracks] == NAMES
  assert Path(labels.videos[0].filename) == video.resolve()
  assert [lf.frame_idx for lf in labels.labeled_frames] == [10, 11, 15]
  for row, lf in enumerate(labels.labeled_frames):
    got = {NAMES.index(i.track.name): i for i in lf.instances}
    want = {t: n for n, t in enumerate(ids[row]) if t >= 0}
    assert set(got) == set(want)
    for t, n in want.items():
      inst_ = got[t]
      assert isinstance(inst_, sleap_io.PredictedInstance)
      np.testing.assert_allclose(inst_.numpy(), kp[row, n], rtol=1e-6)
      np.testing.assert_allclose(inst_.numpy(scores=True)[:, 2], ps[row, n],
                                 rtol=1e-6)
      assert inst_.score == pytest.approx(inst[row, n])


def test_dlc_table_layout_and_round_trip(tmp_path):
  kp, ps, _, ids = predictions()
  df = out.dlc_tracks_table(kp, ps, ids, NAMES, NODES, scorer='kpseq_jax',
                            num_frames=6, frame_indices=[0, 1, 4])
  assert df.columns.names == ['scorer', 'individuals', 'bodyparts', 'coords']
  assert list(df.columns.get_level_values('individuals').unique()) == NAMES
  assert df.shape == (6, 2 * 3 * 3)
  # Frame 1: slot 1 is the female (track 0).
  np.testing.assert_allclose(
      df.loc[1, ('kpseq_jax', 'female', 'thorax', 'x')], kp[1, 1, 1, 0])
  assert df.loc[1, ('kpseq_jax', 'male', 'head', 'likelihood')] == \
      pytest.approx(ps[1, 0, 0])
  assert df.loc[[2, 3]].isna().all().all()  # Frames not analysed.
  assert df.loc[4, ('kpseq_jax', 'female')].isna().all()  # Not seen.
  h5, csv = out.write_dlc_tracks(df, tmp_path / 'flies_kpseq_el.h5')
  pd.testing.assert_frame_equal(out.read_dlc_tracks(h5), df)
  from_csv = out.read_dlc_tracks(csv)
  assert from_csv.columns.equals(df.columns)
  np.testing.assert_allclose(from_csv.to_numpy(), df.to_numpy())


def test_shapes_that_disagree_name_the_field(tmp_path):
  kp, ps, inst, ids = predictions()
  with pytest.raises(ValueError, match='point_scores'):
    out.write_slp(tmp_path / 'x.slp', 'v.mp4', kp, ps[:, :, :2], inst, ids,
                  NAMES, NODES)
  with pytest.raises(ValueError, match='track id 1 but 1 track names'):
    out.dlc_tracks_table(kp, ps, ids, NAMES[:1], NODES, 'kpseq_jax')
