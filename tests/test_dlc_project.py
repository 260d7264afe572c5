"""DeepLabCut project import (data_prep/dlc_project.py, build --dlc_project)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
import yaml

import conftest
from data_prep import build
from data_prep import dlc_project
from kpseq_jax.data import dataset

OPENFIELD = 'openfield-Pranav-2018-10-30'
REACHING = 'Reaching-Mackenzie-2018-08-30'


def _records(dataset_dir) -> dict[str, dict]:
  """file_name -> record over every split of a built data set."""
  out = {}
  for split in dataset.load_info(str(dataset_dir)).split_sizes:
    src = dataset.data_source(str(dataset_dir), split)
    for i in range(len(src)):
      r = src[i]
      name = r['file_name']
      out[name.decode() if isinstance(name, bytes) else name] = r
  return out


def _coco_by_file(splits) -> dict[str, tuple[dict, dict]]:
  out = {}
  for data in splits:
    images = {i['id']: i for i in data['images']}
    for a in data['annotations']:
      im = images[a['image_id']]
      out[im['file_name']] = (a, im)
  return out


@pytest.fixture(scope='module')
def openfield_import(shared_data, tmp_path_factory):
  """(report, data set directory): the open-field project built by
  `build.build_from_dlc_project` with its defaults (a val split of
  `validation.DEFAULT_FRACTION`), once for the tests that read it."""
  out = tmp_path_factory.mktemp('openfield_import') / 'ds'
  return build.build_from_dlc_project(shared_data / 'dlc_projects' / OPENFIELD, out), out


def test_imported_openfield_equals_the_shared_coco_data_set(openfield_import, dlc_dataset):
  """Same frames, keypoints, visibilities and boxes as dlc_openfield (whose
  COCO files were made from this project); only the split differs."""
  report, ds = openfield_import
  assert report.num_written == 116 and report.num_skipped == 0
  assert report.source['train_frames'] == 110  # int(116 * 0.95)
  assert report.source['test_frames'] == 6
  mine, ref = _records(ds), _records(dlc_dataset)
  assert len(ref) == 116 and set(mine) == set(ref)
  for name, r in ref.items():
    np.testing.assert_array_equal(mine[name]['keypoints'], r['keypoints'], err_msg=name)
    np.testing.assert_array_equal(mine[name]['bbox'], r['bbox'], err_msg=name)
  info = dataset.load_info(str(ds))
  [cat] = info.categories.values()
  assert cat.keypoint_names == ('snout', 'leftear', 'rightear', 'tailbase')
  assert cat.flip_pairs == dataset.load_info(str(dlc_dataset)).categories[1].flip_pairs
  meta = tfds.builder_from_directory(str(ds)).info.metadata
  assert meta['unlabelled_means'] == 'absent'  # DeepLabCut: empty cell = not visible.
  assert meta['source']['scorer'] == 'Pranav' and meta['source']['train_fraction'] == 0.95
  assert json.loads((ds / 'prep_report.json').read_text())['source']['format'] == 'deeplabcut'


def test_dlc_val_split_comes_from_the_training_fraction(shared_data, openfield_import):
  """The val frames are taken from DeepLabCut's training frames; its test
  frames are exactly DeepLabCut's (those of `dlc_project.to_coco`, which
  the build reads)."""
  _, ds = openfield_import  # The default val_fraction, 0.1.
  data, _, _ = dlc_project.to_coco(shared_data / 'dlc_projects' / OPENFIELD)
  dlc = {s: {im['file_name'] for im in data[s]['images']} for s in ('train', 'test')}
  built = {}
  for split in ('train', 'val', 'test'):
    src = dataset.data_source(str(ds), split)
    names = (src[i]['file_name'] for i in range(len(src)))
    built[split] = {n.decode() if isinstance(n, bytes) else n for n in names}
  assert dataset.load_info(str(ds)).split_sizes == {'train': 99, 'val': 11, 'test': 6}
  assert built['test'] == dlc['test']
  assert built['train'] | built['val'] == dlc['train']
  assert not built['train'] & built['val']


@pytest.mark.parametrize('project, coco_dir', [(OPENFIELD, 'dlc_openfield'), (REACHING, 'dlc_reaching')])
def test_boxes_and_missing_labels_follow_the_shared_files(shared_data, project, coco_dir):
  """The box rule (extent + 25% + 16 px, clipped) and NaN -> v = 0 give the
  shared COCO files exactly; the reaching project's empty Tongue cells
  become unlabelled keypoints."""
  data, report, config = dlc_project.to_coco(shared_data / 'dlc_projects' / project)
  ref = _coco_by_file(json.loads((shared_data / coco_dir / 'annotations' / f'{s}.json').read_text())
                      for s in ('train', 'test'))
  mine = _coco_by_file(data.values())
  assert set(mine) == set(ref)
  for name, (a, im) in ref.items():
    m, mim = mine[name]
    assert (mim['width'], mim['height']) == (im['width'], im['height'])
    np.testing.assert_allclose(m['bbox'], a['bbox'], rtol=0, atol=1e-9)
    np.testing.assert_allclose(m['keypoints'], a['keypoints'], rtol=0, atol=1e-9)
  if project == REACHING:
    assert report.missing_labels == 42  # Tongue in 40 frames, Hand and Finger1 in 1 each.
    assert config.skeleton == ((0, 1), (3, 4))


def test_split_is_deeplabcuts_rule_seeded_and_disjoint(shared_data):
  project = shared_data / 'dlc_projects' / OPENFIELD
  a, _, _ = dlc_project.to_coco(project, seed=0)
  b, _, _ = dlc_project.to_coco(project, seed=0)
  c, _, _ = dlc_project.to_coco(project, train_fraction=0.8, seed=1)
  ids = lambda d, s: [i['id'] for i in d[s]['images']]
  assert ids(a, 'test') == ids(b, 'test')
  assert ids(a, 'test') == sorted(np.random.RandomState(0).permutation(116)[110:] + 1)
  assert len(ids(c, 'train')) == 92 and len(ids(c, 'test')) == 24
  assert not set(ids(c, 'train')) & set(ids(c, 'test'))
  with pytest.raises(dlc_project.DlcProjectError, match='0 test frames'):
    dlc_project.split_frames(116, 1.0, 0)


def _small_project(shared_data, root, table: pd.DataFrame, suffix='.h5', config_changes=None):
  """A copy of the open-field project's config and 6 frames with ``table``."""
  src = shared_data / 'dlc_projects' / OPENFIELD
  cfg = yaml.safe_load((src / 'config.yaml').read_text())
  cfg.update(config_changes or {})
  (root / 'labeled-data' / 'm4s1').mkdir(parents=True)
  (root / 'config.yaml').write_text(yaml.safe_dump(cfg))
  for entry in table.index:
    name = dlc_project.frame_name(entry)
    shutil.copy(src / 'labeled-data' / name, root / 'labeled-data' / name)
  path = root / 'labeled-data' / 'm4s1' / f'CollectedData_{cfg["scorer"]}{suffix}'
  if suffix == '.h5':
    table.to_hdf(path, key='df_with_missing', mode='w')
  else:
    table.to_csv(path)
  return root


