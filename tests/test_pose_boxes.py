"""Boxes cut again from a decoded pose (`inference/pose_boxes.py`)."""

import numpy as np

from kpseq_jax.inference import pose_boxes
from kpseq_jax.inference import predictor as predictor_lib


def test_pose_box_is_the_import_rule_on_present_keypoints_only():
  """25% of the extent + 16 px a side (data_prep/multi_animal.py), clipped
  to the image; NaN rows and keypoints predicted absent do not count."""
  kp = np.array([[100., 200.], [300., 260.], [np.nan, np.nan], [900., 900.]])
  absent = np.array([False, False, False, True])
  np.testing.assert_allclose(pose_boxes.pose_box(kp, absent, 1000, 1000),
                             [34., 169., 332., 122.])
  kp[0] = [10., 200.]  # Padding past the left edge is clipped.
  np.testing.assert_allclose(pose_boxes.pose_box(kp, absent, 1000, 1000),
                             [0., 169., 300. + 0.25 * 290 + 16, 122.])
  one = np.array([True, False, True, True])
  assert pose_boxes.pose_box(kp, one, 1000, 1000) is None


class _ShiftedPoses:
  """A stand-in keypoint stage: each crop's pose is the truth moved by a
  tenth of the box centre's offset from the truth's centre, so the pose
  depends on the box, as a real model's does. Row 1 is all absent."""

  batch_size = 4  # Both rows in one call.

  def __init__(self, truth):
    self.truth, self.calls = truth, 0

  def crop(self, image, box, category_id):
    del image, category_id
    return dict(box=np.asarray(box, np.float64))

  def predict_crops(self, exs):
    self.calls += 1
    kp = []
    for i, ex in enumerate(exs):
      x, y, w, h = ex['box']
      centre = self.truth[i].mean(axis=0)
      kp.append(self.truth[i] + 0.1 * (np.array([x + w / 2, y + h / 2])
                                       - centre))
    kp = np.stack(kp)
    presence = np.ones(kp.shape[:2], np.float32)
    presence[1] = 0.0
    return predictor_lib.Prediction(
        keypoints=kp, num_keypoints=np.full(len(kp), kp.shape[1]),
        keypoints_px=kp, confidence=presence,
        confidence_by_radius=presence[..., None], presence=presence)


def test_predict_recuts_each_box_from_its_pose_and_decodes_again():
  truth = np.array([[[200., 300.], [260., 340.], [230., 400.]],
                    [[600., 600.], [650., 640.], [700., 700.]]])
  boxes = np.array([[150., 250., 300., 300.], [500., 500., 300., 300.]])
  image = np.zeros([1000, 1000, 3], np.uint8)

  stage = _ShiftedPoses(truth)
  pred, out = pose_boxes.predict(stage, [image] * 2, boxes, [1, 1], 0)
  assert stage.calls == 1
  np.testing.assert_array_equal(out, boxes)
  first = pred.keypoints_px

  stage = _ShiftedPoses(truth)
  pred, out = pose_boxes.predict(stage, [image] * 2, boxes, [1, 1], 2)
  assert stage.calls == 3
  # Row 0: cut twice, each time from the pose of the box before.
  once = pose_boxes.pose_box(first[0], np.zeros(3, bool), 1000, 1000)
  x, y, w, h = once
  second = truth[0] + 0.1 * (np.array([x + w / 2, y + h / 2])
                             - truth[0].mean(axis=0))
  twice = pose_boxes.pose_box(second, np.zeros(3, bool), 1000, 1000)
  np.testing.assert_allclose(out[0], twice)
  assert np.abs(pred.keypoints_px[0] - truth[0]).max() < np.abs(
      first[0] - truth[0]).max()
  # Row 1 (every keypoint absent) keeps its box.
  np.testing.assert_array_equal(out[1], boxes[1])


class _FramePoses(_ShiftedPoses):
  """`_ShiftedPoses` whose truth is the frame's: frame f (all pixels f)
  holds animal f's pose."""

  def crop(self, image, box, category_id):
    del category_id
    return dict(box=np.asarray(box, np.float64), frame=int(image[0, 0, 0]))

  def predict_crops(self, exs):
    self.calls += 1
    kp = []
    for ex in exs:
      x, y, w, h = ex['box']
      truth = self.truth[ex['frame']]
      kp.append(truth + 0.1 * (np.array([x + w / 2, y + h / 2])
                               - truth.mean(axis=0)))
    kp = np.stack(kp)
    conf = np.ones(kp.shape[:2], np.float32)
    return predictor_lib.Prediction(
        keypoints=kp, num_keypoints=np.full(len(kp), kp.shape[1]),
        keypoints_px=kp, confidence=conf, confidence_by_radius=conf[..., None])


def test_video_analysis_recuts_each_box_on_its_own_frame():
  """`analyze._decode_batch` with ``pose_box_passes``: frame 0 has one box,
  frame 1 two; each box is cut again from the pose decoded on its own
  frame, and the batch's boxes become the re-cut ones."""
  from kpseq_jax.inference import analyze
  truth = np.array([[[200., 300.], [260., 340.], [230., 400.]],
                    [[600., 600.], [650., 640.], [700., 700.]]])
  stage = _FramePoses(truth)
  stage.pose_box_passes, stage.calibration, stage.box_range = 1, None, None
  frames = [np.full([1000, 1000, 3], f, np.uint8) for f in (0, 1)]
  boxes = [[(150., 250., 300., 300.)],
           [(500., 500., 300., 300.), (550., 520., 250., 250.)]]
  batch = analyze.video_lib.FrameBatch(start=0, frames=frames, boxes=boxes)
  batch.crops = [[stage.crop(f, b, 1) for b in bs]
                 for f, bs in zip(frames, boxes)]

  class Policy:
    def update(self, kp, lk, w, h):
      del kp, lk, w, h
  kp, _, _, _ = analyze._decode_batch(batch, stage, Policy(), 1, 3, 1000,
                                      1000)
  assert stage.calls == 2 and [len(k) for k in kp] == [1, 2]
  for f, (kp_f, boxes_f, first_boxes) in enumerate(zip(kp, batch.boxes,
                                                       boxes)):
    for pose, box, first in zip(kp_f, boxes_f, first_boxes):
      x, y, w, h = first
      first_pose = truth[f] + 0.1 * (np.array([x + w / 2, y + h / 2])
                                     - truth[f].mean(axis=0))
      want = pose_boxes.pose_box(first_pose, np.zeros(3, bool), 1000, 1000)
      np.testing.assert_allclose(box, want)
      x, y, w, h = want
      np.testing.assert_allclose(pose, truth[f] + 0.1 * (
          np.array([x + w / 2, y + h / 2]) - truth[f].mean(axis=0)))
