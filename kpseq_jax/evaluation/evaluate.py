"""Evaluators built from ``config.evals.evaluators``; ``--mode eval``.

`from_config` builds the run's evaluators once, before training (the
keypoint protocol computes its baseline or draws its CAPE episodes there,
`protocols.py`, so a problem stops the run before anything is trained);
`common.run` runs them on a state: training every ``evals.every_steps``
and at the end, `evaluate` once on a restored workdir. Evaluator types
(``config.evals.evaluators.<name>.type``, default the name; the other keys
are the constructor's arguments, defaults from the run's config in
brackets):

  ``pck``: `pck.PCKEvaluator`; ``oks``: `uncertainty.OKSEvaluator`
    (``default_sigma`` [evals.oks_default_sigma], ``radius_bins``
    [decode.confidence_radius_bins]); ``calibration``:
    `uncertainty.CalibrationEvaluator` (``radius_bins``, ``hit_alpha``
    [calibration.hit_alpha]);
    ``pixel_accuracy``: `pck.PixelAccuracyEvaluator`; ``predictions``:
    `predictions.PredictionsEvaluator` (``image_size_px``
    [input.image_size_px]) -- all over the
    split's keypoint predictions, decoded once per evaluation;
  ``box_ap``: `box_ap.BoxAPEvaluator` (``score_threshold``
    [detector.score_threshold]), the detector's boxes;
  ``detected_boxes``: `detected_boxes.DetectedBoxesEvaluator`
    (``iou_threshold``, ``pck_alpha``), keypoints from a detector's boxes
    (needs ``detector``).

An empty ``config.evals.evaluators`` means the system's defaults
(`default_evals`).
Evaluators run in the order of the types above (the keys of
``eval_<split>.json`` and the sections of its Markdown in that order).
"""

from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.evaluation import box_ap
from kpseq_jax.evaluation import calibration_fit
from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import detected_boxes
from kpseq_jax.evaluation import pck
from kpseq_jax.evaluation import predictions
from kpseq_jax.evaluation import protocols
from kpseq_jax.evaluation import uncertainty
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import box_range
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import metric_writer as metric_writer_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.training import config_checks

KEYPOINT_EVALS = ('pck', 'oks', 'calibration', 'pixel_accuracy',
                  'predictions')


