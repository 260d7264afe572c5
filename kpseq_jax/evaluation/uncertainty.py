"""What the model knows it doesn't know: OKS AP, calibration and presence.

Two evaluators (`common.py`) over one evaluation's decoded predictions
(issue 16):

* `OKSEvaluator` yields ``oks``: OKS AP/AR by pycocotools
  (`oks.evaluate_oks`), per category with its sigmas (the data set's
  ``oks_sigmas``, COCO's for the COCO person layout, else
  ``default_sigma``), averaged over categories. Each instance's score is
  mmpose's ``bbox_keypoint`` rescoring of its keypoint confidences (the box
  score is 1: boxes are the ground truth's). Instance protocol only (None
  for CAPE episodes, which show the same query several times).
* `CalibrationEvaluator` yields ``calibration``: for every labelled
  keypoint, "hit" = within alpha x the PCK normaliser
  (`metrics.correct_keypoints`) at alpha 0.2, 0.05, 0.025 (`HIT_ALPHAS`);
  reliability table, expected calibration error and AUROC of the
  confidence at ``radius_bins``, and ECE/AUROC at every radius of
  `vocab.CONFIDENCE_RADII_BINS`. Then ``presence`` (None without an
  ``<absent>`` token): precision, recall, F1 and accuracy of "present" and
  "absent" per keypoint name and overall, over the keypoints whose truth is
  known: labelled (v > 0) = present; v = 0 in a data set whose v = 0 means
  absent = absent; others are unknown. And ``likelihood`` (issue 36): ECE,
  AUROC and reliability table of the raw likelihood and, with the
  checkpoint's calibration map (`common.Inputs.calibration`), of the
  calibrated one, against the map's hit event; the diagram of both is
  ``reliability_<split>.png``. Its ``boxes_out_of_range`` counts the
  samples whose box is outside the training boxes' range
  (`common.Inputs.box_range`, `box_range`; warned about once per
  evaluation): their calibrated likelihood is 0 (`likelihood.calibrate`).
"""

from typing import Any, Iterator

from absl import logging
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.evaluation import calibration
from kpseq_jax.evaluation import calibration_fit
from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import oks
from kpseq_jax.evaluation import protocols
from kpseq_jax.evaluation import report as report_lib
from kpseq_jax.inference import box_range as box_range_lib
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import results
from kpseq_jax.sequence import vocab as vocab_lib

# Hit thresholds (fractions of the PCK normaliser) calibration is scored at:
# MP-100's 0.2, and two strict ones for lab data where 0.2 saturates. With
# the crop = 1.25 x max(w, h) split in num_bins bins, alpha a is about
# a * num_bins / 1.25 bins: 0.025 ~ 2.6 and 0.05 ~ 5 bins at 128 bins, the
# scale of the confidence's radius.
HIT_ALPHAS = (0.2, 0.05, 0.025)


def arrays(batch: dict[str, np.ndarray], pred_px: np.ndarray,
           confidence_by_radius: np.ndarray, presence: np.ndarray | None,
           size: np.ndarray | None) -> dict[str, np.ndarray]:
  """What the sections read, from N evaluated samples.

  Args:
    batch: the samples' ``keypoints`` float [N, Kmax, 3] (pixels, v),
      ``bbox`` [N, 4], ``category_id``, ``image_id``, ``num_keypoints``
      [N] and (optional) ``keypoint_absent`` float [N, Kmax], 1 = known
      absent.
    pred_px: float [N, Kmax, 2] predicted image pixels, in the same
      keypoint order as ``batch['keypoints']``.
    confidence_by_radius: float [N, Kmax, R] (`predictor.Prediction`).
    presence: float [N, Kmax] or None.
    size: float [N] the PCK normaliser, or None for `metrics.bbox_size`.
  """
  d = dict(keypoints=batch['keypoints'], bbox=batch['bbox'],
           category_id=batch['category_id'], image_id=batch['image_id'],
           num_keypoints=batch['num_keypoints'],
           absent=batch.get('keypoint_absent',
                            np.zeros(batch['keypoints'].shape[:2])),
           pred_px=pred_px, conf=confidence_by_radius,
           size=metrics.bbox_size(batch['bbox']) if size is None else size)
  if presence is not None:
    d['presence'] = presence
  return d


