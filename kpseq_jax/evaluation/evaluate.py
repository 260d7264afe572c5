"""Evaluation: greedy decoding on an eval split, MP-100 PCK, and a floor.

`Evaluator` is built once per run, before training (its protocol computes
the baseline or draws the CAPE episodes once, `protocols.py`), and
`Evaluator.evaluate` runs on any state of the run with the run's compiled
`Predictor`: training calls it every ``eval_every_steps`` and at the end;
`evaluate` restores a workdir and calls it once (``--mode eval``).

Writes to the workdir (only process 0), ``<name>`` being the split
(``test``) or, for CAPE episodes asked in a random keypoint order
(``cape_eval_permuted``), ``<split>_permuted``:
  ``eval_<name>.json``, ``.md``, ``.csv``, ``pck_curve_<name>.png``: the
    `report.EvalReport` (PCK@0.2 by the protocol's definition, mean pixel
    error, the same for its baseline, PCK at alpha 0.05 ... 0.5, mPCK);
  ``predictions_<name>.json``: COCO keypoint results
    (`kpseq_jax.inference.results`) in image pixels, one per sample, in
    the category's keypoint order, with per-keypoint confidence (and
    presence);
  the report also holds OKS AP, the confidence's calibration and presence
    precision/recall (`uncertainty.py`), and ``pixel_accuracy``: accuracy
    within 1, 5, 25 px and mean absolute error, overall and per keypoint
    (`metrics.pixel_accuracy`);
  ``episodes_<name>.jsonl`` (CAPE): the episodes evaluated, one line
    ``[support annotation ids..., query annotation id]`` per query sample;
  ``tensorboard/``: PCK scalars and a few crops with ground truth |
    prediction drawn.
Each evaluation overwrites the files of the one before.
"""

import dataclasses
import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from data_prep import episodes as episodes_lib
from kpseq_jax.data import dataset
from kpseq_jax.data import transforms
from kpseq_jax.data import visualize
from kpseq_jax.evaluation import box_ap
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import oks
from kpseq_jax.evaluation import protocols
from kpseq_jax.evaluation import report as report_lib
from kpseq_jax.evaluation import uncertainty
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import results as results_lib
from kpseq_jax.runtime import metric_writer as metric_writer_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.training import config_checks

# Eval crops drawn to TensorBoard (ground truth | prediction), from batch 1.
NUM_OVERLAYS = 4
OVERLAY_SIZE_PX = 192
# CAPE papers' mPCK: the mean of PCK at these thresholds.
MPCK_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25)


