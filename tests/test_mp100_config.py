"""configs/mp100.py: paper recipe, split/setting fields, and a short real run on
the MP-100 sample images (its one annotation file as both train and test)."""

import json

import pytest

from configs import mp100
from data_prep import mp100_supervised
from kpseq_jax.training import config_checks


def test_paper_recipe_and_derived_dataset_dir():
  c = mp100.get_config()
  assert (c.backbone_depth, c.image_size_px, c.num_layers, c.batch_size,
          c.learning_rate, c.num_epochs, tuple(c.decay_epochs),
          c.decay_factor) == (50, 512, 6, 2, 1e-4, 300, (200,), 0.1)
  assert c.flip_prob > 0 and c.color_jitter > 0 and c.shift_frac > 0
  assert c.dataset_dir == 'data/mp100_cape_split1'
  c.split = 4
  c.setting = 'supervised'
  assert c.dataset_dir == 'data/mp100_supervised_split4'
  c.split = 6
  c.setting = 'fewshot'
  with pytest.raises(ValueError, match="setting='fewshot'.*\n.*split=6 "):
    config_checks.check(c)


def test_supervised_split_is_by_image(shared_data):
  ann = shared_data / 'mp100' / 'annotations'
  files = [json.loads((ann / f'mp100_split1_{p}.json').read_text())
           for p in ('val', 'test')]
  out = mp100_supervised.split_by_image(files)
  images = {i['id'] for f in files for i in f['images']}
  anns = {a['id'] for f in files for a in f['annotations']}
  got_images = [i['id'] for d in out.values() for i in d['images']]
  assert sorted(got_images) == sorted(images)  # Each image exactly once.
  assert sorted(a['id'] for d in out.values() for a in d['annotations']) == \
      sorted(anns)
  for d in out.values():
    ids = {i['id'] for i in d['images']}
    assert all(a['image_id'] in ids for a in d['annotations'])
    assert len(d['categories']) == 30  # split 1: 20 test + 10 val.
  share = len(out['train']['images']) / len(images)
  assert 0.75 < share < 0.85
  # Every category is in training, and most are tested.
  train_cats = {a['category_id'] for a in out['train']['annotations']}
  assert len(train_cats) == 30


def test_short_supervised_training_and_mp100_evaluation(
    mp100_sample_dataset, shared_data, tmp_path):
  """The supervised setting end to end on real MP-100 images of 8
  categories with different K (the CAPE setting has its own test), with
  the category token (the plain sequence is the default of every other
  end-to-end test)."""
  conditioning = True
  from kpseq_jax import train
  c = mp100.get_config()
  c.split = 1
  c.setting = 'supervised'
  c.category_conditioning = conditioning
  # The tiny override of the docs/mp100.md check command.
  c.dataset_dir = str(mp100_sample_dataset)
  c.num_train_steps = 2
  c.image_size_px = 64
  c.num_bins = 64
  c.backbone_depth = 18
  c.d_model = 32
  c.num_heads = 2
  c.num_layers = 1
  c.ffn_dim = 64
  c.eval_batch_size = 4
  c.num_eval_examples = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  from kpseq_jax.evaluation import report as report_lib
  report = report_lib.EvalReport.from_dict(
      train.train_and_evaluate(c, str(tmp_path))['test'])
  assert report.num_instances == 4
  assert report.pck_protocol.startswith('MP-100')
  assert report.num_excluded_instances == 0
  # Each prediction has its own category's K (the file's keypoint lists).
  gt = json.loads((shared_data / 'mp100_sample' / 'annotations' /
                   'mp100_sample.json').read_text())
  k = {cat['id']: len(cat['keypoints']) for cat in gt['categories']}
  preds = json.loads((tmp_path / 'predictions_test.json').read_text())
  assert len(preds) == 4
  assert all(len(p['keypoints']) == 3 * k[p['category_id']] for p in preds)
  assert sum(report.per_category_instances.values()) == 4