def _decoded_arrays(decoded: common.Decoded) -> dict[str, np.ndarray]:
  return arrays(decoded.batch, decoded.pred_px,
                decoded.confidence_by_radius, decoded.presence, decoded.size)


class OKSEvaluator:
  """OKS AP/AR (module docstring).

  Args:
    protocol: what is evaluated (`protocols.Instances` / `Episodes`).
    info: the data set (categories, sigmas).
    name: the report (``eval_<name>.json``).
    default_sigma: OKS sigma of categories with none (0 = none: such a
      category is an error).
    radius_bins: the confidence radius (in `vocab.CONFIDENCE_RADII_BINS`)
      of the keypoint scores.

  Raises:
    ValueError: a category's sigmas do not fit, or it has none and
      ``default_sigma`` is 0 (names the category and field), here before
      anything is trained.
  """

  def __init__(self, protocol, info: dataset.DatasetInfo, name: str,
               default_sigma: float, radius_bins: int):
    self.protocol, self.info, self.report = protocol, info, name
    self.radius = _radius_index(radius_bins)
    self.default_sigma = default_sigma if default_sigma > 0 else None
    self.instances = isinstance(protocol, protocols.Instances)
    if self.instances:
      for c in info.categories.values():
        oks.resolve_sigmas(c.id, c.num_keypoints, c.keypoint_names, c.name,
                           c.oks_sigmas or None, self.default_sigma)

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    """Yields ``oks`` (None for episodes), its AP/AR floats, its Markdown."""
    decoded = inputs.decoded(self.protocol)
    if not self.instances or not decoded.num_samples:
      yield 'oks', None
      return
    o = oks_section(_decoded_arrays(decoded), self.info, self.radius,
                    self.default_sigma)
    logging.info('Eval %s: %s', self.report, report_lib.oks_line(o))
    yield 'oks', o
    yield from ((f'oks/{k}', o[k]) for k in ('ap', 'ap50', 'ap75', 'ar'))
    yield 'oks', common.Markdown(report_lib.oks_markdown(o))


class CalibrationEvaluator:
  """Confidence calibration, the likelihood before and after its map,
  and presence (module docstring).

  Args:
    protocol, info, name: as `OKSEvaluator`.
    radius_bins: the reported confidence's radius.
    hit_alpha: the hit radius of the ``likelihood`` section without a map
      (with one: the map's).
  """

  def __init__(self, protocol, info: dataset.DatasetInfo, name: str,
               radius_bins: int, hit_alpha: float = 0.05):
    self.protocol, self.info, self.report = protocol, info, name
    self.radius = _radius_index(radius_bins)
    self.hit_alpha = hit_alpha

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    """Yields ``calibration`` and ``presence`` (None when not computed),
    their ECE/AUROC and F1/accuracy floats, their Markdown."""
    decoded = inputs.decoded(self.protocol)
    if not decoded.num_samples:
      yield from (('calibration', None), ('presence', None))
      return
    d = _decoded_arrays(decoded)
    c = calibration_section(d, self.radius)
    for line in report_lib.calibration_lines(c):
      logging.info('Eval %s: %s', self.report, line)
    yield 'calibration', c
    yield from ((f'calibration/alpha_0.2/{k}', c['alpha_0.2'][k])
                for k in ('ece', 'auroc'))
    yield 'calibration', common.Markdown(report_lib.calibration_markdown(c))
    lk = likelihood_section(decoded, inputs.calibration, self.hit_alpha,
                            self.protocol.split, inputs.box_range)
    logging.info('Eval %s: %s', self.report, lk['note'])
    if inputs.box_range is not None:
      if warning := box_range_lib.warning(
          inputs.box_range, lk['boxes_out_of_range'], decoded.num_samples,
          f'Eval {self.report}', inputs.calibration is not None):
        logging.warning('%s', warning)
    yield 'likelihood', lk
    yield from ((f'likelihood/{name}/{k}', lk[name][k])
                for name in ('raw', 'calibrated') if lk[name]
                for k in ('ece', 'auroc'))
    yield 'likelihood', common.Markdown(report_lib.likelihood_markdown(lk))
    yield f'reliability_{self.report}.png', common.File(
        lambda path: report_lib.plot_reliability(lk, path))
    p = presence_section(d, self.info) if 'presence' in d else None
    yield 'presence', p
    if p is not None:
      logging.info('Eval %s: %s', self.report, report_lib.presence_line(p))
      yield from ((f'presence/overall/{k}/f1', p['overall'][k]['f1'])
                  for k in ('present', 'absent'))
      yield 'presence/overall/accuracy', p['overall']['accuracy']
      yield 'presence', common.Markdown(report_lib.presence_markdown(p))


