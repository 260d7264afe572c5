"""Markdown table of pixel-precision figures from evaluated workdirs.

  python tools/precision_table.py baseline=runs/reaching \\
      refine_aux=runs/reaching_refine_aux [--split test]

Reads each workdir's ``eval_<split>.json`` (written by ``--mode train`` /
``--mode eval``, `kpseq_jax.evaluation.report`) and prints one row per
``label=workdir``: the evaluated step, mean error (px, Euclidean, over
labelled keypoints), MAE per coordinate (px), acc@5px, PCK@0.05 and
PCK@0.2 (MP-100's max(w, h) normaliser), OKS AP, and each keypoint's MAE
per coordinate (px). The rows of docs/precision.md's ablation come from
it. Not part of the package: a reporting tool. Exits with an error naming
the file when a workdir has no evaluation.
"""
import json
import os
import sys


def _row(label: str, workdir: str, split: str) -> tuple[list[str], dict]:
  path = os.path.join(workdir, f'eval_{split}.json')
  if not os.path.isfile(path):
    sys.exit(f'{path}: not found (evaluate {workdir} with --mode eval first)')
  with open(path) as f:
    r = json.load(f)
  curve = dict(zip(r['pck_curve']['alphas'], r['pck_curve']['pck']))
  pixels = r.get('pixel_accuracy') or {}
  overall = pixels.get('overall', {})
  oks = (r.get('oks') or {}).get('ap')
  cells = [label, str(r['checkpoint_step']), f"{r['mean_error_px']:.2f}",
           f"{overall['mae_px']:.2f}" if 'mae_px' in overall else '-',
           f"{overall['acc@5px']:.3f}" if 'acc@5px' in overall else '-',
           f'{curve[0.05]:.3f}' if 0.05 in curve else '-',
           f"{r['pck']:.3f}", '-' if oks is None else f'{oks:.3f}']
  per_keypoint = {k: v['mae_px'] for k, v in
                  pixels.get('per_keypoint', {}).items()
                  if v.get('mae_px') is not None}
  return cells, per_keypoint


def main(argv: list[str]) -> None:
  split = 'test'
  if '--split' in argv:
    i = argv.index('--split')
    split, argv = argv[i + 1], argv[:i] + argv[i + 2:]
  if not argv or any('=' not in a for a in argv):
    sys.exit(__doc__)
  rows = [_row(*a.split('=', 1), split) for a in argv]
  keypoints = list(dict.fromkeys(k for _, per in rows for k in per))
  head = ['run', 'step', 'mean error px', 'MAE px', 'acc@5px', 'PCK@0.05',
          'PCK@0.2', 'OKS AP'] + [f'{k} MAE px' for k in keypoints]
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for cells, per in rows:
    cells += [f'{per[k]:.2f}' if k in per else '-' for k in keypoints]
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main(sys.argv[1:])
