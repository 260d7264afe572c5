"""configs/mp100.py: the paper config per split and system, and a short real
run on the MP-100 sample images (its one annotation file as both train and
test)."""

import json

import numpy as np
import pytest

from configs import mp100
from data_prep import mp100_supervised
from kpseq_jax.training import config_checks


def _flat(c):
  out = {}
  for k, v in c.items():
    if hasattr(v, 'items'):
      out.update({f'{k}.{kk}': vv for kk, vv in _flat(v).items()})
    else:
      out[k] = v
  return out


@pytest.mark.parametrize('system', ['cape', 'supervised'])
def test_mp100_is_the_paper_config_with_a_split(system):
  """Apart from its split (and the data set it names), configs/mp100.py is
  configs/default.py of the same system, and that system is the model
  training builds."""
  from configs import default
  from kpseq_jax.models import cape, supervised
  from kpseq_jax.training import train_state as ts
  c = mp100.get_config(None if system == 'cape' else system)
  paper = _flat(default.get_config(system))
  ours = _flat(c)
  differ = {k for k in set(paper) | set(ours) if paper.get(k) != ours.get(k)}
  assert differ == {'split', 'field_choices.split', 'input.dataset_dir'}
  model = ts.create_model(c)
  assert type(model) is {'cape': cape.Model, 'supervised': supervised.Model}[
      system]


def test_dataset_dir_follows_split_and_system_and_split_is_checked():
  c = mp100.get_config()
  assert c.input.dataset_dir == 'data/mp100_cape_split1'
  c.split = 4
  assert c.input.dataset_dir == 'data/mp100_cape_split4'
  assert mp100.get_config('supervised').input.dataset_dir == (
      'data/mp100_supervised_split1')
  c.split = 6
  with pytest.raises(ValueError, match='split=6 is not one of'):
    config_checks.check(c)
  with pytest.raises(ValueError, match='cape or supervised'):
    mp100.get_config('fewshot')


def test_paper_schedule_drops_the_rate_at_two_thirds_of_training():
  """300 epochs with x0.1 at epoch 200, in steps."""
  from kpseq_jax.training import train_state as ts
  c = mp100.get_config()
  [drop] = c.optim.decay_steps
  assert drop * 3 == c.optim.num_train_steps * 2
  schedule = ts.learning_rate_schedule(c)
  np.testing.assert_allclose(
      [schedule(0), schedule(drop - 1), schedule(drop)], [1e-4, 1e-4, 1e-5],
      rtol=1e-6)


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
  from kpseq_jax import train
  c = mp100.get_config('supervised')
  c.vocab.category_conditioning = True
  # The tiny override of the docs/mp100.md check command.
  c.input.dataset_dir = str(mp100_sample_dataset)
  c.optim.num_train_steps = 2
  c.input.image_size_px = 64
  c.vocab.num_bins = 64
  c.model.resnet.depth = 18
  c.model.d_model = 32
  c.model.transformer.num_heads = 2
  c.model.transformer.num_layers = 1
  c.model.transformer.ffn_dim = 64
  c.evals.batch_size = 4
  c.evals.num_examples = 4
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