def _radius_index(radius_bins: int) -> int:
  """Index of ``radius_bins`` in `vocab.CONFIDENCE_RADII_BINS`.

  Raises:
    ValueError: not one of them.
  """
  if radius_bins not in vocab_lib.CONFIDENCE_RADII_BINS:
    raise ValueError(f'confidence radius_bins={radius_bins} is not one of '
                     f'{vocab_lib.CONFIDENCE_RADII_BINS}.')
  return vocab_lib.CONFIDENCE_RADII_BINS.index(radius_bins)


def oks_section(d: dict[str, np.ndarray], info: dataset.DatasetInfo,
              radius: int, default_sigma: float | None) -> dict[str, Any]:
  """The ``oks`` section of `arrays` ``d`` (radius: an index of
  `vocab.CONFIDENCE_RADII_BINS`)."""
  k = d['num_keypoints']
  kmax = d['keypoints'].shape[1]
  valid = np.arange(kmax)[None] < k[:, None]
  conf = np.where(valid, d['conf'][..., radius], np.nan)
  visible = valid
  if 'presence' in d:
    visible = valid & (d['presence'] >= 0.5)
  scores = np.array([
      results.bbox_keypoint_score(1.0, c[v]) for c, v in zip(conf, visible)])
  gts = oks.ground_truth_from_arrays(d['image_id'], d['category_id'],
                                     d['keypoints'], d['bbox'], k)
  dts = oks.predictions_from_arrays(d['image_id'], d['category_id'],
                                    d['pred_px'], k, scores=scores,
                                    keypoint_scores=conf)
  sigmas = {c.id: c.oks_sigmas for c in info.categories.values()
            if c.oks_sigmas}
  return oks.evaluate_oks(gts, dts, info.categories, sigmas,
                          default_sigma).to_dict()


def calibration_section(d: dict[str, np.ndarray], radius: int
                      ) -> dict[str, Any]:
  """The ``calibration`` section of `arrays` ``d``."""
  out = {'radius_bins': vocab_lib.CONFIDENCE_RADII_BINS[radius],
         'hit_alphas': list(HIT_ALPHAS)}
  # A labelled keypoint the model did not generate (it emitted <eos>
  # early) is a miss with confidence 0, not a NaN to skip.
  conf = np.nan_to_num(d['conf'], nan=0.0)
  for alpha in HIT_ALPHAS:
    hit, labelled, _ = metrics.correct_keypoints(
        d['pred_px'], d['keypoints'], d['bbox'], alpha, d['size'])
    chosen = calibration.calibration(conf[..., radius], hit, labelled)
    by_radius = {}
    for j, r in enumerate(vocab_lib.CONFIDENCE_RADII_BINS):
      c = calibration.calibration(conf[..., j], hit, labelled)
      by_radius[str(r)] = dict(ece=c.ece, auroc=c.auroc,
                               mean_confidence=c.mean_confidence)
    out[f'alpha_{alpha}'] = dict(chosen.to_dict(), by_radius=by_radius)
  return out


