"""Tests for data_prep: flip pairs, validation, the TFDS build and check mode."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_prep import build
from data_prep import categories
from data_prep import coco
from data_prep import tfds_builder
from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.data import transforms

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f'shared real data not found at {SHARED_DATA}')


def read_split(out, split: str) -> list[dict]:
  """A built split's records, images decoded (uint8 [H, W, 3])."""
  source = dataset.data_source(str(out), split)
  return [transforms.DecodeImage().map(dict(source[i])) for i in range(len(source))]


COCO_PERSON = ['nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
               'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist',
               'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle']


# ----------------------------------------------------------------------------- flip pairs


def test_flip_pairs_mouse_names_glued_prefix():
  assert categories.flip_pairs_from_names(['snout', 'leftear', 'rightear', 'tailbase']) == [(1, 2)]


def test_flip_pairs_coco_person():
  assert categories.flip_pairs_from_names(COCO_PERSON) == [
      (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]


def test_flip_pairs_no_names_or_no_sides():
  assert categories.flip_pairs_from_names([]) == []
  assert categories.flip_pairs_from_names([str(i) for i in range(9)]) == []


def test_flip_pairs_l_r_tokens_and_spaces():
  # Fly-style suffix tokens, bird-style spaces, l_/r_ prefixes, mixed case.
  assert categories.flip_pairs_from_names(['head', 'eyeL', 'eyeR', 'forelegR1', 'forelegL1']) == [(1, 2), (3, 4)]
  assert categories.flip_pairs_from_names(['left eye', 'beak', 'Right Eye']) == [(0, 2)]
  assert categories.flip_pairs_from_names(['l_paw', 'r_paw', 'L_Ear', 'R_ear']) == [(0, 1), (2, 3)]


def test_flip_pairs_unmatched_and_ambiguous_names_stay_unpaired():
  # 'left_wing' has no counterpart; two 'left_eye' make that side ambiguous.
  assert categories.flip_pairs_from_names(['left_wing', 'right_leg']) == []
  assert categories.flip_pairs_from_names(['left_eye', 'left_eye', 'right_eye']) == []
  # Rest of the name must match exactly: front vs back paw do not pair.
  assert categories.flip_pairs_from_names(['left_front_paw', 'right_back_paw']) == []


def test_explicit_flip_pairs_take_precedence(monkeypatch):
  monkeypatch.setitem(categories.EXPLICIT_FLIP_PAIRS, 1007, [(3, 0)])
  assert categories.category_flip_pairs(1007, ['left_a', 'right_a', 'b', 'c'], 4) == [(0, 3)]
  monkeypatch.setitem(categories.EXPLICIT_FLIP_PAIRS, 1007, [(0, 9)])
  with pytest.raises(ValueError, match='EXPLICIT_FLIP_PAIRS'):
    categories.category_flip_pairs(1007, [], 4)


def test_explicit_flip_pairs_only_for_the_k_they_were_written_for():
  # MP-100's id 40 is the 68-point 300W face; a 4-point category reusing id
  # 40 elsewhere gets its pairs from its names.
  assert len(categories.category_flip_pairs(40, [], 68)) == 29
  assert categories.category_flip_pairs(
      40, ['snout', 'leftear', 'rightear', 'tailbase'], 4) == [(1, 2)]


# ----------------------------------------------------------------------------- synthetic build


def _png(path: Path, size=(40, 30), mode='RGB', value=100):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, value if mode == 'L' else (value, 50, 200)).save(path)


def _ann(ann_id, image_id, category_id=1, k=3, **overrides):
  ann = {'id': ann_id, 'image_id': image_id, 'category_id': category_id,
         'keypoints': [v for i in range(k) for v in (5.0 + i, 6.0 + i, 2)],
         'num_keypoints': k, 'bbox': [2.0, 3.0, 20.0, 15.0], 'area': 300.0, 'iscrowd': 0}
  ann.update(overrides)
  return ann


