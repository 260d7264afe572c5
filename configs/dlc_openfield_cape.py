"""Category-agnostic pose on the DeepLabCut open-field mouse, on 2 CPU cores.

`configs/dlc_openfield.py` as a support-conditioned (CAPE) model: every
training episode is one support frame and one query frame of the 93
training frames, asking for their 4 keypoints in a random order and a
random subset of 2 to 4 of them (the same in support and query), so the
model cannot learn the mouse's keypoint order and must follow the
support. Evaluation: each of the 23 held-out frames is a query once, with
a support drawn from the training frames (the user's labels);
``--config.cape_eval_permuted=True`` asks for the keypoints in a random
order per episode.

Build the data set as for configs/dlc_openfield.py (README).
"""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.flip_test = False  # Support-conditioned decoding: no mirrored crop.
  c.decoder_refine_points = False  # Measured (docs/cape.md) without it.
  c.setting = 'cape'
  c.num_shots = 1
  c.cape_support_split = 'train'
  c.cape_permute_keypoints = True
  c.cape_min_keep_frac = 0.5
  # An episode encodes 2 crops: batch 8 episodes = 16 crops, the images per
  # step of configs/dlc_openfield.py (its step time grows faster than the
  # batch on this CPU).
  c.batch_size = 8
  c.decay_epochs = (109,)  # Step 1200 at 11 steps per epoch (93 / 8).
  return c