def likelihood_section(decoded: common.Decoded,
                       cmap: likelihood.CalibrationMap | None,
                       hit_alpha: float, split: str,
                       box_range: box_range_lib.BoxRange | None = None
                       ) -> dict[str, Any]:
  """The ``likelihood`` section: ECE, AUROC and reliability table of the
  raw likelihood (`likelihood.raw_likelihood`) and of its calibration map
  ``cmap`` (None: raw only; 0 for the samples whose box is out of
  ``box_range``, `likelihood.calibrate`), against hits within the map's
  ``hit_alpha`` (or ``hit_alpha`` without a map) over the keypoints whose
  truth is known (`calibration_fit.hits`: known absent = miss); with
  ``box_range``, ``boxes_out_of_range`` (int) and ``box_range`` (its
  JSON), else None."""
  alpha = cmap.hit_alpha if cmap is not None else hit_alpha
  hit, known = calibration_fit.hits(decoded.batch, decoded.pred_px,
                                    decoded.size, alpha)
  raw = calibration_fit.raw_of(decoded)
  far = (None if box_range is None else
         box_range.out_of_range(decoded.batch['bbox']))  # [N]
  out = dict(split=split, hit_alpha=alpha, num_keypoints=int(known.sum()),
             event=(cmap.event if cmap is not None else
                    f'within {alpha:g} x max(box w, h) of the truth'),
             raw=calibration.calibration(raw, hit, known).to_dict(),
             calibrated=None, map=None,
             boxes_out_of_range=None if far is None else int(far.sum()),
             box_range=None if box_range is None else box_range.to_json())
  if cmap is None:
    out['note'] = ('likelihood: raw (no calibration.json for this '
                   'checkpoint); ECE {} AUROC {}'.format(
                       *(_fmt(out['raw'][k]) for k in ('ece', 'auroc'))))
    return out
  out['calibrated'] = calibration.calibration(
      likelihood.calibrate(cmap, raw, far), hit, known).to_dict()
  out['map'] = dict(checkpoint_step=cmap.checkpoint_step, split=cmap.split,
                    num_keypoints=cmap.num_keypoints, num_hits=cmap.num_hits,
                    knots=len(cmap.raw_knots))
  out['note'] = (
      f'likelihood on {out["num_keypoints"]} keypoints, hit within {alpha:g}'
      f' x box: raw ECE {_fmt(out["raw"]["ece"])} AUROC '
      f'{_fmt(out["raw"]["auroc"])} -> calibrated (fitted on '
      f'{cmap.num_keypoints} {cmap.split!r} keypoints) ECE '
      f'{_fmt(out["calibrated"]["ece"])} AUROC '
      f'{_fmt(out["calibrated"]["auroc"])}')
  return out


def _fmt(v: float | None) -> str:
  return 'n/a' if v is None else f'{v:.3f}'


def presence_section(d: dict[str, np.ndarray], info: dataset.DatasetInfo
                   ) -> dict[str, Any]:
  """The ``presence`` section of `arrays` ``d`` (with ``presence``)."""
  present = d['keypoints'][..., 2] > 0
  absent = (d['absent'] > 0) & ~present
  kmax = present.shape[1]
  valid = np.arange(kmax)[None] < d['num_keypoints'][:, None]
  known = (present | absent) & valid
  names = None
  probability = np.nan_to_num(d['presence'], nan=0.0)
  if len(info.categories) == 1:  # Per keypoint name.
    cat = next(iter(info.categories.values()))
    k = cat.num_keypoints
    probability, present, known = (probability[:, :k], present[:, :k],
                                   known[:, :k])
    names = (list(cat.keypoint_names) if len(cat.keypoint_names) == k
             else [f'keypoint {i}' for i in range(k)])
  out = calibration.presence_metrics(probability, present, known,
                                     names).to_dict()
  out['truth'] = (f'present = labelled (v > 0); absent = v = 0 where the '
                  f'data set says v = 0 means absent (unlabelled_means='
                  f'{info.unlabelled_means!r})')
  return out
