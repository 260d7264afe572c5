"""Evaluation: greedy decoding on an eval split, MP-100 PCK, and a floor.

`Evaluator` is built once per run (it compiles the decoder and computes the
mean-pose baseline once) and `Evaluator.evaluate` runs on any state of the
run: training calls it every ``eval_every_steps`` and at the end;
`evaluate` restores a workdir and calls it once (``--mode eval``).

Writes to the workdir (only process 0):
  ``eval_<split>.json``, ``.md``, ``.csv``, ``pck_curve_<split>.png``: the
    `report.EvalReport` (PCK by MP-100's protocol, `metrics.py`: per-instance
    PCK@0.2 against 0.2 x max(clean bbox w, h), averaged per category, then
    over categories; mean pixel error; the same for the mean-pose baseline;
    PCK at alpha 0.05 ... 0.5);
  ``predictions_<split>.json``: COCO keypoint results
    (`kpseq_jax.inference.results`) in image pixels;
  ``tensorboard/``: PCK scalars and a few crops with ground truth |
    prediction drawn.
Each evaluation overwrites the files of the one before.
"""

import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from kpseq_jax.data import dataset
from kpseq_jax.data import pipeline
from kpseq_jax.data import transforms
from kpseq_jax.data import visualize
from kpseq_jax.evaluation import baseline as baseline_lib
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import report as report_lib
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import results as results_lib
from kpseq_jax.runtime import metric_writer as metric_writer_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.training import config_checks

# Eval crops drawn to TensorBoard (ground truth | prediction), from batch 1.
NUM_OVERLAYS = 4
OVERLAY_SIZE_PX = 192
PCK_PROTOCOL = ('MP-100 (POMNet _report_metric): per-instance PCK@0.2, '
                'threshold 0.2 x max(clean bbox w, h), mean per category, '
                'then over categories; see evaluation/metrics.py')
MEAN_POSE = 'mean pose of the training crops'


