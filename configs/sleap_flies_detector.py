"""Two courting flies (SLEAP): the detector that finds every fly's box.

configs/dlc_openfield_detector.py's Deformable DETR on the 1024x1024 fly
frames resized to 256x256 (scale 0.25: a fly's box is about 45 px), every
labelled fly of a frame a target. configs/sleap_flies_centroid.py
(centre heatmaps) replaced it for configs/sleap_flies.py's boxes: higher
validation box AP, and it finds both flies on another recording, which this
one does not (docs/multi_animal.md sections 5 and 6).
Data set: as configs/sleap_flies.py.
"""

import ml_collections

from configs import dlc_openfield_detector


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield_detector.get_config()
  c.max_num_keypoints = 13
  c.input.dataset_dir = 'data/sleap_flies'
  c.detector.image_size_px = (256, 256)
  # The training frames' flies stay in one band of the arena (box centres
  # 426-500 px of 1024 high): crops (scale above 1) and vertical flips
  # move them over the whole canvas, so that another recording's flies
  # are found wherever they walk (docs/multi_animal.md).
  c.detector.scale_range = (0.75, 1.5)
  c.detector.vertical_flip_prob = 0.5
  # A detector trained on one recording repeats a box on one fly in
  # another (docs/multi_animal.md section 5): NMS at the usual 0.5 IoU.
  c.detector.nms_iou = 0.5
  c.optim.num_train_steps = 1200
  c.optim.decay_steps = (1000,)
  c.evals.split = 'val'
  c.evals.batch_size = 25
  c.evals.every_steps = 600
  return c
