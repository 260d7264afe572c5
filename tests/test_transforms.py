"""Top-down crop geometry, flip with left/right swap, tokenisation chain."""

import numpy as np
import pytest

from kpseq_jax.data import transforms
from kpseq_jax.sequence import vocab as vocab_lib


def _example(image=None):
  if image is None:
    image = np.zeros([100, 200, 3], np.uint8)
  return dict(
      image=image,
      bbox=np.array([50.0, 20.0, 40.0, 20.0], np.float32),
      keypoints=np.array([[60, 25, 2], [80, 25, 2], [70, 35, 1]], np.float32),
      category_id=7, image_id=3, annotation_id=11)


def test_crop_matrix_maps_the_enlarged_bbox_onto_the_crop():
  # bbox centre (70, 30), side 1.25 * 40 = 50 -> crop [45, 95] x [5, 55].
  m = transforms.crop_matrix(np.array([50, 20, 40, 20]), 100, 1.25)
  np.testing.assert_allclose(
      transforms.apply_affine(m, np.array([[45, 5], [95, 55], [70, 30]])),
      [[0, 0], [100, 100], [50, 50]], atol=1e-9)


def test_crop_affine_round_trip_with_rotation_scale_and_shift():
  m = transforms.crop_matrix(np.array([50, 20, 40, 20]), 64, 1.25, scale=0.8,
                             shift=(0.1, -0.05), rotation_deg=33.0)
  pts = np.array([[60.0, 25.0], [80.5, 25.25], [0.0, 0.0]])
  back = transforms.apply_affine(transforms.invert_affine(m),
                                 transforms.apply_affine(m, pts))
  np.testing.assert_allclose(back, pts, atol=1e-9)


def test_rotation_by_90_degrees_turns_right_into_up():
  m = transforms.crop_matrix(np.array([0, 0, 10, 10]), 10, 1.0,
                             rotation_deg=90.0)
  # A point right of the centre moves above it (counter-clockwise on screen).
  np.testing.assert_allclose(transforms.apply_affine(m, np.array([[8, 5]])),
                             [[5, 2]], atol=1e-9)


def test_warp_moves_image_content_with_the_keypoints():
  img = np.zeros([100, 200, 3], np.uint8)
  img[24:27, 79:82] = 255  # A bright spot around keypoint 1 at (80, 25).
  ex = transforms.CropAffine(100, 1.25).map(_example(img))
  ex = transforms.WarpToCrop(100).map(ex)
  kp = ex['keypoints_crop'][1, :2] * 100
  np.testing.assert_allclose(kp, [70.0, 40.0], atol=1e-4)  # (80-45)*2, (25-5)*2
  y, x = np.unravel_index(np.argmax(ex['image'][..., 0]), ex['image'].shape[:2])
  assert abs(x + 0.5 - kp[0]) <= 2.5 and abs(y + 0.5 - kp[1]) <= 2.5
  np.testing.assert_array_equal(ex['keypoints_crop'][:, 2], [2, 2, 1])


def test_warp_to_canvas_keeps_the_tokens_and_maps_the_crop_into_the_canvas():
  """PRTR end-to-end: the whole 200 x 100 image fits a 64 x 96 canvas at
  scale 0.48 (height 48); `memory_from_crop` takes each keypoint's crop
  (x, y) to where its bright spot is on the canvas, through a rotated,
  flipped, shifted crop."""
  img = np.zeros([100, 200, 3], np.uint8)
  img[20:31, 75:86] = 255  # A bright square around keypoint 1 at (80, 25).
  ex = _example(img)
  ex['crop_from_image'] = transforms.crop_matrix(
      ex['bbox'], 64, 1.25, scale=0.9, shift=(0.05, -0.1),
      rotation_deg=20.0).astype(np.float32)
  flip = np.array([[-1.0, 0.0, 64.0], [0.0, 1.0, 0.0], [0, 0, 1]])
  ex['crop_from_image'] = (flip @ np.concatenate(
      [ex['crop_from_image'], [[0, 0, 1]]]))[:2].astype(np.float32)
  crop = transforms.WarpToCrop(64).map(dict(ex))
  canvas = transforms.WarpToCanvas(64, (64, 96)).map(dict(ex))
  np.testing.assert_array_equal(canvas['keypoints_crop'],
                                crop['keypoints_crop'])
  assert canvas['image'].shape == (64, 96, 3)
  assert canvas['image'][48:].max() == 0  # Below the resized image.
  m = canvas['memory_from_crop'].astype(np.float64)
  xy = transforms.apply_affine(m, crop['keypoints_crop'][:, :2])  # [K, 2]
  # Canvas-normalised = image pixels * 0.48 / (96, 64).
  np.testing.assert_allclose(xy, ex['keypoints'][:, :2] * 0.48 / [96, 64],
                             atol=1e-5)
  x, y = xy[1] * [96, 64]
  assert canvas['image'][int(y), int(x), 0] > 200  # On the bright square.


