"""PRTR's end-to-end keypoint stage at the model level: whole-image memory,
tokens in a box's frame (`Memory.from_crop`), in teacher forcing, in the
reference decoder and in the KV-cached decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.inference import decoding
from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib
from kpseq_jax.training import step as step_lib

KMAX = 3
LENGTH = grammar.seq_len(KMAX)
VOCAB = vocab_lib.Vocab(16)
# Two boxes of one 64 x 96 image each: the right half, and a small box at
# the top left; normalised crop (x, y) -> normalised image (x, y).
BOXES = np.array([[[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]],
                  [[0.25, 0.0, 0.05], [0.0, 0.3, 0.1]]], np.float32)


def _model(full_image_memory=True):
  return model_lib.KeypointSequenceModel(
      vocab=VOCAB, backbone_depth=18, feature_levels=('c4', 'c5'),
      d_model=32, num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0,
      max_seq_len=LENGTH, full_image_memory=full_image_memory)


@pytest.fixture(scope='module')
def setup():
  model = _model()
  image = jax.random.randint(jax.random.PRNGKey(3), [1, 64, 96, 3], 0, 255
                             ).astype(jnp.uint8)
  images = jnp.repeat(image, 2, axis=0)  # Both boxes in the same image.
  tokens = jnp.zeros([2, LENGTH], jnp.int32)
  coords = jnp.zeros([2, LENGTH])
  variables = jax.jit(lambda: model.init(
      jax.random.PRNGKey(0), images, tokens, coords, train=False,
      memory_from_crop=jnp.asarray(BOXES)))()
  # <eos> suppressed: every box decodes all KMAX groups.
  head = dict(variables['params']['class_head'])
  head['bias'] = head['bias'].at[VOCAB.eos].add(-1e4)
  variables = dict(variables,
                   params=dict(variables['params'], class_head=head))
  return model, variables, images


def test_the_box_frame_is_required_exactly_when_the_model_reads_whole_images(
    setup):
  model, variables, images = setup
  tokens, coords = jnp.zeros([2, LENGTH], jnp.int32), jnp.zeros([2, LENGTH])
  with pytest.raises(ValueError, match='memory_from_crop is missing'):
    model.apply(variables, images, tokens, coords, train=False)
  with pytest.raises(ValueError, match='memory_from_crop is given'):
    _model(False).apply(variables, images, tokens, coords, train=False,
                        memory_from_crop=jnp.asarray(BOXES))
  assert model_lib.FROM_CROP_FIELD in step_lib.train_fields(model)
  assert model_lib.FROM_CROP_FIELD in decoding.input_fields(model)
  assert model_lib.FROM_CROP_FIELD not in decoding.input_fields(_model(False))


def test_cached_and_reference_decoders_agree_inside_each_box(setup):
  """Both decoders read the box frame at every step: the same tokens and
  coordinates; another box of the same image decodes something else."""
  model, variables, images = setup
  inputs = {'image': images,
            model_lib.FROM_CROP_FIELD: jnp.asarray(BOXES)}
  ref = jax.jit(lambda v, x: decoding.greedy_decode(model, v, x, KMAX))(
      variables, inputs)
  cached = jax.jit(lambda v, x: decoding.cached_greedy_decode(
      model, v, x, KMAX))(variables, inputs)
  np.testing.assert_array_equal(cached['tokens'], ref['tokens'])
  np.testing.assert_allclose(cached['keypoints'], ref['keypoints'], atol=1e-6)
  assert np.all(np.asarray(ref['num_keypoints']) == KMAX)
  # Same image, two boxes: different inputs to the decoder.
  assert not np.allclose(ref['keypoints'][0], ref['keypoints'][1])
  # The identity frame is the top-down model (same parameters).
  tokens = jnp.asarray(ref['tokens'])
  coords = jnp.full(tokens.shape, 0.3)
  identity = jnp.tile(jnp.eye(2, 3)[None], (2, 1, 1))
  whole = jax.jit(lambda v: model.apply(v, images, tokens, coords, False,
                                        memory_from_crop=identity))(variables)
  crop = jax.jit(lambda v: _model(False).apply(v, images, tokens, coords,
                                               False))(variables)
  np.testing.assert_allclose(whole[0], crop[0], atol=1e-5)
  np.testing.assert_allclose(whole[1], crop[1], atol=1e-6)


def test_end_to_end_stage_trains_and_evaluates_on_real_frames(dlc_dataset,
                                                              tmp_path):
  """keypoint_stage='end_to_end': whole 640 x 480 frames on a 96 x 128
  canvas, the tokens in each mouse's jittered crop; 2 train steps, then
  the usual evaluation (PCK from crop_from_image, overlays warped out of
  the canvas)."""
  import json
  from conftest import smoke_config
  from kpseq_jax import train
  config = smoke_config(dlc_dataset, keypoint_stage='end_to_end',
                        detector_image_size_px=(96, 128))
  report = train.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / 'eval_test.json').read_text())
  assert saved['checkpoint_step'] == 2 and saved['num_instances'] == 8
  assert report.num_instances == 8
  assert 0 <= report.pck <= 1 and np.isfinite(report.mean_error_px)
  steps = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').open()]
  assert all(np.isfinite(s['loss']) for s in steps if 'loss' in s)
