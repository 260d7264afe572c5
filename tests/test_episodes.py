"""data_prep.episodes: MP-100's CAPE episodes, against a transcription of CapeFormer's code."""

from __future__ import annotations

import collections
import json
from pathlib import Path
import random
import re
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from data_prep import episodes

REPO = Path(__file__).resolve().parents[1]
MP100_FILES = [f'mp100_split{s}_{part}.json' for s in range(1, 6) for part in ('test', 'val')]

# Split 1 test, 1 shot: the first 3 episodes (category 10, klipspringer_face) as
# (support, queries). Catches any later change to the pool order or the sampler.
SPLIT1_FIRST_EPISODES = [
    (1000000001016037, [
        1000000001016032, 1000000001016013, 1000000001016099, 1000000001016088, 1000000001015988,
        1000000001016066, 1000000001015987, 1000000001016078, 1000000001016090, 1000000001016008,
        1000000001015977, 1000000001016021, 1000000001015993, 1000000001016097, 1000000001016019,
    ]),
    (1000000001016054, [
        1000000001016057, 1000000001016013, 1000000001016074, 1000000001016052, 1000000001016063,
        1000000001015987, 1000000001016009, 1000000001016068, 1000000001016064, 1000000001015975,
        1000000001016046, 1000000001016067, 1000000001016097, 1000000001016056, 1000000001016090,
    ]),
    (1000000001016070, [
        1000000001016055, 1000000001016008, 1000000001015990, 1000000001016053, 1000000001016091,
        1000000001016068, 1000000001016097, 1000000001016096, 1000000001016098, 1000000001016013,
        1000000001015981, 1000000001016066, 1000000001016093, 1000000001016064, 1000000001016112,
    ]),
]


@pytest.fixture(scope='module')
def mp100(shared_data) -> dict[str, tuple[Path, dict]]:
  """File name -> (path, parsed JSON) of the 10 MP-100 annotation files."""
  ann = shared_data / 'mp100' / 'annotations'
  return {name: (ann / name, json.loads((ann / name).read_text())) for name in MP100_FILES}


@pytest.fixture
def restore_global_random():
  state, np_state = random.getstate(), np.random.get_state()
  yield
  random.setstate(state)
  np.random.set_state(np_state)


# ----------------------------------------------------------------------------- the reference


def _coco(data: dict) -> COCO:
  coco = COCO()
  coco.dataset = data
  coco.createIndex()
  return coco


def _reference_db(coco: COCO) -> tuple[dict[int, list[int]], list[tuple[int, list]]]:
  """CapeFormer's `_get_db` / `_load_coco_keypoint_annotation_kernel`:
  (cat2obj: category id -> db indices, db: index -> (annotation id, clean_bbox))."""
  cat2obj = {c: [] for c in coco.getCatIds()}
  db = []
  for img_id in coco.getImgIds():
    img = coco.loadImgs(img_id)[0]
    width, height = img['width'], img['height']
    valid = []
    for obj in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)):
      if 'bbox' not in obj:
        continue
      x, y, w, h = obj['bbox']
      x1 = max(0, x)
      y1 = max(0, y)
      x2 = min(width - 1, x1 + max(0, w - 1))
      y2 = min(height - 1, y1 + max(0, h - 1))
      if ('area' not in obj or obj['area'] > 0) and x2 > x1 and y2 > y1:
        valid.append((obj, [x1, y1, x2 - x1, y2 - y1]))
    for obj, clean in valid:
      if 'keypoints' not in obj or max(obj['keypoints']) == 0:
        continue
      if 'num_keypoints' in obj and obj['num_keypoints'] == 0:
        continue
      cat2obj[obj['category_id']].append(len(db))
      db.append((obj['id'], clean))
  return cat2obj, db


def _reference_samples(coco: COCO, num_shots: int, num_episodes: int, num_queries: int) -> list[tuple[int, ...]]:
  """CapeFormer's `make_paired_samples` on the global RNGs, db indices mapped to annotation ids."""
  cat2obj, db = _reference_db(coco)
  random.seed(1)
  np.random.seed(0)
  all_samples = []
  for cls in coco.getCatIds():
    for _ in range(num_episodes):
      shots = random.sample(cat2obj[cls], num_shots + num_queries)
      for query_id in shots[num_shots:]:
        all_samples.append(shots[:num_shots] + [query_id])
  return [tuple(db[i][0] for i in sample) for sample in all_samples]


