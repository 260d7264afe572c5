"""OKS keypoint AP/AR by pycocotools' ``COCOeval(iouType='keypoints')``.

The numbers are pycocotools' own: this module builds in-memory COCO ground
truth and results, picks each category's OKS sigmas, runs one ``COCOeval``
per category and averages its summary over categories. OKS
(cocodataset.org/#keypoints-eval, ``COCOeval.computeOks``) =
``mean_i exp(-d_i^2 / (2 area (2 sigma_i)^2))`` over labelled keypoints;
AP over OKS 0.50:0.05:0.95, at most 20 predictions per image.

Conventions: COCO's 17 person keypoints in COCO's order get COCO's sigmas
(`COCO_PERSON_SIGMAS`, ``Params.setKpParams``); other categories a uniform
`DEFAULT_SIGMA` = 0.1 (DeepLabCut's ``compute_oks``, same ``(2 sigma)^2``);
a ``{category_id: sigmas}`` mapping overrides either. Area: the ground
truth's ``area``, else ``0.53 w h`` of its box (xtcocotools
``computeOks``). A NaN (not generated) keypoint is put at +inf: a miss, as
in DeepLabCut. A category with no labelled ground truth, or predictions
but no ground truth, is skipped and reported; -1 is never averaged in.
"""

import collections
import contextlib
import dataclasses
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

# COCO's person keypoints in order (COCO 2017 person_keypoints_*.json
# ``categories[0].keypoints``).
COCO_PERSON_KEYPOINTS = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear',
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
    'right_knee', 'left_ankle', 'right_ankle')
# pycocotools cocoeval.py, Params.setKpParams: kpt_oks_sigmas (per keypoint
# of COCO_PERSON_KEYPOINTS; Ruggero Ronchi & Perona, "Benchmarking and Error
# Diagnosis in Multi-Instance Pose Estimation", ICCV 2017).
COCO_PERSON_SIGMAS = tuple(
    np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07,
              1.07, .87, .87, .89, .89]) / 10.0)
# DeepLabCut's OKS sigma for every keypoint (deeplabcut/core/metrics/
# distance_metrics.py, compute_oks: oks_sigma=0.1).
DEFAULT_SIGMA = 0.1
# xtcocotools cocoeval.py: GT area = 0.53 * box area when not given.
AREA_FROM_BBOX = 0.53

# Where the sigmas of a category came from (`CategoryOKS.sigma_source`).
SIGMA_OVERRIDE = 'override'
SIGMA_COCO_PERSON = 'coco_person'
SIGMA_DEFAULT = 'default'

