"""The video frames a likelihood cut-off hides, as a sheet to check by eye.

Reads the DeepLabCut table that `--mode analyze` writes (``.h5`` or
``.csv``), finds the frames where any body part's likelihood is under
``--pcutoff`` (DeepLabCut's default 0.6), prints them as runs of
consecutive frames, and pastes a sample of them, taken from the labelled
video, into one PNG with each frame's likelihoods written on it. With
``--raw`` (the ``_likelihood_raw.csv`` beside the table), a second row of
frames shows the ones the raw confidence would hide and the calibrated
likelihood shows: were they right to be shown?

  python tools/pcutoff_frames.py \\
      --table runs/of_video/m3v1mp4KPSEQ_resnet18_mousetopview_step1500.h5 \\
      --raw runs/of_video/m3v1mp4KPSEQ_resnet18_mousetopview_step1500_likelihood_raw.csv \\
      --labeled_video runs/of_video/m3v1mp4KPSEQ_resnet18_mousetopview_step1500_labeled.mp4 \\
      --out runs/of_video/pcutoff_frames.png

Used for docs/uncertainty.md (the open-field video's hidden frames).
"""
import argparse
import sys

import av
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

TILE = (480, 360)  # Pixels per frame in the sheet.
PER_ROW = 3


def read_likelihood(table: str) -> pd.DataFrame:
  """Likelihood per frame (rows) and body part (columns) of a DeepLabCut table.

  Raises:
    ValueError: the table has no `likelihood` coordinate.
  """
  if table.endswith('.h5'):
    df = pd.read_hdf(table)
  else:
    df = pd.read_csv(table, header=[0, 1, 2], index_col=0)
  coords = df.columns.get_level_values(-1)
  if 'likelihood' not in set(coords):
    raise ValueError(f'{table}: no likelihood column (levels: '
                     f'{list(df.columns.names)})')
  lik = df.loc[:, coords == 'likelihood']
  lik.columns = lik.columns.get_level_values(-2)
  return lik


def runs(frames: np.ndarray) -> list[tuple[int, int]]:
  """Consecutive stretches of sorted frame indices, as (first, last)."""
  if not len(frames):
    return []
  cuts = np.where(np.diff(frames) > 1)[0] + 1
  return [(int(g[0]), int(g[-1])) for g in np.split(frames, cuts)]


def sheet(video: str, picks: list[tuple[int, str]]) -> Image.Image:
  """Frames ``picks`` [(index, caption)] of ``video`` pasted PER_ROW a row."""
  wanted = dict(picks)
  images = {}
  with av.open(video) as container:
    for i, frame in enumerate(container.decode(video=0)):
      if i in wanted:
        images[i] = frame.to_image().convert('RGB')
      if i >= max(wanted):
        break
  missing = sorted(set(wanted) - set(images))
  if missing:
    raise ValueError(f'{video}: frames {missing[:5]} are past its end')
  rows = -(-len(picks) // PER_ROW)
  out = Image.new('RGB', (TILE[0] * PER_ROW, TILE[1] * rows))
  for k, (i, caption) in enumerate(picks):
    im = images[i].resize(TILE)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, TILE[0], 14], fill='black')
    draw.text((3, 2), caption, fill='white')
    out.paste(im, ((k % PER_ROW) * TILE[0], (k // PER_ROW) * TILE[1]))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--table', required=True, help='analyze output, .h5 or .csv')
  p.add_argument('--labeled_video', required=True)
  p.add_argument('--raw', help='the _likelihood_raw.csv beside the table')
  p.add_argument('--pcutoff', type=float, default=0.6,
                 help="DeepLabCut's default p-cutoff")
  p.add_argument('--num', type=int, default=12,
                 help='hidden frames in the sheet, evenly spaced')
  p.add_argument('--out', required=True, help='PNG')
  a = p.parse_args(argv)
  lik = read_likelihood(a.table)
  hidden = np.where((lik.to_numpy() < a.pcutoff).any(1))[0]
  print(f'{len(hidden)} of {len(lik)} frames have a body part under '
        f'{a.pcutoff}: runs {runs(hidden)}')
  pick = hidden[np.linspace(0, len(hidden) - 1, min(a.num, len(hidden)))
                .astype(int)] if len(hidden) else []

  def caption(i, tag):
    return f'frame {i} {tag}: ' + ' '.join(
        f'{b} {v:.2f}' for b, v in lik.iloc[i].items())

  picks = [(int(i), caption(int(i), 'hidden')) for i in pick]
  if a.raw:
    raw = pd.read_csv(a.raw, index_col=0)[list(lik.columns)].to_numpy()
    shown = np.where(((raw < a.pcutoff) & (lik.to_numpy() >= a.pcutoff))
                     .any(1))[0]
    print(f'{len(shown)} frames hidden by the raw confidence are shown '
          'calibrated')
    take = shown[np.linspace(0, len(shown) - 1, min(PER_ROW, len(shown)))
                 .astype(int)] if len(shown) else []
    picks += [(int(i), caption(int(i), 'shown')) for i in take]
  if not picks:
    print('nothing hidden: no sheet written')
    return 0
  sheet(a.labeled_video, picks).save(a.out)
  print(f'wrote {a.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