def _assert_pool_is_reference_db(pool: episodes.EpisodePool, coco: COCO):
  cat2obj, db = _reference_db(coco)
  assert pool.category_ids == tuple(coco.getCatIds())
  assert pool.annotation_ids == {c: tuple(db[i][0] for i in idx) for c, idx in cat2obj.items()}
  assert pool.clean_bbox == {ann_id: tuple(clean) for ann_id, clean in db}


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize('num_shots', [1, 5])
def test_split1_test_equals_the_reference(mp100, restore_global_random, num_shots):
  path, data = mp100['mp100_split1_test.json']
  coco = COCO(str(path))
  pool = episodes.episode_pool(data, str(path))
  _assert_pool_is_reference_db(pool, coco)
  expected = _reference_samples(coco, num_shots, 200, 15)
  got = episodes.make_paired_samples(pool, num_shots, 200, 15)
  assert len(expected) == 60_000 and got.skipped == {}
  assert got.samples == expected


@pytest.mark.parametrize('name', MP100_FILES)
@pytest.mark.parametrize('num_shots', [1, 5])
def test_counts_on_every_split(mp100, name, num_shots):
  path, data = mp100[name]
  pool = episodes.episode_pool(data, str(path))
  num_episodes, num_categories = (200, 20) if name.endswith('_test.json') else (100, 10)
  samples = episodes.make_paired_samples(pool, num_shots, num_episodes, 15).samples
  assert len(pool.category_ids) == num_categories
  assert len(samples) == num_categories * num_episodes * 15  # 60,000 for test, 15,000 for val.
  category_of = {a: c for c, ids in pool.annotation_ids.items() for a in ids}
  per_category = collections.Counter(category_of[s[-1]] for s in samples)
  assert per_category == {c: num_episodes * 15 for c in pool.category_ids}
  for i in range(0, len(samples), 15):  # One episode: same supports, 16/20 distinct instances.
    episode = samples[i:i + 15]
    assert {s[:num_shots] for s in episode} == {episode[0][:num_shots]}
    assert len({a for s in episode for a in s}) == num_shots + 15
    assert {category_of[a] for s in episode for a in s} == {category_of[episode[0][0]]}


def test_split1_first_episodes_are_pinned(mp100):
  path, data = mp100['mp100_split1_test.json']
  samples = episodes.make_paired_samples(episodes.episode_pool(data, str(path)), 1, 200, 15).samples
  assert samples[:45] == [(s, q) for s, queries in SPLIT1_FIRST_EPISODES for q in queries]


def test_negative_boxes_are_dropped_by_the_clean_bbox_filter(mp100):
  """MP-100's 'face' (id 18) has boxes with negative w and h; nothing else is dropped."""
  dropped = {}
  for name, (path, data) in mp100.items():
    pool = episodes.episode_pool(data, str(path))
    negative = {a['id'] for a in data['annotations'] if a['bbox'][2] < 0 or a['bbox'][3] < 0}
    assert {a['id'] for a in data['annotations']} - set(pool.clean_bbox) == negative, name
    assert not negative & {a for ids in pool.annotation_ids.values() for a in ids}
    if negative:
      dropped[name] = (len(negative), {a['category_id'] for a in data['annotations'] if a['id'] in negative})
  assert dropped == {'mp100_split4_val.json': (6, {18}), 'mp100_split5_test.json': (2, {18})}
  path, data = mp100['mp100_split5_test.json']
  assert len(episodes.episode_pool(data, str(path)).annotation_ids[18]) == 98


def test_pool_json_round_trip(mp100):
  path, data = mp100['mp100_split2_test.json']
  pool = episodes.episode_pool(data, str(path))
  text = json.dumps(pool.to_json(), allow_nan=False)
  assert all(isinstance(k, str) for k in json.loads(text)['annotation_ids'])
  assert episodes.EpisodePool.from_json(json.loads(text)) == pool
  with pytest.raises(ValueError, match="episode pool JSON: .*'clean_bbox'"):
    episodes.EpisodePool.from_json({k: v for k, v in pool.to_json().items() if k != 'clean_bbox'})


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'data_prep.episodes', *args],
                        capture_output=True, text=True, cwd=REPO)


def test_cli_writes_the_samples_atomically(mp100, tmp_path):
  path, data = mp100['mp100_split1_test.json']
  out = tmp_path / 'split1_1shot.jsonl'
  proc = _cli(f'--annotations={path}', '--num_shots=1', '--num_episodes=200', '--num_queries=15', f'--out={out}')
  assert proc.returncode == 0, proc.stderr
  lines = [tuple(json.loads(line)) for line in out.read_text().splitlines()]
  assert len(lines) == 60_000
  assert lines == episodes.make_paired_samples(episodes.episode_pool(data, str(path)), 1, 200, 15).samples
  assert '20 categories x 200 episodes = 4000 episodes; wrote 60000 lines' in proc.stderr
  # A failing run names the categories, exits non-zero and leaves the old file alone.
  proc = _cli(f'--annotations={path}', '--num_shots=1', '--num_queries=100', f'--out={out}')
  assert proc.returncode != 0
  assert f'{path}: an episode needs 101 instances' in proc.stderr and 'category 10 has 100' in proc.stderr
  assert len(out.read_text().splitlines()) == 60_000
  assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_help_explains_the_protocol():
  proc = _cli('--help')
  assert 'flyinglynx/CapeFormer' in proc.stdout and '--num_shots' in proc.stdout
  assert 'num_episodes=200' in proc.stdout


