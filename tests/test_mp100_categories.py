"""The MP-100 category table from the ten real annotation files (check mode)."""

import collections
import json

import numpy as np
import pytest

from data_prep import build
from data_prep import categories

SPLIT_FILES = [f'mp100_split{s}_{part}' for s in range(1, 6)
               for part in ('test', 'val')]


@pytest.fixture(scope='module')
def check(shared_data):
  ann = shared_data / 'mp100' / 'annotations'
  return build.check_annotation_files(
      {name: ann / f'{name}.json' for name in SPLIT_FILES})


@pytest.fixture(scope='module')
def raw(shared_data):
  """Distinct annotations per category id and the categories, straight from
  the JSON files."""
  anns, cats = collections.defaultdict(dict), {}
  for name in SPLIT_FILES:
    d = json.loads((shared_data / 'mp100' / 'annotations' /
                    f'{name}.json').read_text())
    cats.update({c['id']: c for c in d['categories']})
    for a in d['annotations']:
      anns[a['category_id']][a['id']] = a
  return anns, cats


def test_check_reports_all_100_categories(check, raw):
  anns, cats = raw
  table = check.report.categories
  assert sorted(table) == list(range(1, 101)) == sorted(cats)
  assert len(check.report.splits) == 10
  for cid, c in table.items():
    assert c.name == cats[cid]['name']
    assert c.supercategory == cats[cid]['supercategory']
    assert check.annotations_per_category[cid] == len(anns[cid])
    # K: the name list, or (no names) the keypoint count of the annotations.
    assert c.num_keypoints == (len(cats[cid]['keypoints']) or
                               len(next(iter(anns[cid].values()))['keypoints']) // 3)
  assert check.num_annotations == sum(len(a) for a in anns.values())
  assert check.num_annotations == 14175 and check.num_images == 13412


@pytest.mark.parametrize('cid,name,k,num_pairs,some_pairs', [
    (72, 'person', 17, 8, [(1, 2), (15, 16)]),       # COCO names.
    (44, 'locust', 35, 15, [(5, 20), (19, 34)]),     # 'forelegL1' style.
    (66, 'fly', 32, 14, [(1, 2), (30, 31)]),
    (14, 'Woodpecker', 15, 3, [(6, 10), (8, 12)]),   # 'left eye' (CUB).
    (2, 'horse_body', 17, 7, [(0, 1), (13, 16)]),    # AP-10K names.
    (40, 'face', 68, 29, [(0, 16), (36, 45), (65, 67)]),  # 300W, explicit.
    (18, 'face', 19, 8, [(0, 5), (15, 17)]),          # AFLW, explicit.
    (4, 'fennecfox_face', 9, 3, [(0, 3), (1, 2), (5, 6)]),  # AnimalWeb.
    (80, 'hand', 21, 0, []),                          # no left/right.
    (64, 'long_sleeved_dress', 37, 17, [(1, 5), (6, 36), (20, 22)]),  # DF2.
    (1, 'skirt', 8, 3, [(0, 2), (3, 7), (4, 6)]),
    (83, 'short_sleeved_outwear', 31, 0, []),         # not established.
    (67, 'trousers', 14, 0, []),
    (32, 'car', 13, 0, []),
])
def test_named_categories(check, cid, name, k, num_pairs, some_pairs):
  c = check.report.categories[cid]
  assert (c.name, c.num_keypoints, len(c.flip_pairs)) == (name, k, num_pairs)
  assert set(some_pairs) <= set(c.flip_pairs)
  flat = [i for p in c.flip_pairs for i in p]
  assert len(flat) == len(set(flat)) and all(0 <= i < k for i in flat)


def test_face_categories_have_no_names_so_k_comes_from_annotations(check):
  for cid in (18, 40):
    c = check.report.categories[cid]
    assert c.keypoint_names == ()
    assert c.num_keypoints_source == categories.K_FROM_ANNOTATIONS


@pytest.mark.parametrize('cid', sorted(categories.EXPLICIT_FLIP_PAIRS))
def test_explicit_pairs_mirror_in_the_real_annotations(raw, cid):
  """On average over the instances (x normalised to the labelled keypoints'
  extent; faces in profile blur single instances), the two points of each
  explicit pair lie apart horizontally and their midpoint is near the
  centre: the pairing matches the data, not just the cited definition."""
  anns, _ = raw
  k = categories.EXPLICIT_FLIP_PAIRS_NUM_KEYPOINTS[cid]
  kps = np.array([a['keypoints'] for a in anns[cid].values()
                  if len(a['keypoints']) == 3 * k]).reshape(-1, k, 3)
  labelled = kps[..., 2] > 0
  x = np.where(labelled, kps[..., 0], np.nan)
  lo, hi = np.nanmin(x, axis=1), np.nanmax(x, axis=1)
  xn = (x - lo[:, None]) / np.maximum(hi - lo, 1e-9)[:, None]  # [N, K]
  for i, j in categories.EXPLICIT_FLIP_PAIRS[cid]:
    both = labelled[:, i] & labelled[:, j]
    assert both.sum() >= 20
    apart = abs(np.mean(xn[both, j] - xn[both, i]))
    middle = np.mean((xn[both, i] + xn[both, j]) / 2)
    assert apart > 0.05 and abs(middle - 0.5) < 0.12, (cid, i, j, apart, middle)
