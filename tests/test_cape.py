"""Category-agnostic pose: support-conditioned model, episodes, evaluation."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from data_prep import episodes as episodes_lib
from kpseq_jax.data import episodes
from kpseq_jax.inference import decoding
from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 4
SHOTS = 2
BATCH = 3
LENGTH = grammar.seq_len(KMAX)


@pytest.fixture(scope='module')
def cape_model():
  """A tiny support-conditioned model, its variables and an episode batch
  asking for 4, 2 and 3 keypoints; <eos> would win every group start if
  the grammar did not force K."""
  model = conftest.tiny_model(
      'cape', vocab=vocab_lib.Vocab(16), resnet=dict(depth=18),
      feature_levels=('c4', 'c5'), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=LENGTH, proposals=True)
  rng = np.random.default_rng(0)
  visible = rng.uniform(size=[BATCH, SHOTS, KMAX]) > 0.3
  visible[0, :, 1] = False  # Keypoint 1 of episode 0: no shot sees it.
  inputs = dict(
      image=rng.integers(0, 255, [BATCH, 64, 64, 3], np.uint8),
      support_image=rng.integers(0, 255, [BATCH, SHOTS, 64, 64, 3], np.uint8),
      support_keypoints=rng.uniform(0.1, 0.9, [BATCH, SHOTS, KMAX, 2]
                                    ).astype(np.float32),
      support_visible=visible.astype(np.float32),
      num_keypoints=np.array([4, 2, 3], np.int32))
  support = model_lib.SupportSet.from_batch(
      {k: jnp.asarray(v) for k, v in inputs.items()})
  # Compiled whole: op by op (eager), the ResNet's initialisation took
  # about three times as long.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), jnp.asarray(inputs['image']),
      jnp.zeros([BATCH, LENGTH], jnp.int32), jnp.zeros([BATCH, LENGTH]),
      support=support)
  head = dict(variables['params']['class_head'])
  head['bias'] = head['bias'].at[model.vocab.eos].add(1e4)
  variables = dict(variables, params=dict(variables['params'],
                                          class_head=head))
  return model, variables, inputs


def _encoder(model):
  """`decoding._encode` compiled (the same computation in every test that
  calls it: the persistent compilation cache compiles it once)."""
  return jax.jit(lambda v, x: decoding._encode(model, v, x))


def test_cached_decoder_matches_the_reference_and_makes_k_groups(cape_model):
  model, variables, inputs = cape_model
  ref = jax.jit(lambda v, x: decoding.greedy_decode(model, v, x, KMAX))(
      variables, inputs)
  cached = jax.jit(lambda v, x: decoding.cached_greedy_decode(
      model, v, x, KMAX))(variables, inputs)
  np.testing.assert_array_equal(ref['num_keypoints'], [4, 2, 3])
  np.testing.assert_array_equal(cached['tokens'], ref['tokens'])
  np.testing.assert_allclose(cached['keypoints'], ref['keypoints'],
                             rtol=0, atol=1e-6)
  kps = np.asarray(ref['keypoints'])
  assert np.all(np.isfinite(kps[1, :2])) and np.all(np.isnan(kps[1, 2:]))
  vocab = model.vocab
  tokens = np.asarray(ref['tokens'])
  assert tokens[1, grammar.position(2, grammar.COORD, 0) + 1] == vocab.eos


def test_prefill_and_steps_match_teacher_forcing(cape_model):
  """The support prefix written once to the cache, then one token per
  step, gives decode()'s outputs at every position."""
  model, variables, inputs = cape_model
  rng = np.random.default_rng(1)
  kps = np.concatenate([rng.uniform(size=[BATCH, KMAX, 2]),
                        np.ones([BATCH, KMAX, 1])], -1).astype(np.float32)
  seqs = [grammar.build_sequence(k, int(n), model.vocab, KMAX)
          for k, n in zip(kps, inputs['num_keypoints'])]
  tokens = jnp.asarray(np.stack([s['input_tokens'] for s in seqs]))
  coords = jnp.asarray(np.stack([s['input_coords'] for s in seqs]))
  enc = _encoder(model)(variables, inputs)
  logits, xy = model.apply(variables, enc.memory, tokens, coords, train=False,
                           prefix=enc.prefix, method=model.decode)
  step_model = model.for_cached_decoding()
  projected = step_model.apply(variables, enc.memory,
                               method=step_model.project_values)
  cache = decoding.init_cache(step_model, variables, enc.memory, BATCH,
                              LENGTH, enc.prefix)
  cache_length = KMAX + LENGTH
  _, mutated = step_model.apply({**variables, 'cache': cache}, projected,
                                enc.prefix, cache_length,
                                method=step_model.prefill, mutable=['cache'])
  cache = mutated['cache']
  # One compiled step for every position (op by op it took most of the
  # test's time); ``cache_length`` is a shape, so static.
  decode_step = jax.jit(functools.partial(
      step_model.apply, method=step_model.decode_step, mutable=['cache']),
                        static_argnums=5)
  for t in range(LENGTH):
    (lt, xyt), mutated = decode_step(
        {**variables, 'cache': cache}, projected, tokens[:, t], coords[:, t],
        jnp.int32(t), cache_length, enc.prefix)
    cache = mutated['cache']
    np.testing.assert_allclose(lt, logits[:, t], rtol=0, atol=1e-5)
    np.testing.assert_allclose(xyt, xy[:, t], rtol=0, atol=1e-6)


