"""Evaluation: greedy decoding on an eval split, PCK@0.2, and a floor.

Writes to the workdir:
  ``eval_<split>.json``: PCK by MP-100's protocol (`metrics.py`: per-instance
    PCK@0.2 against 0.2 x max(clean bbox w, h), averaged per category, then
    over categories; also the plain instance mean and the keypoint-pooled
    figure), per category, mean pixel error, the same figures for the mean-pose baseline, the checkpoint
    step, the number of instances, and PCK at alpha 0.05 ... 0.5
    (``pck_curve``).
  ``eval_<split>.md``, ``eval_<split>.csv``, ``pck_curve_<split>.png``: the
    per-category table and the PCK-threshold plot (see `report.py`).
  ``predictions_<split>.json``: predictions in the COCO keypoint results
    format (``image_id``, ``category_id``, ``keypoints`` [x, y, score] * K in
    image pixels, ``score``); keypoints not generated are (0, 0, 0).
  ``tensorboard/``: PCK scalars and a few crops with ground truth | prediction
    drawn (see `metric_writer.py`).
"""

import json
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from kpseq_jax import checkpointing
from kpseq_jax import config_checks
from kpseq_jax import decoding
from kpseq_jax import input_pipeline
from kpseq_jax import metric_writer as metric_writer_lib
from kpseq_jax import metrics
from kpseq_jax import report as report_lib
from kpseq_jax import sharding
from kpseq_jax import train_state as ts
from kpseq_jax import transforms
from kpseq_jax import visualize

# Eval crops drawn to TensorBoard (ground truth | prediction), from batch 1.
NUM_OVERLAYS = 4
OVERLAY_SIZE_PX = 192


def crop_to_image(keypoints_norm: np.ndarray, crop_from_image: np.ndarray,
                  image_size_px: int) -> np.ndarray:
  """Maps normalised crop keypoints back to image pixels.

  Args:
    keypoints_norm: float [N, K, 2] normalised [0, 1] crop (x, y); NaN kept.
    crop_from_image: float [N, 2, 3] image->crop-pixel affines.
    image_size_px: S.

  Returns:
    float64 [N, K, 2] image pixels.
  """
  out = np.empty(keypoints_norm.shape, np.float64)
  for i, m in enumerate(crop_from_image):
    out[i] = transforms.apply_affine(transforms.invert_affine(m),
                                     keypoints_norm[i] * image_size_px)
  return out


