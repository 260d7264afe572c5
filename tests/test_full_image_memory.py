"""PRTR's end-to-end keypoint stage at the model level: whole-image memory,
tokens in a box's frame (`Memory.from_crop`), in teacher forcing, in the
reference decoder and in the KV-cached decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
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
  return conftest.tiny_model(
      'end_to_end' if full_image_memory else 'supervised',
      vocab=VOCAB, resnet=dict(depth=18), feature_levels=('c4', 'c5'),
      d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=LENGTH)


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
  with pytest.raises(TypeError, match='memory_from_crop'):  # Crops only.
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


def test_an_image_encoded_once_serves_all_its_boxes(setup):
  """``memory_from_crop`` [M, N, 2, 3] (one encoder pass per image) decodes
  what [M x N, 2, 3] with the image repeated per box decodes, in the
  cached and in the reference decoder."""
  model, variables, images = setup
  for decoder in (decoding.cached_greedy_decode, decoding.greedy_decode):
    decode = jax.jit(lambda v, x, d=decoder: d(model, v, x, KMAX))
    per_box = decode(variables, {
        'image': images, model_lib.FROM_CROP_FIELD: jnp.asarray(BOXES)})
    grouped = decode(variables, {
        'image': images[:1],
        model_lib.FROM_CROP_FIELD: jnp.asarray(BOXES)[None]})
    np.testing.assert_array_equal(grouped['tokens'], per_box['tokens'])
    np.testing.assert_allclose(grouped['keypoints'], per_box['keypoints'],
                               atol=1e-6)


def test_canvas_batcher_groups_boxes_by_image_and_keeps_their_order(setup):
  """`batchers.CanvasBatcher` (the end-to-end stage's inference): boxes of
  two images, grouped into rows of one image's boxes over several padded
  calls, come back in the order given and equal to one box per call."""
  import ml_collections
  from kpseq_jax.inference import batchers
  from kpseq_jax.inference import predictor as predictor_lib
  from kpseq_jax.runtime import sharding
  model, variables, _ = setup
  config = ml_collections.ConfigDict(dict(
      max_num_keypoints=KMAX, model_name='end_to_end',
      input=dict(image_size_px=64, bbox_scale=1.25),
      decode=dict(confidence_radius_bins=2, flip_test=False,
                  pose_box_passes=0),
      evals=dict(batch_size=2), detector=dict(image_size_px=(64, 96))))
  mesh = sharding.create_mesh((1, 1))
  batcher = batchers.make_batcher(config, predictor_lib.Predictor(
      config, model, jax.device_put(variables), mesh), {})
  assert isinstance(batcher, batchers.CanvasBatcher)
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 255, [120, 180, 3], np.uint8),
            rng.integers(0, 255, [90, 90, 3], np.uint8)]
  boxes = [(0, (10, 20, 60, 50)), (1, (5, 5, 40, 70)), (0, (100, 30, 70, 80)),
           (0, (0, 0, 180, 120)), (1, (50, 10, 30, 30))]
  exs = [batcher.crop(frames[i], b, 0) for i, b in boxes]
  assert exs[0]['image'] is exs[2]['image'] is exs[3]['image']
  grouped = batcher.predict_crops(exs)  # Rows [0, 2], [3], [1, 4].
  alone = [batcher.predict_crops([ex]) for ex in exs]
  for i, one in enumerate(alone):
    np.testing.assert_allclose(grouped.keypoints[i], one.keypoints[0],
                               atol=1e-6)
    np.testing.assert_allclose(grouped.keypoints_px[i], one.keypoints_px[0],
                               atol=1e-4)
  # The crop frame is the two-stage crop's: pixels come back in the box.
  top_down = batchers.CropBatcher(config, batcher.predictor, {})
  for ex, (_, bbox) in zip(exs, boxes):
    np.testing.assert_allclose(
        ex['crop_from_image'],
        top_down.crop(frames[0], bbox, 0)['crop_from_image'], atol=1e-5)
  assert len({tuple(np.round(k[0], 4)) for k in grouped.keypoints}) == 5


def test_end_to_end_stage_trains_evaluates_and_predicts_on_real_frames(
    dlc_dataset, shared_data, tmp_path):
  """model_name='end_to_end': whole 640 x 480 frames on a 96 x 128
  canvas, the tokens in each mouse's jittered crop; 2 train steps, then
  the usual evaluation (PCK from crop_from_image, overlays warped out of
  the canvas), then --mode predict from a boxes file."""
  import json
  from conftest import smoke_config
  from kpseq_jax import train
  config = smoke_config(dlc_dataset, **{'model_name': 'end_to_end'},
                        **{'detector.image_size_px': (96, 128)})
  from kpseq_jax.evaluation import report as report_lib
  report = report_lib.EvalReport.from_dict(
      train.train_and_evaluate(config, str(tmp_path))['test'])
  saved = json.loads((tmp_path / 'eval_test.json').read_text())
  assert saved['checkpoint_step'] == 2 and saved['num_instances'] == 8
  assert report.num_instances == 8
  assert 0 <= report.pck <= 1 and np.isfinite(report.mean_error_px)
  steps = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').open()]
  assert all(np.isfinite(s['loss']) for s in steps if 'loss' in s)
  # --mode predict on the same model: two boxes on each of two frames, one
  # encoder pass per frame (`batchers.CanvasBatcher`), keypoints in pixels.
  from kpseq_jax.inference import predict
  images = shared_data / 'dlc_openfield' / 'images'
  ann = json.loads((shared_data / 'dlc_openfield' / 'annotations' /
                    'test.json').read_text())
  names = {i['id']: i['file_name'] for i in ann['images'][:2]}
  dets = [dict(image_id=a['image_id'], file_name=names[a['image_id']],
               category_id=a['category_id'],
               bbox=list(np.add(a['bbox'], shift)), score=1.0)
          for a in ann['annotations'] if a['image_id'] in names
          for shift in ([0, 0, 0, 0], [30, -20, 10, 10])]
  (tmp_path / 'dets.json').write_text(json.dumps(dets))
  summary = predict.predict(config, str(tmp_path), str(images),
                            str(tmp_path / 'predicted'),
                            str(tmp_path / 'dets.json'))
  assert (summary.num_images, summary.num_boxes) == (2, 4)
  results = json.loads((tmp_path / 'predicted' / 'predictions.json'
                        ).read_text())
  xy = np.array([r['keypoints'] for r in results]).reshape(4, -1, 3)[..., :2]
  assert np.all(np.isfinite(xy)) and np.all(xy >= -1) and np.all(
      xy[..., 0] <= 641) and np.all(xy[..., 1] <= 481)
  assert not np.allclose(xy[0], xy[1])  # Each box decodes its own pose.