def test_support_features_pool_visible_shots_and_zero_unseen(cape_model):
  model, variables, inputs = cape_model
  encode = _encoder(model)
  enc = encode(variables, inputs)
  feats = np.asarray(enc.prefix.features)
  np.testing.assert_array_equal(feats[0, 1], 0.0)  # No shot sees it.
  seen = inputs['support_visible'].sum(axis=1) > 0
  assert np.all(np.abs(feats[seen]).sum(-1) > 0)
  np.testing.assert_array_equal(np.asarray(enc.prefix.valid),
                                np.arange(KMAX)[None] < [[4], [2], [3]])
  # A shot that does not see a keypoint does not change its feature.
  changed = dict(inputs, support_keypoints=inputs['support_keypoints'].copy())
  hidden = inputs['support_visible'] == 0
  changed['support_keypoints'][hidden] = 0.5
  again = encode(variables, changed)
  np.testing.assert_allclose(again.prefix.features, feats, atol=1e-6)


def test_proposals_are_the_centre_of_the_matching_cell(cape_model):
  """Support feature k equal to query memory cell j_k (one-hot features,
  identity projections): the proposal is cell j_k's centre."""
  model, variables, _ = cape_model
  d = model.d_model
  shapes = ((2, 3),)  # Cells in row-major order: centres (x, y).
  cells = [1, 5, 3]  # (1.5/3, 0.5/2), (2.5/3, 1.5/2), (0.5/3, 1.5/2)
  features = jnp.eye(6, d)[None] * 30.0  # [1, 6, D]
  memory = model_lib.Memory(features=features, spatial_shapes=shapes)
  prefix = model_lib.SupportPrefix(features=features[:, cells],
                                   valid=jnp.ones([1, 3], bool))
  identity = {'kernel': jnp.eye(d), 'bias': jnp.zeros(d)}
  params = dict(variables['params'], proposal_query=identity,
                proposal_key=identity)
  got = model.apply(dict(variables, params=params), memory, prefix,
                    method=model.propose)
  np.testing.assert_allclose(
      got[0], [[1.5 / 3, 0.5 / 2], [2.5 / 3, 1.5 / 2], [0.5 / 3, 1.5 / 2]],
      atol=1e-4)


