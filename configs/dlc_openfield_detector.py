"""Detection stage for the DeepLabCut open-field mouse: whole 640x480 frames.

The Deformable DETR detector of issue 18 (kpseq_jax/models/detector.py),
sized like configs/dlc_openfield.py so that it trains on 2 CPU cores in
about the keypoint config's time: a ResNet-18 from scratch (batch
statistics) on frames resized to 256x192 (scale 0.4), strides 4/8/16/32
(the stride-4 level: box corners to about one canvas pixel), a 3-layer
decoder with 10 queries, batch 4, 1,650 steps (measurements:
docs/detection.md). Its boxes feed the keypoint stage
(configs/dlc_openfield.py) in `--mode predict` / `--mode analyze` with
``--detector_workdir``.

Build the data set first (the same one as the keypoint config):
  python -m data_prep.build --image-root ../shared/data/dlc_openfield/images \
    --annotations ../shared/data/dlc_openfield/annotations/train.json \
    --annotations ../shared/data/dlc_openfield/annotations/test.json \
    --out data/dlc_openfield
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config('detector')
  c.max_num_categories = 1  # The mouse.
  c.max_num_keypoints = 4
  c.input.dataset_dir = 'data/dlc_openfield'
  c.input.batch_size = 4  # Images.
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1)
  c.model.feature_levels = ('c2', 'c3', 'c4', 'c5')
  c.model.d_model = 128
  c.model.transformer.update(num_layers=3, num_heads=4, ffn_dim=512)
  c.model.num_queries = 10
  c.detector.image_size_px = (192, 256)  # 640x480 at scale 0.4.
  c.detector.max_detections = 10
  c.optim.learning_rate = 2e-4  # Deformable DETR's.
  c.optim.num_train_steps = 1650
  c.optim.decay_steps = (1334,)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.evals.batch_size = 23
  c.evals.every_steps = 550
  c.evals.evaluators = dict(box_ap=dict(type='box_ap'))  # Box AP, COCO's.
  return c