# The COCOeval keypoint summary (`COCOeval.stats`, 10 values) entries kept:
# AP, AP50, AP75 (indices 0-2) and AR, AR50, AR75 (5-7), all at area 'all',
# maxDets 20 (3, 4, 8, 9 are the 'medium'/'large' area ranges).
_STATS = {'ap': 0, 'ap50': 1, 'ap75': 2, 'ar': 5, 'ar50': 6, 'ar75': 7}


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """One ground-truth instance.

  Attributes:
    image_id: int image id.
    category_id: int category id.
    keypoints: float [K, 3] (x, y, v) in image pixels, v in {0, 1, 2}
      (0: not labelled; COCO's visibility flag).
    bbox: float [4] (x, y, w, h) in image pixels.
    area: the instance's area in px^2 (COCO ``area``, e.g. its segment's);
      None: ``AREA_FROM_BBOX * w * h``.
  """
  image_id: int
  category_id: int
  keypoints: np.ndarray
  bbox: Sequence[float]
  area: float | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One predicted instance.

  Attributes:
    image_id: int image id (must have ground truth: an image of the data).
    category_id: int category id.
    keypoints: float [K, 2] (x, y) in image pixels; NaN = not predicted
      (scored as a miss).
    score: the instance's confidence, which ranks predictions for AP.
    keypoint_scores: optional float [K] per-keypoint confidences (written
      into the results' v slot, which pycocotools ignores; use
      `kpseq_jax.inference.results.bbox_keypoint_score` to fold them into ``score``).
  """
  image_id: int
  category_id: int
  keypoints: np.ndarray
  score: float = 1.0
  keypoint_scores: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CategoryOKS:
  """pycocotools' keypoint summary of one category.

  AP/AR figures are fractions in [0, 1] at area range 'all', at most 20
  predictions per image; None when the category was skipped.

  Attributes:
    category_id: the category's id.
    name: its name ('' if unknown).
    num_keypoints: K.
    num_instances: ground-truth instances.
    num_labelled_instances: those with a labelled keypoint (the others are
      ignored by COCOeval).
    num_area_from_bbox: instances whose area is ``AREA_FROM_BBOX * w * h``.
    num_predictions: predictions.
    sigma_source: `SIGMA_OVERRIDE`, `SIGMA_COCO_PERSON` or `SIGMA_DEFAULT`.
    sigmas: the K per-keypoint OKS sigmas used.
    ap: AP at OKS 0.50:0.95; ``ap50``, ``ap75`` at 0.5 and 0.75.
    ar: AR at OKS 0.50:0.95; ``ar50``, ``ar75`` at 0.5 and 0.75.
    skipped: why the category was not evaluated (None if it was).
  """
  category_id: int
  name: str
  num_keypoints: int
  num_instances: int
  num_labelled_instances: int
  num_area_from_bbox: int
  num_predictions: int
  sigma_source: str
  sigmas: tuple[float, ...]
  ap: float | None
  ap50: float | None
  ap75: float | None
  ar: float | None
  ar50: float | None
  ar75: float | None
  skipped: str | None


@dataclasses.dataclass(frozen=True)
class OKSResult:
  """OKS AP/AR averaged over the evaluated categories.

  Attributes:
    ap, ap50, ap75, ar, ar50, ar75: the mean over evaluated categories of
      each category's figure (`CategoryOKS`); None if none was evaluated.
    num_categories: categories averaged.
    per_category: category id -> `CategoryOKS` (skipped ones included).
    skipped: category id -> why it was not evaluated.
  """
  ap: float | None
  ap50: float | None
  ap75: float | None
  ar: float | None
  ar50: float | None
  ar75: float | None
  num_categories: int
  per_category: dict[int, CategoryOKS]
  skipped: dict[int, str]

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (category ids as string keys; None = undefined)."""
    d = dataclasses.asdict(self)
    d['per_category'] = {str(c): {**v, 'sigmas': list(v['sigmas'])}
                         for c, v in d['per_category'].items()}
    d['skipped'] = {str(c): v for c, v in d['skipped'].items()}
    return d