def test_prefix_is_bidirectional_and_hidden_from_nothing_it_should_see():
  from kpseq_jax.models.decoder import self_attention_mask
  valid = jnp.array([[True, True, False]])
  mask = np.asarray(self_attention_mask(jnp.arange(6), valid, 6))[0, 0]
  np.testing.assert_array_equal(mask, [
      [1, 1, 0, 0, 0, 0],   # Prefix sees the valid prefix only.
      [1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],   # (padding rows too: their outputs are unused)
      [1, 1, 0, 1, 0, 0],   # Sequence: valid prefix + causal.
      [1, 1, 0, 1, 1, 0],
      [1, 1, 0, 1, 1, 1]])
  causal = np.asarray(self_attention_mask(jnp.arange(3), None, 3))[0, 0]
  np.testing.assert_array_equal(causal, np.tril(np.ones([3, 3])))


def _instance(cat, ann, kps, size=64):
  return dict(image=np.zeros([size, size, 3], np.uint8),
              keypoints=np.asarray(kps, np.float32),
              keypoints_crop=np.asarray(kps, np.float32) / [size, size, 1],
              bbox=np.array([0, 0, size, size], np.float32),
              crop_from_image=np.eye(2, 3, dtype=np.float32),
              category_id=cat, image_id=ann, annotation_id=ann)


def test_tokenize_episode_permutes_support_and_query_alike():
  query = _instance(7, 1, [[8, 8, 2], [16, 8, 2], [24, 8, 2], [32, 8, 2]])
  support = _instance(7, 2, [[8, 40, 2], [16, 40, 0], [24, 40, 2],
                             [32, 40, 2]])
  t = episodes.TokenizeEpisode(vocab_lib.Vocab(64), max_num_keypoints=5,
                               permute=True)
  rng = np.random.default_rng(3)
  order = episodes.keypoint_order(4, np.random.default_rng(3), True, 1.0)
  out = t.random_map({'query': query, 'supports': [support]}, rng)
  assert sorted(order) == [0, 1, 2, 3] and list(order) != [0, 1, 2, 3]
  np.testing.assert_array_equal(out['keypoint_order'], list(order) + [-1])
  assert int(out['num_keypoints']) == 4
  # Group g asks for keypoint order[g], in the support and the query.
  np.testing.assert_allclose(out['support_keypoints'][0, :4] * 64,
                             np.array(support['keypoints'])[order, :2])
  np.testing.assert_allclose(out['keypoints'][:4, :2],
                             np.array(query['keypoints'])[order, :2])
  # Keypoint 1 is unlabelled in the support: no loss, no metric for it.
  g = list(order).index(1)
  assert out['support_visible'][0, g] == 0
  assert out['keypoints'][g, 2] == 0
  x_pos = grammar.position(g, grammar.X, 0)
  assert out['coord_weights'][x_pos] == 0
  assert out['input_tokens'][x_pos + 1] == vocab_lib.Vocab(64).nocoord
  others = [grammar.position(i, grammar.X, 0) for i in range(4) if i != g]
  np.testing.assert_array_equal(out['coord_weights'][others], 1)
  # The proposals' targets: the query keypoints per group, same mask.
  np.testing.assert_allclose(out['query_keypoints'][:4] * 64,
                             np.array(query['keypoints'])[order, :2])
  np.testing.assert_array_equal(out['query_keypoint_weights'],
                                [float(i != g) for i in range(4)] + [0])
  np.testing.assert_array_equal(out['support_annotation_ids'], [2])


def test_subsampling_keeps_between_the_fraction_and_all():
  rng = np.random.default_rng(0)
  sizes = {len(episodes.keypoint_order(10, rng, True, 0.5))
           for _ in range(300)}
  assert sizes == set(range(5, 11))
  assert len(episodes.keypoint_order(10, rng, False, 1.0)) == 10


