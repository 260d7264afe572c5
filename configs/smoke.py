"""Seconds-long configuration for tests: tiny model, 64 px, 2 steps.

`configs/default.py` with one level of overrides: a from-scratch ResNet-18
a quarter as wide (width 16) and a 2-layer, 32-wide decoder on 64 px crops
of a 4-keypoint data set (tests/conftest.py sets ``input.dataset_dir``);
no reference-point refinement and no flip test (the tests that are about
them turn them on).
The argument is the system and optionally the backbone, as
configs/default.py's (``configs/smoke.py:cape``, ``configs/smoke.py:supervised,mae``);
a ViT keeps its variant's size (shrink it with ``--config.model.vit.depth``
etc.).
"""

import ml_collections

from configs import default


def get_config(arg: str = 'supervised') -> ml_collections.ConfigDict:
  """``arg``: the system and backbone (`default.parse_arg`), 'supervised'
  with the ResNet by default."""
  c = default.get_config(arg)
  c.max_num_keypoints = 4
  c.input.dataset_dir = 'data/dlc_openfield'
  c.input.batch_size = 4
  c.input.image_size_px = 64
  c.input.rotation_deg = 180.0
  c.vocab.num_bins = 64
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1, width=16)
  c.model.feature_levels = ('c4', 'c5')
  c.model.d_model = 32
  c.model.transformer.update(num_layers=2, num_heads=2, ffn_dim=64)
  c.optim.learning_rate = 5e-4
  c.optim.num_train_steps = 2
  c.optim.decay_steps = (1200,)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.evals.batch_size = 8
  c.evals.num_examples = 8
  return c
