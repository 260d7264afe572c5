"""Two courting flies (SLEAP): boxes from centre heatmaps (CenterNet).

The alternative to configs/sleap_flies_detector.py's Deformable DETR for
the same job, as SLEAP's own top-down pipeline finds animals: a heatmap of
animal centres (`models/centroid.py`), each peak a fly, with the box's size
read at the peak. Everything but the model is the DETR config's, so the two
differ only in how boxes are predicted: the 256x256 canvas (scale 0.25),
its crops, flips and colour jitter, batch 4, AdamW 2e-4 for 1,200 steps
with the drop at 1,000, box NMS at 0.5 IoU and the 0.3 score threshold.
Model: a from-scratch ResNet-18 (as the keypoint stage), c3-c5 summed onto
the stride-8 grid (32 x 32 cells; a fly's box is about 6 cells), CenterNet's
heads and loss weights. Data set: the DETR config's (docs/multi_animal.md):
  python -m data_prep.build --slp ../shared/data/sleap_flies/clip.slp \
    --slp test=../shared/data/sleap_flies/two_flies.slp \
    --slp_split train=0:0.8,val=0.8:1 --every_nth_frame train=4,val=4 \
    --out data/sleap_flies
"""

import ml_collections

from configs import default
from configs import sleap_flies_detector


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config('centroid')
  detr = sleap_flies_detector.get_config()
  for group in ('input', 'detector', 'optim', 'evals'):
    for name, value in detr[group].items():
      if name != 'evaluators':  # The box models' default: box AP.
        c[group][name] = value
  for name in ('max_num_categories', 'max_num_keypoints', 'log_every_steps',
               'checkpoint_every_steps'):
    c[name] = detr[name]
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1)
  c.model.feature_levels = ('c3', 'c4', 'c5')
  return c