def test_failed_write_leaves_no_file(tmp_path):
  def lines():
    yield (1, 2)
    raise RuntimeError('disk full')

  with pytest.raises(RuntimeError, match='disk full'):
    episodes.write_jsonl_atomically(lines(), tmp_path / 'out.jsonl')
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- small files


def _ann(ann_id, image_id, category_id=1, bbox=(2.0, 3.0, 20.0, 15.0), **overrides):
  ann = {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': list(bbox),
         'keypoints': [5.0, 6.0, 2, 7.0, 8.0, 2], 'num_keypoints': 2, 'area': 300.0, 'iscrowd': 0}
  ann.update(overrides)
  return ann


def _tiny(counts: dict[int, int]) -> dict:
  """One 40x30 image; `counts[c]` instances of category c, in that category order."""
  anns = []
  for c, n in counts.items():
    for _ in range(n):
      anns.append(_ann(len(anns) + 1, 1, c))
  return {'images': [{'id': 1, 'file_name': 'a.png', 'width': 40, 'height': 30}],
          'annotations': anns,
          'categories': [{'id': c, 'name': f'c{c}'} for c in counts]}


def test_pycocotools_order_and_filters_on_a_quirky_file(restore_global_random):
  data = {
      'images': [
          {'id': 3, 'file_name': 'c.png', 'width': 40, 'height': 30},
          {'id': 1, 'file_name': 'a.png', 'width': 40, 'height': 30},
          {'id': 2, 'file_name': 'b.png', 'width': 40, 'height': 30},
          {'id': 3, 'file_name': 'c.png', 'width': 25, 'height': 30},  # Repeated id: first place, last size.
      ],
      'annotations': [
          _ann(10, 1), _ann(11, 2), _ann(12, 3, bbox=(10.0, 3.0, 30.0, 15.0)),  # Clipped to width 25.
          _ann(13, 1, bbox=(-5.0, 25.0, 20.0, 15.0)),  # Sticks out left and bottom: clipped.
          _ann(14, 1, iscrowd=1), _ann(15, 1, area=0), _ann(16, 1, bbox=(2.0, 3.0, -4.0, 15.0)),
          _ann(17, 1, bbox=(2.0, 3.0, 1.0, 15.0)),  # w = 1: the clean box is empty.
          _ann(18, 2, keypoints=[0, 0, 0, 0, 0, 0]), _ann(19, 2, num_keypoints=0),
          _ann(20, 2, category_id=2, iscrowd=0.0), _ann(21, 3, category_id=2),
          {k: v for k, v in _ann(22, 2).items() if k != 'bbox'},
          {k: v for k, v in _ann(23, 2, category_id=2).items() if k not in ('area', 'num_keypoints')},
      ],
      'categories': [{'id': 2, 'name': 'b'}, {'id': 1, 'name': 'a'}, {'id': 5, 'name': 'empty'}],
  }
  pool = episodes.episode_pool(data)
  _assert_pool_is_reference_db(pool, _coco(data))
  assert pool.category_ids == (2, 1, 5)
  assert pool.annotation_ids == {2: (21, 20, 23), 1: (12, 10, 13, 11), 5: ()}
  assert pool.clean_bbox[12] == (10.0, 3.0, 14.0, 14.0)
  assert pool.clean_bbox[13] == (0.0, 25.0, 19.0, 4.0)
  # Drawing from the quirky pool matches the reference too (category 5 skipped: it has no instances).
  pool_without_5 = episodes.EpisodePool((2, 1), {2: (21, 20, 23), 1: (12, 10, 13, 11)}, pool.clean_bbox)
  result = episodes.make_paired_samples(pool, 2, 7, 1, skip_small_categories=True)
  assert result.skipped == {5: 0}
  assert result.samples == _reference_samples(_coco({**data, 'categories': data['categories'][:2]}), 2, 7, 1)
  assert result.samples == episodes.make_paired_samples(pool_without_5, 2, 7, 1).samples