def test_keypoint_outside_the_crop_becomes_unlabelled():
  ex = _example()
  ex['keypoints'][2] = [150, 90, 2]  # Outside the 50 px crop around the bbox.
  ex = transforms.WarpToCrop(100).map(transforms.CropAffine(100).map(ex))
  np.testing.assert_array_equal(ex['keypoints_crop'][:, 2], [2, 2, 0])


def test_flip_swaps_left_and_right_keypoints():
  perm = transforms.flip_permutation(3, [(0, 1)])
  np.testing.assert_array_equal(perm, [1, 0, 2])
  assert transforms.flip_permutation(3, []) is None
  flip = transforms.RandomFlip(100, {7: perm}, prob=1.0)
  ex = transforms.CropAffine(100).map(_example())
  ex = flip.random_map(ex, np.random.default_rng(0))
  ex = transforms.WarpToCrop(100).map(ex)
  # Unflipped crop x of kp0 (60, 25) is 30 and of kp1 (80, 25) is 70.
  # After the flip, row 0 is the old kp1 mirrored: x = 100 - 70 = 30.
  np.testing.assert_allclose(ex['keypoints_crop'][:, :2] * 100,
                             [[30, 40], [70, 40], [50, 60]], atol=1e-4)
  np.testing.assert_array_equal(ex['keypoints'][:, :2],
                                [[80, 25], [60, 25], [70, 35]])


def test_category_without_flip_pairs_is_never_flipped():
  flip = transforms.RandomFlip(100, {}, prob=1.0)
  ex = transforms.CropAffine(100).map(_example())
  before = ex['crop_from_image'].copy()
  ex = flip.random_map(ex, np.random.default_rng(0))
  np.testing.assert_array_equal(ex['crop_from_image'], before)


def test_random_crop_is_deterministic_given_the_rng_and_varies_with_it():
  t = transforms.RandomCropAffine(64, scale_range=(0.5, 1.5), shift_frac=0.2,
                                  rotation_deg=30)
  a = t.random_map(_example(), np.random.default_rng(1))['crop_from_image']
  b = t.random_map(_example(), np.random.default_rng(1))['crop_from_image']
  c = t.random_map(_example(), np.random.default_rng(2))['crop_from_image']
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_color_jitter_keeps_shape_and_dtype_and_changes_pixels():
  img = np.random.default_rng(0).integers(0, 255, [8, 8, 3], np.uint8)
  out = transforms.ColorJitter(0.5).random_map(dict(image=img.copy()),
                                               np.random.default_rng(3))
  assert out['image'].dtype == np.uint8 and out['image'].shape == (8, 8, 3)
  assert not np.array_equal(out['image'], img)
  same = transforms.ColorJitter(0.0).random_map(dict(image=img.copy()),
                                                np.random.default_rng(3))
  np.testing.assert_array_equal(same['image'], img)


def test_tokenize_pads_to_kmax_and_keeps_eval_fields():
  v = vocab_lib.Vocab(16)
  ex = transforms.WarpToCrop(32).map(transforms.CropAffine(32).map(_example()))
  out = transforms.Tokenize(v, max_num_keypoints=5).map(ex)
  assert out['input_tokens'].shape == (21,)
  assert out['keypoints'].shape == (5, 3)
  np.testing.assert_array_equal(out['keypoints'][3:], 0)
  assert int(out['num_keypoints']) == 3
  assert out['target_tokens'][12] == v.eos
  with pytest.raises(ValueError, match='max_num_keypoints'):
    transforms.Tokenize(v, max_num_keypoints=2).map(ex)


# (processes, local batch, batches): 23 frames in batches of 6 are 4
# batches; split 12/11 over 2 processes in batches of 11, 2 each (the second
# process's second batch holds 0 frames, padding only); split 8/8/7 over 3
# in batches of 7, 2 each (without padding whole batches the last process
# would have one batch fewer).
@pytest.mark.parametrize('num_processes,local_batch,expected', [
    (1, 6, 4), (2, 11, 2), (3, 7, 2)])
def test_eval_batches_have_the_same_count_on_every_process(
    dlc_dataset, monkeypatch, num_processes, local_batch, expected):
  from configs import smoke
  from kpseq_jax.data import dataset, pipeline
  config = smoke.get_config()
  config.input.dataset_dir = str(dlc_dataset)
  config.evals.num_examples = -1  # All 23 test frames.
  config.evals.batch_size = local_batch * num_processes
  info = dataset.load_info(config.input.dataset_dir)
  monkeypatch.setattr(pipeline.jax, 'process_count',
                      lambda: num_processes)
  counts, ids = [], []
  for p in range(num_processes):
    monkeypatch.setattr(pipeline.jax, 'process_index', lambda p=p: p)
    batches = list(pipeline.create_eval_batches(config, info, 'test'))
    counts.append(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == local_batch
      ids.extend(batch['annotation_id'][batch['valid'] > 0].tolist())
  assert counts == [expected] * num_processes
  assert sorted(ids) == sorted(set(ids)) and len(ids) == 23
