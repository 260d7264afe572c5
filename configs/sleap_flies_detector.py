"""Two courting flies (SLEAP): the detector that finds every fly's box.

configs/dlc_openfield_detector.py's Deformable DETR on the 1024x1024 fly
frames resized to 256x256 (scale 0.25: a fly's box is about 45 px), every
labelled fly of a frame a target. Its boxes feed configs/sleap_flies.py in
`--mode analyze --max_animals 2` and in the detected-box evaluation.
Data set: as configs/sleap_flies.py.
"""

import ml_collections

from configs import dlc_openfield_detector


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield_detector.get_config()
  c.max_num_keypoints = 13
  c.input.dataset_dir = 'data/sleap_flies'
  c.detector.image_size_px = (256, 256)
  c.optim.num_train_steps = 1200
  c.optim.decay_steps = (1000,)
  c.evals.split = 'val'
  c.evals.batch_size = 25
  c.evals.every_steps = 600
  return c