def test_too_few_instances_raise_or_are_skipped():
  pool = episodes.episode_pool(_tiny({2: 1, 1: 4, 3: 0}))
  with pytest.raises(episodes.InsufficientInstancesError,
                     match=r'needs 3 instances .*: category 2 has 1, category 3 has 0$') as info:
    episodes.make_paired_samples(pool, 1, 5, 2)
  assert (info.value.counts, info.value.needed) == ({2: 1, 3: 0}, 3)
  result = episodes.make_paired_samples(pool, 1, 5, 2, skip_small_categories=True)
  assert result.skipped == {2: 1, 3: 0}
  assert len(result.samples) == 5 * 2 and {a for s in result.samples for a in s} <= set(pool.annotation_ids[1])
  # Skipped categories draw nothing: category 1 gets the draws it would get alone.
  alone = episodes.episode_pool(_tiny({1: 4}))
  assert alone.annotation_ids[1] == (1, 2, 3, 4) and pool.annotation_ids[1] == (2, 3, 4, 5)
  assert [tuple(a + 1 for a in s) for s in episodes.make_paired_samples(alone, 1, 5, 2).samples] == result.samples
  with pytest.raises(ValueError, match='num_queries must be >= 1, got 0'):
    episodes.make_paired_samples(pool, 1, 5, 0)


@pytest.mark.parametrize('change, message', [
    (lambda d: d['annotations'][1].update(image_id=77),
     'tiny.json: annotation id 2: field "image_id": no image with id 77'),
    (lambda d: d['annotations'][0].update(bbox=[2.0, 'x', 20.0, 15.0]),
     'tiny.json: annotation id 1: field "bbox" must be 4 numbers'),
    (lambda d: d['annotations'][0].pop('iscrowd'), 'tiny.json: annotation id 1: field "iscrowd" is missing'),
    (lambda d: d['annotations'][2].update(id=1),
     'tiny.json: annotation id 1: field "id": annotation id is listed twice'),
    (lambda d: d['annotations'][0].update(category_id=9), 'tiny.json: annotation id 1: field "category_id": 9 is not'),
    (lambda d: d['annotations'][0].update(keypoints=[]), 'tiny.json: annotation id 1: field "keypoints"'),
    (lambda d: d.pop('images'), "tiny.json: top-level field 'images' is missing"),
])
def test_bad_input_names_file_annotation_and_field(change, message):
  data = _tiny({1: 3})
  change(data)
  with pytest.raises(ValueError, match=re.escape(message)):
    episodes.episode_pool(data, 'tiny.json')


# ----------------------------------------------------------------------------- data set metadata


def test_built_dataset_metadata_carries_the_pool(shared_data,
                                                mp100_sample_dataset):
  import tensorflow_datasets as tfds
  ann = shared_data / 'mp100_sample' / 'annotations' / 'mp100_sample.json'
  meta = tfds.builder_from_directory(mp100_sample_dataset).info.metadata
  pool = episodes.EpisodePool.from_json(meta['episode_pools']['test'])
  assert pool == episodes.load_episode_pool(ann)
  assert sum(map(len, pool.annotation_ids.values())) == 27 and meta['episode_pool_errors'] == {}


def test_build_of_a_file_the_protocol_rejects_has_no_pool(tmp_path):
  import tensorflow_datasets as tfds
  from data_prep import build
  Image.new('RGB', (40, 30)).save(tmp_path / 'a.png')
  data = _tiny({1: 2})
  data['annotations'][1]['image_id'] = 77  # The build skips this record; the protocol rejects the file.
  (tmp_path / 'train.json').write_text(json.dumps(data))
  report = build.build_dataset({'train': tmp_path / 'train.json'}, tmp_path, tmp_path / 'ds')
  assert report.splits['train'].written == 1
  meta = tfds.builder_from_directory(tmp_path / 'ds').info.metadata
  assert meta['episode_pools'] == {}
  assert 'annotation id 2: field "image_id": no image with id 77' in meta['episode_pool_errors']['train']


def test_clean_bbox_hand_values():
  """MP-100's clean box: inside the image (w - 1, h - 1); sticking out
  right/bottom: clipped at W - 1 / H - 1 (box 0: y2 = min(49, 20 + 39) ->
  h 29); sticking out left: shifted to x = 0 keeping w - 1 (the kernel's
  quirk); w - 1 = 0: dropped."""
  boxes = [[10, 20, 30, 40], [90, 0, 30, 10], [-5, 0, 30, 10], [3, 3, 1, 9]]
  coco = {'images': [{'id': 1, 'width': 100, 'height': 50}],
          'categories': [{'id': 1}],
          'annotations': [{'id': i + 1, 'image_id': 1, 'category_id': 1,
                           'iscrowd': 0, 'bbox': b, 'keypoints': [5, 5, 2]}
                          for i, b in enumerate(boxes)]}
  pool = episodes.episode_pool(coco)
  assert pool.clean_bbox == {1: (10, 20, 29, 29), 2: (90, 0, 9, 9),
                             3: (0, 0, 29, 9)}
  assert pool.annotation_ids == {1: (1, 2, 3)}