class Evaluator:
  """Evaluates states of one run on one split.

  Built once per run, before training: the protocol (`protocols.create`)
  computes its baseline or draws its episodes here, so a problem with them
  stops the run before anything is trained.

  Args:
    config: the run's config.
    info: the data set's `DatasetInfo`.
    split: the split to evaluate (default ``config.evals.split``).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               info: dataset.DatasetInfo, split: str | None = None):
    self.config = config
    self.info = info
    self.split = split or config.evals.split
    self.protocol = protocols.create(config, info, self.split)
    if isinstance(self.protocol, protocols.Instances):
      # OKS sigmas of every category, or a ValueError naming the category
      # and field before anything is trained.
      for c in info.categories.values():
        oks.resolve_sigmas(c.id, c.num_keypoints, c.keypoint_names, c.name,
                           c.oks_sigmas or None,
                           config.evals.oks_default_sigma or None)
    permuted = config.model_name == 'cape' and config.cape.eval_permuted
    self.name = self.split + ('_permuted' if permuted else '')

  def evaluate(self, workdir: str, predictor: predictor_lib.Predictor,
               variables, step: int | None,
               writer: metric_writer_lib.MetricWriter
               ) -> report_lib.EvalReport:
    """Decodes the split with ``variables`` and writes the report.

    Args:
      workdir: where the files go (process 0 writes).
      predictor: the run's compiled decoder.
      variables: {'params', 'batch_stats'} on the predictor's mesh.
      step: the state's train step (for the report and TensorBoard).
      writer: TensorBoard writer for the scalars and overlays.

    Returns:
      the `report.EvalReport`, the same on every process.
    """
    config, info, split, name = self.config, self.info, self.split, self.name
    protocol = self.protocol
    acc = {a: metrics.PCKAccumulator(alpha=a) for a in report_lib.ALPHAS}
    base_acc = {a: metrics.PCKAccumulator(alpha=a) for a in report_lib.ALPHAS}
    unc = uncertainty.UncertaintyAccumulator(
        info, config.decode.confidence_radius_bins, config.evals.oks_default_sigma,
        with_oks=isinstance(protocol, protocols.Instances))
    results, overlays = [], {}
    pixels = metrics.PixelAccuracyAccumulator()  # Captioning papers' figures.
    bar = tqdm.tqdm(total=protocol.num_samples, desc=f'eval {split}',
                    unit='sample', disable=jax.process_index() != 0)
    for local in protocol.batches():
      pred = predictor.predict(local, variables)
      if not overlays:
        overlays = _overlays(local, pred.keypoints, info, name,
                             pred.absent, config.input.image_size_px)
      batch = sharding.gather(sharding.global_batch(
          {k: v for k, v in local.items()
           if k not in ('image', 'support_image')}, predictor.mesh))
      keep = batch['valid'] > 0
      batch = {k: v[keep] for k, v in batch.items()}
      pred_px = pred.keypoints_px[keep]
      presence = None if pred.presence is None else pred.presence[keep]
      base_px = predictor_lib.crop_to_image(
          protocol.baseline(batch), batch['crop_from_image'],
          config.input.image_size_px)
      size = protocol.normaliser(batch)
      for a in report_lib.ALPHAS:
        for accumulator, p in ((acc[a], pred_px), (base_acc[a], base_px)):
          accumulator.update(batch['category_id'], p, batch['keypoints'],
                             batch['bbox'], size=size)
      pixels.update(batch['category_id'], pred_px, batch['keypoints'],
                    ordered='keypoint_order' not in batch)
      unc.update(batch, pred_px, pred.confidence_by_radius[keep], presence,
                 size)
      results.extend(_coco_results(pred_px, batch, info,
                                   pred.confidence[keep], presence))
      bar.update(int(keep.sum()))
    bar.close()
    report = _report(info, name, split, step, len(results), protocol,
                     [acc[a].result() for a in report_lib.ALPHAS],
                     [base_acc[a].result() for a in report_lib.ALPHAS],
                     unc.result())
    report = dataclasses.replace(report, pixel_accuracy=pixels.result(
        {c.id: list(c.keypoint_names) for c in info.categories.values()}))
    logging.info(
        'Eval %s (step %s, %d samples): PCK@0.2 %.4f, mean error %.2f px '
        '| %s: PCK@0.2 %.4f, mean error %.2f px', split, step,
        report.num_instances, report.pck, report.mean_error_px,
        report.baseline, report.baseline_pck, report.baseline_error_px)
    for line in report_lib.uncertainty_lines(report):
      logging.info('Eval %s: %s', split, line)
    if jax.process_index() == 0:
      paths = report_lib.write(workdir, report)
      with open(os.path.join(workdir, f'predictions_{name}.json'), 'w') as f:
        json.dump(results, f)
      if isinstance(protocol, protocols.Episodes):
        episodes_lib.write_jsonl_atomically(
            protocol.samples, os.path.join(workdir, f'episodes_{name}.jsonl'))
      logging.info('Eval %s per category (also in %s, %s; PCK curve %s):\n%s',
                   split, paths['markdown'], paths['csv'], paths['curve'],
                   report_lib.to_markdown(report_lib.category_rows(report)))
    log_step = 0 if step is None else int(step)
    writer.write_scalars(log_step, report.scalars())
    writer.write_images(log_step, overlays)
    writer.flush()
    return report


def evaluate(config: ml_collections.ConfigDict, workdir: str
             ) -> report_lib.EvalReport | box_ap.BoxReport:
  """``--mode eval``: restores the latest checkpoint and evaluates it (box
  AP for ``model_name='detector'``, `box_ap.DetectionEvaluator`).

  Raises:
    FileNotFoundError: missing data set or checkpoint.
    ValueError: for an impossible config (see `config_checks`).
  """
  config_checks.check(config)
  info = dataset.load_info(config.input.dataset_dir)
  config_checks.check_dataset(config, info)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  if config.model_name == 'detector':
    evaluator = box_ap.DetectionEvaluator(config, info)
    model, variables, step = predictor_lib.restore_variables(
        config, workdir, mesh)
    predictor = box_predictor.BoxPredictor(config, model, variables, mesh)
  else:
    evaluator = Evaluator(config, info)
    model, variables, step = predictor_lib.restore_variables(
        config, workdir, mesh)
    predictor = predictor_lib.Predictor(config, model, variables, mesh)
  with metric_writer_lib.MetricWriter(workdir) as writer:
    return evaluator.evaluate(workdir, predictor, predictor.variables, step,
                              writer)


def _coco_results(pred_px: np.ndarray, batch: dict,
                  info: dataset.DatasetInfo, confidence: np.ndarray,
                  presence: np.ndarray | None) -> list[dict]:
  """COCO results of a batch in each category's keypoint order.

  Args:
    pred_px: float [N, Kmax, 2] image pixels, in the batch's keypoint order.
    batch: the evaluated samples (``category_id``, ``image_id``, and for
      episodes ``keypoint_order``, ``num_keypoints``).
    info: the category table.
    confidence: float [N, Kmax] per-keypoint confidence.
    presence: float [N, Kmax] or None.

  An episode's groups are in its ``keypoint_order`` (a permuted or
  subsampled episode asks for the category's keypoints in another order);
  they are put back at their category index, keypoints not asked for are
  (0, 0, 0).
  """
  ks = np.array([info.categories[int(c)].num_keypoints
                 for c in batch['category_id']])
  if 'keypoint_order' in batch:
    def reorder(a):
      if a is None:
        return None
      out = np.full((len(a), max(ks, default=0)) + a.shape[2:], np.nan)
      for i, order in enumerate(batch['keypoint_order']):
        n = int(batch['num_keypoints'][i])
        out[i, order[:n]] = a[i, :n]
      return out
    pred_px, confidence, presence = (reorder(pred_px), reorder(confidence),
                                     reorder(presence))
  return results_lib.coco_results(pred_px, ks, batch['image_id'],
                                  batch['category_id'],
                                  keypoint_scores=confidence,
                                  presence=presence)


def _report(info: dataset.DatasetInfo, name: str, split: str,
            step: int | None,
            num_samples: int, protocol, curve: list[metrics.PCKResult],
            base_curve: list[metrics.PCKResult],
            unc: uncertainty.UncertaintyResult) -> report_lib.EvalReport:
  """The `EvalReport` of the accumulated results (categories by name)."""
  named = lambda d: {_name(info, c): v for c, v in d.items()}
  if protocol.mean_over_samples:
    figure = lambda r: r.pck_instance_mean
  else:
    figure = lambda r: r.pck
  at = lambda alpha: report_lib.ALPHAS.index(alpha)
  res, base = curve[at(0.2)], base_curve[at(0.2)]
  return report_lib.EvalReport(
      name=name, split=split, checkpoint_step=None if step is None else int(step),
      num_instances=num_samples, pck=figure(res),
      pck_protocol=protocol.description,
      pck_instance_mean=res.pck_instance_mean,
      pck_keypoint_pooled=res.pck_keypoint_pooled,
      num_excluded_instances=res.num_excluded,
      mean_error_px=res.mean_error_px,
      num_labelled_keypoints=res.num_keypoints,
      per_category_pck=named(res.per_category),
      per_category_instances=named(res.per_category_instances),
      per_category_labelled_keypoints=named(res.per_category_keypoints),
      per_category_error_px=named(res.per_category_error_px),
      baseline=protocol.baseline_name, baseline_pck=figure(base),
      baseline_error_px=base.mean_error_px,
      baseline_per_category_pck=named(base.per_category),
      baseline_per_category_error_px=named(base.per_category_error_px),
      pck_curve=report_lib.PCKCurve(
          alphas=list(report_lib.ALPHAS), pck=[figure(r) for r in curve],
          baseline_pck=[figure(r) for r in base_curve],
          per_category_pck={
              _name(info, c): [r.per_category.get(c) for r in curve]
              for c in res.per_category}),
      mpck=float(np.mean([figure(curve[at(a)]) for a in MPCK_ALPHAS])),
      num_samples_without_keypoints=res.num_without_keypoints,
      notes=list(protocol.notes),
      oks=unc.oks, calibration=unc.calibration, presence=unc.presence)


def _overlays(local: dict, keypoints_norm: np.ndarray,
              info: dataset.DatasetInfo, split: str,
              absent: np.ndarray, image_size_px: int
              ) -> dict[str, np.ndarray]:
  """Up to NUM_OVERLAYS crops as uint8 [S', 2 S', 3]: truth | prediction.

  Args:
    local: this process's batch (crop ``image`` etc.; or whole-image
      canvases and ``memory_from_crop``, whose crops are warped out).
    keypoints_norm: float [B, Kmax, 2] predictions of the global batch;
      process 0's local rows are its first rows (only process 0 writes).
    info: category table.
    split: the evaluation's name, for the tags.
    absent: bool [B, Kmax] predicted not visible (drawn hollow).
    image_size_px: S, the crop side of ``crop_from_image``.
  """
  out = {}
  size = OVERLAY_SIZE_PX
  for i in range(min(NUM_OVERLAYS, len(local['image']))):
    if local['valid'][i] <= 0:
      continue
    k = int(local['num_keypoints'][i])
    cat = info.categories.get(int(local['category_id'][i]))
    if 'keypoint_order' in local:  # An episode's order: no names, skeleton.
      cat = None
    if 'memory_from_crop' in local:  # A canvas: warp the crop out of it.
      h, w = local['image'].shape[1:3]
      m = np.concatenate([local['memory_from_crop'][i].astype(np.float64),
                          [[0.0, 0.0, 1.0]]])
      # Overlay pixels -> canvas pixels, as Pillow's AFFINE wants them.
      a = (np.diag([w, h, 1.0]) @ m @ np.diag([1 / size, 1 / size, 1.0]))[:2]
      crop = Image.fromarray(local['image'][i]).transform(
          (size, size), Image.Transform.AFFINE, data=tuple(a.reshape(-1)),
          resample=Image.Resampling.BILINEAR)
    else:
      crop = Image.fromarray(local['image'][i]).resize(
          (size, size), Image.Resampling.BILINEAR)
    scale = size / image_size_px
    gt = local['keypoints'][i, :k]
    gt_xy = transforms.apply_affine(local['crop_from_image'][i], gt[:, :2])
    truth = np.concatenate([gt_xy * scale, gt[:, 2:]], axis=1)
    xy = keypoints_norm[i, :k] * size
    pred = np.concatenate([xy, np.isfinite(xy[:, :1]).astype(float)], axis=1)
    out[f'eval_{split}/truth_vs_prediction/{i}'] = np.concatenate(
        [np.asarray(visualize.draw_pose(crop, truth, cat)),
         np.asarray(visualize.draw_pose(crop, pred, cat,
                                        absent=absent[i, :k]))], axis=1)
  return out


def _name(info: dataset.DatasetInfo, cid: int) -> str:
  """``"<id>:<name>"`` of a category (the id alone if unknown)."""
  c = info.categories.get(cid)
  return f'{cid}:{c.name}' if c else str(cid)
