"""Every kind of bad input in one data-prep build: repaired or skipped, counted.

Empty and schema-breaking JSON files are covered by
`test_data_prep.test_schema_breaking_json_raises_and_leaves_no_output`.
"""

import io
import json
import math

import numpy as np
from PIL import Image
import pytest

from data_prep import build
from data_prep import images as images_lib
from kpseq_jax.data import dataset
from kpseq_jax.data import transforms

NAN, INF = float('nan'), float('inf')


def _ann(ann_id, image_id, category_id=1, kps=None, bbox=(2.0, 3.0, 20.0, 15.0)):
  kps = kps or [5.0, 6.0, 2, 6.0, 7.0, 2, 7.0, 8.0, 2]
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id,
          'keypoints': kps, 'num_keypoints': 3, 'bbox': list(bbox)}


def _exif_jpeg(path, size, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  img = Image.new('RGB', size, (10, 20, 30))
  img.paste((255, 0, 0), (0, 0, 8, 8))  # Marks the stored top-left corner.
  img.save(path, exif=exif.tobytes(), quality=100)


@pytest.fixture
def built(tmp_path):
  im = tmp_path / 'images'
  im.mkdir()
  Image.new('RGB', (40, 30), (100, 50, 200)).save(im / 'rgb.png')
  Image.new('L', (40, 30), 77).save(im / 'gray.png')
  Image.new('RGBA', (40, 30), (1, 2, 3, 0)).save(im / 'rgba.png')
  Image.fromarray(np.full((30, 40), 0xABCD, np.uint16)).save(im / 's16.png')
  _exif_jpeg(im / 'exif_displayed.jpg', (40, 30), 6)  # Entry: displayed 30x40.
  _exif_jpeg(im / 'exif_stored.jpg', (40, 30), 6)  # Entry: stored 40x30.
  (im / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nnot a png at all')
  buf = io.BytesIO()
  Image.new('RGB', (40, 30)).save(buf, format='JPEG')
  (im / 'truncated.jpg').write_bytes(buf.getvalue()[:150])
  entry = lambda i, f, w=40, h=30: {'id': i, 'file_name': f, 'width': w, 'height': h}
  data = {
      'images': [
          entry(1, 'rgb.png'), entry(1, 'rgb.png'),  # identical duplicate
          entry(2, 'gray.png'), entry(3, 'rgba.png'), entry(4, 's16.png'),
          entry(5, 'exif_displayed.jpg', 30, 40), entry(6, 'exif_stored.jpg', 40, 30),
          entry(7, 'corrupt.png'), entry(8, 'truncated.jpg'), entry(9, 'missing.png'),
          entry(10, 'rgb.png'), entry(10, 'gray.png'),  # conflicting duplicate id
      ],
      'annotations': [
          # Kept: one per image kind ...
          _ann(1, 1), _ann(2, 2), _ann(3, 3), _ann(4, 4), _ann(5, 5), _ann(6, 6),
          # ... and repaired.
          _ann(20, 1, bbox=(-5.0, 25.0, 20.0, 15.0)),  # sticks out: clipped
          _ann(21, 1, kps=[NAN, 6.0, 2, 6.0, 7.0, 2, 7.0, 8.0, 2]),  # NaN x: unlabelled
          _ann(22, 1, kps=[500.0, 6.0, 2, 6.0, -9.0, 1, 7.0, 8.0, 2]),  # 2 outside: unlabelled
          _ann(23, 1, kps=[NAN, NAN, 0, 6.0, 7.0, 2, 7.0, 8.0, 2]),  # NaN but v=0: zeroed
          # Skipped, one per reason.
          _ann(30, 7), _ann(31, 8), _ann(32, 9),  # corrupt, truncated, missing file
          _ann(33, 10),  # conflicting image entry
          _ann(34, 77),  # no image entry
          _ann(35, 1, category_id=99),  # unknown category
          _ann(36, 1, kps=[5.0, 6.0, 2] * 4),  # K=4 for a K=3 category
          _ann(1, 2),  # duplicate annotation id
          _ann(37, 1, bbox=(2.0, 3.0, 0.0, 15.0)),  # zero width
          _ann(38, 1, bbox=(2.0, 3.0, 20.0, -4.0)),  # negative height
          _ann(39, 1, bbox=(100.0, 100.0, 5.0, 5.0)),  # wholly outside
          _ann(40, 1, bbox=(2.0, NAN, 20.0, 15.0)),  # NaN box
          _ann(41, 1, kps=[5.0, 6.0, INF, 6.0, 7.0, 2, 7.0, 8.0, 2]),  # inf visibility
          _ann(42, 1, kps=[5.0, 6.0, 3, 6.0, 7.0, 2, 7.0, 8.0, 2]),  # v = 3
          _ann(43, 1, kps=[5.0, 6.0, 0, 6.0, 7.0, 0, 7.0, 8.0, 0]),  # nothing labelled
          _ann(44, 1, kps=[INF, 6.0, 2, NAN, 7.0, 2, 7.0, NAN, 1]),  # all labelled NaN/inf
          _ann(45, 1, kps=[-50.0, 6.0, 2, 6.0, 90.0, 2, 0.0, 0.0, 0]),  # all labelled outside
      ],
      'categories': [{'id': 1, 'name': 'thing', 'keypoints': ['left_a', 'mid', 'right_a'],
                      'skeleton': []}],
  }
  path = tmp_path / 'train.json'
  path.write_text(json.dumps(data))  # NaN/Infinity as JSON literals.
  out = tmp_path / 'ds'
  report = build.build_dataset({'train': path}, im, out)
  source = dataset.data_source(str(out), 'train')
  records = {int(source[i]['annotation_id']): transforms.DecodeImage().map(dict(source[i]))
             for i in range(len(source))}
  return report, records, out


def test_every_bad_input_is_repaired_or_skipped_and_counted(built):
  report, records, out = built
  split = report.splits['train']
  assert sorted(records) == [1, 2, 3, 4, 5, 6, 20, 21, 22, 23]
  assert (split.read, split.written, len(split.skipped)) == (27, 10, 17)
  assert split.skipped_by_reason == {
      'bbox_empty': 2, 'bbox_outside_image': 1, 'conflicting_image_entry': 1,
      'duplicate_annotation_id': 1, 'image_file_missing': 1, 'image_undecodable': 2,
      'invalid_visibility': 1, 'keypoint_count_mismatch': 1, 'keypoint_outside_image': 1,
      'missing_image_entry': 1, 'no_labelled_keypoints': 1, 'non_finite_bbox': 1,
      'non_finite_keypoints': 2, 'unknown_category': 1}
  assert split.nonzero_notes() == {
      'bbox_clipped': 1, 'duplicate_image_entries': 1, 'exif_ignored_size_is_stored': 1,
      'exif_rotated': 1, 'image_mode_converted': 3, 'image_reencoded_png': 5,
      'keypoint_non_finite_unlabelled': 1, 'keypoint_outside_image_unlabelled': 2,
      'num_keypoints_field_mismatch': 3, 'records_with_keypoints_unlabelled': 2}
  on_disk = json.loads((out / 'prep_report.json').read_text())['splits']['train']
  assert on_disk['skipped_by_reason'] == split.skipped_by_reason
  assert on_disk['notes'] == split.nonzero_notes()


def test_images_are_converted_to_8bit_rgb_in_the_annotated_orientation(built):
  _, records, _ = built
  for ann_id in records:
    assert records[ann_id]['image'].dtype == np.uint8 and records[ann_id]['image'].shape[2] == 3
  np.testing.assert_array_equal(records[2]['image'][5, 5], [77, 77, 77])  # gray
  np.testing.assert_array_equal(records[3]['image'][5, 5], [1, 2, 3])  # RGBA: alpha dropped
  np.testing.assert_array_equal(records[4]['image'][5, 5], [0xAB] * 3)  # 16-bit >> 8
  # EXIF 6 (rotate 90 CW) applied: the stored top-left ends up top-right.
  disp = records[5]['image']
  assert disp.shape == (40, 30, 3)
  assert disp[0, -1, 0] > 200 and disp[0, 0, 0] < 60
  # Entry declares the stored size: the annotator saw stored pixels.
  stored = records[6]['image']
  assert stored.shape == (30, 40, 3) and stored[0, 0, 0] > 200


def test_bad_keypoints_become_unlabelled_and_good_ones_are_kept(built):
  _, records, _ = built
  kp = lambda i: records[i]['keypoints'].tolist()
  assert kp(21) == [[0, 0, 0], [6, 7, 2], [7, 8, 2]]
  assert kp(22) == [[0, 0, 0], [0, 0, 0], [7, 8, 2]]
  assert kp(23) == [[0, 0, 0], [6, 7, 2], [7, 8, 2]]
  assert all(math.isfinite(v) for r in records.values() for v in r['keypoints'].ravel())
  np.testing.assert_array_equal(records[20]['bbox'], [0, 25, 15, 5])  # clipped to 40x30


def test_load_rgb_array_for_prediction(tmp_path):
  _exif_jpeg(tmp_path / 'r.jpg', (40, 30), 6)
  arr = images_lib.load_rgb_array(tmp_path / 'r.jpg')
  assert arr.dtype == np.uint8 and arr.shape == (40, 30, 3)
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff garbage')
  with pytest.raises(images_lib.ImageDecodeError):
    images_lib.load_rgb_array(tmp_path / 'bad.jpg')
  with pytest.raises(FileNotFoundError):
    images_lib.load_rgb_array(tmp_path / 'nope.jpg')