class Evaluator:
  """Evaluates states of one run on one split.

  Args:
    config: the run's config.
    info: the data set's `DatasetInfo`.
    predictor: the run's `Predictor` (evaluated with each state's
      variables).
    split: the split to evaluate (default ``config.eval_split``).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo,
               predictor: predictor_lib.Predictor,
               split: str | None = None):
    self.config = config
    self.info = info
    self.predictor = predictor
    self.split = split or config.eval_split
    self.mean_pose = baseline_lib.mean_pose(config)  # Once per run.

  def evaluate(self, workdir: str, variables, step: int | None,
               writer: metric_writer_lib.MetricWriter
               ) -> report_lib.EvalReport:
    """Decodes the split with ``variables`` and writes the report.

    Args:
      workdir: where the files go (process 0 writes).
      variables: {'params', 'batch_stats'} on the predictor's mesh.
      step: the state's train step (for the report and TensorBoard).
      writer: TensorBoard writer for the scalars and overlays.

    Returns:
      the `report.EvalReport`, the same on every process.
    """
    config, info, split = self.config, self.info, self.split
    kmax = config.max_num_keypoints
    acc, base_acc = metrics.PCKAccumulator(), metrics.PCKAccumulator()
    curve = {a: metrics.PCKAccumulator(alpha=a) for a in report_lib.ALPHAS}
    base_curve = {a: metrics.PCKAccumulator(alpha=a)
                  for a in report_lib.ALPHAS}
    results, overlays = [], {}
    total = (info.split_sizes[split] if config.num_eval_examples <= 0 else
             min(config.num_eval_examples, info.split_sizes[split]))
    bar = tqdm.tqdm(total=total, desc=f'eval {split}', unit='inst',
                    disable=jax.process_index() != 0)
    for local in pipeline.create_eval_batches(config, info, split):
      pred = self.predictor.predict(local, variables)
      if not overlays:
        overlays = _overlays(local, pred.keypoints, info, split)
      batch = sharding.gather(sharding.global_batch(
          {k: v for k, v in local.items() if k != 'image'},
          self.predictor.mesh))
      keep = batch['valid'] > 0
      batch = {k: v[keep] for k, v in batch.items()}
      pred_px = pred.keypoints_px[keep]
      mean = np.stack([baseline_lib.padded(self.mean_pose.get(int(c)), kmax)
                       for c in batch['category_id']])
      base = predictor_lib.crop_to_image(mean, batch['crop_from_image'],
                                         config.image_size_px)
      for a, p in [(acc, pred_px), (base_acc, base)] + [
          (curve[a], pred_px) for a in curve] + [
              (base_curve[a], base) for a in base_curve]:
        a.update(batch['category_id'], p, batch['keypoints'], batch['bbox'])
      results.extend(results_lib.coco_results(
          pred_px, batch['num_keypoints'], batch['image_id'],
          batch['category_id']))
      bar.update(int(keep.sum()))
    bar.close()
    report = _report(info, split, step, len(results), acc.result(),
                     base_acc.result(),
                     [curve[a].result() for a in report_lib.ALPHAS],
                     [base_curve[a].result() for a in report_lib.ALPHAS])
    logging.info(
        'Eval %s (step %s, %d instances): PCK@0.2 %.4f, mean error %.2f px '
        '| %s: PCK@0.2 %.4f, mean error %.2f px', split, step,
        report.num_instances, report.pck, report.mean_error_px,
        report.baseline, report.baseline_pck, report.baseline_error_px)
    if jax.process_index() == 0:
      paths = report_lib.write(workdir, report)
      with open(os.path.join(workdir, f'predictions_{split}.json'), 'w') as f:
        json.dump(results, f)
      logging.info('Eval %s per category (also in %s, %s; PCK curve %s):\n%s',
                   split, paths['markdown'], paths['csv'], paths['curve'],
                   report_lib.to_markdown(report_lib.category_rows(report)))
    log_step = 0 if step is None else int(step)
    writer.write_scalars(log_step, report.scalars())
    writer.write_images(log_step, overlays)
    writer.flush()
    return report


def evaluate(config: ml_collections.ConfigDict,
             workdir: str) -> report_lib.EvalReport:
  """``--mode eval``: restores the latest checkpoint and evaluates it.

  Raises:
    FileNotFoundError: missing data set or checkpoint.
    ValueError: for an impossible config (see `config_checks`).
  """
  config_checks.check(config)
  info = dataset.load_info(config.dataset_dir)
  config_checks.check_dataset(config, info)
  mesh = sharding.create_mesh(config.mesh_shape)
  model, state, step = predictor_lib.restore_state(
      config, workdir, mesh, info.split_sizes[config.train_split])
  predictor = predictor_lib.Predictor.from_state(config, model, state, mesh)
  with metric_writer_lib.MetricWriter(workdir) as writer:
    return Evaluator(config, info, predictor).evaluate(
        workdir, predictor.variables, step, writer)


def _report(info: dataset.DatasetInfo, split: str, step: int | None,
            num_instances: int, res: metrics.PCKResult,
            base: metrics.PCKResult, curve: list[metrics.PCKResult],
            base_curve: list[metrics.PCKResult]) -> report_lib.EvalReport:
  """The `EvalReport` of the accumulated results (categories by name)."""
  named = lambda d: {_name(info, c): v for c, v in d.items()}
  return report_lib.EvalReport(
      split=split, checkpoint_step=None if step is None else int(step),
      num_instances=num_instances, pck=res.pck, pck_protocol=PCK_PROTOCOL,
      pck_instance_mean=res.pck_instance_mean,
      pck_keypoint_pooled=res.pck_keypoint_pooled,
      num_excluded_instances=res.num_excluded,
      mean_error_px=res.mean_error_px,
      num_labelled_keypoints=res.num_keypoints,
      per_category_pck=named(res.per_category),
      per_category_instances=named(res.per_category_instances),
      per_category_labelled_keypoints=named(res.per_category_keypoints),
      per_category_error_px=named(res.per_category_error_px),
      baseline=MEAN_POSE, baseline_pck=base.pck,
      baseline_error_px=base.mean_error_px,
      baseline_per_category_pck=named(base.per_category),
      baseline_per_category_error_px=named(base.per_category_error_px),
      pck_curve=report_lib.PCKCurve(
          alphas=list(report_lib.ALPHAS), pck=[r.pck for r in curve],
          baseline_pck=[r.pck for r in base_curve],
          per_category_pck={
              _name(info, c): [r.per_category.get(c) for r in curve]
              for c in res.per_category}))


def _overlays(local: dict, keypoints_norm: np.ndarray,
              info: dataset.DatasetInfo,
              split: str) -> dict[str, np.ndarray]:
  """Up to NUM_OVERLAYS crops as uint8 [S', 2 S', 3]: truth | prediction.

  Args:
    local: this process's batch (crop ``image`` etc.).
    keypoints_norm: float [B, Kmax, 2] predictions of the global batch;
      process 0's local rows are its first rows (only process 0 writes).
    info: category table.
    split: for the tags.
  """
  out = {}
  size = OVERLAY_SIZE_PX
  for i in range(min(NUM_OVERLAYS, len(local['image']))):
    if local['valid'][i] <= 0:
      continue
    k = int(local['num_keypoints'][i])
    cat = info.categories.get(int(local['category_id'][i]))
    crop = Image.fromarray(local['image'][i]).resize(
        (size, size), Image.Resampling.BILINEAR)
    scale = size / local['image'].shape[1]
    gt = local['keypoints'][i, :k]
    gt_xy = transforms.apply_affine(local['crop_from_image'][i], gt[:, :2])
    truth = np.concatenate([gt_xy * scale, gt[:, 2:]], axis=1)
    xy = keypoints_norm[i, :k] * size
    pred = np.concatenate([xy, np.isfinite(xy[:, :1]).astype(float)], axis=1)
    out[f'eval_{split}/truth_vs_prediction/{i}'] = np.concatenate(
        [np.asarray(visualize.draw_pose(crop, truth, cat)),
         np.asarray(visualize.draw_pose(crop, pred, cat))], axis=1)
  return out


def _name(info: dataset.DatasetInfo, cid: int) -> str:
  """``"<id>:<name>"`` of a category (the id alone if unknown)."""
  c = info.categories.get(cid)
  return f'{cid}:{c.name}' if c else str(cid)
