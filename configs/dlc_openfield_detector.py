"""Detection stage for the DeepLabCut open-field mouse: whole 640x480 frames.

The Deformable DETR detector of issue 18 (kpseq_jax/models/detector.py),
sized like configs/dlc_openfield.py so that it trains on 2 CPU cores in
about the keypoint config's time: a ResNet-18 from scratch (batch
statistics) on frames resized to 256x192 (scale 0.4), strides 4/8/16/32
(the stride-4 level took box AP from 0.68 to 0.72 at the same training
time, docs/detection.md), a 3-layer decoder with 10 queries, batch 4,
1,650 steps (0.97x the keypoint config's 1,500 steps in time, measured
alternating with tools/step_cost.py). Its boxes feed the keypoint stage
(configs/dlc_openfield.py) in `--mode predict` / `--mode analyze` with
``--detector_workdir``.

Build the data set first (the same one as the keypoint config):
  python -m data_prep.build --image-root ../shared/data/dlc_openfield/images \
    --annotations ../shared/data/dlc_openfield/annotations/train.json \
    --annotations ../shared/data/dlc_openfield/annotations/test.json \
    --out data/dlc_openfield
"""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.task = 'detection'
  c.max_num_categories = 1  # The mouse.
  c.detector_image_size_px = (192, 256)  # 640x480 at scale 0.4.
  # Stride 4 too: box corners to ~1 canvas pixel (AP at IoU up to 0.95).
  c.feature_levels = ('c2', 'c3', 'c4', 'c5')
  c.detector_num_queries = 10
  c.max_detections = 10
  c.batch_size = 4
  c.learning_rate = 2e-4  # Deformable DETR's.
  c.num_train_steps = 1650
  c.decay_epochs = (58,)  # Step 1334 at 23 steps per epoch (93 / 4 images).
  c.eval_batch_size = 23
  c.eval_every_steps = 550
  return c
