"""The keypoint evaluation report: its typed view and its formatting.

`EvalReport` is ``eval_<name>.json`` as a dataclass (`from_dict`); the
evaluators (`pck.py`, `uncertainty.py`) format their parts of
``eval_<name>.md`` / ``.csv`` and ``pck_curve_<name>.png`` with the
functions here, and `common.write_report` writes them:
  ``eval_<name>.md`` and ``eval_<name>.csv``: one row per category (PCK@0.2,
    mean pixel error, instances, labelled keypoints, the baseline), then the
    mean over categories; the Markdown then has the OKS AP, confidence
    calibration and presence sections;
  ``pck_curve_<name>.png``: PCK against the threshold alpha for the model
    and the baseline (mean over categories, and each category when there
    are few).
"""

import csv
import dataclasses
import io
from typing import Any

import numpy as np

# Thresholds of the PCK curve, as fractions of max(bbox w, h).
ALPHAS = tuple(float(a) for a in np.round(np.arange(0.05, 0.501, 0.05), 2))
# Categories drawn one by one on the curve when there are at most this many.
MAX_CURVES = 8

COLUMNS = ('category', 'instances', 'labelled_keypoints', 'pck@0.2',
           'mean_error_px', 'baseline_pck@0.2', 'baseline_mean_error_px')


@dataclasses.dataclass(frozen=True)
class PCKCurve:
  """PCK at several thresholds (fractions of max(bbox w, h)).

  Attributes:
    alphas: the thresholds, increasing.
    pck: the model's PCK at each (mean over categories).
    baseline_pck: the baseline's PCK at each.
    per_category_pck: category name -> the model's PCK at each (None where
      the category had no evaluated instance).
  """
  alphas: list[float]
  pck: list[float]
  baseline_pck: list[float]
  per_category_pck: dict[str, list[float | None]]


@dataclasses.dataclass(frozen=True)
class EvalReport:
  """One evaluation of one split (also ``eval_<split>.json``).

  Categories are named ``"<id>:<name>"``. PCK figures are fractions in
  [0, 1]; errors are in image pixels.

  Attributes:
    name: the evaluation's name in file names and TensorBoard tags: the
      split, with ``_permuted`` for CAPE episodes in a random order.
    split: the data set split evaluated.
    checkpoint_step: the train step of the evaluated state (None if
      unknown).
    num_instances: instances (query samples) predicted.
    pck: PCK@0.2 by ``pck_protocol``.
    pck_protocol: how ``pck`` is computed, in words.
    pck_instance_mean: mean per-instance PCK over all instances.
    pck_keypoint_pooled: labelled keypoints pooled per category, mean over
      categories.
    num_excluded_instances: instances not evaluated (empty clean box).
    mean_error_px: mean distance of predicted labelled keypoints.
    num_labelled_keypoints: labelled keypoints evaluated.
    per_category_pck, per_category_instances,
    per_category_labelled_keypoints, per_category_error_px: per category.
    baseline: what the baseline is (e.g. the mean pose of the training
      crops).
    baseline_pck, baseline_error_px, baseline_per_category_pck,
    baseline_per_category_error_px: the baseline's figures.
    pck_curve: PCK against the threshold.
    mpck: mean PCK at alpha 0.05, 0.1, 0.15, 0.2 and 0.25 (the CAPE
      papers' mPCK).
    num_samples_without_keypoints: samples with no keypoint to evaluate
      (scored 0; in CAPE, none labelled in the query and every support).
    notes: what the evaluation skipped and why (categories, episodes).
    oks: OKS AP/AR (`oks.OKSResult.to_dict`), or None (CAPE episodes, or
      a report written before it existed).
    calibration: the per-keypoint confidence against hits
      (`uncertainty.py`), or None.
    likelihood: ECE, AUROC and reliability of the raw and the calibrated
      likelihood (`uncertainty.likelihood_section`), or None (older
      reports).
    presence: presence precision/recall/F1 per keypoint
      (`calibration.PresenceMetrics.to_dict`), or None without a presence
      model.
    pixel_accuracy: the pose-captioning figures, accuracy within 1, 5 and
      25 px and mean absolute error in px, overall and per keypoint
      (`metrics.PixelAccuracyAccumulator.result`; {} in older reports).
  """
  name: str
  split: str
  checkpoint_step: int | None
  num_instances: int
  pck: float
  pck_protocol: str
  pck_instance_mean: float
  pck_keypoint_pooled: float
  num_excluded_instances: int
  mean_error_px: float
  num_labelled_keypoints: int
  per_category_pck: dict[str, float]
  per_category_instances: dict[str, int]
  per_category_labelled_keypoints: dict[str, int]
  per_category_error_px: dict[str, float]
  baseline: str
  baseline_pck: float
  baseline_error_px: float
  baseline_per_category_pck: dict[str, float]
  baseline_per_category_error_px: dict[str, float]
  pck_curve: PCKCurve
  mpck: float
  num_samples_without_keypoints: int
  notes: list[str]
  oks: dict[str, Any] | None = None
  calibration: dict[str, Any] | None = None
  likelihood: dict[str, Any] | None = None
  presence: dict[str, Any] | None = None
  pixel_accuracy: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (NaN stays a float NaN, as `json` writes it)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'EvalReport':
    """Inverse of `to_dict` (e.g. of a loaded ``eval_<split>.json``)."""
    return cls(**{**d, 'pck_curve': PCKCurve(**d['pck_curve'])})