def resolve_sigmas(category_id: int, num_keypoints: int,
                   keypoint_names: Sequence[str] = (), name: str = '',
                   override: Sequence[float] | None = None,
                   default_sigma: float | None = DEFAULT_SIGMA
                   ) -> tuple[np.ndarray, str]:
  """The OKS sigmas of one category (see the module docstring for sources).

  In order: ``override`` if given; COCO's person sigmas if
  ``keypoint_names`` are `COCO_PERSON_KEYPOINTS`; else ``default_sigma``
  for every keypoint.

  Args:
    category_id: the category's id (for error messages).
    num_keypoints: K.
    keypoint_names: the category's K keypoint names (may be empty).
    name: the category's name (for error messages).
    override: the caller's K sigmas for this category.
    default_sigma: the uniform fallback; None: a category with neither an
      override nor COCO's layout is an error.

  Returns:
    (float64 [K] sigmas, source: `SIGMA_OVERRIDE`, `SIGMA_COCO_PERSON` or
    `SIGMA_DEFAULT`).

  Raises:
    ValueError: ``override`` does not have K finite positive values, or no
      sigmas are available (``default_sigma`` None).
  """
  label = f'category {category_id}' + (f' ({name!r})' if name else '')
  if override is not None:
    sigmas = np.asarray(override, np.float64).reshape(-1)
    if sigmas.size != num_keypoints:
      raise ValueError(
          f'{label}: field "sigmas" has {sigmas.size} values but the '
          f'category has {num_keypoints} keypoints')
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)):
      raise ValueError(f'{label}: field "sigmas" must be finite and > 0, got '
                       f'{sigmas.tolist()}')
    return sigmas, SIGMA_OVERRIDE
  if (tuple(keypoint_names) == COCO_PERSON_KEYPOINTS
      and num_keypoints == len(COCO_PERSON_KEYPOINTS)):
    return np.array(COCO_PERSON_SIGMAS), SIGMA_COCO_PERSON
  if default_sigma is None:
    raise ValueError(
        f'{label}: field "sigmas" is required: no override for its '
        f'{num_keypoints} keypoints, they are not COCO\'s person layout and '
        'default_sigma is None')
  if not default_sigma > 0:
    raise ValueError(f'default_sigma must be > 0, got {default_sigma}')
  return np.full([num_keypoints], float(default_sigma)), SIGMA_DEFAULT


def ground_truth_from_arrays(image_ids: np.ndarray, category_ids: np.ndarray,
                             keypoints: np.ndarray, bbox: np.ndarray,
                             num_keypoints: np.ndarray,
                             area: np.ndarray | None = None
                             ) -> list[GroundTruth]:
  """`GroundTruth` instances from a padded batch (as evaluate.py holds it).

  Args:
    image_ids: int [N].
    category_ids: int [N].
    keypoints: float [N, Kmax, 3] (x, y, v) in image pixels.
    bbox: float [N, 4] (x, y, w, h) in image pixels.
    num_keypoints: int [N] each instance's K (its first K rows are kept).
    area: optional float [N] areas in px^2 (NaN entries: from the box).

  Returns:
    N `GroundTruth`.
  """
  out = []
  for i in range(len(image_ids)):
    a = None if area is None else float(area[i])
    out.append(GroundTruth(
        image_id=int(image_ids[i]), category_id=int(category_ids[i]),
        keypoints=np.asarray(keypoints[i, :int(num_keypoints[i])], np.float64),
        bbox=tuple(float(v) for v in bbox[i]),
        area=None if a is None or np.isnan(a) else a))
  return out


def predictions_from_arrays(image_ids: np.ndarray, category_ids: np.ndarray,
                            keypoints: np.ndarray, num_keypoints: np.ndarray,
                            scores: np.ndarray | None = None,
                            keypoint_scores: np.ndarray | None = None
                            ) -> list[Prediction]:
  """`Prediction` instances from a padded batch.

  Args:
    image_ids: int [N].
    category_ids: int [N].
    keypoints: float [N, Kmax, 2] (x, y) in image pixels, NaN = none.
    num_keypoints: int [N] each instance's K.
    scores: optional float [N] instance scores (default 1.0).
    keypoint_scores: optional float [N, Kmax] per-keypoint scores.

  Returns:
    N `Prediction`.
  """
  out = []
  for i in range(len(image_ids)):
    k = int(num_keypoints[i])
    out.append(Prediction(
        image_id=int(image_ids[i]), category_id=int(category_ids[i]),
        keypoints=np.asarray(keypoints[i, :k], np.float64),
        score=1.0 if scores is None else float(scores[i]),
        keypoint_scores=(None if keypoint_scores is None else
                         np.asarray(keypoint_scores[i, :k], np.float64))))
  return out


