"""DeepLabCut reaching mouse (5 keypoints, the tongue mostly out of sight).

`configs/dlc_openfield.py`'s model and schedule on
`../shared/data/dlc_reaching` (42 train / 13 test frames of 832x747 and
640x470), with keypoint presence on: a missing DeepLabCut label means the
body part is not visible, so the data set is built with
``--unlabelled_means=absent`` and the tongue's 29 unlabelled train frames
are ``<absent>`` targets (pix2seq's INVISIBLE token). The camera is fixed
and sees the mouse from the side, so rotations stay small (+-15 degrees
against the open field's 180).

Build the data set first:
  python -m data_prep.build --unlabelled_means=absent \
    --image-root ../shared/data/dlc_reaching/images \
    --annotations ../shared/data/dlc_reaching/annotations/train.json \
    --annotations ../shared/data/dlc_reaching/annotations/test.json \
    --out data/dlc_reaching

The same model without presence: --config.presence_token=False.

Precision (docs/precision.md, issue 19): reference-point refinement,
auxiliary losses on every decoder layer and ResNet layer1's stride-4 map as
a fourth memory level. Measured at 600 steps: 9.48 and 9.78 px mean error
(two seeds) against 11.60 px without them and 11.28 px with refinement and
auxiliary losses on strides 8-32 only; the step costs 1.15x. The
earlier model: --config.decoder_refine_points=False
--config.decoder_aux_loss=False "--config.feature_levels=('c3', 'c4', 'c5')".
"""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.dataset_dir = 'data/dlc_reaching'
  c.max_num_keypoints = 5
  c.presence_token = True
  c.rotation_deg = 15.0  # Side view from a fixed camera: up stays up.
  # A crop pixel is 2.6-6.6 image pixels here (boxes of 264-680 px at
  # 128 px crops): stride-4 features and per-layer refinement pay.
  c.decoder_refine_points = True
  c.decoder_aux_loss = True
  c.feature_levels = ('c2', 'c3', 'c4', 'c5')
  # 600 steps, learning rate x0.1 at step 480 (42 frames / batch 16 = 2
  # steps per epoch; steps_per_epoch rounds down): what docs/uncertainty.md
  # measured, about 30 min for two runs side by side on 2 CPU cores.
  c.num_train_steps = 600
  c.decay_epochs = (240,)
  c.eval_batch_size = 13
  c.eval_every_steps = 300
  return c
