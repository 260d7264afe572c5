"""PCK exactly as the MP-100 benchmark computes it; pixel accuracy.

MP-100's authors' protocol (POMNet, Xu et al., ECCV 2022,
``FewShotBaseDataset._report_metric`` in Pose-for-Everything's
``pomnet/datasets/datasets/mp100/fewshot_base_dataset.py``, shared by
CapeFormer's ``TestBaseDataset._report_metric``): per instance, mmpose 0.x
``keypoint_pck_accuracy`` (``mmpose/core/evaluation/top_down_eval.py``):
the fraction of labelled (v > 0) keypoints with ``||(pred - gt) / s|| <
0.2`` (strict, float32), 0 if none is labelled, ``s = max(w, h)`` of the
``clean_bbox`` (``max(w, h) - 1`` for a box inside the image, as data_prep
clips them; CAPE episodes pass the exact clean size as ``size``);
instances with an empty clean box are not evaluated. ``pck`` is the mean
over categories of each category's mean (MP-100 draws the same number of
queries per category); also the plain instance mean and the
keypoint-pooled figure. More in docs/mp100.md (the PCK protocol).
"""

import collections
import dataclasses

import numpy as np


def bbox_size(bbox: np.ndarray) -> np.ndarray:
  """PCK normaliser ``max(w, h)`` of MP-100's clean box of in-image boxes.

  Args:
    bbox: float [N, 4] (x, y, w, h) lying inside the image (as data_prep
      writes them).

  Returns:
    float64 [N] ``max(w, h) - 1`` (<= 0: the instance is not evaluated).
  """
  return np.max(np.asarray(bbox, np.float64)[:, 2:4], axis=1) - 1.0