def category_rows(r: dict[str, Any]) -> list[dict]:
  """Table rows of a report's values (`EvalReport` fields as a dict): one
  per category, then ``mean`` (PCK averaged over them)."""
  rows = []
  for name, pck in r['per_category_pck'].items():
    rows.append({
        'category': name,
        'instances': r['per_category_instances'][name],
        'labelled_keypoints': r['per_category_labelled_keypoints'][name],
        'pck@0.2': pck,
        'mean_error_px': r['per_category_error_px'][name],
        'baseline_pck@0.2': r['baseline_per_category_pck'].get(name),
        'baseline_mean_error_px':
            r['baseline_per_category_error_px'].get(name)})
  rows.append({
      'category': 'mean', 'instances': r['num_instances'],
      'labelled_keypoints': r['num_labelled_keypoints'],
      'pck@0.2': r['pck'], 'mean_error_px': r['mean_error_px'],
      'baseline_pck@0.2': r['baseline_pck'],
      'baseline_mean_error_px': r['baseline_error_px']})
  return rows


def oks_line(o: dict[str, Any]) -> str:
  """One-line summary of the ``oks`` section ('n/a': undefined)."""
  return 'OKS ' + ', '.join(
      f'{k.upper()} {_na(o.get(k))}' for k in ('ap', 'ap50', 'ap75', 'ar')
  ) + f' ({o.get("num_categories")} categories)'


def calibration_lines(c: dict[str, Any]) -> list[str]:
  """One line per hit threshold of the ``calibration`` section."""
  lines = []
  for alpha in c['hit_alphas']:
    a = c[f'alpha_{alpha}']
    lines.append(
        f'confidence (radius {c["radius_bins"]} bins) vs hit within '
        f'{alpha} x size: ECE {_na(a["ece"])}, AUROC {_na(a["auroc"])} '
        f'({a["num"]} keypoints, accuracy {_na(a["accuracy"])}, mean '
        f'confidence {_na(a["mean_confidence"])})')
  return lines


def presence_line(p: dict[str, Any]) -> str:
  """One-line summary of the ``presence`` section."""
  o = p['overall']
  return (f'presence ({o["num"]} keypoints with known truth): accuracy '
          f'{_na(o["accuracy"])}; F1 present {_na(o["present"]["f1"])}, '
          f'absent {_na(o["absent"]["f1"])} (support '
          f'{o["present"]["support"]} / {o["absent"]["support"]})')