def evaluate_oks(ground_truth: Sequence[GroundTruth],
                 predictions: Sequence[Prediction],
                 categories: Mapping[int, Any] | None = None,
                 sigmas: Mapping[int, Sequence[float]] | None = None,
                 default_sigma: float | None = DEFAULT_SIGMA) -> OKSResult:
  """OKS AP/AR of ``predictions``, one ``COCOeval`` per category, averaged.

  Args:
    ground_truth: every ground-truth instance of the evaluated images (the
      images are those of the ground truth).
    predictions: the predicted instances (any number per image).
    categories: optional category id -> object with ``name`` and
      ``keypoint_names`` attributes (e.g. `data_prep.categories.Category`);
      used for names and to recognise COCO's person layout.
    sigmas: optional category id -> K OKS sigmas, overriding the defaults
      (entries of categories without instances are unused, so one table can
      serve every split).
    default_sigma: the uniform sigma of other categories (`DEFAULT_SIGMA`);
      None makes a category without an override or COCO's layout an error.

  Returns:
    `OKSResult`.

  Raises:
    ValueError: a malformed instance (keypoints not [K, 3] / [K, 2], v not
      in {0, 1, 2}, bbox not 4 values, negative size or area, NaN labelled
      ground truth), instances of one category with different K, a
      prediction on an image without ground truth, or a sigma problem
      (`resolve_sigmas`); messages name the instance, category and field.
  """
  categories = categories or {}
  sigmas = sigmas or {}
  gts, dts, num_kp = _checked(ground_truth, predictions)
  gt_coco, dt_coco = _coco_objects(gts, dts, num_kp)
  gt_by_cat = collections.defaultdict(list)
  for g in gts:
    gt_by_cat[g.category_id].append(g)
  dt_by_cat = collections.defaultdict(list)
  for p in dts:
    dt_by_cat[p.category_id].append(p)
  per_category = {}
  for cid in sorted(num_kp):
    cat = categories.get(cid)
    name = str(getattr(cat, 'name', '') or '')
    s, source = resolve_sigmas(
        cid, num_kp[cid], tuple(getattr(cat, 'keypoint_names', ()) or ()),
        name, sigmas.get(cid), default_sigma)
    per_category[cid] = _category_oks(
        cid, name, num_kp[cid], gt_by_cat[cid], dt_by_cat[cid], gt_coco,
        dt_coco, s, source)
  evaluated = [c for c in per_category.values() if c.skipped is None]
  means = {k: (float(np.mean([getattr(c, k) for c in evaluated]))
               if evaluated else None) for k in _STATS}
  return OKSResult(num_categories=len(evaluated), per_category=per_category,
                   skipped={c: v.skipped for c, v in per_category.items()
                            if v.skipped is not None}, **means)


def _checked(ground_truth: Sequence[GroundTruth],
             predictions: Sequence[Prediction]
             ) -> tuple[list[GroundTruth], list[Prediction], dict[int, int]]:
  """Checked copies of both lists and each category's K (`evaluate_oks`
  names the errors)."""
  gts = [_check_ground_truth(g, i) for i, g in enumerate(ground_truth)]
  dts = [_check_prediction(p, i) for i, p in enumerate(predictions)]
  images = {g.image_id for g in gts}
  for i, p in enumerate(dts):
    if p.image_id not in images:
      raise ValueError(f'predictions[{i}]: field "image_id" {p.image_id} has '
                       'no ground truth (not an evaluated image)')
  num_kp: dict[int, int] = {}
  for field, items in (('ground_truth', gts), ('predictions', dts)):
    for i, x in enumerate(items):
      k = num_kp.setdefault(x.category_id, len(x.keypoints))
      if len(x.keypoints) != k:
        raise ValueError(
            f'{field}[{i}]: field "keypoints" has {len(x.keypoints)} '
            f'keypoints, but category {x.category_id} has {k}')
  return gts, dts, num_kp


