"""Category-agnostic pose (CAPE) on the DeepLabCut open-field mouse, 2 CPU
cores.

`configs/dlc_openfield.py`'s sizes as a support-conditioned model: every
training episode is one support frame and one query frame of the 93
training frames, asking for their 4 keypoints in a random order and a
random subset of 2 to 4 of them (the same in support and query), so the
model must follow the support. Evaluation: each of the 23 held-out frames
is a query once, with a support drawn from the training frames;
``--config.cape.eval_permuted=True`` asks for the keypoints in a random
order per episode. No reference-point refinement and no flip test
(measured without them: docs/cape.md).

Build the data set as for configs/dlc_openfield.py (README).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config('cape')
  c.max_num_keypoints = 4
  c.input.dataset_dir = 'data/dlc_openfield'
  # An episode encodes 2 crops: 8 episodes = 16 crops per step.
  c.input.batch_size = 8
  c.input.image_size_px = 128
  c.input.rotation_deg = 180.0
  c.vocab.num_bins = 128
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1)
  c.model.feature_levels = ('c3', 'c4', 'c5')
  c.model.d_model = 128
  c.model.transformer.update(num_layers=3, num_heads=4, ffn_dim=512)
  c.optim.learning_rate = 5e-4
  c.optim.num_train_steps = 1500
  c.optim.decay_steps = (1199,)
  c.cape.update(num_shots=1, support_split='train', permute_keypoints=True,
                min_keep_frac=0.5)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.evals.batch_size = 23
  c.evals.every_steps = 500
  return c