def _real_table(shared_data, rows=6) -> pd.DataFrame:
  return pd.read_hdf(shared_data / 'dlc_projects' / OPENFIELD / 'labeled-data' / 'm4s1' /
                     'CollectedData_Pranav.h5').iloc[:rows].copy()


@pytest.mark.parametrize('suffix', ['.h5', '.csv'])
def test_missing_bodypart_and_nan_rows_are_reported_and_good_labels_kept(shared_data, tmp_path, suffix):
  table = _real_table(shared_data)
  good = table.copy()
  table = table.drop(columns='rightear', level='bodyparts')  # A body part added after labelling.
  table.iloc[2] = np.nan  # A frame with no label.
  table.iloc[4, 0:2] = np.nan  # Its snout not labelled.
  root = _small_project(shared_data, tmp_path / 'proj', table, suffix, {'TrainingFraction': [0.5]})
  out = tmp_path / 'ds'
  if suffix == '.h5':  # The command line once (a subprocess: TF start-up).
    run = subprocess.run([sys.executable, '-m', 'data_prep.build', f'--dlc_project={root}', f'--out={out}'],
                         cwd=conftest.REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no column for body part(s) ['rightear']" in run.stderr
    assert '1 frame(s) have no label at all' in run.stderr
  else:
    build.build_from_dlc_project(root, out)
  report = json.loads((out / 'prep_report.json').read_text())
  src = report['source']
  assert src['bodyparts_missing_from_file'] == {f'labeled-data/m4s1/CollectedData_Pranav{suffix}': ['rightear']}
  assert src['frames_without_labels'] == ['m4s1/img0002.png']
  assert src['missing_labels'] == 3 + 1  # 3 body parts of the empty row, 1 snout.
  skipped = {s: r['skipped_by_reason'] for s, r in report['splits'].items()}
  assert sum(sum(v.values()) for v in skipped.values()) == 1
  assert {'no_labelled_keypoints': 1} in skipped.values()
  records = _records(out)
  assert len(records) == 5  # Every frame but the empty one.
  for name, r in records.items():
    kp = r['keypoints']
    row = good.loc[f'labeled-data/{name}'].to_numpy().reshape(4, 2)
    assert kp[2, 2] == 0 and np.all(kp[2, :2] == 0)  # rightear: no column.
    for k in (0, 1, 3):
      if name == 'm4s1/img0004.png' and k == 0:
        assert kp[k, 2] == 0
      else:
        assert kp[k, 2] == 2
        np.testing.assert_allclose(kp[k, :2], row[k], atol=1e-4)


def test_dlc22_row_multiindex_and_csv_equal_h5(shared_data, tmp_path):
  """DeepLabCut 2.2+ stores the frame as ('labeled-data', video, image)."""
  table = _real_table(shared_data)
  multi = table.copy()
  multi.index = pd.MultiIndex.from_tuples([tuple(i.split('/')) for i in table.index])
  a = _small_project(shared_data, tmp_path / 'a', multi, '.h5')
  b = _small_project(shared_data, tmp_path / 'b', multi, '.csv')
  c = _small_project(shared_data, tmp_path / 'c', table, '.csv')
  frames = [dlc_project.project_keypoints(dlc_project.read_config(p), dlc_project.ImportReport(str(p), 1, 0))
            for p in (a, b, c)]
  for names, xy in frames:
    assert names == [f'm4s1/img000{i}.png' for i in range(6)]
    np.testing.assert_allclose(xy.reshape(6, 8), table.to_numpy(), atol=1e-9)


def test_multi_animal_config_and_table_must_agree(shared_data, tmp_path):
  """A multi-animal table needs a multi-animal config and the other way
  round (multi-animal import itself: tests/test_sleap_import.py)."""
  table = _real_table(shared_data)
  a = _small_project(shared_data, tmp_path / 'a', table, config_changes={'multianimalproject': True})
  with pytest.raises(dlc_project.DlcProjectError, match='multianimalbodyparts must be'):
    dlc_project.to_coco(a)
  c = _small_project(shared_data, tmp_path / 'c', table, config_changes={
      'multianimalproject': True, 'multianimalbodyparts': ['snout'], 'individuals': ['mouse1']})
  with pytest.raises(dlc_project.DlcProjectError, match='no "individuals" column level'):
    dlc_project.to_coco(c)
  multi = table.copy()
  multi.columns = pd.MultiIndex.from_tuples([(s, 'mouse1', b, c) for s, b, c in table.columns],
                                            names=['scorer', 'individuals', 'bodyparts', 'coords'])
  for suffix in ('.h5', '.csv'):
    b = _small_project(shared_data, tmp_path / f'b{suffix[1:]}', multi, suffix)
    with pytest.raises(dlc_project.DlcProjectError, match='"individuals" column level.*multianimalproject'):
      dlc_project.to_coco(b)


def test_a_project_without_labels_names_the_scorer(shared_data, tmp_path):
  table = _real_table(shared_data)
  root = _small_project(shared_data, tmp_path / 'p', table)
  cfg = yaml.safe_load((root / 'config.yaml').read_text())
  (root / 'config.yaml').write_text(yaml.safe_dump(dict(cfg, scorer='Someone')))
  with pytest.raises(dlc_project.DlcProjectError, match="CollectedData_Someone.*scorer right"):
    dlc_project.to_coco(root)
  with pytest.raises(dlc_project.DlcProjectError, match='no config.yaml'):
    dlc_project.to_coco(tmp_path)