def _category_oks(cid: int, name: str, num_keypoints: int,
                  g_cat: list[GroundTruth], d_cat: list[Prediction],
                  gt_coco: coco_lib.COCO, dt_coco: coco_lib.COCO | None,
                  s: np.ndarray, source: str) -> CategoryOKS:
  """One category's `CategoryOKS` (``skipped`` says why it has none)."""
  labelled = sum(int(np.any(g.keypoints[:, 2] > 0)) for g in g_cat)
  reason = None
  if not g_cat:
    reason = 'no ground truth instance'
  elif not labelled:
    reason = 'no labelled keypoint in its ground truth'
  stats = dict.fromkeys(_STATS)
  if reason is None:
    img_ids = sorted({x.image_id for x in g_cat + d_cat})
    stats = _coco_eval(gt_coco, dt_coco, cid, img_ids, s)
    if any(v is None for v in stats.values()):
      reason = 'COCOeval returned -1 (undefined)'
  if reason is not None:
    stats = dict.fromkeys(_STATS)
  return CategoryOKS(
      category_id=cid, name=name, num_keypoints=num_keypoints,
      num_instances=len(g_cat), num_labelled_instances=labelled,
      num_area_from_bbox=sum(g.area is None for g in g_cat),
      num_predictions=len(d_cat), sigma_source=source,
      sigmas=tuple(float(v) for v in s), skipped=reason, **stats)


def _check_ground_truth(g: GroundTruth, i: int) -> GroundTruth:
  """``g`` with float64 arrays; raises ValueError if malformed."""
  where = f'ground_truth[{i}] (category {g.category_id})'
  kp = np.array(g.keypoints, np.float64)  # A copy: edited below.
  if kp.ndim != 2 or kp.shape[1] != 3:
    raise ValueError(f'{where}: field "keypoints" must be [K, 3], got shape '
                     f'{kp.shape}')
  v = kp[:, 2]
  if not np.all(np.isin(v, (0, 1, 2))):
    raise ValueError(f'{where}: field "keypoints" visibility must be 0, 1 or '
                     f'2, got {sorted(set(v.tolist()))}')
  if not np.all(np.isfinite(kp[v > 0, :2])):
    raise ValueError(f'{where}: field "keypoints" has a non-finite labelled '
                     'keypoint')
  kp[v == 0, :2] = 0.0  # Never read by COCOeval; keep the file JSON-clean.
  bbox = np.asarray(g.bbox, np.float64).reshape(-1)
  if bbox.size != 4 or not np.all(np.isfinite(bbox)) or np.any(bbox[2:] < 0):
    raise ValueError(f'{where}: field "bbox" must be 4 finite values (x, y, '
                     f'w, h) with w, h >= 0, got {bbox.tolist()}')
  if g.area is not None and not (np.isfinite(g.area) and g.area >= 0):
    raise ValueError(f'{where}: field "area" must be finite and >= 0, got '
                     f'{g.area}')
  return dataclasses.replace(g, image_id=int(g.image_id),
                             category_id=int(g.category_id), keypoints=kp,
                             bbox=tuple(bbox.tolist()))


def _check_prediction(p: Prediction, i: int) -> Prediction:
  """``p`` with float64 arrays; raises ValueError if malformed."""
  where = f'predictions[{i}] (category {p.category_id})'
  kp = np.asarray(p.keypoints, np.float64)
  if kp.ndim != 2 or kp.shape[1] != 2:
    raise ValueError(f'{where}: field "keypoints" must be [K, 2], got shape '
                     f'{kp.shape}')
  if not np.isfinite(p.score):
    raise ValueError(f'{where}: field "score" must be finite, got {p.score}')
  ks = None
  if p.keypoint_scores is not None:
    ks = np.asarray(p.keypoint_scores, np.float64).reshape(-1)
    if ks.size != len(kp):
      raise ValueError(f'{where}: field "keypoint_scores" has {ks.size} '
                       f'values for {len(kp)} keypoints')
  return dataclasses.replace(p, image_id=int(p.image_id),
                             category_id=int(p.category_id), keypoints=kp,
                             score=float(p.score), keypoint_scores=ks)


