"""Flip test: predictions averaged with the mirrored crop's
(config.decode.flip_test)."""

import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.inference import predictor as predictor_lib


def _decoded(keypoints, confidence=None, presence=None):
  kps = np.asarray(keypoints, np.float32)
  out = {'keypoints': kps, 'num_keypoints': np.full(len(kps), kps.shape[1]),
         'confidence': (np.ones(kps.shape[:2] + (2,), np.float32)
                        if confidence is None else confidence)}
  if presence is not None:
    out['presence'] = np.asarray(presence, np.float32)
  return out


def test_average_mirrors_back_and_permutes_left_right():
  # A mouse: snout, left ear, right ear, tail base; flip pairs (1, 2).
  truth = np.array([[0.2, 0.5], [0.3, 0.4], [0.3, 0.6], [0.8, 0.5]])
  perm = np.array([0, 2, 1, 3])
  # The mirrored crop's ideal prediction: x -> 1 - x, row k = row perm[k].
  mirror = truth[perm].copy()
  mirror[:, 0] = 1 - mirror[:, 0]
  err = np.array([[0.02, -0.01]] * 4)
  decoded = _decoded(np.stack([truth + err, truth + err]),
                     presence=[[0.9, 0.8, 0.7, 0.6]] * 2)
  # Opposite errors in the mirror's frame (x error mirrored too).
  mirror_err = mirror + err[perm] * np.array([1, -1])
  conf = np.ones([2, 4, 2], np.float32)
  conf[:, 1] = 0.5  # The mirror's row 1 is the original's row 2.
  mirror_decoded = _decoded(np.stack([mirror_err, mirror_err]), conf,
                            presence=[[0.9, 0.2, 0.7, 0.6]] * 2)
  inverse = np.stack([np.argsort(perm), np.arange(4)]).astype(np.int32)
  out = predictor_lib.flip_test_average(
      decoded, mirror_decoded, inverse, np.array([True, False]))
  np.testing.assert_allclose(out['keypoints'][0], truth, atol=1e-6)
  # Row 1 is not flipped: its own prediction stays.
  np.testing.assert_allclose(out['keypoints'][1], truth + err, atol=1e-6)
  np.testing.assert_allclose(out['confidence'][0, :, 0], [1, 1, 0.75, 1])
  np.testing.assert_allclose(out['presence'][0], [0.9, 0.75, 0.45, 0.6])
  np.testing.assert_array_equal(out['num_keypoints'], [4, 4])


def test_average_keeps_the_crop_prediction_where_the_mirror_has_none():
  decoded = _decoded([[[0.2, 0.5], [0.4, 0.4]]])
  mirror = _decoded([[[0.8, 0.5], [np.nan, np.nan]]])
  out = predictor_lib.flip_test_average(
      decoded, mirror, np.array([[0, 1]], np.int32), np.array([True]))
  np.testing.assert_allclose(out['keypoints'][0], [[0.2, 0.5], [0.4, 0.4]])


def _column_decoder(model, variables, inputs, max_num_keypoints):
  """A stand-in decoder whose keypoints depend on which side of the crop is
  bright: x_k = the image's intensity-weighted mean column to the power
  k + 1, y_k = k / 10 (so a mirrored crop gives other keypoints)."""
  del model, variables
  img = inputs['image'].astype(jnp.float32).mean(-1)  # [B, S, S]
  s = img.shape[2]
  cols = (jnp.arange(s) + 0.5) / s
  mean_col = (img * cols).sum((1, 2)) / img.sum((1, 2))  # [B]
  k = jnp.arange(max_num_keypoints)
  x = mean_col[:, None] ** (k + 1.0)
  y = jnp.broadcast_to(k / 10.0, x.shape)
  b = img.shape[0]
  return {'keypoints': jnp.stack([x, y], -1),
          'num_keypoints': jnp.full([b], max_num_keypoints, jnp.int32),
          'confidence': jnp.ones([b, max_num_keypoints, 3]),
          'tokens': jnp.zeros([b, 1], jnp.int32)}


def test_predictor_flip_test_is_the_mean_of_crop_and_mirror(trained,
                                                           monkeypatch):
  """Real dlc_openfield eval crops through `Predictor`: with flip test the
  keypoints are the average of the crop's decode and the mirrored crop's,
  mapped back (x -> 1 - x, left/right ears swapped), for the mouse
  category. The decoder is a stand-in whose output depends on the
  crop's orientation by construction, so the test checks the plumbing
  (mirroring on the device, the permutation, the average, the category
  ids) whatever the 2-step model learnt."""
  from kpseq_jax.data import dataset
  from kpseq_jax.data import pipeline
  from kpseq_jax.inference import decoding
  from kpseq_jax.runtime import sharding
  monkeypatch.setattr(decoding, 'cached_greedy_decode', _column_decoder)
  config, workdir, _ = trained
  info = dataset.load_info(config.input.dataset_dir)
  perm = info.flip_permutations()[1]
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, _ = predictor_lib.restore_variables(config,
                                                        str(workdir), mesh)
  configs = {}
  for on in (False, True):
    configs[on] = config.copy_and_resolve_references()
    configs[on].decode.flip_test = on
  plain = predictor_lib.Predictor(configs[False], model, variables, mesh)
  flipped = predictor_lib.Predictor(configs[True], model, variables, mesh)
  batch = next(iter(pipeline.create_eval_batches(config, info)))
  a = plain.predict(batch).keypoints
  mirrored = dict(batch, image=np.ascontiguousarray(batch['image'][:, :, ::-1]))
  b = plain.predict(mirrored).keypoints
  back = b[:, np.argsort(perm)].copy()
  back[..., 0] = 1 - back[..., 0]
  assert np.abs(back - a).max() > 1e-2
  got = flipped.predict(batch)
  np.testing.assert_allclose(got.keypoints, (a + back) / 2, atol=1e-5)
  # Pixels come from the averaged crop coordinates.
  np.testing.assert_allclose(got.keypoints_px, predictor_lib.crop_to_image(
      (a + back) / 2, batch['crop_from_image'], config.input.image_size_px),
                             atol=1e-3)
  with pytest.raises(KeyError, match='category_id'):
    flipped.predict({k: v for k, v in batch.items() if k != 'category_id'})
