"""Train the smoke config on the real dlc_openfield data, save, restore, eval."""

import json

import jax
import numpy as np

import conftest
from kpseq_jax import checkpointing
from kpseq_jax import evaluate
from kpseq_jax import train
from kpseq_jax import train_state as ts


# `trained` (conftest.py): the smoke config trained 2 steps, once per session.


def test_training_saves_a_checkpoint_and_writes_the_eval(trained):
  config, workdir, report = trained
  assert checkpointing.Checkpointer(str(workdir)).latest_step() == 2
  saved = json.loads((workdir / 'eval_test.json').read_text())
  assert saved == report
  assert report['num_instances'] == config.num_eval_examples == 8
  assert report['checkpoint_step'] == 2
  assert 0.0 <= report['pck'] <= 1.0
  # The mean-pose floor is a real figure on these frames, not a placeholder.
  assert 0.0 < report['baseline_mean_pose_pck'] < 1.0
  preds = json.loads((workdir / 'predictions_test.json').read_text())
  assert len(preds) == 8
  assert all(len(p['keypoints']) == 4 * 3 for p in preds)
  assert {p['category_id'] for p in preds} == {1}


def test_eval_mode_restores_and_reproduces_the_figures(trained):
  config, workdir, report = trained
  again = evaluate.evaluate(config, str(workdir))
  assert again == report  # Same checkpoint, same decoding: same figures.


def test_restored_state_equals_the_trained_one(trained, dlc_dataset):
  config, workdir, _ = trained
  from kpseq_jax import input_pipeline, sharding
  info = input_pipeline.load_info(config.dataset_dir)
  mesh = sharding.create_mesh(config.mesh_shape)
  model, state, step = evaluate.restore_state(config, str(workdir), mesh,
                                              info.split_sizes['train'])
  assert step == 2 and int(state.step) == 2
  fresh = ts.create_train_state(config, model, ts.create_optimizer(
      config, info.split_sizes['train']), mesh)
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      state.params, fresh.params))
  assert max(diffs) > 0  # Two AdamW steps moved the parameters.


def test_running_again_resumes_from_the_checkpoint(trained, tmp_path):
  config, workdir, _ = trained
  import shutil
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  more = conftest.smoke_config(config.dataset_dir, num_train_steps=3)
  train.train_and_evaluate(more, str(resumed_dir))
  ckpt = checkpointing.Checkpointer(str(resumed_dir))
  assert ckpt.latest_step() == 3
  # Step 3 started from step 2's state: both checkpoints exist.
  assert sorted(ckpt._manager.all_steps()) == [1, 2, 3]