def _coco_objects(gts: list[GroundTruth], dts: list[Prediction],
                  num_kp: dict[int, int]
                  ) -> tuple[coco_lib.COCO, coco_lib.COCO | None]:
  """In-memory pycocotools ground truth and results (None: no prediction)."""
  anns = []
  for i, g in enumerate(gts):
    w, h = g.bbox[2], g.bbox[3]
    anns.append({
        'id': i + 1,  # COCOeval reads id 0 as "unmatched".
        'image_id': g.image_id, 'category_id': g.category_id,
        'keypoints': g.keypoints.reshape(-1).tolist(),
        'num_keypoints': int(np.count_nonzero(g.keypoints[:, 2] > 0)),
        'bbox': list(g.bbox),
        'area': float(g.area if g.area is not None
                      else AREA_FROM_BBOX * w * h),
        'iscrowd': 0})
  gt_coco = coco_lib.COCO()
  gt_coco.dataset = {
      'images': [{'id': i} for i in sorted({g.image_id for g in gts})],
      'categories': [{'id': c, 'name': str(c)} for c in sorted(num_kp)],
      'annotations': anns}
  with contextlib.redirect_stdout(io.StringIO()):
    gt_coco.createIndex()
  if not dts:
    return gt_coco, None
  results, finite_area = [], []
  for p in dts:
    xy = np.where(np.isnan(p.keypoints), np.inf, p.keypoints)  # Miss: OKS 0.
    v = np.ones(len(xy)) if p.keypoint_scores is None else p.keypoint_scores
    results.append({'image_id': p.image_id, 'category_id': p.category_id,
                    'keypoints': np.concatenate([xy, v[:, None]], 1)
                                 .reshape(-1).tolist(),
                    'score': p.score})
    finite = p.keypoints[np.all(np.isfinite(p.keypoints), axis=1)]
    if len(finite):
      (x0, y0), (x1, y1) = finite.min(0), finite.max(0)
    else:
      x0 = y0 = x1 = y1 = 0.0
    finite_area.append(([x0, y0, x1 - x0, y1 - y0], (x1 - x0) * (y1 - y0)))
  with contextlib.redirect_stdout(io.StringIO()):
    dt_coco = gt_coco.loadRes(results)
  # loadRes sets each result's box and area from all its keypoints (inf
  # for a missed one); use the finite ones', as loadRes does for a full one.
  for ann, (box, area) in zip(dt_coco.dataset['annotations'], finite_area):
    ann['bbox'], ann['area'] = [float(b) for b in box], float(area)
  return gt_coco, dt_coco


def _coco_eval(gt_coco: coco_lib.COCO, dt_coco: coco_lib.COCO | None,
               category_id: int, image_ids: list[int],
               sigmas: np.ndarray) -> dict[str, float | None]:
  """pycocotools' keypoint summary of one category (None where -1).

  Only the images holding the category's ground truth or predictions are
  passed: the others hold neither, which COCOeval skips (``evaluateImg``
  returns None), so the figures are those over every image.
  """
  if dt_coco is None:  # No prediction at all: an empty result set.
    dt_coco = coco_lib.COCO()
    dt_coco.dataset = {'images': gt_coco.dataset['images'],
                       'categories': gt_coco.dataset['categories'],
                       'annotations': []}
    with contextlib.redirect_stdout(io.StringIO()):
      dt_coco.createIndex()
  e = cocoeval.COCOeval(gt_coco, dt_coco, iouType='keypoints')
  e.params.catIds = [category_id]
  e.params.imgIds = image_ids
  e.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
  with contextlib.redirect_stdout(io.StringIO()):
    e.evaluate()
    e.accumulate()
    e.summarize()
  return {k: (None if e.stats[i] == -1 else float(e.stats[i]))
          for k, i in _STATS.items()}