def default_evals(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The evaluators of a config with empty ``evals.evaluators``: box AP
  for the box models (`detection.BOX_MODELS`), else `KEYPOINT_EVALS` (in
  the order of the keys of ``eval_<split>.json``)."""
  if config.model_name in detection.BOX_MODELS:
    return {'box_ap': {'type': 'box_ap'}}
  return {name: {'type': name} for name in KEYPOINT_EVALS}


def _builders(config, info, split, detector) -> dict[str, Callable]:
  """Evaluator type -> f(**kwargs); the keypoint protocol built at most
  once, on first use, and shared."""
  shared = {}

  def keypoints(cls, **defaults):
    def build(**kw):
      if 'protocol' not in shared:
        shared['protocol'] = protocols.create(config, info, split)
      permuted = config.model_name == 'cape' and config.cape.eval_permuted
      name = split + ('_permuted' if permuted else '')
      return cls(shared['protocol'], info, name, **{**defaults, **kw})
    return build

  radius = config.decode.confidence_radius_bins
  return dict(
      pck=keypoints(pck.PCKEvaluator),
      oks=keypoints(uncertainty.OKSEvaluator,
                    default_sigma=config.evals.oks_default_sigma,
                    radius_bins=radius),
      calibration=keypoints(uncertainty.CalibrationEvaluator,
                            radius_bins=radius,
                            hit_alpha=config.calibration.hit_alpha),
      pixel_accuracy=keypoints(pck.PixelAccuracyEvaluator),
      predictions=keypoints(predictions.PredictionsEvaluator,
                            image_size_px=config.input.image_size_px),
      box_ap=lambda **kw: box_ap.BoxAPEvaluator(
          config, info, split, **{
              'score_threshold': config.detector.score_threshold, **kw}),
      detected_boxes=lambda **kw: detected_boxes.DetectedBoxesEvaluator(
          config, info, split, detector, **kw))


def from_config(config: ml_collections.ConfigDict, info: dataset.DatasetInfo,
                split: str | None = None,
                detector: box_predictor.ImageDetector | None = None
                ) -> list[tuple[str, Any]]:
  """(name, evaluator) of every ``config.evals.evaluators`` entry (module
  docstring).

  Args:
    config: the run's config.
    info: the data set's `DatasetInfo`.
    split: default ``config.evals.split``.
    detector: with it, ``detected_boxes`` is added to the evaluators.

  Raises:
    ValueError: an unknown evaluator type (naming it), or what an
      evaluator's constructor raises (e.g. a category without OKS sigmas).
  """
  split = split or config.evals.split
  specs = {k: dict(v) for k, v in
           (config.evals.get('evaluators') or default_evals(config)).items()}
  if detector is not None and not any(
      s.get('type', n) == 'detected_boxes' for n, s in specs.items()):
    specs['detected_boxes'] = {'type': 'detected_boxes'}
  builders = _builders(config, info, split, detector)
  kinds = {name: spec.pop('type', name) for name, spec in specs.items()}
  for name, kind in kinds.items():
    if kind not in builders:
      raise ValueError(f'config.evals.evaluators.{name}: unknown evaluator '
                       f'type {kind!r}; known: {sorted(builders)}.')
  # By type in `builders` order, whatever the order of the entries (a
  # ConfigDict sorts its keys): the report's keys and sections in one order.
  order = sorted(specs, key=lambda n: list(builders).index(kinds[n]))
  return [(name, builders[kinds[name]](**specs[name])) for name in order]


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             detector: box_predictor.ImageDetector | None = None
             ) -> dict[str, dict[str, Any]]:
  """``--mode eval``: restores the chosen checkpoint
  (`checkpointing.chosen_step`: best on validation, else the latest) and
  runs every evaluator on the report split (``config.evals.report_split``,
  'test'; the selection split when there is none), with the workdir's
  likelihood calibration when it has one for that step, applied with the
  training boxes' range (`box_range`: boxes out of it counted in the
  ``likelihood`` section, their calibrated likelihood 0), and
  ``detected_boxes`` with ``detector``.

  Returns:
    report name -> its JSON (`common.run`).

  Raises:
    FileNotFoundError: missing data set or checkpoint.
    ValueError: for an impossible config (see `config_checks`), or a
      damaged ``calibration.json``.
  """
  config_checks.check(config)
  info = dataset.load_info(config.input.dataset_dir)
  config_checks.check_dataset(config, info)
  selection, report, _ = config_checks.evaluation_splits(config, info)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  evaluators = from_config(config, info, report or selection,
                           detector=detector)
  model, variables, step = predictor_lib.restore_variables(config, workdir,
                                                           mesh)
  keypoints = config.model_name not in detection.BOX_MODELS
  predictor_cls = (predictor_lib.Predictor if keypoints
                   else box_predictor.BoxPredictor)
  predictor = predictor_cls(config, model, variables, mesh)
  calibration = likelihood.load(workdir, step) if keypoints else None
  boxes = box_range.from_config(config) if keypoints else None
  inputs = common.Inputs(predictor, predictor.variables, step, calibration,
                         boxes)
  with metric_writer_lib.MetricWriter(workdir) as writer:
    return common.run(evaluators, inputs, workdir, writer)


def calibrate_and_save(config: ml_collections.ConfigDict,
                       info: dataset.DatasetInfo, split: str, predictor,
                       variables, step: int, workdir: str
                       ) -> likelihood.CalibrationMap | None:
  """Decodes ``split`` with ``variables`` (checkpoint ``step``), fits the
  likelihood map on it (`calibration_fit.fit_decoded` with
  ``config.calibration``) and writes ``WORKDIR/calibration.json``
  (process 0). Returns the map, or None when the split is too small for
  one (a stale ``calibration.json`` of another step then stays unused:
  `likelihood.load` checks the step)."""
  protocol = protocols.create(config, info, split)
  decoded = common.decode(protocol, predictor, variables)
  cmap = calibration_fit.fit_decoded(
      decoded, config.calibration.hit_alpha, config.calibration.min_keypoints,
      step, split, config.calibration.method)
  if cmap is not None and jax.process_index() == 0:
    logging.info('Likelihood calibration -> %s',
                 likelihood.save(cmap, workdir))
  return cmap


def calibrate(config: ml_collections.ConfigDict, workdir: str
              ) -> likelihood.CalibrationMap | None:
  """``--mode calibrate``: fits the likelihood calibration of a trained
  workdir's chosen checkpoint on the selection split (``evals.split``,
  'val') and writes ``calibration.json`` (what training does after its
  last step; for workdirs trained before it, or after a new choice).

  Raises:
    ValueError: a detector config, or a data set without the selection
      split (names it and the fix).
    FileNotFoundError: missing data set or checkpoint.
  """
  config_checks.check(config)
  if config.model_name in detection.BOX_MODELS:
    raise ValueError('--mode calibrate calibrates keypoint likelihoods; '
                     f'model_name={config.model_name} has none.')
  info = dataset.load_info(config.input.dataset_dir)
  config_checks.check_dataset(config, info)
  selection, _, _ = config_checks.evaluation_splits(config, info)
  if selection is None:
    raise ValueError(
        f'--mode calibrate fits on the {config.evals.split!r} split '
        f'(evals.split), which {config.input.dataset_dir} does not have '
        f'({sorted(info.split_sizes)}); rebuild it with `python -m '
        'data_prep.build --val_fraction 0.1` (the frames held out must not '
        'be trained on: retrain on the rebuilt data set).')
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, step = predictor_lib.restore_variables(config, workdir,
                                                           mesh)
  predictor = predictor_lib.Predictor(config, model, variables, mesh)
  return calibrate_and_save(config, info, selection, predictor,
                            predictor.variables, step, workdir)
