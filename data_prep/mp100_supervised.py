r"""MP-100 "supervised" annotation files: all categories, split by image.

MP-100's own files (``mp100_split{N}_{train,val,test}.json``) split the 100
categories into disjoint train / val / test sets (the CAPE setting). For the
supervised setting one model trains on every category, so the images are
split instead: the three files of one split (together all 100 categories,
every image once) are pooled, and each image goes to train / val / test by a
hash of its id (deterministic, independent of file order), so one image's
instances stay together. The category table is the union of the files'.

  python -m data_prep.mp100_supervised \
      --annotations ../mp100/annotations/mp100_split1_train.json \
      --annotations ../mp100/annotations/mp100_split1_val.json \
      --annotations ../mp100/annotations/mp100_split1_test.json \
      --out-dir data/mp100_supervised_split1_annotations

writes ``OUT_DIR/{train,val,test}.json`` (COCO keypoint format), to be built
with ``python -m data_prep.build`` like any other files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Sequence

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test.
SPLITS = ('train', 'val', 'test')


def image_split(image_id: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
                ) -> str:
  """'train' / 'val' / 'test' for an image id, from sha1(id) in [0, 1)."""
  u = int(hashlib.sha1(str(int(image_id)).encode()).hexdigest()[:12], 16) / 16**12
  edge = 0.0
  for name, f in zip(SPLITS, fractions):
    edge += f
    if u < edge:
      return name
  return SPLITS[-1]


def split_by_image(files: Sequence[dict], fractions: Sequence[float] = DEFAULT_FRACTIONS
                   ) -> dict[str, dict]:
  """Pools COCO keypoint dicts and splits them by image.

  Args:
    files: parsed COCO keypoint files (images, annotations, categories).
    fractions: train / val / test shares, summing to 1.

  Returns:
    split name -> COCO dict with that split's images and their annotations
    and the union of the categories (first definition of an id kept).

  Raises:
    ValueError: fractions do not sum to 1.
  """
  if abs(sum(fractions) - 1) > 1e-9 or len(fractions) != 3:
    raise ValueError(f'fractions {fractions} must be 3 shares summing to 1')
  images, categories, annotations = {}, {}, {}
  for f in files:
    for im in f['images']:
      images.setdefault(im['id'], im)
    for c in f['categories']:
      categories.setdefault(c['id'], c)
    for a in f['annotations']:
      annotations.setdefault(a['id'], a)
  out = {s: {'images': [], 'annotations': [],
             'categories': [categories[c] for c in sorted(categories)]}
         for s in SPLITS}
  where = {i: image_split(i, fractions) for i in images}
  for i in sorted(images):
    out[where[i]]['images'].append(images[i])
  for a_id in sorted(annotations):
    a = annotations[a_id]
    if a['image_id'] in where:
      out[where[a['image_id']]]['annotations'].append(a)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Command line (argparse: these flags must not clash with data_prep.build's)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--annotations', action='append', required=True,
                      help='MP-100 file of one split; repeat.')
  parser.add_argument('--out-dir', required=True,
                      help='Directory for train.json, val.json, test.json.')
  parser.add_argument('--fractions', default=','.join(map(str, DEFAULT_FRACTIONS)),
                      help='train,val,test image shares.')
  args = parser.parse_args(argv)
  files = [json.loads(Path(p).read_text()) for p in args.annotations]
  out = split_by_image(files, [float(f) for f in args.fractions.split(',')])
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, d in out.items():
    (out_dir / f'{name}.json').write_text(json.dumps(d))
    print(f'{name}: {len(d["images"])} images, {len(d["annotations"])} instances, '
          f'{len({a["category_id"] for a in d["annotations"]})} categories')


if __name__ == '__main__':
  main()