def test_training_episodes_are_class_balanced_and_from_one_category():
  pool = episodes_lib.EpisodePool(
      category_ids=(5, 6, 9),
      annotation_ids={5: (50, 51, 52, 53), 6: (60, 61), 9: (90,)},
      clean_bbox={})
  index = {a: a - 40 for ids in ((50, 51, 52, 53), (60, 61), (90,))
           for a in ids}
  eps = episodes.TrainEpisodes.from_pool(pool, index, num_shots=1)
  assert eps.category_ids == (5, 6) and eps.skipped == {9: 1}
  assert len(eps) == 2 * 4  # Every category as often as the largest.
  draw = episodes.DrawEpisode(eps)
  rng = np.random.default_rng(0)
  for slot in range(len(eps)):
    e = draw.random_map(slot, rng)
    members = eps.records[eps.category_ids[slot // 4]]
    picked = e['supports'] + [e['query']]
    assert set(picked) <= set(members) and len(set(picked)) == 2
  with pytest.raises(ValueError, match='no category has 6 instances'):
    episodes.TrainEpisodes.from_pool(pool, index, num_shots=5)


def test_supports_from_another_split_cover_every_query_once():
  query = episodes_lib.EpisodePool((1,), {1: (10, 11, 12)}, {})
  support = episodes_lib.EpisodePool((1,), {1: (20, 21)}, {})
  got = episodes_lib.supports_for_each_query(query, support, 1, seed=0)
  assert [s[-1] for s in got.samples] == [10, 11, 12]
  assert all(s[0] in (20, 21) for s in got.samples)
  with pytest.raises(episodes_lib.InsufficientInstancesError,
                     match='category 1 has 2'):
    episodes_lib.supports_for_each_query(query, support, 3)


@pytest.fixture(scope='module')
def cape_run(dlc_dataset, tmp_path_factory):
  """The smoke config as a CAPE model trained 2 steps on dlc_openfield
  episodes, evaluated on the test frames with training-frame supports."""
  from kpseq_jax import train
  workdir = tmp_path_factory.mktemp('cape_run')
  config = conftest.smoke_config(dlc_dataset, **{'model_name': 'cape'},
                                 **{'cape.support_split': 'train'})
  from kpseq_jax.evaluation import report as report_lib
  report = report_lib.EvalReport.from_dict(
      train.train_and_evaluate(config, str(workdir))['test'])
  return config, workdir, report


def test_cape_training_and_episode_evaluation(cape_run, shared_data):
  config, workdir, report = cape_run
  assert report.num_instances == config.evals.num_examples == 8
  assert report.pck_protocol.startswith('MP-100 CAPE, 1-shot episodes')
  assert report.baseline.startswith('support pose')
  lines = (workdir / 'episodes_test.jsonl').read_text().splitlines()
  test_ids = [a['id'] for a in json.loads(
      (shared_data / 'dlc_openfield' / 'annotations' / 'test.json'
       ).read_text())['annotations']]
  train_ids = {a['id'] for a in json.loads(
      (shared_data / 'dlc_openfield' / 'annotations' / 'train.json'
       ).read_text())['annotations']}
  samples = [json.loads(l) for l in lines]
  # Every test frame is a query once, its support a training frame.
  assert sorted(s[1] for s in samples) == sorted(test_ids)
  assert all(s[0] in train_ids for s in samples)
  preds = json.loads((workdir / 'predictions_test.json').read_text())
  assert len(preds) == 8 and all(len(p['keypoints']) == 12 for p in preds)


def test_no_category_information_reaches_the_cape_model(cape_run):
  """The decoder reads no category field: the same episodes with other
  category ids decode to the same keypoints."""
  from kpseq_jax.data import dataset
  from kpseq_jax.evaluation import protocols
  from kpseq_jax.inference import predictor
  from kpseq_jax.runtime import sharding
  config, workdir, _ = cape_run
  info = dataset.load_info(config.input.dataset_dir)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, _ = predictor.restore_variables(config, str(workdir),
                                                    mesh)
  assert model.vocab.num_categories == 0 and model.support_conditioning
  assert 'category_token' not in decoding.input_fields(model)
  p = predictor.Predictor(config, model, variables, mesh)
  batch = next(iter(protocols.Episodes(config, info, 'test').batches()))
  other = dict(batch, category_id=batch['category_id'] + 17)
  np.testing.assert_array_equal(p.predict(batch).keypoints,
                                p.predict(other).keypoints)


def _mp100_cape_config(dataset_dir, num_shots):
  from configs import mp100
  c = mp100.get_config()
  c.input.dataset_dir = str(dataset_dir)
  c.cape.num_shots = num_shots
  c.optim.num_train_steps = 2
  c.input.image_size_px = 64
  c.vocab.num_bins = 64
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1)
  c.model.d_model = 32
  c.model.transformer.update(num_heads=2, num_layers=1, ffn_dim=64)
  c.evals.batch_size = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.cape.update(num_episodes=1, num_queries=2)
  return c


def _check_episode_report(report, workdir, sizes, num_shots):
  """The report covers exactly the categories big enough for an episode of
  ``num_shots`` supports and 2 queries, and names the others."""
  big = sorted(c for c, n in sizes.items() if n >= num_shots + 2)
  small = sorted(c for c, n in sizes.items() if n < num_shots + 2)
  assert big and small  # The sample has both kinds at 1 and 5 shots.
  assert report.num_instances == 2 * len(big)
  assert report.pck_protocol.startswith(f'MP-100 CAPE, {num_shots}-shot')
  assert sorted(int(n.split(':')[0]) for n in report.per_category_pck) == big
  assert len(report.notes) == len(small)
  assert all(f'category {s} skipped' in ' '.join(report.notes)
             for s in small)
  samples = [json.loads(l) for l in
             (workdir / 'episodes_test.jsonl').read_text().splitlines()]
  assert len(samples) == report.num_instances
  assert all(len(s) == num_shots + 1 for s in samples)
  mpck_at = [report.pck_curve.alphas.index(a)
             for a in (0.05, 0.1, 0.15, 0.2, 0.25)]
  assert report.mpck == pytest.approx(
      np.mean([report.pck_curve.pck[i] for i in mpck_at]))


def test_mp100_cape_path_on_the_sample_images(mp100_sample_dataset,
                                              tmp_path):
  """Build, train 2 steps on 1-shot episodes, evaluate MP-100's episode
  protocol at 1 shot and (the same checkpoint, --mode eval) at 5 shots,
  1 episode x 2 queries per category here; categories too small for an
  episode stop the run before training, or are skipped and named."""
  from kpseq_jax import train
  from kpseq_jax.data import dataset
  from kpseq_jax.evaluation import evaluate
  info = dataset.load_info(str(mp100_sample_dataset))
  pool = info.episode_pools['test']
  sizes = {c: len(pool.annotation_ids[c]) for c in pool.category_ids}
  small = min(c for c, n in sizes.items() if n < 3)
  c = _mp100_cape_config(mp100_sample_dataset, 1)
  with pytest.raises(episodes_lib.InsufficientInstancesError,
                     match=f'category {small} has {sizes[small]}'):
    train.train_and_evaluate(c, str(tmp_path / 'strict'))
  assert not (tmp_path / 'strict' / 'checkpoints').exists()  # Nothing ran.
  c.cape.skip_small_categories = True
  workdir = tmp_path / 'run'
  from kpseq_jax.evaluation import report as report_lib
  report = report_lib.EvalReport.from_dict(
      train.train_and_evaluate(c, str(workdir))['test'])
  _check_episode_report(report, workdir, sizes, 1)
  c.cape.num_shots = 5
  report5 = report_lib.EvalReport.from_dict(
      evaluate.evaluate(c, str(workdir))['test'])
  _check_episode_report(report5, workdir, sizes, 5)
  assert report5.checkpoint_step == report.checkpoint_step == 2
