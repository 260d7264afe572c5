"""DeepLabCut reaching mouse (5 keypoints, the tongue mostly out of sight).

`configs/dlc_openfield.py`'s model and schedule (1,500 steps, x0.1 at step
1200) on `../shared/data/dlc_reaching` (42 train / 13 test frames of
832x747 and 640x470), with keypoint presence on: a missing DeepLabCut label
means the body part is not visible, so the data set is built with
``--unlabelled_means=absent`` and the tongue's unlabelled train frames are
``<absent>`` targets (pix2seq's INVISIBLE token). The camera is fixed and
sees the mouse from the side, so rotations stay small (+-15 degrees). A
moving average of the weights evaluates and predicts. Measurements and the
earlier variants' flags: docs/precision.md, docs/uncertainty.md.

Build the data set first:
  python -m data_prep.build --unlabelled_means=absent \
    --image-root ../shared/data/dlc_reaching/images \
    --annotations ../shared/data/dlc_reaching/annotations/train.json \
    --annotations ../shared/data/dlc_reaching/annotations/test.json \
    --out data/dlc_reaching
"""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.max_num_keypoints = 5
  c.input.dataset_dir = 'data/dlc_reaching'
  c.input.rotation_deg = 15.0  # Side view from a fixed camera: up stays up.
  c.vocab.presence_token = True
  c.optim.ema_decay = 0.995
  c.evals.batch_size = 13  # The 13 held-out frames.
  return c
