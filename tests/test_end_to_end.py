"""Train the smoke config on the real dlc_openfield data, save, restore, eval."""

import json

import jax
import numpy as np

import conftest
from kpseq_jax import train
from kpseq_jax.data import dataset
from kpseq_jax.data import pipeline
from kpseq_jax.evaluation import evaluate
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import report as report_lib
from kpseq_jax.runtime import scalar_log
from kpseq_jax.runtime import sharding
from kpseq_jax.training import checkpointing
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts


# `trained` (conftest.py): the smoke config trained 2 steps, once per session.


def test_training_saves_a_checkpoint_and_writes_the_eval(trained,
                                                        shared_data):
  config, workdir, report = trained
  assert checkpointing.Checkpointer(str(workdir)).latest_step() == 2
  saved = json.loads((workdir / 'eval_test.json').read_text())
  assert report_lib.EvalReport.from_dict(saved) == report
  assert report.num_instances == config.evals.num_examples == 8
  assert report.checkpoint_step == 2
  # The mean-pose floor is a real figure on these frames, not a placeholder.
  assert 0.0 < report.baseline_pck < 1.0
  preds = json.loads((workdir / 'predictions_test.json').read_text())
  assert len(preds) == 8
  assert {p['category_id'] for p in preds} == {1}
  # The reported PCK is the PCK of the written predictions against the
  # annotation file's ground truth.
  gt = json.loads((shared_data / 'dlc_openfield' / 'annotations' /
                   'test.json').read_text())
  anns = {a['image_id']: a for a in gt['annotations']}
  acc = metrics.PCKAccumulator()
  for p in preds:
    a = anns[p['image_id']]
    acc.update(np.array([1]), np.reshape(p['keypoints'], [1, 4, 3])[..., :2],
               np.reshape(a['keypoints'], [1, 4, 3]), np.array([a['bbox']]))
  assert acc.result().pck == report.pck
  assert abs(acc.result().mean_error_px - report.mean_error_px) < 1e-3


def test_eval_mode_restores_and_reproduces_the_figures(trained):
  config, workdir, report = trained
  again = evaluate.evaluate(config, str(workdir))
  # Same checkpoint, same decoding: same figures.
  assert report_lib.EvalReport.from_dict(again['test']) == report


def test_restored_state_equals_the_trained_one(trained):
  """The checkpoint holds exactly the state two train steps produce: the
  same two steps, run here from a fresh initialisation on the same
  batches, give the restored parameters and statistics bit for bit."""
  config, workdir, _ = trained
  info = dataset.load_info(config.input.dataset_dir)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  ckpt = checkpointing.Checkpointer(str(workdir))
  restored, step = ckpt.restore(ts.abstract_train_state(config, model, tx,
                                                        mesh))
  ckpt.close()
  assert step == 2 and int(restored.step) == 2
  state = ts.create_train_state(config, model, tx, mesh)
  step_fn = step_lib.make_train_step(
      config, model, tx, ts.learning_rate_schedule(config),
      jax.tree.map(lambda a: a.sharding, state), mesh)
  batches = iter(pipeline.create_train_dataset(config, info))
  with jax.set_mesh(mesh):
    for _ in range(2):
      local = next(batches)
      state, _ = step_fn(state, sharding.global_batch(
          {k: local[k] for k in step_lib.train_fields(model)}, mesh))
  for name in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(getattr(restored, name)),
                 jax.device_get(getattr(state, name)))


def test_inference_restores_from_a_relative_workdir(trained, monkeypatch):
  """`--workdir runs/x` as README writes it: the weights are restored
  (Orbax reads no metadata through a relative path) and equal the
  absolute path's."""
  from kpseq_jax.inference import predictor as predictor_lib
  config, workdir, _ = trained
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  _, absolute, step = predictor_lib.restore_variables(config, str(workdir),
                                                      mesh)
  monkeypatch.chdir(workdir.parent)
  _, relative, rstep = predictor_lib.restore_variables(config, workdir.name,
                                                       mesh)
  assert rstep == step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(relative),
               jax.device_get(absolute))


def test_running_again_resumes_from_the_checkpoint(trained, tmp_path):
  """A longer run in the same workdir trains only the new step: one new
  line in metrics.jsonl (step 3), and a checkpoint at 3 beside 1 and 2."""
  config, workdir, _ = trained
  import shutil
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  before = (resumed_dir / scalar_log.FILE_NAME).read_text().splitlines()
  # No 'none' split: one final evaluation (test), not three; same training.
  more = conftest.smoke_config(
      config.input.dataset_dir, **{'optim.num_train_steps': 3},
      **{'vocab.presence_token': config.vocab.presence_token},
      **{'evals.split': 'none'})
  train.train_and_evaluate(more, str(resumed_dir))
  after = (resumed_dir / scalar_log.FILE_NAME).read_text().splitlines()
  assert after[:len(before)] == before
  assert [json.loads(l)['step'] for l in after[len(before):]] == [3]
  assert checkpointing.Checkpointer(str(resumed_dir)).all_steps() == [1, 2, 3]
