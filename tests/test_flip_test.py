"""Flip test: predictions averaged with the mirrored crop's (config.flip_test)."""

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


def test_predictor_flip_test_is_the_mean_of_crop_and_mirror(trained):
  """On real dlc_openfield eval crops and the 2-step model: flip test's
  keypoints equal the average of two plain decodes, of the crops and of
  the mirrored crops mapped back (left/right ears swapped)."""
  from kpseq_jax.data import dataset
  from kpseq_jax.data import pipeline
  from kpseq_jax.runtime import sharding
  config, workdir, _ = trained
  info = dataset.load_info(config.dataset_dir)
  perm = info.flip_permutations()[1]
  mesh = sharding.create_mesh(config.mesh_shape)
  model, state, _ = predictor_lib.restore_state(config, str(workdir), mesh,
                                                93)
  plain = predictor_lib.Predictor.from_state(config, model, state, mesh)
  flip_config = config.copy_and_resolve_references()
  flip_config.flip_test = True
  flipped = predictor_lib.Predictor.from_state(flip_config, model, state,
                                               mesh)
  batch = next(iter(pipeline.create_eval_batches(config, info)))
  a = plain.predict(batch)
  mirrored = dict(batch, image=np.ascontiguousarray(batch['image'][:, :, ::-1]))
  b = plain.predict(mirrored)
  back = b.keypoints[:, np.argsort(perm)].copy()
  back[..., 0] = 1 - back[..., 0]
  got = flipped.predict(batch)
  both = np.isfinite(a.keypoints) & np.isfinite(back)
  assert both.sum() >= 8  # The model decodes keypoints (not <eos> at once).
  np.testing.assert_allclose(got.keypoints[both],
                             ((a.keypoints + back) / 2)[both], atol=1e-5)
  assert not np.allclose(got.keypoints[both], a.keypoints[both])
  with pytest.raises(KeyError, match='category_id'):
    flipped.predict({k: v for k, v in batch.items() if k != 'category_id'})