def oks_markdown(oks: dict[str, Any]) -> str:
  """The Markdown section of OKS AP (all, then per category)."""
  rows = [('all', oks)] + [(f'{cid}', v)
                           for cid, v in oks['per_category'].items()]
  lines = ['## OKS (pycocotools COCOeval, keypoints)', '',
           '| category | AP | AP50 | AP75 | AR | sigmas |',
           '|---|---:|---:|---:|---:|---|']
  for name, v in rows:
    lines.append(f'| {name} | {_fmt(v.get("ap"))} | {_fmt(v.get("ap50"))} '
                 f'| {_fmt(v.get("ap75"))} | {_fmt(v.get("ar"))} | '
                 f'{v.get("sigma_source", "")} |')
  return '\n'.join(lines)


def calibration_markdown(c: dict[str, Any]) -> str:
  """The Markdown section of the confidence's calibration."""
  lines = ['## Confidence calibration', '',
           f'Confidence = probability mass within {c["radius_bins"]} bins '
           'of the decoded x and y bins (product). Hit = within alpha x '
           'the PCK normaliser.', '',
           '| hit alpha | radius (bins) | ECE | AUROC |',
           '|---:|---:|---:|---:|']
  for alpha in c['hit_alphas']:
    for r, v in c[f'alpha_{alpha}']['by_radius'].items():
      lines.append(f'| {alpha} | {r} | {_na(v["ece"])} | '
                   f'{_na(v["auroc"])} |')
  for alpha in c['hit_alphas']:
    t = c[f'alpha_{alpha}']['table']
    lines += ['', f'Reliability at radius {c["radius_bins"]} (hit alpha '
              f'{alpha}):', '',
              '| confidence bin | keypoints | mean confidence | accuracy |',
              '|---|---:|---:|---:|']
    for m, n in enumerate(t['count']):
      if n:
        lines.append(f'| ({t["edges"][m]:.1f}, {t["edges"][m + 1]:.1f}] '
                     f'| {n} | {_fmt(t["mean_confidence"][m])} | '
                     f'{_fmt(t["accuracy"][m])} |')
  return '\n'.join(lines)


def presence_markdown(p: dict[str, Any]) -> str:
  """The Markdown section of presence precision/recall per keypoint."""
  lines = ['## Presence', '', p.get('truth', ''), '',
           '| keypoint | known | accuracy | present P | present R | '
           'present F1 | absent P | absent R | absent F1 |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for name, v in list(p['per_keypoint'].items()) + [('all', p['overall'])]:
    pr, ab = v['present'], v['absent']
    lines.append(
        f'| {name} | {v["num"]} | {_fmt(v["accuracy"])} | '
        f'{_fmt(pr["precision"])} | {_fmt(pr["recall"])} | '
        f'{_fmt(pr["f1"])} | {_fmt(ab["precision"])} | '
        f'{_fmt(ab["recall"])} | {_fmt(ab["f1"])} |')
  return '\n'.join(lines)


def _na(v) -> str:
  """`_fmt`, with 'n/a' for an undefined (None) figure."""
  return 'n/a' if v is None else _fmt(v)


def _fmt(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4f}' if np.isfinite(v) else 'nan'
  return str(v)


def to_markdown(rows: list[dict]) -> str:
  """A Markdown table of `category_rows` (4 decimals)."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(COLUMNS) - 1)) + '|']
  lines += ['| ' + ' | '.join(_fmt(r[c]) for c in COLUMNS) + ' |'
            for r in rows]
  return '\n'.join(lines) + '\n'


def to_csv(rows: list[dict]) -> str:
  """CSV text of `category_rows` (header `COLUMNS`, 4 decimals)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, COLUMNS, lineterminator='\n')
  w.writeheader()
  w.writerows({c: _fmt(r[c]) for c in COLUMNS} for r in rows)
  return buf.getvalue()


