"""Evaluation report files: per-category table and PCK-threshold curve.

From the dict `evaluate.evaluate` returns, writes to the workdir:
  ``eval_<split>.md`` and ``eval_<split>.csv``: one row per category (PCK@0.2,
    mean pixel error, instances, labelled keypoints, mean-pose baseline),
    then the mean over categories;
  ``pck_curve_<split>.png``: PCK against the threshold alpha (0.05 to 0.5)
    for the model and the baseline (mean over categories, and each category
    when there are few).
"""

import csv
import io
import os

from matplotlib import figure
import numpy as np

# Thresholds of the PCK curve, as fractions of max(bbox w, h).
ALPHAS = tuple(float(a) for a in np.round(np.arange(0.05, 0.501, 0.05), 2))
# Categories drawn one by one on the curve when there are at most this many.
MAX_CURVES = 8

COLUMNS = ('category', 'instances', 'labelled_keypoints', 'pck@0.2',
           'mean_error_px', 'baseline_pck@0.2', 'baseline_mean_error_px')


def category_rows(report: dict) -> list[dict]:
  """Table rows: one per category, then ``mean`` (PCK averaged over them)."""
  rows = []
  for name, pck in report['per_category_pck'].items():
    rows.append({
        'category': name,
        'instances': report['per_category_instances'][name],
        'labelled_keypoints': report['per_category_labelled_keypoints'][name],
        'pck@0.2': pck,
        'mean_error_px': report['per_category_error_px'][name],
        'baseline_pck@0.2': report['baseline_per_category_pck'].get(name),
        'baseline_mean_error_px':
            report['baseline_per_category_error_px'].get(name)})
  rows.append({
      'category': 'mean', 'instances': report['num_instances'],
      'labelled_keypoints': report['num_labelled_keypoints'],
      'pck@0.2': report['pck'], 'mean_error_px': report['mean_error_px'],
      'baseline_pck@0.2': report['baseline_mean_pose_pck'],
      'baseline_mean_error_px': report['baseline_mean_pose_error_px']})
  return rows


def _fmt(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4f}' if np.isfinite(v) else 'nan'
  return str(v)


def to_markdown(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(COLUMNS) - 1)) + '|']
  lines += ['| ' + ' | '.join(_fmt(r[c]) for c in COLUMNS) + ' |'
            for r in rows]
  return '\n'.join(lines) + '\n'


def to_csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, COLUMNS, lineterminator='\n')
  w.writeheader()
  w.writerows({c: _fmt(r[c]) for c in COLUMNS} for r in rows)
  return buf.getvalue()


def plot_pck_curve(report: dict, path: str) -> None:
  """PNG of PCK against alpha from ``report['pck_curve']``."""
  curve = report['pck_curve']
  alphas = curve['alphas']
  fig = figure.Figure(figsize=(6, 4.2), dpi=100)  # No pyplot: no global state.
  ax = fig.add_subplot()
  ax.plot(alphas, curve['pck'], 'o-', color='tab:blue', lw=2,
          label=f'model (mean over categories), PCK@0.2 {report["pck"]:.3f}')
  ax.plot(alphas, curve['baseline_pck'], 's--', color='tab:gray', lw=1.5,
          label='mean-pose baseline, PCK@0.2 '
          f'{report["baseline_mean_pose_pck"]:.3f}')
  per_cat = curve['per_category_pck']
  if 1 < len(per_cat) <= MAX_CURVES:
    for name, values in per_cat.items():
      ax.plot(alphas, values, lw=0.8, alpha=0.7, label=name)
  ax.axvline(0.2, color='k', lw=0.5, ls=':')
  ax.set(xlim=(0, max(alphas) + 0.02), ylim=(0, 1.02),
         xlabel='threshold alpha (fraction of max(bbox w, h))', ylabel='PCK',
         title=f'PCK vs threshold: {report["split"]} split, step '
         f'{report["checkpoint_step"]}, {report["num_instances"]} instances')
  ax.grid(alpha=0.3)
  ax.legend(loc='best', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def write(workdir: str, report: dict) -> dict[str, str]:
  """Writes the table (Markdown, CSV) and curve PNG; returns their paths."""
  split = report['split']
  rows = category_rows(report)
  paths = {'markdown': os.path.join(workdir, f'eval_{split}.md'),
           'csv': os.path.join(workdir, f'eval_{split}.csv'),
           'curve': os.path.join(workdir, f'pck_curve_{split}.png')}
  with open(paths['markdown'], 'w') as f:
    f.write(to_markdown(rows))
  with open(paths['csv'], 'w') as f:
    f.write(to_csv(rows))
  plot_pck_curve(report, paths['curve'])
  return paths