def correct_keypoints(pred_xy: np.ndarray, gt_keypoints: np.ndarray,
                      bbox: np.ndarray, alpha: float = 0.2,
                      size: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-keypoint correctness of one batch, MP-100 definition.

  Args:
    pred_xy: float [N, K, 2] predicted (x, y) in image pixels (NaN = none,
      which is wrong).
    gt_keypoints: float [N, K, 3] ground truth (x, y, v) in pixels.
    bbox: float [N, 4] in-image (x, y, w, h) in pixels.
    alpha: threshold as a fraction of the normaliser.
    size: optional float [N] normaliser; default `bbox_size(bbox)`.

  Returns:
    (correct bool [N, K], labelled bool [N, K] (v > 0), error float [N, K]
    in pixels, NaN where no prediction).
  """
  pred_xy = np.asarray(pred_xy, np.float64)
  gt = np.asarray(gt_keypoints, np.float64)
  s = bbox_size(bbox) if size is None else np.asarray(size, np.float64)
  err = np.linalg.norm(pred_xy - gt[..., :2], axis=-1)  # [N, K]
  with np.errstate(divide='ignore', invalid='ignore'):
    # mmpose: norm((pred - gt) / [s, s]) stored in float32, then `< thr`.
    norm_err = np.linalg.norm(
        (pred_xy - gt[..., :2]) / s[:, None, None], axis=-1).astype(np.float32)
  labelled = gt[..., 2] > 0
  with np.errstate(invalid='ignore'):
    correct = labelled & (norm_err < np.float32(alpha))  # NaN -> False.
  return correct, labelled, err


def instance_pck(pred_xy: np.ndarray, gt_keypoints: np.ndarray,
                 bbox: np.ndarray, alpha: float = 0.2,
                 size: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Per-instance PCK as mmpose ``keypoint_pck_accuracy`` on one instance.

  Args: as `correct_keypoints`.

  Returns:
    (float64 [N] fraction of labelled keypoints correct (0 with none
    labelled), bool [N] evaluated: normaliser > 0, as MP-100 loads it).
  """
  correct, labelled, _ = correct_keypoints(pred_xy, gt_keypoints, bbox,
                                           alpha, size)
  n = labelled.sum(axis=1)
  pck = np.where(n > 0, correct.sum(axis=1) / np.maximum(n, 1), 0.0)
  s = bbox_size(bbox) if size is None else np.asarray(size, np.float64)
  return pck, s > 0


def _counter(kind=int):
  return dataclasses.field(
      default_factory=lambda: collections.defaultdict(kind))


@dataclasses.dataclass
class PCKAccumulator:
  """Accumulates MP-100 PCK and mean pixel error per category over batches."""

  alpha: float = 0.2
  _pck_sum: dict = _counter(float)    # Sum of per-instance PCK.
  _instances: dict = _counter()       # Evaluated instances.
  _excluded: dict = _counter()        # Normaliser <= 0: not evaluated.
  _correct: dict = _counter()         # Keypoint-pooled counts.
  _labelled: dict = _counter()
  _err_sum: dict = _counter(float)
  _err_count: dict = _counter()
  _without_keypoints: dict = _counter()  # Evaluated, nothing labelled: 0.

  def update(self, category_ids: np.ndarray, pred_xy: np.ndarray,
             gt_keypoints: np.ndarray, bbox: np.ndarray,
             size: np.ndarray | None = None) -> None:
    """Adds a batch; arguments as in `correct_keypoints`, ids int [N]."""
    correct, labelled, err = correct_keypoints(pred_xy, gt_keypoints, bbox,
                                               self.alpha, size)
    pck, evaluated = instance_pck(pred_xy, gt_keypoints, bbox, self.alpha,
                                  size)
    has_err = labelled & np.isfinite(err)
    for i, cid in enumerate(np.asarray(category_ids).tolist()):
      if not evaluated[i]:
        self._excluded[cid] += 1
        continue
      self._pck_sum[cid] += float(pck[i])
      self._instances[cid] += 1
      self._correct[cid] += int(correct[i].sum())
      self._labelled[cid] += int(labelled[i].sum())
      self._err_sum[cid] += float(err[i][has_err[i]].sum())
      self._err_count[cid] += int(has_err[i].sum())
      self._without_keypoints[cid] += int(not labelled[i].any())

  def result(self) -> 'PCKResult':
    """The figures over every batch added so far (see `PCKResult`)."""
    cats = sorted(c for c in self._instances if self._instances[c])
    per_cat = {c: self._pck_sum[c] / self._instances[c] for c in cats}
    pooled = {c: self._correct[c] / self._labelled[c]
              for c in cats if self._labelled[c]}
    n_inst = sum(self._instances.values())
    n_err = sum(self._err_count.values())
    mean = lambda d: float(np.mean(list(d.values()))) if d else float('nan')
    return PCKResult(
        pck=mean(per_cat),
        per_category=per_cat,
        pck_instance_mean=(sum(self._pck_sum.values()) / n_inst
                           if n_inst else float('nan')),
        pck_keypoint_pooled=mean(pooled),
        per_category_keypoint_pooled=pooled,
        mean_error_px=(sum(self._err_sum.values()) / n_err
                       if n_err else float('nan')),
        num_keypoints=int(sum(self._labelled.values())),
        num_excluded=int(sum(self._excluded.values())),
        per_category_error_px={
            c: (self._err_sum[c] / self._err_count[c]
                if self._err_count[c] else float('nan')) for c in cats},
        per_category_keypoints={c: self._labelled[c] for c in cats},
        per_category_instances={c: self._instances[c] for c in cats},
        num_without_keypoints=int(sum(self._without_keypoints.values())))


@dataclasses.dataclass(frozen=True)
class PCKResult:
  """What a `PCKAccumulator` measured (dicts keyed by category id).

  Attributes:
    pck: MP-100 PCK: the mean over categories of each category's mean
      per-instance PCK.
    per_category: category id -> mean per-instance PCK.
    pck_instance_mean: mean per-instance PCK over all instances.
    pck_keypoint_pooled: labelled keypoints pooled per category, then the
      mean over categories; ``per_category_keypoint_pooled`` per category.
    mean_error_px: mean pixel error over predicted labelled keypoints (NaN
      if none); ``per_category_error_px`` per category.
    num_keypoints: labelled keypoints counted; ``per_category_keypoints``.
    num_excluded: instances not evaluated (clean box of size <= 0).
    per_category_instances: evaluated instances per category.
    num_without_keypoints: evaluated instances with no labelled keypoint
      (their PCK is 0, as mmpose's).
  """
  pck: float
  per_category: dict[int, float]
  pck_instance_mean: float
  pck_keypoint_pooled: float
  per_category_keypoint_pooled: dict[int, float]
  mean_error_px: float
  num_keypoints: int
  num_excluded: int
  per_category_error_px: dict[int, float]
  per_category_keypoints: dict[int, int]
  per_category_instances: dict[int, int]
  num_without_keypoints: int


# -- Pixel accuracy: the pose-captioning papers' figures ----------------------

PIXEL_THRESHOLDS_PX = (1.0, 5.0, 25.0)


def pixel_accuracy(pred_px: np.ndarray, gt: np.ndarray,
                   names: list[str] | None = None,
                   thresholds_px=PIXEL_THRESHOLDS_PX) -> dict:
  """Accuracy within 1, 5 and 25 px and mean absolute error, in pixels.

  The figures keypoint-captioning work reports for poses written as text
  (`kpseq_jax.inference.captions`): a keypoint is right within ``t`` px
  when its Euclidean error ``||pred - gt||`` is ``<= t``; the mean absolute
  error is the mean of ``|x_pred - x_gt|`` and ``|y_pred - y_gt|`` over both
  coordinates (not the Euclidean ``mean_error_px`` of the PCK report).
  Only labelled keypoints (v > 0) count; one the model did not generate
  (NaN) is wrong at every threshold and left out of the MAE (counted in
  ``not_generated``).

  Args:
    pred_px: float [N, K, 2] predicted image pixels (NaN = not generated).
    gt: float [N, K, 3] ground truth (x, y, v) pixels.
    names: K keypoint names for ``per_keypoint`` (default ``'0'``, ``'1'``...).
    thresholds_px: the thresholds in pixels.

  Returns:
    ``{'overall': figures, 'per_keypoint': {name: figures}}``, figures a
    dict ``{'acc@1px': .., 'acc@5px': .., 'acc@25px': .., 'mae_px': ..,
    'num_labelled': n, 'not_generated': m}`` (fractions in [0, 1]; NaN
    when nothing is labelled).
  """
  pred = np.asarray(pred_px, np.float64)
  gt = np.asarray(gt, np.float64)
  k = gt.shape[1]
  names = names or [str(i) for i in range(k)]
  labelled = gt[..., 2] > 0  # [N, K]
  err = np.abs(pred - gt[..., :2])  # [N, K, 2]
  dist = np.sqrt(np.sum(err ** 2, axis=-1))  # [N, K], NaN if not generated.

  def figures(mask: np.ndarray) -> dict:
    n = int(mask.sum())
    d = dist[mask]
    made = np.isfinite(d)
    out = {}
    for t in thresholds_px:
      with np.errstate(invalid='ignore'):
        out[f'acc@{t:g}px'] = float(np.mean(made & (d <= t))) if n else float('nan')
    out['mae_px'] = float(np.mean(err[mask][made])) if made.any() else float('nan')
    out['num_labelled'] = n
    out['not_generated'] = int(n - made.sum())
    return out

  return {'overall': figures(labelled),
          'per_keypoint': {names[j]: figures(labelled & (np.arange(k) == j))
                           for j in range(k)}}


class PixelAccuracyAccumulator:
  """`pixel_accuracy` over batches, keypoints named per category.

  ``update`` with a batch's category ids [N], predictions [N, K, 2] and
  ground truth [N, K, 3] (K may be padded: only labelled keypoints count);
  ``result(keypoint_names)`` with category id -> names gives the figures,
  per keypoint named ``name`` (one category) or ``category:name``.
  Batches whose keypoints are in another order than the category's (CAPE
  episodes) count overall only (``ordered=False``).
  """

  def __init__(self):
    self._rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    self._unordered: list[tuple[np.ndarray, np.ndarray]] = []

  def update(self, category_ids: np.ndarray, pred_px: np.ndarray,
             gt: np.ndarray, ordered: bool = True) -> None:
    for c, p, g in zip(np.asarray(category_ids), np.asarray(pred_px),
                       np.asarray(gt)):
      (self._rows.setdefault(int(c), []) if ordered
       else self._unordered).append((p, g))

  def result(self, keypoint_names: dict[int, list[str]]) -> dict:
    """See class docstring; {} when nothing was added."""
    pooled_pred, pooled_gt, per_keypoint = [], [], {}
    k_max = max([len(p) for rows in [*self._rows.values(), self._unordered]
                 for p, _ in rows], default=0)
    for cid, rows in sorted(self._rows.items()):
      pred = np.stack([p for p, _ in rows])
      gt = np.stack([g for _, g in rows])
      names = list(keypoint_names.get(cid, []))
      k = len(names) or gt.shape[1]
      names = [names[j] if j < len(names) else str(j) for j in range(k)]
      if len(self._rows) > 1:
        names = [f'{cid}:{n}' for n in names]
      per_keypoint.update(pixel_accuracy(pred[:, :k], gt[:, :k],
                                         names)['per_keypoint'])
    for rows in [*self._rows.values(), self._unordered]:
      for p, g in rows:
        pad = k_max - len(p)
        pooled_pred.append(np.pad(p, [(0, pad), (0, 0)],
                                  constant_values=np.nan))
        pooled_gt.append(np.pad(g, [(0, pad), (0, 0)]))
    if not pooled_gt:
      return {}
    overall = pixel_accuracy(np.stack(pooled_pred), np.stack(pooled_gt))
    return {'thresholds_px': list(PIXEL_THRESHOLDS_PX),
            'overall': overall['overall'], 'per_keypoint': per_keypoint}
