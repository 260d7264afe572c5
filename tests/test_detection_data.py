"""The detection stage's data and box AP (issue 18): whole images with every
instance, the canvas and its way back to image pixels, pycocotools' AP."""

import numpy as np
import pytest

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.evaluation import box_ap
from kpseq_jax.inference import box_predictor


def _element(image, bboxes, category_ids=None, image_id=7):
  bboxes = np.asarray(bboxes, np.float32)
  return {'image': image, 'bboxes': bboxes, 'image_id': image_id,
          'category_ids': np.asarray(category_ids or [1] * len(bboxes))}


def _xyxy(cxcywh):
  return np.concatenate([cxcywh[..., :2] - cxcywh[..., 2:] / 2,
                         cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)


def test_images_are_grouped_with_all_their_instances(mp100_sample_dataset):
  source = dataset.data_source(str(mp100_sample_dataset), 'test')
  groups = detection.image_groups(source)
  # mp100_sample: 19 images, 27 instances.
  assert len(groups) == 19
  assert sorted(i for g in groups for i in g) == list(range(len(source)))
  images = detection.ImageGroups(source, tuple(groups))
  for i, g in enumerate(groups):
    ex = images[i]
    assert {int(source[j]['image_id']) for j in g} == {int(ex['image_id'])}
    np.testing.assert_array_equal(
        ex['bboxes'], np.stack([source[j]['bbox'] for j in g]))
  assert max(len(g) for g in groups) > 1  # Several people or animals.


def test_canvas_boxes_map_back_to_the_image_boxes():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, [470, 640, 3], dtype=np.uint8)
  bboxes = [[10, 20, 100, 50], [300.5, 100, 200, 300]]
  t = detection.ResizeToCanvas((240, 320), {1: 0}, 4)
  ex = t.map(_element(image, bboxes))
  assert ex['image'].shape == (240, 320, 3)
  assert ex['box_valid'].tolist() == [True, True, False, False]
  np.testing.assert_allclose(ex['canvas_from_image'], [0.5, 0, 0])
  back = box_predictor.canvas_to_image(
      _xyxy(ex['boxes'])[None], (240, 320), ex['canvas_from_image'][None],
      ex['image_size'][None])[0]
  # Largest first.
  want = np.array([[300.5, 100, 500.5, 400], [10, 20, 110, 70]])
  np.testing.assert_allclose(back[:2], want, atol=0.01)


@pytest.mark.parametrize('seed', range(8))
def test_augmented_boxes_frame_the_object_on_the_canvas(seed):
  # A bright rectangle on black: after random scale (crops above 1), offset
  # and both flips, the target box is exactly where the bright pixels are
  # (clipped to the canvas; no box when none are left).
  image = np.zeros([300, 400, 3], np.uint8)
  image[50:150, 40:200] = 255
  t = detection.RandomResizeToCanvas((240, 320), {1: 0}, 2,
                                     scale_range=(0.5, 2.0), flip_prob=0.5,
                                     vertical_flip_prob=0.5)
  ex = t.random_map(_element(image, [[40, 50, 160, 100]]),
                    np.random.default_rng(seed))
  ys, xs = np.nonzero(ex['image'][..., 0] > 127)
  if not ex['box_valid'][0]:
    assert len(xs) == 0
    return
  x0, y0, x1, y1 = _xyxy(ex['boxes'][0]) * [320, 240, 320, 240]
  np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                             [x0, y0, x1, y1], atol=1.5)
  assert ex['box_valid'].tolist() == [True, False]


def test_crops_and_vertical_flips_move_an_object_over_the_canvas():
  # An object that sits in one band of every frame (as the flies of
  # sleap_flies' training frames, whose centres span 426-500 px of 1024)
  # reaches the whole canvas height only with crops and vertical flips.
  image = np.zeros([400, 400, 3], np.uint8)
  element = _element(image, [[180, 170, 40, 30]])
  def centres_y(**kw):
    t = detection.RandomResizeToCanvas((256, 256), {1: 0}, 2, flip_prob=0.5,
                                       **kw)
    rng = np.random.default_rng(0)
    exs = [t.random_map(element, rng) for _ in range(300)]
    return np.array([e['boxes'][0, 1] for e in exs if e['box_valid'][0]])
  fitting = centres_y(scale_range=(0.75, 1.0))
  assert fitting.min() > 0.3 and fitting.max() < 0.65
  cropped = centres_y(scale_range=(0.75, 2.0), vertical_flip_prob=0.5)
  assert cropped.min() < 0.15 and cropped.max() > 0.85


def test_only_the_largest_instances_fit_the_queries():
  image = np.zeros([100, 100, 3], np.uint8)
  bboxes = [[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 20, 20]]
  ex = detection.ResizeToCanvas((100, 100), {1: 0, 2: 1}, 2).map(
      _element(image, bboxes, [1, 2, 1]))
  np.testing.assert_allclose(ex['boxes'][:, 2], [0.5, 0.2])
  assert ex['labels'].tolist() == [1, 0]


def test_box_ap_is_pycocotools_figure():
  images = [{'id': 1, 'width': 100, 'height': 100},
            {'id': 2, 'width': 100, 'height': 100}]
  gt = [{'image_id': 1, 'category_id': 3, 'bbox': [10, 10, 40, 40]},
        {'image_id': 2, 'category_id': 3, 'bbox': [50, 50, 20, 30]}]
  exact = [dict(g, score=0.9) for g in gt]
  assert box_ap.box_ap(images, gt, exact, [3])['ap'] == pytest.approx(1.0)
  # IoU of the second box 0.6: counted at 0.5 .. 0.6, missed above.
  shifted = [exact[0], dict(exact[1], bbox=[50, 50, 20, 18])]
  got = box_ap.box_ap(images, gt, shifted, [3])
  assert got['ap50'] == pytest.approx(1.0)
  assert 0.5 < got['ap'] < 1.0
  assert box_ap.box_ap(images, gt, [], [3])['ap'] == 0.0



def test_nms_drops_a_repeated_box_on_one_animal_and_keeps_the_other():
  # Two boxes on fly A (IoU 0.68), one on fly B, one of another class on A.
  a, a_again = (100, 100, 50, 50), (105, 105, 50, 50)
  b = (400, 100, 50, 50)
  found = [(1, a, 0.9), (1, a_again, 0.8), (2, a_again, 0.7), (1, b, 0.6)]
  kept = box_predictor.non_maximum_suppression(found, 0.5)
  assert kept == [found[0], found[2], found[3]]  # Order kept; class apart.
  # A threshold above their IoU keeps both; 1 (the default) keeps all.
  assert box_predictor.non_maximum_suppression(found, 0.7) == found
  assert box_predictor.non_maximum_suppression(found, 1.0) == found
