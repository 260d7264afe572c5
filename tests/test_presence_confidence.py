"""Keypoint presence (<absent>) and per-keypoint confidence, issue 16.

Sequence layout of absent keypoints, the decoders' presence decision and
confidence (cached = reference), and the data set property that says what
v = 0 means.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import conftest
from kpseq_jax.inference import decoding
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 3
BINS = 16
VOCAB = vocab_lib.Vocab(BINS, presence=True)
LENGTH = grammar.seq_len(KMAX)
BATCH = 2


def test_absent_token_shifts_only_categories():
  plain, pres = vocab_lib.Vocab(10, 3), vocab_lib.Vocab(10, 3, presence=True)
  assert pres.absent == 16 and pres.category(0) == 17 == plain.category(0) + 1
  assert pres.vocab_size == plain.vocab_size + 1
  assert (pres.pad, pres.eos, pres.nocoord) == (plain.pad, plain.eos,
                                                plain.nocoord)
  with pytest.raises(ValueError, match='no <absent>'):
    _ = plain.absent


def test_absent_keypoint_is_a_target_and_an_input():
  """<coord> <absent> <absent> <sep>: CE targets, inputs, no L1; an
  unlabelled keypoint not known absent stays <nocoord> with no target."""
  kps = np.array([[0.5, 0.5, 2], [0, 0, 0], [0, 0, 0]], np.float32)
  absent = np.array([False, True, False])
  s = grammar.build_sequence(kps, 3, VOCAB, KMAX, absent=absent)
  x1, y1 = (grammar.position(1, grammar.X, 0),
            grammar.position(1, grammar.Y, 0))
  assert s['target_tokens'][x1] == s['target_tokens'][y1] == VOCAB.absent
  assert s['token_weights'][x1] == s['token_weights'][y1] == 1
  assert s['coord_weights'][x1] == s['coord_weights'][y1] == 0
  assert s['input_tokens'][x1 + 1] == s['input_tokens'][y1 + 1] == VOCAB.absent
  x2 = grammar.position(2, grammar.X, 0)
  assert s['token_weights'][x2] == 0
  assert s['input_tokens'][x2 + 1] == VOCAB.nocoord
  # A labelled keypoint is never absent, whatever the mask says.
  s2 = grammar.build_sequence(kps, 3, VOCAB, KMAX,
                              absent=np.array([True, True, False]))
  x0 = grammar.position(0, grammar.X, 0)
  assert s2['target_tokens'][x0] == VOCAB.quantize(np.float32(0.5))
  with pytest.raises(ValueError, match='without'):
    grammar.build_sequence(kps, 3, vocab_lib.Vocab(BINS), KMAX, absent=absent)


def test_coordinate_mass_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=[4, BINS + 6]).astype(np.float32)
  bins = np.array([0, 5, 15, 8], np.int32)
  mass = np.asarray(decoding.coordinate_mass(jnp.asarray(logits),
                                             jnp.asarray(bins), BINS))
  p = np.exp(logits[:, :BINS]) / np.exp(logits[:, :BINS]).sum(-1,
                                                               keepdims=True)
  for i, b in enumerate(bins):
    for j, r in enumerate(decoding.CONFIDENCE_RADII_BINS):
      want = p[i, max(b - r, 0):b + r + 1].sum()
      np.testing.assert_allclose(mass[i, j], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def model():
  return conftest.tiny_model(
      vocab=VOCAB, resnet=dict(depth=18), feature_levels=('c5',), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0),
      max_seq_len=LENGTH)


def _variables(model, absent_bias):
  images = jax.random.randint(jax.random.PRNGKey(7), [BATCH, 64, 64, 3], 0,
                              255).astype(jnp.uint8)
  variables = model.init(jax.random.PRNGKey(0), images,
                         jnp.zeros([BATCH, LENGTH], jnp.int32),
                         jnp.zeros([BATCH, LENGTH]), train=False)
  params = jax.tree.map(lambda x: x, variables['params'])
  head = dict(params['class_head'])
  bias = head['bias'].at[VOCAB.eos].add(-1e4)  # Decode all KMAX groups.
  head['bias'] = bias.at[VOCAB.absent].add(absent_bias)
  return dict(variables, params=dict(params, class_head=head)), images


def _check_against_the_model(model, variables, images, out):
  """The decoded keypoints, confidence and presence are what one
  teacher-forced pass over the decoded sequence gives, computed here by
  hand: at group g's x (y) target position, the keypoint is the clipped
  regression output, the confidence at radius r the product over x and y
  of the softmax mass over the coordinate bins within r bins of the
  emitted bin, and the presence 1 - P(<absent>) at x (softmax over the
  bins and <absent>)."""
  tokens = np.asarray(out['tokens'])
  kps = np.asarray(out['keypoints'])
  coords = np.zeros(tokens.shape, np.float32)
  tx = [grammar.position(g, grammar.X, 0) for g in range(KMAX)]
  ty = [grammar.position(g, grammar.Y, 0) for g in range(KMAX)]
  coords[:, np.add(tx, 1)], coords[:, np.add(ty, 1)] = kps[..., 0], kps[..., 1]
  logits, xy = model.apply(variables, images, jnp.asarray(tokens),
                           jnp.asarray(coords), train=False)
  logits = np.asarray(logits, np.float64)
  xy = np.clip(np.asarray(xy, np.float64), 0.0, 1.0)

  def mass(step_logits, value):  # [R] by a direct sum.
    p = np.exp(step_logits[:BINS] - step_logits[:BINS].max())
    p /= p.sum()
    b = int(VOCAB.quantize(np.float32(value)))
    return np.array([p[max(b - r, 0):b + r + 1].sum()
                     for r in decoding.CONFIDENCE_RADII_BINS])

  for i in range(BATCH):
    for g in range(KMAX):
      lx, ly = logits[i, tx[g]], logits[i, ty[g]]
      np.testing.assert_allclose(kps[i, g], [xy[i, tx[g], 0], xy[i, ty[g], 1]],
                                 atol=1e-4)
      np.testing.assert_allclose(
          out['confidence'][i, g], mass(lx, kps[i, g, 0]) * mass(
              ly, kps[i, g, 1]), atol=1e-4)
      absent = special.expit(lx[VOCAB.absent] -
                             special.logsumexp(lx[:BINS]))
      np.testing.assert_allclose(out['presence'][i, g], 1.0 - absent,
                                 atol=1e-4)


@pytest.mark.parametrize('absent_bias', [-1e4, 1e4, 'mixed'])
def test_decoders_agree_on_presence_and_confidence(model, absent_bias):
  """Cached and reference decoders emit the same tokens, coordinates,
  presence and confidence; a strong <absent> bias makes every group
  <coord> <absent> <absent> <sep> with presence 0 and keypoints still
  decoded; a strong negative one none."""
  bias = 0.0 if absent_bias == 'mixed' else absent_bias
  variables, images = _variables(model, bias)
  if absent_bias == 'mixed':
    # Shift <absent> to between the two crops' margins at the first x step:
    # the first group is absent in one crop and present in the other.
    tokens = jnp.full([BATCH, LENGTH], VOCAB.pad).at[:, 0].set(
        VOCAB.bos).at[:, 1].set(VOCAB.coord)
    logits, _ = model.apply(variables, images, tokens,
                            jnp.zeros([BATCH, LENGTH]), train=False)
    p = np.asarray(decoding.absent_probability(logits[:, 1], VOCAB))
    margin = np.log(p) - np.log1p(-p)
    variables, _ = _variables(model, -float(margin.sum()) / 2)
  ref = decoding.greedy_decode(model, variables, {'image': images}, KMAX)
  cached = decoding.cached_greedy_decode(model, variables, {'image': images},
                                         KMAX)
  for key in ('tokens', 'num_keypoints'):
    np.testing.assert_array_equal(cached[key], ref[key])
  for key in ('keypoints', 'confidence', 'presence'):
    np.testing.assert_allclose(cached[key], ref[key], rtol=0, atol=1e-5)
  tokens = np.asarray(ref['tokens'])
  presence = np.asarray(ref['presence'])
  _check_against_the_model(model, variables, images, ref)
  xs = [grammar.position(g, grammar.X, 0) + 1 for g in range(KMAX)]
  ys = [grammar.position(g, grammar.Y, 0) + 1 for g in range(KMAX)]
  is_absent = tokens[:, xs] == VOCAB.absent
  np.testing.assert_array_equal(tokens[:, ys] == VOCAB.absent, is_absent)
  np.testing.assert_array_equal(is_absent, presence < 0.5)
  if absent_bias == 1e4:
    assert is_absent.all() and np.all(presence < 1e-3)
  elif absent_bias == -1e4:
    assert not is_absent.any() and np.all(presence > 0.999)
  else:
    assert sorted(is_absent[:, 0]) == [False, True]


# --- Data: what v = 0 means, recorded by data_prep and carried to eval. ---


def _hidden_openfield(shared_data, tmp_path, seed=0, frac=0.25):
  """dlc_openfield's test file with a random quarter of the keypoints
  hidden (x = y = v = 0), built with ``unlabelled_means='absent'``.

  Returns (data set dir, hidden bool [N, 4] in annotation order, names)."""
  import json
  from data_prep import build
  src = shared_data / 'dlc_openfield' / 'annotations'
  rng = np.random.default_rng(seed)
  files = {}
  hidden = None
  for split in ('train', 'test'):
    d = json.loads((src / f'{split}.json').read_text())
    if split == 'test':
      kps = np.array([a['keypoints'] for a in d['annotations']],
                     np.float64).reshape(len(d['annotations']), 4, 3)
      hidden = rng.uniform(size=kps.shape[:2]) < frac
      hidden[:, 0] &= ~hidden[:, 1:].all(axis=1)  # Keep one labelled.
      kps[hidden] = 0.0
      for a, k, h in zip(d['annotations'], kps, hidden):
        a['keypoints'] = k.reshape(-1).tolist()
        a['num_keypoints'] = int((k[:, 2] > 0).sum())
    path = tmp_path / f'{split}.json'
    path.write_text(json.dumps(d))
    files[split] = path
    names = d['categories'][0]['keypoints']
  out = tmp_path / 'data'
  build.build_dataset(files, shared_data / 'dlc_openfield' / 'images', out,
                      unlabelled_means='absent')
  return out, hidden, names


def test_hidden_keypoints_reach_the_targets_and_the_presence_report(
    shared_data, tmp_path):
  """Keypoints hidden at random in real dlc_openfield frames: the data set
  records that v = 0 means absent, the eval batches mark exactly those
  keypoints absent, their targets are <absent>, and presence metrics score
  an oracle perfectly and an always-present model 0 F1 on 'absent'."""
  from kpseq_jax.data import dataset
  from kpseq_jax.data import pipeline
  from kpseq_jax.evaluation import uncertainty
  data_dir, hidden, names = _hidden_openfield(shared_data, tmp_path)
  info = dataset.load_info(str(data_dir))
  assert info.unlabelled_means == 'absent'
  config = conftest.smoke_config(data_dir, **{'vocab.presence_token': True},
                                 max_num_keypoints=4, **{'evals.batch_size': 8,
                                                     'evals.split': 'test'})
  vocab = vocab_lib.from_config(config)
  absent, ids, parts, oracle = [], [], [], []
  for batch in pipeline.create_eval_batches(config, info):
    keep = batch['valid'] > 0
    b = {k: v[keep] for k, v in batch.items()}
    absent.append(b['keypoint_absent'])
    ids.extend(b['annotation_id'].tolist())
    xs = [grammar.position(g, grammar.X, 0) for g in range(4)]
    np.testing.assert_array_equal(
        b['target_tokens'][:, xs] == vocab.absent, b['keypoint_absent'] > 0)
    gt_xy = b['keypoints'][..., :2]
    conf = np.ones(gt_xy.shape[:2] + (len(decoding.CONFIDENCE_RADII_BINS),))
    parts.append(uncertainty.arrays(b, gt_xy, conf, np.ones(gt_xy.shape[:2]),
                                    None))
    oracle.append(uncertainty.arrays(b, gt_xy, conf,
                                     1.0 - b['keypoint_absent'], None))
  absent = np.concatenate(absent) > 0
  import json
  ann_ids = [a['id'] for a in json.loads(
      (tmp_path / 'test.json').read_text())['annotations']]
  want = hidden[[ann_ids.index(i) for i in ids]]
  np.testing.assert_array_equal(absent, want)
  assert want.sum() > 5
  concat = lambda ps: {k: np.concatenate([p[k] for p in ps]) for k in ps[0]}
  res = uncertainty.presence_section(concat(parts), info)
  best = uncertainty.presence_section(concat(oracle), info)
  assert res['overall']['absent']['f1'] == 0.0
  assert res['overall']['absent']['support'] == int(want.sum())
  assert best['overall']['absent']['f1'] == 1.0
  assert best['overall']['accuracy'] == 1.0
  assert list(best['per_keypoint']) == names


def test_presence_needs_a_data_set_that_knows_absence(
    dlc_dataset, mp100_sample_dataset, tmp_path):
  """presence_token on a data set whose v = 0 means 'unknown' (the COCO
  default, as the MP-100 sample is built) is refused before training,
  naming the fix."""
  import conftest
  from data_prep import build
  from kpseq_jax.data import dataset
  from kpseq_jax.training import config_checks
  ann = conftest.SHARED_DATA / 'dlc_openfield' / 'annotations'
  info = dataset.load_info(str(mp100_sample_dataset))
  assert info.unlabelled_means == 'unknown'
  with pytest.raises(ValueError, match='--unlabelled_means=absent'):
    config_checks.check_dataset(conftest.smoke_config(
        mp100_sample_dataset, **{'vocab.presence_token': True},
        max_num_keypoints=68), info)
  # The session's dlc_openfield data set says "absent": accepted.
  config_checks.check_dataset(
      conftest.smoke_config(dlc_dataset, **{'vocab.presence_token': True}),
      dataset.load_info(str(dlc_dataset)))
  with pytest.raises(ValueError, match='unlabelled_means'):
    build.build_dataset({'test': ann / 'test.json'},
                        conftest.SHARED_DATA / 'dlc_openfield' / 'images',
                        tmp_path / 'bad', unlabelled_means='invisible')


def test_sigma_errors_name_the_category_and_field(dlc_dataset, tmp_path):
  """A sigma list of the wrong length at data_prep, and a category left
  without sigmas when the default is switched off, stop with the category
  and the field named (before training: the Evaluator is built first)."""
  import conftest
  from data_prep import build
  from kpseq_jax.data import dataset
  from kpseq_jax.evaluation import evaluate
  ann = conftest.SHARED_DATA / 'dlc_openfield' / 'annotations'
  images = conftest.SHARED_DATA / 'dlc_openfield' / 'images'
  with pytest.raises(ValueError, match=r'1:mouse_topview.*oks_sigmas.*4'):
    build.build_dataset({'test': ann / 'test.json'}, images, tmp_path / 'a',
                        oks_sigmas={'1': [0.1, 0.1]}, oks_sigmas_source='s.json')
  with pytest.raises(ValueError, match='no category id or name'):
    build.build_dataset({'test': ann / 'test.json'}, images, tmp_path / 'b',
                        oks_sigmas={'rat': [0.1] * 4})
  out = tmp_path / 'c'
  build.build_dataset({'test': ann / 'test.json'}, images, out,
                      oks_sigmas={'mouse_topview': [0.05] * 4})
  info = dataset.load_info(str(out))
  assert info.categories[1].oks_sigmas == (0.05,) * 4
  evaluate.from_config(conftest.smoke_config(
      out, **{'evals.oks_default_sigma': 0.0, 'input.train_split': 'test',
              'evals.split': 'test'}),
                       info)
  with pytest.raises(ValueError, match='mouse_topview'):
    evaluate.from_config(
        conftest.smoke_config(dlc_dataset, **{'evals.oks_default_sigma': 0.0}),
        dataset.load_info(str(dlc_dataset)))


def test_absent_keypoints_are_v0_in_results_and_hollow_in_overlays():
  from PIL import Image
  from kpseq_jax.data import visualize
  from kpseq_jax.inference import results
  pred = np.array([[[10.0, 10.0], [30.0, 30.0]]])
  out = results.coco_results(pred, [2], [5], [1],
                             keypoint_scores=np.array([[0.9, 0.3]]),
                             presence=np.array([[0.8, 0.1]]))[0]
  assert out['keypoints'] == [10.0, 10.0, 1.0, 30.0, 30.0, 0.0]
  assert out['keypoint_presence'] == [0.8, 0.1]
  # mmpose bbox_keypoint: mean of the visible keypoints' scores above 0.2.
  assert out['score'] == pytest.approx(0.9)
  canvas = Image.new('RGB', (40, 40))
  kps = np.array([[10.0, 10.0, 1.0], [30.0, 30.0, 1.0]])
  drawn = np.asarray(visualize.draw_pose(canvas, kps, radius=4,
                                         absent=np.array([False, True])))
  colors = visualize.keypoint_colors(2)
  assert tuple(drawn[10, 10]) == colors[0]  # Present: a filled disc.
  assert tuple(drawn[30, 30]) == (0, 0, 0)  # Absent: hollow ...
  assert tuple(drawn[30, 34]) == colors[1] or tuple(drawn[30, 33]) == colors[1]


def test_a_keypoint_not_generated_is_a_miss_with_confidence_zero():
  """<eos> before the category's K: the labelled keypoints left out count
  in the calibration as misses with confidence 0 (not NaN, not skipped)."""
  from kpseq_jax.evaluation import uncertainty
  gt = np.array([[[10.0, 10.0, 2], [20.0, 20.0, 2]]])
  batch = dict(keypoints=gt, bbox=np.array([[0.0, 0.0, 40.0, 40.0]]),
               category_id=np.array([1]), image_id=np.array([1]),
               num_keypoints=np.array([2]))
  pred = np.array([[[10.0, 10.0], [np.nan, np.nan]]])  # b not generated.
  conf = np.full([1, 2, len(decoding.CONFIDENCE_RADII_BINS)], 0.9)
  conf[0, 1] = np.nan
  d = uncertainty.arrays(batch, pred, conf, None, None)
  radius = decoding.CONFIDENCE_RADII_BINS.index(2)
  c = uncertainty.calibration_section(d, radius)['alpha_0.2']
  assert c['num'] == 2 and c['accuracy'] == 0.5
  assert c['mean_confidence'] == pytest.approx(0.45)
  assert c['auroc'] == 1.0