def _gather(tree: Any) -> Any:
  """Global numpy values of (possibly multi-process) arrays."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def restore_state(config: ml_collections.ConfigDict, workdir: str,
                  mesh: jax.sharding.Mesh, train_size: int):
  """Restores the latest checkpoint of ``workdir`` onto ``mesh``.

  Returns:
    (model, state, step).

  Raises:
    FileNotFoundError: if ``workdir`` has no checkpoint.
  """
  model = ts.create_model(config)
  tx = ts.create_optimizer(config, train_size)
  abstract = ts.abstract_train_state(config, model, tx, mesh)
  ckpt = checkpointing.Checkpointer(workdir)
  state, step = ckpt.restore(abstract)
  ckpt.close()
  return model, state, step


def make_eval_decode_fn(config: ml_collections.ConfigDict, model,
                        state, mesh: jax.sharding.Mesh):
  """The compiled greedy decoder `evaluate` uses, for ``state``'s layout.

  Training builds it once and passes it to every periodic `evaluate`, so
  the decoder compiles once per run.

  Returns:
    the jitted cached greedy decoder of `decoding.make_decode_fn`,
    ``fn(variables, images[, category_tokens])`` (shapes and outputs: see
    `decoding.cached_greedy_decode`), sharded like ``state`` and the batch.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return decoding.make_decode_fn(  # Variables keep their (fsdp) layout.
      model, config.max_num_keypoints,
      jax.tree.map(lambda a: a.sharding, variables),
      sharding.batch_sharding(mesh))


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             model=None, state=None, step: int | None = None,
             split: str | None = None,
             writer: metric_writer_lib.MetricWriter | None = None,
             decode_fn=None) -> dict:
  """Decodes an eval split and reports PCK beside the mean-pose baseline.

  With ``model``/``state`` None, restores the latest checkpoint in
  ``workdir`` (``--mode eval``). Only process 0 writes files (each call
  overwrites ``eval_<split>.json``). Scalars and overlays go to ``writer``
  (default: one opened on ``workdir`` for this call). ``decode_fn``: from
  `make_eval_decode_fn` (default: built here).

  Returns:
    dict as written to ``eval_<split>.json``.

  Raises:
    FileNotFoundError: missing data set or checkpoint.
    ValueError: for an impossible config (see `config_checks`).
  """
  split = split or config.eval_split
  if state is None:  # --mode eval; training checked the config already.
    config_checks.check(config)
  info = input_pipeline.load_info(config.dataset_dir)
  config_checks.check_dataset(config, info)
  mesh = sharding.create_mesh(config.mesh_shape)
  if state is None:
    model, state, step = restore_state(
        config, workdir, mesh, info.split_sizes[config.train_split])
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if decode_fn is None:
    decode_fn = make_eval_decode_fn(config, model, state, mesh)
  baseline = input_pipeline.mean_pose(config, info)
  s = config.image_size_px
  acc, base_acc = metrics.PCKAccumulator(), metrics.PCKAccumulator()
  curve = {a: metrics.PCKAccumulator(alpha=a) for a in report_lib.ALPHAS}
  base_curve = {a: metrics.PCKAccumulator(alpha=a) for a in report_lib.ALPHAS}
  results, overlays = [], {}
  total = (info.split_sizes[split] if config.num_eval_examples <= 0 else
           min(config.num_eval_examples, info.split_sizes[split]))
  bar = tqdm.tqdm(total=total, desc=f'eval {split}', unit='inst',
                  disable=jax.process_index() != 0)
  for local in input_pipeline.create_eval_batches(config, info, split):
    inputs = sharding.global_batch(
        {k: local[k] for k in ('image', 'category_token') if k in local},
        mesh)  # category_token: with category conditioning only.
    out = _gather(decode_fn(variables, inputs['image'], *(
        [inputs['category_token']] if 'category_token' in inputs else [])))
    if not overlays:
      overlays = _overlays(local, out['keypoints'], info, split)
    batch = _gather(sharding.global_batch(
        {k: v for k, v in local.items() if k != 'image'}, mesh))
    keep = batch['valid'] > 0
    batch = {k: v[keep] for k, v in batch.items()}
    pred = crop_to_image(out['keypoints'][keep], batch['crop_from_image'], s)
    mean = np.stack([_padded(baseline.get(int(c)), config.max_num_keypoints)
                     for c in batch['category_id']])
    base = crop_to_image(mean, batch['crop_from_image'], s)
    for a, b in [(acc, pred), (base_acc, base)] + [
        (curve[a], pred) for a in curve] + [
            (base_curve[a], base) for a in base_curve]:
      a.update(batch['category_id'], b, batch['keypoints'], batch['bbox'])
    results.extend(coco_results(pred, batch))
    bar.update(int(keep.sum()))
  bar.close()
  res, base_res = acc.result(), base_acc.result()
  curve_res = [curve[a].result() for a in report_lib.ALPHAS]
  base_curve_res = [base_curve[a].result() for a in report_lib.ALPHAS]
  named = lambda d: {_name(info, c): v for c, v in d.items()}
  report = dict(
      split=split, checkpoint_step=None if step is None else int(step),
      num_instances=len(results), pck=res['pck'],
      pck_protocol=('MP-100 (POMNet _report_metric): per-instance PCK@0.2, '
                    'threshold 0.2 x max(clean bbox w, h), mean per '
                    'category, then over categories; see metrics.py'),
      pck_instance_mean=res['pck_instance_mean'],
      pck_keypoint_pooled=res['pck_keypoint_pooled'],
      num_excluded_instances=res['num_excluded'],
      mean_error_px=res['mean_error_px'],
      per_category_pck={_name(info, c): v
                        for c, v in res['per_category'].items()},
      baseline_mean_pose_pck=base_res['pck'],
      baseline_mean_pose_error_px=base_res['mean_error_px'],
      baseline_per_category_pck={_name(info, c): v
                                 for c, v in base_res['per_category'].items()},
      num_labelled_keypoints=res['num_keypoints'],
      per_category_instances=named(res['per_category_instances']),
      per_category_labelled_keypoints=named(res['per_category_keypoints']),
      per_category_error_px=named(res['per_category_error_px']),
      baseline_per_category_error_px=named(
          base_res['per_category_error_px']),
      pck_curve=dict(
          alphas=list(report_lib.ALPHAS),
          pck=[r['pck'] for r in curve_res],
          baseline_pck=[r['pck'] for r in base_curve_res],
          per_category_pck={
              _name(info, c): [r['per_category'].get(c) for r in curve_res]
              for c in res['per_category']}))
  logging.info(
      'Eval %s (step %s, %d instances): PCK@0.2 %.4f, mean error %.2f px | '
      'mean-pose baseline PCK@0.2 %.4f, mean error %.2f px', split, step,
      len(results), res['pck'], res['mean_error_px'], base_res['pck'],
      base_res['mean_error_px'])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f'eval_{split}.json'), 'w') as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(workdir, f'predictions_{split}.json'), 'w') as f:
      json.dump(results, f)
    paths = report_lib.write(workdir, report)
    logging.info('Eval %s per category (also in %s, %s; PCK curve %s):\n%s',
                 split, paths['markdown'], paths['csv'], paths['curve'],
                 report_lib.to_markdown(report_lib.category_rows(report)))
  own_writer = writer is None
  if own_writer:
    writer = metric_writer_lib.MetricWriter(workdir)
  log_step = 0 if step is None else int(step)
  writer.write_scalars(log_step, _eval_scalars(report))
  writer.write_images(log_step, overlays)
  writer.flush()
  if own_writer:
    writer.close()
  return report