def plot_pck_curve(r: dict[str, Any], path: str) -> None:
  """PNG of PCK against alpha from a report's values (``pck_curve``,
  ``pck``, ``baseline``, ``baseline_pck``, ``split``, ``checkpoint_step``,
  ``num_instances``)."""
  curve = r['pck_curve']
  alphas = curve['alphas']
  from matplotlib import figure  # Here: matplotlib costs ~1 s to import.
  fig = figure.Figure(figsize=(6, 4.2), dpi=100)  # No pyplot: no global state.
  ax = fig.add_subplot()
  ax.plot(alphas, curve['pck'], 'o-', color='tab:blue', lw=2,
          label=f'model (mean over categories), PCK@0.2 {r["pck"]:.3f}')
  ax.plot(alphas, curve['baseline_pck'], 's--', color='tab:gray', lw=1.5,
          label=f'{r["baseline"]}, PCK@0.2 {r["baseline_pck"]:.3f}')
  per_cat = curve['per_category_pck']
  if 1 < len(per_cat) <= MAX_CURVES:
    for name, values in per_cat.items():
      ax.plot(alphas, values, lw=0.8, alpha=0.7, label=name)
  ax.axvline(0.2, color='k', lw=0.5, ls=':')
  ax.set(xlim=(0, max(alphas) + 0.02), ylim=(0, 1.02),
         xlabel='threshold alpha (fraction of max(bbox w, h))', ylabel='PCK',
         title=f'PCK vs threshold: {r["split"]} split, step '
         f'{r["checkpoint_step"]}, {r["num_instances"]} instances')
  ax.grid(alpha=0.3)
  ax.legend(loc='best', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def plot_reliability(section: dict[str, Any], path: str) -> None:
  """PNG reliability diagram of a ``likelihood`` section
  (`uncertainty.likelihood_section`): per equal-width bin, the fraction of
  hits against the mean likelihood, raw and (when fitted) calibrated, with
  the diagonal of perfect calibration; ECE and AUROC in the legend."""
  from matplotlib import figure  # Here: matplotlib costs ~1 s to import.
  fig = figure.Figure(figsize=(5.2, 5), dpi=100)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color='k', lw=0.6, ls=':',
          label='perfectly calibrated')
  for name, style in (('raw', 'o--'), ('calibrated', 's-')):
    c = section.get(name)
    if not c:
      continue
    t = c['table']
    pts = [(m, a) for m, a, n in zip(t['mean_confidence'], t['accuracy'],
                                     t['count']) if n]
    fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.5,
            label=f'{name}: ECE {fmt(c["ece"])}, AUROC {fmt(c["auroc"])}')
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='likelihood (bin mean)',
         ylabel=f'fraction within {section["hit_alpha"]:g} x max(box w, h)',
         title=f'Reliability, {section["split"]} split, '
         f'{section["num_keypoints"]} keypoints')
  ax.grid(alpha=0.3)
  ax.legend(loc='upper left', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def likelihood_markdown(section: dict[str, Any]) -> str:
  """Markdown of a ``likelihood`` section: ECE, AUROC, accuracy and mean
  likelihood, raw and calibrated."""
  fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'
  lines = [f'## Likelihood calibration ({section["split"]}): '
           f'P({section["event"]})',
           '', section['note'], '',
           '| likelihood | ECE | AUROC | hit rate | mean likelihood |',
           '|---|---|---|---|---|']
  for name in ('raw', 'calibrated'):
    c = section.get(name)
    if c:
      lines.append(f'| {name} | {fmt(c["ece"])} | {fmt(c["auroc"])} | '
                   f'{fmt(c["accuracy"])} | {fmt(c["mean_confidence"])} |')
  if (r := section.get('box_range')) is not None:
    lines += ['', f'Boxes outside the training scale (max(w, h) < '
              f'{r["low_px"]:.0f} or > {r["high_px"]:.0f} px; training '
              f'{r["min_side_px"]:.0f}-{r["max_side_px"]:.0f} px): '
              f'{section["boxes_out_of_range"]} (calibrated likelihood 0).']
  return '\n'.join(lines)