def _write_broken_dataset(root: Path) -> tuple[Path, Path]:
  """Good records 1-4 plus one record per fault; returns (json, image root)."""
  images = root / 'images'
  _png(images / 'sub' / 'a.png')
  _png(images / 'sub' / 'b.png', size=(50, 40))
  _png(images / 'gray.png', mode='L', value=77)
  (images / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nthis is not a png')
  data = {
      'images': [
          {'id': 1, 'file_name': 'sub/a.png', 'width': 40, 'height': 30},
          {'id': 2, 'file_name': 'sub/b.png', 'width': 50, 'height': 40},
          {'id': 2, 'file_name': 'sub/b.png', 'width': 50, 'height': 40},  # identical duplicate
          {'id': 3, 'file_name': 'gray.png', 'width': 40, 'height': 30},
          {'id': 4, 'file_name': 'missing.png', 'width': 40, 'height': 30},
          {'id': 5, 'file_name': 'corrupt.png', 'width': 40, 'height': 30},
      ],
      'annotations': [
          _ann(1, 1),
          _ann(2, 2, bbox=[40.0, 30.0, 15.0, 12.0]),  # sticks out by 5 / 2 px: clipped, kept
          _ann(3, 3),  # grayscale image: converted, kept
          _ann(4, 1, category_id=2, k=2),
          _ann(10, 4),  # image file missing
          _ann(11, 5),  # corrupt bytes
          _ann(12, 1, category_id=99),  # unknown category
          _ann(13, 1, k=4),  # K mismatch
          _ann(14, 1, keypoints=[float('nan'), 6.0, 2, 7.0, 8.0, 2, 9.0, 10.0, 2]),  # NaN x: unlabelled, kept
          _ann(15, 1, bbox=[2.0, 3.0, 0.0, 15.0]),  # zero-size bbox
          _ann(1, 2),  # duplicate annotation id
          _ann(16, 1, keypoints=[5.0, 6.0, 0, 7.0, 8.0, 0, 9.0, 10.0, 0]),  # nothing labelled
          _ann(17, 1, keypoints=[5.0, 6.0, 2, 70.0, 8.0, 2, 9.0, 10.0, 2]),  # outside: unlabelled, kept
          _ann(18, 1, keypoints=[5.0, 6.0, 3, 7.0, 8.0, 2, 9.0, 10.0, 2]),  # visibility 3
          _ann(19, 77),  # no image entry
      ],
      'categories': [
          {'id': 1, 'name': 'thing', 'supercategory': 's', 'keypoints': ['left_x', 'mid', 'right_x'],
           'skeleton': [[1, 2], [2, 3]]},  # COCO 1-based
          {'id': 2, 'name': 'thing', 'supercategory': 's', 'keypoints': [], 'skeleton': []},
      ],
  }
  path = root / 'train.json'
  path.write_text(json.dumps(data))  # NaN is written as the JSON literal NaN.
  return path, images


def test_broken_records_build(tmp_path):
  ann_path, images = _write_broken_dataset(tmp_path)
  out = tmp_path / 'ds'
  report = build.build_dataset({'train': ann_path}, images, out)

  split = report.splits['train']
  assert (split.read, split.written, len(split.skipped)) == (15, 6, 9)
  assert split.skipped_by_reason == {
      'bbox_empty': 1, 'duplicate_annotation_id': 1, 'image_file_missing': 1, 'image_undecodable': 1,
      'invalid_visibility': 1, 'keypoint_count_mismatch': 1,
      'missing_image_entry': 1, 'no_labelled_keypoints': 1, 'unknown_category': 1}
  assert split.nonzero_notes() == {
      'bbox_clipped': 1, 'duplicate_image_entries': 1, 'image_mode_converted': 1, 'image_reencoded_png': 3,
      'keypoint_non_finite_unlabelled': 1, 'keypoint_outside_image_unlabelled': 1,
      'num_keypoints_field_mismatch': 2, 'records_with_keypoints_unlabelled': 2}
  missing = next(s for s in split.skipped if s.reason == 'image_file_missing')
  assert (missing.file, missing.annotation_id, missing.image_id, missing.field) == (
      str(ann_path), 10, 4, 'file_name')
  dup = next(s for s in split.skipped if s.reason == 'duplicate_annotation_id')
  assert (dup.annotation_id, dup.image_id, dup.field) == (1, 2, 'id')

  on_disk = json.loads((out / 'prep_report.json').read_text())
  assert on_disk['splits']['train']['skipped_by_reason'] == split.skipped_by_reason
  assert len(on_disk['splits']['train']['skipped_records']) == 9
  assert on_disk['num_keypoints_inferred'] == {'2': 'thing: no keypoint names; K=2 from its annotations'}
  # Box sizes of the written records: 20 px boxes and the clipped 10 x 10 one.
  assert on_disk['splits']['train']['bbox_long_side_px'] == {
      'min': 10.0, 'p10': 15.0, 'median': 20.0, 'p90': 20.0, 'max': 20.0}
  resolution = dataset.crop_resolution(str(out), 'train', 64, 1.25)
  assert 'longer side 10-20 px (median 20)' in resolution
  assert 'one crop pixel covers 0.20-0.39 image pixels (median 0.39)' in resolution
  assert dataset.crop_resolution(str(out), 'test', 64, 1.25) is None

  builder = tfds.builder_from_directory(out)
  records = {int(r['annotation_id']): r for r in read_split(out, 'train')}
  assert sorted(records) == [1, 2, 3, 4, 14, 17]
  np.testing.assert_array_equal(records[14]['keypoints'], [[0, 0, 0], [7, 8, 2], [9, 10, 2]])
  np.testing.assert_array_equal(records[17]['keypoints'], [[5, 6, 2], [0, 0, 0], [9, 10, 2]])
  for ann_id, image_id, shape in [(1, 1, (30, 40, 3)), (2, 2, (40, 50, 3)), (3, 3, (30, 40, 3))]:
    rec = records[ann_id]
    assert rec['image'].dtype == np.uint8 and rec['image'].shape == shape
    assert int(rec['image_id']) == image_id
    np.testing.assert_array_equal(rec['keypoints'], np.array([[5, 6, 2], [6, 7, 2], [7, 8, 2]], np.float32))
  assert records[1]['keypoints'].dtype == np.float32 and records[1]['bbox'].dtype == np.float32
  np.testing.assert_array_equal(records[1]['image'][0, 0], [100, 50, 200])
  np.testing.assert_array_equal(records[3]['image'][0, 0], [77, 77, 77])  # gray -> RGB
  np.testing.assert_array_equal(records[1]['bbox'], [2, 3, 20, 15])
  np.testing.assert_array_equal(records[2]['bbox'], [40, 30, 10, 10])  # clipped to 50x40
  assert records[4]['keypoints'].shape == (2, 3)
  assert records[1]['file_name'] in ('sub/a.png', b'sub/a.png')

  meta = builder.info.metadata
  assert meta['categories'] == [
      {'id': 1, 'name': 'thing', 'supercategory': 's', 'num_keypoints': 3,
       'keypoint_names': ['left_x', 'mid', 'right_x'], 'skeleton': [[0, 1], [1, 2]], 'flip_pairs': [[0, 2]],
       'oks_sigmas': []},
      {'id': 2, 'name': 'thing', 'supercategory': 's', 'num_keypoints': 2,
       'keypoint_names': [], 'skeleton': [], 'flip_pairs': [], 'oks_sigmas': []}]
  assert meta['max_num_keypoints'] == 3
  assert meta['split_sizes'] == {'train': 6}
  assert meta['source_files'] == {'train': str(ann_path)}

  # An existing OUT is kept unless overwrite=True.
  with pytest.raises(FileExistsError):
    build.build_dataset({'train': ann_path}, images, out)
  build.build_dataset({'train': ann_path}, images, out, overwrite=True)
  assert len(dataset.data_source(str(out), 'train')) == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds', 'images', 'train.json']


def _shared_image_split(tmp_path, skipped_image: bool = False):
  """Images dir and train.json: two instances on a.png (id 7), one on b.png
  (id 8); with ``skipped_image``, also c.png (id 9) whose only instance has
  an unknown category and is skipped."""
  images = tmp_path / 'images'
  _png(images / 'a.png', value=10)
  _png(images / 'b.png', size=(50, 40), value=200)
  data = {
      'images': [{'id': 7, 'file_name': 'a.png', 'width': 40, 'height': 30},
                 {'id': 8, 'file_name': 'b.png', 'width': 50, 'height': 40}],
      'annotations': [_ann(1, 7), _ann(2, 8), _ann(3, 7, bbox=[10.0, 5.0, 8.0, 8.0])],
      'categories': [{'id': 1, 'name': 'thing', 'supercategory': 's', 'keypoints': ['a', 'b', 'c'],
                      'skeleton': []}],
  }
  if skipped_image:
    _png(images / 'c.png', value=30)
    data['images'].append({'id': 9, 'file_name': 'c.png', 'width': 40, 'height': 30})
    data['annotations'].append(_ann(4, 9, category_id=99))  # Unknown category.
  ann_path = tmp_path / 'train.json'
  ann_path.write_text(json.dumps(data))
  return images, ann_path


def test_each_image_is_stored_once_and_joined_to_all_its_instances(tmp_path):
  # Two instances on a.png, one on b.png, and a third image whose only
  # instance is skipped: the store holds a.png and b.png, each once.
  images, ann_path = _shared_image_split(tmp_path, skipped_image=True)
  out = tmp_path / 'ds'
  report = build.build_dataset({'train': ann_path}, images, out)
  assert (report.splits['train'].written, report.splits['train'].images_written) == (3, 2)
  assert json.loads((out / 'prep_report.json').read_text())['splits']['train']['images_written'] == 2
  assert json.loads((out / 'images-train.json').read_text()) == {'image_ids': [7, 8]}
  # The instance records carry no image bytes.
  assert 'image' not in tfds.builder_from_directory(out).info.features
  source = dataset.data_source(str(out), 'train')
  assert len(source) == 3 and len(source.images) == 2
  by_ann = {int(r['annotation_id']): r for r in read_split(out, 'train')}
  np.testing.assert_array_equal(by_ann[1]['image'], by_ann[3]['image'])
  assert by_ann[1]['image'].shape == (30, 40, 3) and by_ann[1]['image'][0, 0, 0] == 10
  assert by_ann[2]['image'].shape == (40, 50, 3) and by_ann[2]['image'][0, 0, 0] == 200
  np.testing.assert_array_equal(by_ann[3]['bbox'], [10, 5, 8, 8])
  # The detector's view: one element per image with all its boxes, the
  # image read once per element.
  groups = detection.ImageGroups(source, tuple(detection.image_groups(source)))
  assert [len(g['bboxes']) for g in groups] == [2, 1]
  first = groups[0]
  assert int(first['image_id']) == 7 and first['bboxes'].shape == (2, 4)
  assert first['image'] == source.images[7]
  with pytest.raises(KeyError, match='image 9 is not in'):
    source.images[9]


def test_a_version_1_data_set_with_images_in_its_records_still_reads(tmp_path, monkeypatch):
  # Data sets built before the image store (TFDS 1.0.0) hold each
  # instance's image in its record; `dataset.data_source` reads them as
  # they are, with the same records and pixels as a version 2 build.
  images, ann_path = _shared_image_split(tmp_path)
  build.build_dataset({'train': ann_path}, images, tmp_path / 'v2')

  v2_features = tfds_builder.features
  v2_generate = tfds_builder.KeypointDatasetBuilder._generate_examples

  def v1_generate(self, split):
    for key, example in v2_generate(self, split):
      yield key, {**example, 'image': (images / example['file_name']).read_bytes()}

  monkeypatch.setattr(tfds_builder, 'features', lambda: tfds.features.FeaturesDict(
      {**v2_features(), 'image': tfds.features.Image(shape=(None, None, 3))}))
  monkeypatch.setattr(tfds_builder.KeypointDatasetBuilder, '_generate_examples', v1_generate)
  monkeypatch.setattr(tfds_builder.KeypointDatasetBuilder, 'VERSION', tfds.core.Version('1.0.0'))
  v1 = tmp_path / 'v1'
  build.build_dataset({'train': ann_path}, images, v1)
  for path in v1.glob('images-train.*'):
    path.unlink()  # Version 1 had no image store.
  assert 'image' in tfds.builder_from_directory(v1).info.features

  old = {int(r['annotation_id']): r for r in read_split(v1, 'train')}
  new = {int(r['annotation_id']): r for r in read_split(tmp_path / 'v2', 'train')}
  assert sorted(old) == sorted(new) == [1, 2, 3]
  for ann_id, record in new.items():
    np.testing.assert_array_equal(old[ann_id]['image'], record['image'])
    np.testing.assert_array_equal(old[ann_id]['keypoints'], record['keypoints'])
  meta = dataset.records_without_images(dataset.data_source(str(v1), 'train'))
  assert sorted(int(meta[i]['image_id']) for i in range(len(meta))) == [7, 7, 8]
  assert [len(g) for g in sorted(detection.image_groups(dataset.data_source(str(v1), 'train')),
                                 key=len)] == [1, 2]


@pytest.mark.parametrize('content, field', [
    ('', 'empty'),
    ('{"images": [], "annotations": []}', "'categories'"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images'"),
    ('[1, 2]', 'top level'),
    ('{"images": [], "annotations": [], "categories": [{"id": "x", "name": "a"}]}', 'categories[0].id'),
])
def test_schema_breaking_json_raises_and_leaves_no_output(tmp_path, content, field):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  out = tmp_path / 'ds'
  with pytest.raises(coco.AnnotationError, match=re.escape(field)) as info:
    build.build_dataset({'train': path}, tmp_path, out)
  assert str(path) in str(info.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.json']


def test_failure_during_generation_leaves_no_output(tmp_path):
  ann_path, images = _write_broken_dataset(tmp_path)
  data = json.loads(ann_path.read_text())
  data['annotations'] = [a for a in data['annotations'] if a['id'] == 10]  # only a missing image
  ann_path.write_text(json.dumps(data))
  with pytest.raises(coco.AnnotationError, match='no valid records'):
    build.build_dataset({'train': ann_path}, images, tmp_path / 'ds')
  assert not (tmp_path / 'ds').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


def test_cli_exits_nonzero_with_message(tmp_path):
  import subprocess
  import sys
  bad = tmp_path / 'train.json'
  bad.write_text('{"images": []}')
  proc = subprocess.run([sys.executable, '-m', 'data_prep.build', '--check', f'--annotations={bad}'],
                        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode != 0
  assert f"{bad}: missing top-level key 'annotations'" in proc.stderr


def test_split_arguments():
  assert coco.parse_split_arguments(['/a/train.json', 'val=/b/x=y.json']) == {
      'train': Path('/a/train.json'), 'val': Path('/b/x=y.json')}
  with pytest.raises(ValueError, match='twice'):
    coco.parse_split_arguments(['/a/train.json', '/b/train.json'])
  with pytest.raises(ValueError, match='NAME=PATH'):
    coco.parse_split_arguments(['/a/my-file.json'])


def test_skeleton_base_detection_and_conflicting_image_entries(tmp_path):
  path = tmp_path / 'f.json'
  path.write_text(json.dumps({
      'images': [{'id': 1, 'file_name': 'a', 'width': 5, 'height': 5},
                 {'id': 1, 'file_name': 'b', 'width': 5, 'height': 5}],
      'annotations': [],
      'categories': [{'id': 3, 'name': 'c', 'keypoints': ['a', 'b'], 'skeleton': [[0, 1]]}]}))
  f = coco.load_annotation_file(path)
  assert f.skeleton_index_base == 0
  assert f.categories[0].skeleton == ((0, 1),)
  assert f.conflicting_image_ids == frozenset({1}) and f.images == {}


# ----------------------------------------------------------------------------- real data


DLC_OPENFIELD_FILES = {s: SHARED_DATA / 'dlc_openfield' / 'annotations' / f'{s}.json'
                       for s in ('train', 'test')}


@pytest.fixture(scope='module')
def dlc_openfield_built(tmp_path_factory):
  """(report, directory): dlc_openfield built with `build.build_dataset`'s
  defaults (COCO's unlabelled meaning, a 10% val split, seed 0), once for
  the tests that read it."""
  out = tmp_path_factory.mktemp('dlc_openfield_built') / 'dlc'
  report = build.build_dataset(DLC_OPENFIELD_FILES, SHARED_DATA / 'dlc_openfield' / 'images', out)
  return report, out


@needs_shared_data
def test_build_dlc_openfield(dlc_openfield_built):
  report, out = dlc_openfield_built
  # 9 of the 93 training frames (10%, seed 0) are held out as 'val'.
  assert {s: (r.read, r.written, len(r.skipped)) for s, r in report.splits.items()} == {
      'train': (84, 84, 0), 'val': (9, 9, 0), 'test': (23, 23, 0)}
  builder = tfds.builder_from_directory(out)
  assert builder.info.metadata['categories'] == [{
      'id': 1, 'name': 'mouse_topview', 'supercategory': 'animal', 'num_keypoints': 4,
      'keypoint_names': ['snout', 'leftear', 'rightear', 'tailbase'], 'skeleton': [], 'flip_pairs': [[1, 2]],
      'oks_sigmas': []}]
  assert builder.info.metadata['unlabelled_means'] == 'unknown'  # COCO's default.
  assert builder.info.metadata['split_sizes'] == {'train': 84, 'val': 9, 'test': 23}
  assert builder.info.metadata['validation']['status'] == 'carved'
  test = read_split(out, 'test')
  assert len(test) == 23
  rec = test[0]
  assert rec['image'].shape == (480, 640, 3) and rec['image'].dtype == np.uint8
  assert rec['keypoints'].shape == (4, 3)
  assert report.annotation_ids_in_several_splits == 0


@needs_shared_data
def test_build_mp100_sample(tmp_path):
  root = SHARED_DATA / 'mp100_sample'
  ann_path = root / 'annotations' / 'mp100_sample.json'
  out = tmp_path / 'sample'
  report = build.build_dataset({'train': ann_path}, root / 'images', out)
  split = report.splits['train']
  assert (split.read, split.written, len(split.skipped)) == (27, 27, 0)
  # 27 instances on 19 images (several people or animals on some): each image stored once.
  assert split.images_written == 19
  raw = json.loads(ann_path.read_text())
  expected_counts = {}
  for a in raw['annotations']:
    expected_counts[a['category_id']] = expected_counts.get(a['category_id'], 0) + 1
  assert dict(split.instances_per_category) == expected_counts
  assert dict(sorted(expected_counts.items())) == {40: 2, 44: 2, 58: 1, 64: 2, 66: 2, 72: 12, 80: 4, 92: 2}

  builder = tfds.builder_from_directory(out)
  meta = builder.info.metadata
  ks = {c['id']: c['num_keypoints'] for c in meta['categories']}
  assert ks == {40: 68, 44: 35, 58: 17, 64: 37, 66: 32, 72: 17, 80: 21, 92: 17}
  assert meta['max_num_keypoints'] == 68
  flips = {c['id']: len(c['flip_pairs']) for c in meta['categories']}
  # From EXPLICIT_FLIP_PAIRS: 40 (300W face) the 29 iBUG pairs, 64
  # (DeepFashion2 long-sleeved dress) 17; 80 (hand): none.
  assert flips == {40: 29, 44: 15, 58: 7, 64: 17, 66: 14, 72: 8, 80: 0, 92: 8}
  source = read_split(out, 'train')
  by_id = {a['id']: a for a in raw['annotations']}
  for i in range(len(source)):
    rec = source[i]
    ann = by_id[int(rec['annotation_id'])]
    assert rec['image'].dtype == np.uint8 and rec['image'].ndim == 3 and rec['image'].shape[2] == 3
    np.testing.assert_array_equal(rec['keypoints'], np.asarray(ann['keypoints'], np.float32).reshape(-1, 3))
    assert rec['keypoints'].shape == (ks[int(rec['category_id'])], 3)


@needs_shared_data
def test_check_mode_over_the_ten_mp100_files():
  files = sorted((SHARED_DATA / 'mp100' / 'annotations').glob('mp100_split*.json'))
  assert len(files) == 10
  result = build.check_annotation_files({f.stem: f for f in files})
  table = result.report.categories
  assert len(table) == 100 and sorted(table) == list(range(1, 101))
  assert (result.num_images, result.num_annotations) == (13412, 14175)
  # K from the files: name-list length, or the annotations for nameless ones.
  assert {cid: table[cid].num_keypoints for cid in (1, 4, 18, 40, 44, 66, 72, 78, 80)} == {
      1: 8, 4: 9, 18: 19, 40: 68, 44: 35, 66: 32, 72: 17, 78: 39, 80: 21}
  assert table[18].name == table[40].name == 'face'
  assert table[18].num_keypoints_source == table[40].num_keypoints_source == 'annotations'
  assert [cid for cid, c in table.items() if c.num_keypoints_source != 'keypoint_names'] == [18, 40]
  assert min(c.num_keypoints for c in table.values()) == 8
  assert max(c.num_keypoints for c in table.values()) == 68
  # MP-100 skeletons are already 0-based.
  assert table[72].skeleton[0] == (15, 13)
  assert len(table[72].flip_pairs) == 8 and table[14].flip_pairs == ((6, 10), (7, 11), (8, 12))
  split4_val = result.report.splits['mp100_split4_val']
  assert split4_val.skipped_by_reason == {'bbox_empty': 6}
  # 22 records with 40 labelled keypoints outside their image are kept with
  # those keypoints unlabelled (51 records over the ten files).
  assert (split4_val.notes['records_with_keypoints_unlabelled'],
          split4_val.notes['keypoint_outside_image_unlabelled']) == (22, 40)
  assert sum(s.notes['records_with_keypoints_unlabelled'] for s in result.report.splits.values()) == 51
  assert result.report.num_skipped == 8
  text = build.format_check(result)
  assert '100 categories' in text and '13412 distinct images' in text
  assert len([line for line in text.splitlines() if re.match(r'^ *\d+  \S', line)]) == 100


def test_validate_instance_rejects_infinite_bbox_and_keeps_float_visibility():
  cat = categories.Category(1, 'c', 's', 2, (), (), (), 'annotations')
  ann = {'id': 1, 'image_id': 1, 'category_id': 1, 'keypoints': [1.0, 1.0, 2.0, 2.0, 2.0, 0.0],
         'bbox': [0, 0, math.inf, 3]}
  from data_prep import validate
  instance, problem = validate.validate_instance(ann, cat, 10, 10)
  assert instance is None and problem.reason == 'non_finite_bbox'
  ann['bbox'] = [0, 0, 5, 3]
  instance, problem = validate.validate_instance(ann, cat, 10, 10)
  assert problem is None and instance.keypoints.dtype == np.float32
  np.testing.assert_array_equal(instance.keypoints[:, 2], [2, 0])


def test_load_rgb_image_conversions(tmp_path):
  import io
  from data_prep import images as images_lib
  # Plain RGB JPEG: original bytes kept.
  jpeg = tmp_path / 'a.jpg'
  Image.new('RGB', (6, 4), (10, 20, 30)).save(jpeg, quality=95)
  enc = images_lib.load_rgb_image(jpeg)
  assert enc.kept_original and enc.data == jpeg.read_bytes() and (enc.height, enc.width) == (4, 6)
  # EXIF orientation 6 (rotate 90 CW): re-encoded PNG in the displayed orientation.
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = tmp_path / 'r.jpg'
  Image.new('RGB', (6, 4), (10, 20, 30)).save(rotated, exif=exif.tobytes())
  enc = images_lib.load_rgb_image(rotated)
  assert not enc.kept_original and enc.exif_rotated and (enc.height, enc.width) == (6, 4)
  # 16-bit grayscale is scaled, palette and RGBA become RGB.
  sixteen = tmp_path / 's.png'
  Image.fromarray(np.full((3, 5), 0xABCD, np.uint16)).save(sixteen)
  enc = images_lib.load_rgb_image(sixteen)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(enc.data))), np.full((3, 5, 3), 0xAB, np.uint8))
  for mode in ('P', 'RGBA', 'L'):
    path = tmp_path / f'{mode}.png'
    Image.new(mode, (5, 3)).save(path)
    decoded = Image.open(io.BytesIO(images_lib.load_rgb_image(path).data))
    assert decoded.mode == 'RGB' and decoded.size == (5, 3)
  # Truncated file.
  truncated = tmp_path / 't.jpg'
  truncated.write_bytes(jpeg.read_bytes()[:200])
  with pytest.raises(images_lib.ImageDecodeError):
    images_lib.load_rgb_image(truncated)


# ----------------------------------------------------------------------------- validation split


def _frames(out, split: str) -> set[str]:
  return {r['file_name'].decode() if isinstance(r['file_name'], bytes) else r['file_name']
          for r in read_split(out, split)}


@needs_shared_data
def test_val_split_is_seeded_disjoint_and_test_frames_unchanged(dlc_openfield_built):
  """The val frames come out of train only: train + val = the train file's
  frames, disjoint; test is the test file; same seed, same frames; another
  seed, other frames."""
  from data_prep import validation
  files = DLC_OPENFIELD_FILES
  _, out = dlc_openfield_built  # val_fraction 0.1, val_seed 0 (the defaults).
  train, val, test = (_frames(out, s) for s in ('train', 'val', 'test'))
  raw = {s: {im['file_name'] for im in json.loads(p.read_text())['images']} for s, p in files.items()}
  assert len(val) == 9 and not val & train and not val & test and not train & test
  assert train | val == raw['train'] and test == raw['test']
  data = {s: json.loads(p.read_text()) for s, p in files.items()}
  again = validation.carve(data, 0.1, 0)[0]['val']
  assert {im['file_name'] for im in again['images']} == val
  assert {im['file_name'] for im in validation.carve(data, 0.1, 1)[0]['val']['images']} != val


def test_val_split_falls_back_when_train_is_small_or_val_is_given():
  from data_prep import validation
  images = lambda n: {'images': [{'id': i} for i in range(n)],
                      'annotations': [{'id': i, 'image_id': i} for i in range(n)]}
  out, c = validation.carve({'train': images(19), 'test': images(3)}, 0.1, 0)
  assert c.status == 'too_few' and set(out) == {'train', 'test'} and len(out['train']['images']) == 19
  out, c = validation.carve({'train': images(30), 'val': images(4)}, 0.1, 0)
  assert c.status == 'given' and len(out['train']['images']) == 30 and c.num_frames == 4
  out, c = validation.carve({'train': images(30)}, 0.1, 0)  # 10% of 30 is 3: at least 5.
  assert c.status == 'carved' and len(out['val']['images']) == 5 and len(out['train']['images']) == 25
  assert {a['image_id'] for a in out['val']['annotations']} == set(c.image_ids)
  with pytest.raises(ValueError, match='--val_fraction'):
    validation.carve({'train': images(30)}, 0.9, 0)