def _eval_scalars(report: dict) -> dict[str, float]:
  """TensorBoard scalars of a report, under ``eval_<split>/``."""
  p = f'eval_{report["split"]}'
  out = {f'{p}/pck': report['pck'],
         f'{p}/mean_error_px': report['mean_error_px'],
         f'{p}/baseline_mean_pose_pck': report['baseline_mean_pose_pck']}
  for name, v in report['per_category_pck'].items():
    out[f'{p}/pck_per_category/{name}'] = v
  return out


def _overlays(local: dict, keypoints_norm: np.ndarray,
              info: input_pipeline.DatasetInfo,
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


def _name(info: input_pipeline.DatasetInfo, cid: int) -> str:
  c = info.categories.get(cid)
  return f'{cid}:{c.name}' if c else str(cid)


def _padded(mean_xy: np.ndarray | None, kmax: int) -> np.ndarray:
  """[K, 2] -> [Kmax, 2] with NaN padding (NaN if the category is unseen)."""
  out = np.full([kmax, 2], np.nan, np.float32)
  if mean_xy is not None:
    out[:len(mean_xy)] = mean_xy
  return out


def coco_results(pred_px: np.ndarray, batch: dict) -> list[dict]:
  """COCO keypoint results entries for a batch of predictions.

  Args:
    pred_px: float [N, Kmax, 2] image pixels, NaN where not generated.
    batch: int [N] ``num_keypoints``, ``image_id``, ``category_id``, and
      optional float [N] ``score`` (default 1.0).

  Returns:
    N dicts ``image_id, category_id, keypoints`` ([x, y, 1] * K, (0, 0, 0)
    for a keypoint not generated), ``score``.
  """
  out = []
  for i in range(len(pred_px)):
    k = int(batch['num_keypoints'][i])
    xy = pred_px[i, :k]
    ok = np.all(np.isfinite(xy), axis=1)
    kp = np.concatenate([np.where(ok[:, None], xy, 0.0),
                         ok[:, None].astype(np.float64)], axis=1)
    out.append(dict(image_id=int(batch['image_id'][i]),
                    category_id=int(batch['category_id'][i]),
                    keypoints=[round(float(v), 3) for v in kp.reshape(-1)],
                    score=float(batch['score'][i]) if 'score' in batch
                    else 1.0))
  return out
