"""Turns COCO-style keypoint files plus an image root into a TFDS data set.

Run once, before training (training never parses JSON):

    python -m data_prep.build --annotations train.json --annotations test.json \
        --image-root DIR --out OUT
    python -m data_prep.build --check --annotations F1.json --annotations F2.json

Modules, one job each:
  coco.py        parse and schema-check one COCO keypoint file.
  categories.py  merge category tables over files; keypoint counts; flip pairs.
  validate.py    per-record validation of one annotation (no I/O).
  images.py      read an image file and produce 8-bit RGB encoded bytes.
  report.py      what was read, written and skipped, and why.
  build.py       the TFDS ArrayRecord builder, check mode and the CLI.

The package import stays light: `tensorflow_datasets` is imported only by
`build.py`.
"""
