"""Two courting flies (SLEAP, 13 nodes): the keypoint stage of each fly.

Top-down crops of each labelled fly (the other fly is often inside the
crop: the hard case) from `../shared/data/sleap_flies` as
docs/multi_animal.md builds it: `clip` frames 0-1196 for training and
1200-1496 for validation (every 4th), `two_flies` as the test set. The
open-field model (configs/dlc_openfield.py) with 13 keypoints, keypoint
presence (a leg hidden under the body is unlabelled: ``<absent>``), a
moving average of the weights, and any rotation (seen from above).
Boxes at test time come from configs/sleap_flies_centroid.py (chosen over
configs/sleap_flies_detector.py on validation box AP, docs/multi_animal.md
section 6).

Build the data set first (docs/multi_animal.md): every training frame
(chosen over every 4th on the validation frames' OKS AP, docs/multi_animal.md
section 5):
  python -m data_prep.build --slp ../shared/data/sleap_flies/clip.slp \
    --slp test=../shared/data/sleap_flies/two_flies.slp \
    --slp_split train=0:0.8,val=0.8:1 --every_nth_frame train=1,val=4 \
    --out data/sleap_flies_dense
"""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.max_num_keypoints = 13
  c.input.dataset_dir = 'data/sleap_flies_dense'
  c.vocab.presence_token = True
  c.optim.ema_decay = 0.995
  c.optim.num_train_steps = 1500
  c.optim.decay_steps = (1200,)
  c.evals.split = 'val'  # Settings are chosen here; test is reported once.
  c.evals.batch_size = 25
  c.evals.every_steps = 500
  # Poses from detected boxes: each box cut again from its pose twice
  # (chosen on the validation frames, docs/multi_animal.md section 7).
  c.decode.pose_box_passes = 2
  return c
