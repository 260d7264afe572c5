"""Evaluation: greedy decoding on an eval split, PCK@0.2, and a floor.

Writes to the workdir:
  ``eval_<split>.json``: PCK (mean over categories and per category), mean
    pixel error, the same figures for the mean-pose baseline, the checkpoint
    step, the number of instances.
  ``predictions_<split>.json``: predictions in the COCO keypoint results
    format (``image_id``, ``category_id``, ``keypoints`` [x, y, score] * K in
    image pixels, ``score``); keypoints not generated are (0, 0, 0).
"""

import json
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from kpseq_jax import checkpointing
from kpseq_jax import decoding
from kpseq_jax import input_pipeline
from kpseq_jax import metrics
from kpseq_jax import sharding
from kpseq_jax import train_state as ts
from kpseq_jax import transforms


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


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             model=None, state=None, step: int | None = None,
             split: str | None = None) -> dict:
  """Decodes an eval split and reports PCK beside the mean-pose baseline.

  With ``model``/``state`` None, restores the latest checkpoint in
  ``workdir`` (``--mode eval``). Only process 0 writes files.

  Returns:
    dict as written to ``eval_<split>.json``.

  Raises:
    FileNotFoundError: missing data set or checkpoint.
  """
  split = split or config.eval_split
  info = input_pipeline.load_info(config.dataset_dir)
  mesh = sharding.create_mesh(config.mesh_shape)
  if state is None:
    model, state, step = restore_state(
        config, workdir, mesh, info.split_sizes[config.train_split])
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  decode_fn = decoding.make_decode_fn(
      model, config.max_num_keypoints, sharding.replicated(mesh),
      sharding.batch_sharding(mesh))
  baseline = input_pipeline.mean_pose(config, info)
  s = config.image_size_px
  acc, base_acc = metrics.PCKAccumulator(), metrics.PCKAccumulator()
  results = []
  total = (info.split_sizes[split] if config.num_eval_examples <= 0 else
           min(config.num_eval_examples, info.split_sizes[split]))
  bar = tqdm.tqdm(total=total, desc=f'eval {split}', unit='inst',
                  disable=jax.process_index() != 0)
  for local in input_pipeline.create_eval_batches(config, info, split):
    images = sharding.global_batch({'image': local['image']}, mesh)['image']
    out = _gather(decode_fn(variables, images))
    batch = _gather(sharding.global_batch(
        {k: v for k, v in local.items() if k != 'image'}, mesh))
    keep = batch['valid'] > 0
    batch = {k: v[keep] for k, v in batch.items()}
    pred = crop_to_image(out['keypoints'][keep], batch['crop_from_image'], s)
    mean = np.stack([_padded(baseline.get(int(c)), config.max_num_keypoints)
                     for c in batch['category_id']])
    base = crop_to_image(mean, batch['crop_from_image'], s)
    acc.update(batch['category_id'], pred, batch['keypoints'], batch['bbox'])
    base_acc.update(batch['category_id'], base, batch['keypoints'],
                    batch['bbox'])
    results.extend(_coco_results(pred, batch))
    bar.update(int(keep.sum()))
  bar.close()
  res, base_res = acc.result(), base_acc.result()
  report = dict(
      split=split, checkpoint_step=None if step is None else int(step),
      num_instances=len(results), pck=res['pck'],
      mean_error_px=res['mean_error_px'],
      per_category_pck={_name(info, c): v
                        for c, v in res['per_category'].items()},
      baseline_mean_pose_pck=base_res['pck'],
      baseline_mean_pose_error_px=base_res['mean_error_px'],
      baseline_per_category_pck={_name(info, c): v
                                 for c, v in base_res['per_category'].items()},
      num_labelled_keypoints=res['num_keypoints'])
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
  return report


def _name(info: input_pipeline.DatasetInfo, cid: int) -> str:
  c = info.categories.get(cid)
  return f'{cid}:{c.name}' if c else str(cid)


def _padded(mean_xy: np.ndarray | None, kmax: int) -> np.ndarray:
  """[K, 2] -> [Kmax, 2] with NaN padding (NaN if the category is unseen)."""
  out = np.full([kmax, 2], np.nan, np.float32)
  if mean_xy is not None:
    out[:len(mean_xy)] = mean_xy
  return out


def _coco_results(pred_px: np.ndarray, batch: dict) -> list[dict]:
  """COCO keypoint results entries for a batch of predictions."""
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
                    score=1.0))
  return out
