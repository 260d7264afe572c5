"""The evaluator machinery (evaluation/common.py, evaluate.from_config): what
one writer makes of the pairs evaluators yield, and evaluators from config."""

import json

import numpy as np
import pytest

from kpseq_jax.evaluation import common


class _Fake:
  """An evaluator yielding ``pairs`` into report ``report``; counts the
  decodings it asks for."""

  def __init__(self, report, pairs, protocol=None):
    self.report, self.pairs, self.protocol = report, pairs, protocol

  def run(self, inputs):
    if self.protocol is not None:
      inputs.decoded(self.protocol)
    yield from self.pairs


class _Writer:
  """Records what `metric_writer.MetricWriter` would write."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars.update({(k, step): v for k, v in scalars.items()})

  def write_images(self, step, images):
    self.images.update({(k, step): v for k, v in images.items()})

  def flush(self):
    pass


def test_one_writer_makes_json_markdown_csv_files_and_tensorboard(tmp_path):
  image = np.zeros([4, 8, 3], np.uint8)
  written = []
  a = _Fake('test', [
      ('pck', 0.75), ('num_instances', 8), ('notes', ['x']),
      ('oks', {'ap': 0.5, 'per_category': {'1': {'ap': 0.5}}}),
      ('oks/ap', 0.5),  # A float of the section: TensorBoard, same place.
      ('table', common.Markdown('| a |\n')), ('table', common.Csv('a\n1\n')),
      ('crops', common.Images({'0': image})),
      ('out.txt', common.File(lambda p: written.append(p)))])
  b = _Fake('test', [('presence', None), ('oks', common.Markdown('## OKS'))])
  c = _Fake('test_boxes', [('ap', 0.25), ('step', 7)])
  writer = _Writer()
  out = common.run([('a', a), ('b', b), ('c', c)],
                   common.Inputs(None, None, 7), str(tmp_path), writer)
  want = {'pck': 0.75, 'num_instances': 8, 'notes': ['x'],
          'oks': {'ap': 0.5, 'per_category': {'1': {'ap': 0.5}}},
          'presence': None}
  assert out == {'test': want, 'test_boxes': {'ap': 0.25, 'step': 7}}
  saved = json.loads((tmp_path / 'eval_test.json').read_text())
  assert saved == want and list(saved) == list(want)  # Order kept.
  assert (tmp_path / 'eval_test.md').read_text() == '| a |\n\n## OKS\n'
  assert (tmp_path / 'eval_test.csv').read_text() == 'a\n1\n'
  assert not (tmp_path / 'eval_test_boxes.md').exists()
  assert written == [str(tmp_path / 'out.txt')]
  # Floats only (counts are not curves), tagged by report and path.
  assert writer.scalars == {('eval_test/pck', 7): 0.75,
                            ('eval_test/oks/ap', 7): 0.5,
                            ('eval_test_boxes/ap', 7): 0.25}
  assert list(writer.images) == [('crops/0', 7)]


def test_nesting_a_key_below_a_value_is_an_error():
  assert common.nest({'a/b/c': 1, 'a/d': 2}) == {'a': {'b': {'c': 1},
                                                        'd': 2}}
  with pytest.raises(ValueError, match="'a/b'.*'a' is already a value"):
    common.nest({'a': 1, 'a/b': 2})


def test_predictions_are_decoded_once_per_evaluation(monkeypatch):
  calls = []
  monkeypatch.setattr(common, 'decode',
                      lambda protocol, *_: calls.append(protocol) or 'd')
  p, q = object(), object()
  inputs = common.Inputs(None, None, None)
  for e in (_Fake('r', [], p), _Fake('r', [], p), _Fake('r', [], q)):
    list(e.run(inputs))
  assert calls == [p, q]
  list(_Fake('r', [], p).run(common.Inputs(None, None, None)))
  assert calls == [p, q, p]  # A new evaluation decodes again.


def test_evaluators_from_config(dlc_dataset):
  import conftest
  from kpseq_jax.data import dataset
  from kpseq_jax.evaluation import evaluate
  info = dataset.load_info(str(dlc_dataset))
  config = conftest.smoke_config(dlc_dataset)
  default = evaluate.from_config(config, info)
  assert [n for n, _ in default] == list(evaluate.KEYPOINT_EVALS)
  assert {e.report for _, e in default} == {'val'}  # evals.split.
  # One protocol (baseline computed once) shared by the keypoint evaluators.
  assert len({id(e.protocol) for _, e in default}) == 1
  config.evals.evaluators = {
      'strict_oks': {'type': 'oks', 'default_sigma': 0.05}, 'pck': {}}
  built = dict(evaluate.from_config(config, info, split='train'))
  assert list(built) == ['pck', 'strict_oks']  # By type: the report's order.
  assert built['strict_oks'].default_sigma == 0.05
  assert built['pck'].report == 'train'
  config.evals.evaluators = {'pck': {'type': 'pkc'}}
  with pytest.raises(ValueError, match="config.evals.evaluators.pck: unknown "
                     "evaluator type 'pkc'"):
    evaluate.from_config(config, info)
  config.evals.evaluators = {'pck': {'alpha': 0.1}}
  with pytest.raises(TypeError, match='alpha'):
    evaluate.from_config(config, info)
  # A detector adds the detected-boxes evaluator.
  config.evals.evaluators = {}
  with_detector = evaluate.from_config(config, info, detector=object())
  assert with_detector[-1][0] == 'detected_boxes'
  assert with_detector[-1][1].report == 'val_detected_boxes'
