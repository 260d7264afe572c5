"""Checks that reject an impossible config before anything compiles."""

import dataclasses
import importlib

import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.models import model as model_lib
from kpseq_jax.models import vit as vit_lib
from kpseq_jax.runtime import sharding

# Model fields that come from the data, not from ``config.model``
# (`train_state.create_model`), and flax's own.
_DATA_FIELDS = ('vocab', 'max_seq_len', 'num_classes', 'cache_decoding',
                'parent', 'name')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every field of ``config`` that cannot work.

  Checked: each field in ``config.field_choices`` (nested as the config)
  set to one of its choices; ``config.model`` holding the arguments of
  ``models/<model_name>.py``'s ``Model`` (`model_field_errors`); the
  input, decoding, CAPE, detector and device constraints of the helpers
  below.
  """
  errors = choice_errors(config, config.field_choices)
  if not errors:  # The model's module and fields exist.
    errors += model_field_errors(config)
  model_ok = not errors  # The checks below that read config.model.
  errors += input_errors(config) + device_errors(config)
  if model_ok:
    errors += encoder_errors(config)
  if config.model_name == 'cape':
    errors += cape_errors(config)
  if model_ok and config.model_name in (*detection.BOX_MODELS, 'end_to_end'):
    errors += canvas_errors(config)
  if model_ok and config.model_name not in detection.BOX_MODELS:
    errors += decoder_errors(config)
  if errors:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(errors))


def choice_errors(config, choices, path: str = '') -> list[str]:
  """Fields of ``config`` not among their ``choices`` (a nested
  ``field_choices``), named by dotted path."""
  errors = []
  for name, allowed in choices.items():
    where = f'{path}{name}'
    if name not in config:
      errors.append(f'field_choices names {where}, which is not a field.')
    elif isinstance(allowed, ml_collections.ConfigDict):
      errors += choice_errors(config[name], allowed, where + '.')
    elif config[name] not in allowed:
      errors.append(f'{where}={config[name]!r} is not one of '
                    f'{tuple(allowed)}.')
  return errors


def model_field_errors(config: ml_collections.ConfigDict) -> list[str]:
  """``config.model``'s keys against ``Model``'s constructor fields (those
  not derived from the data: vocab, max_seq_len, num_classes)."""
  module = importlib.import_module(f'kpseq_jax.models.{config.model_name}')
  fields = {f.name: f for f in dataclasses.fields(module.Model)
            if f.name not in _DATA_FIELDS}
  given = set(config.model.keys())
  errors = [f'model.{k} is not a field of models/{config.model_name}.py\'s '
            f'Model (fields: {sorted(fields)}).'
            for k in sorted(given - set(fields))]
  errors += [f'model.{k} is missing (models/{config.model_name}.py\'s Model '
             'has no default for it).' for k, f in sorted(fields.items())
             if k not in given and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  levels = tuple(config.model.feature_levels)
  allowed = model_lib.ENCODER_LEVELS.get(config.model.get('encoder', 'resnet'),
                                         model_lib.FEATURE_LEVELS)
  if not levels or any(l not in allowed for l in levels):
    errors.append(f'model.feature_levels={levels} must be a non-empty subset '
                  f'of {allowed} (model.encoder='
                  f'{config.model.get("encoder", "resnet")!r}).')
  if 'transformer' in config.model and (
      config.model.d_model % config.model.transformer.num_heads):
    errors.append(f'model.d_model={config.model.d_model} is not divisible by '
                  f'model.transformer.num_heads='
                  f'{config.model.transformer.num_heads}.')
  order = model_lib.FEATURE_LEVELS
  if config.model_name == 'centroid' and not errors and tuple(levels) != (
      order[order.index(levels[0]):order.index(levels[0]) + len(levels)]):
    errors.append(f'model.feature_levels={levels} must be consecutive levels '
                  'in stride order (the centroid neck sums each onto the '
                  'next finer one, 2x apart), e.g. (\'c3\', \'c4\', \'c5\').')
  if config.model.d_model % 32:
    errors.append(f'model.d_model={config.model.d_model} must be a multiple '
                  'of 32 (GroupNorm(32) after each level\'s projection).')
  return errors


def input_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Data set, crop size, bins, Grain, OKS sigma, box range factor,
  moving average, sharding rules."""
  i, errors = config.input, []
  if not i.dataset_dir:
    errors.append('input.dataset_dir is empty: pass --config.input.'
                  'dataset_dir=DIR (a data set from '
                  '`python -m data_prep.build`).')
  if i.image_size_px <= 0 or (config.model.get('encoder', 'resnet') ==
                              'resnet' and i.image_size_px % 32):
    errors.append(f'input.image_size_px={i.image_size_px} must be a positive '
                  'multiple of 32 (the ResNet stride).')
  if config.vocab.num_bins < 2:
    errors.append(f'vocab.num_bins={config.vocab.num_bins} must be >= 2.')
  if i.prefetch_batches < 1 or i.data_threads < 0:
    errors.append(f'input.prefetch_batches={i.prefetch_batches} must be >= 1 '
                  f'and input.data_threads={i.data_threads} >= 0 (0: the CPU '
                  'count).')
  if config.max_num_keypoints < 1:
    errors.append(f'max_num_keypoints={config.max_num_keypoints} must be '
                  '>= 1.')
  if config.optim.num_train_steps < 1:
    errors.append(f'optim.num_train_steps={config.optim.num_train_steps} '
                  'must be >= 1.')
  if not config.evals.oks_default_sigma >= 0:
    errors.append(f'evals.oks_default_sigma={config.evals.oks_default_sigma} '
                  'must be >= 0 (0: every category needs its own sigmas).')
  if not config.calibration.box_range_factor >= 1:
    errors.append('calibration.box_range_factor='
                  f'{config.calibration.box_range_factor} must be >= 1 (a '
                  'box is out of the training range beyond this factor of '
                  'its extremes).')
  if not 0 <= config.optim.ema_decay < 1:
    errors.append(f'optim.ema_decay={config.optim.ema_decay} must be in '
                  '[0, 1) (0: no moving average of the weights).')
  try:
    sharding.check_rules(config.sharding.rules)
  except ValueError as e:
    errors.append(str(e))
  return errors


def _image_sizes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The (height, width) pixel sizes the backbone sees, by field name: the
  crop, and the whole-image canvas of the detector and end_to_end."""
  sizes = {}
  if config.model_name not in detection.BOX_MODELS:
    sizes['input.image_size_px'] = (config.input.image_size_px,) * 2
  if config.model_name in (*detection.BOX_MODELS, 'end_to_end'):
    sizes['detector.image_size_px'] = tuple(config.detector.image_size_px)
  return sizes


def encoder_errors(config: ml_collections.ConfigDict) -> list[str]:
  """The ResNet's width (>= 1, whole groups of GroupNorm's 32). The ViT
  (``model.encoder='vit'``): its fields (`vit.ViT.dims`), image
  sizes that are whole patches and that its position-embedding resampling
  reaches; layer decay only with it, in (0, 1]; warm-up steps >= 0."""
  errors, o = [], config.optim
  if o.warmup_steps < 0:
    errors.append(f'optim.warmup_steps={o.warmup_steps} must be >= 0.')
  if config.model.get('encoder', 'resnet') != 'vit':
    r = config.model.get('resnet', {})
    width = r.get('width', 64)
    if width < 1 or (r.get('norm') == 'group' and width % 32):
      errors.append(f'model.resnet.width={width} must be >= 1, and a '
                    "multiple of 32 with norm='group' (32 groups).")
    if o.layer_decay > 0:
      errors.append(f'optim.layer_decay={o.layer_decay} needs '
                    "model.encoder='vit' (it decays the rate over a ViT's "
                    'blocks); 0 for plain AdamW.')
    return errors
  if not 0 <= o.layer_decay <= 1:
    errors.append(f'optim.layer_decay={o.layer_decay} must be in [0, 1] (0: '
                  'plain AdamW).')
  v = config.model.vit
  try:
    vit_lib.ViT(**v).dims()
  except ValueError as e:
    return errors + [f'model.vit: {e}']
  p = v.patch_size
  for name, hw in _image_sizes(config).items():
    bad = [s for s in hw if s <= 0 or s % p]
    if bad:
      s = bad[0]
      errors.append(f'{name}: {s} px is not a multiple of the ViT patch {p} '
                    f'px (model.vit.patch_size): use e.g. '
                    f'{max(p, s // p * p)} or {(s // p + 1) * p}.')
      continue
    for s in set(hw):
      try:
        vit_lib.resample_weights(v.pos_embed_grid, s // p, v.pos_interpolation)
      except ValueError as e:
        errors.append(f'{name}: model.vit.pos_interpolation='
                      f'{v.pos_interpolation!r} from grid '
                      f'{v.pos_embed_grid}: {e}.')
  return errors


def decoder_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Reference noise range; aux losses and refinement need >= 2 layers;
  pose-box passes >= 0."""
  t, errors = config.model.transformer, []
  if config.decode.pose_box_passes < 0:
    errors.append(f'decode.pose_box_passes={config.decode.pose_box_passes} '
                  'must be >= 0.')
  if not 0 <= t.reference_noise < 0.5:
    errors.append(f'model.transformer.reference_noise={t.reference_noise} '
                  'must be in [0, 0.5) (a fraction of the crop).')
  if (config.model.aux_loss or t.refine_points) and t.num_layers < 2:
    errors.append('model.aux_loss / model.transformer.refine_points need '
                  f'model.transformer.num_layers >= 2 (got {t.num_layers}): '
                  'they work on the layers before the last.')
  return errors


def cape_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Shots, kept fraction and episode counts; no category token, no
  presence."""
  c, errors = config.cape, []
  if c.num_shots < 1:
    errors.append(f'cape.num_shots={c.num_shots} must be >= 1.')
  if config.vocab.category_conditioning:
    errors.append('vocab.category_conditioning=True with model_name=cape: a '
                  'CAPE model is told what to find by its supports, never by '
                  'a category token.')
  if not 0 < c.min_keep_frac <= 1:
    errors.append(f'cape.min_keep_frac={c.min_keep_frac} must be in (0, 1].')
  for name in ('num_episodes', 'num_queries'):
    if c[name] < 1:
      errors.append(f'cape.{name}={c[name]} must be >= 1.')
  if config.vocab.presence_token:
    errors.append('vocab.presence_token=True with model_name=cape: keypoint '
                  'presence is not implemented for support-conditioned '
                  'episodes yet.')
  return errors


def canvas_errors(config: ml_collections.ConfigDict) -> list[str]:
  """The whole-image canvas (detector, end_to_end) and the detector's
  augmentation and detections."""
  d, errors = config.detector, []
  hw = tuple(d.image_size_px)
  stride = 32 if config.model.get('encoder', 'resnet') == 'resnet' else 1
  if len(hw) != 2 or min(hw) < 32 or any(v % stride for v in hw):
    errors.append(f'detector.image_size_px={hw} must be (height, width), '
                  '>= 32 px and with the ResNet multiples of 32 (its '
                  'stride).')
  if config.model_name in detection.BOX_MODELS:
    lo, hi = d.scale_range
    if not 0 < lo <= hi:
      errors.append(f'detector.scale_range={(lo, hi)} must satisfy 0 < lo '
                    '<= hi (times the scale that fits the canvas; above 1, '
                    'a random crop).')
    if not 0 <= d.vertical_flip_prob <= 1:
      errors.append(f'detector.vertical_flip_prob={d.vertical_flip_prob} '
                    'must be in [0, 1].')
    if not 0 <= d.nms_iou <= 1:
      errors.append(f'detector.nms_iou={d.nms_iou} must be in [0, 1] (1: '
                    'no suppression).')
    if config.model_name == 'detector':
      most = config.model.num_queries * config.max_num_categories
      if not 1 <= d.max_detections <= most:
        errors.append(f'detector.max_detections={d.max_detections} must be '
                      'in 1 .. model.num_queries x max_num_categories.')
    elif d.max_detections < 1:  # The centroid's queries: its grid cells.
      errors.append(f'detector.max_detections={d.max_detections} must be '
                    '>= 1.')
  return errors


def device_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Batch sizes divisible by the devices; the mesh matching them."""
  n, errors = jax.device_count(), []
  for name, size in (('input.batch_size', config.input.batch_size),
                     ('evals.batch_size', config.evals.batch_size)):
    if size % n:
      errors.append(f'{name}={size} is not divisible by the {n} devices.')
  shape = tuple(config.sharding.mesh_shape)
  if -1 not in shape and int(np.prod(shape)) != n:
    errors.append(f'sharding.mesh_shape={shape} has {int(np.prod(shape))} '
                  f'devices, but {n} are available.')
  return errors


def frozen_without_weights(config: ml_collections.ConfigDict) -> str:
  """A warning if the backbone is partly frozen at a random initialisation.

  Frozen BatchNorm with random-init statistics (mean 0, var 1) is the
  identity, and frozen stages keep their random weights: that is the
  paper's fine-tuning recipe without the ImageNet weights it assumes.

  Returns:
    The message, or '' when nothing is frozen or weights are loaded.
  """
  if config.model_init or config.model.get('encoder', 'resnet') != 'resnet':
    return ''
  frozen = []
  if config.model.resnet.norm == 'frozen_batch':
    frozen.append('model.resnet.norm=frozen_batch')
  if config.model.resnet.frozen_stages >= 0:
    frozen.append(
        f'model.resnet.frozen_stages={config.model.resnet.frozen_stages}')
  if not frozen:
    return ''
  return (f'{" and ".join(frozen)} with no model_init: the '
          'frozen parts keep their random initialisation (frozen BatchNorm '
          'is then the identity). Pass --config.model_init='
          'resnet50.safetensors (ImageNet weights, as the paper), or train '
          'from scratch with --config.model.resnet.norm=batch '
          '--config.model.resnet.frozen_stages=-1.')


def episode_pool_errors(config: ml_collections.ConfigDict,
                        info: dataset.DatasetInfo,
                        splits: dict[str, str]) -> list[str]:
  """CAPE: the train, eval and support splits need episode pools
  (`data_prep.episodes`); the support split must exist."""
  errors = []
  splits = dict(splits, **{'cape.support_split': config.cape.support_split})
  for name, split in splits.items():
    if not split or split not in info.split_sizes:
      continue  # '' = the eval split; a missing split is reported apart.
    if split not in info.episode_pools:
      why = info.episode_pool_errors.get(
          split, 'the data set was built without episode pools; rebuild '
          'it with `python -m data_prep.build`')
      errors.append(f'{name}={split!r} has no CAPE episode pool in '
                    f'{config.input.dataset_dir}: {why}')
  support = config.cape.support_split
  if support and support not in info.split_sizes:
    errors.append(f'cape.support_split={support!r} is not a split of '
                  f'{config.input.dataset_dir} (it has '
                  f'{sorted(info.split_sizes)}).')
  return errors


def _configured_splits(config: ml_collections.ConfigDict,
                       info: dataset.DatasetInfo) -> dict[str, str]:
  """Config field -> split name, of the splits the run reads. A missing
  evals.split falls back to evals.report_split (logged by training); only
  neither is an error, reported under evals.split."""
  splits = {'input.train_split': config.input.train_split}
  selection, report, _ = evaluation_splits(config, info)
  if selection:
    splits['evals.split'] = selection
  if report:
    splits['evals.report_split'] = report
  if not (selection or report):
    splits['evals.split'] = config.evals.split
  return splits


def check_dataset(config: ml_collections.ConfigDict,
                  info: dataset.DatasetInfo) -> None:
  """Raises ValueError if the data set does not fit ``config``.

  Checked (against the category table `data_prep` stored in the data set's
  metadata): every category's K is at most ``max_num_keypoints`` (the
  sequence holds `grammar.seq_len` = ``4 * max_num_keypoints + 1`` targets,
  plus the category token with category conditioning), the configured
  train/eval splits exist, with category conditioning the vocabulary
  has a token for every category, and with ``model_name='cape'`` the train,
  eval and support splits have episode pools (`data_prep.episodes`).

  Args:
    config: the run's config.
    info: `dataset.DatasetInfo` of ``config.input.dataset_dir``.
  """
  errors = []
  too_long = sorted((c.num_keypoints, c.id, c.name)
                    for c in info.categories.values()
                    if c.num_keypoints > config.max_num_keypoints)
  if too_long:
    k, cid, name = too_long[-1]
    errors.append(
        f'max_num_keypoints={config.max_num_keypoints} is smaller than K of '
        f'{len(too_long)} categor{"y" if len(too_long) == 1 else "ies"} in '
        f'{config.input.dataset_dir} (largest: {cid}:{name} with K={k}); set '
        f'--config.max_num_keypoints={k} or more.')
  splits = _configured_splits(config, info)
  errors += [f'{name}={split!r} is not a split of {config.input.dataset_dir} '
             f'(it has {sorted(info.split_sizes)}).'
             for name, split in splits.items()
             if split not in info.split_sizes]
  if config.model_name == 'cape':
    errors += episode_pool_errors(config, info, splits)
  if config.vocab.presence_token and info.unlabelled_means != 'absent':
    errors.append(
        f'vocab.presence_token=True, but {config.input.dataset_dir} records '
        f'unlabelled_means={info.unlabelled_means!r}: no keypoint is known '
        'to be absent, so <absent> would never be a target. If a missing '
        'label means "not visible" in this data (DeepLabCut), rebuild it '
        'with `python -m data_prep.build --unlabelled_means=absent`; '
        'otherwise set --config.vocab.presence_token=False.')
  n = len(info.categories)
  if (config.model_name in detection.BOX_MODELS
      and n > config.max_num_categories):
    errors.append(f'max_num_categories={config.max_num_categories} is smaller '
                  f'than the data set\'s {n} categories (the detector\'s '
                  f'classes): pass --config.max_num_categories={n}.')
  if config.vocab.category_conditioning and n > config.max_num_categories:
    errors.append(f'max_num_categories={config.max_num_categories} is smaller '
                  f'than the data set\'s {n} categories (category '
                  f'conditioning): pass --config.max_num_categories={n}.')
  if errors:
    raise ValueError('Invalid config for the data set:\n  ' +
                     '\n  '.join(errors))


def evaluation_splits(config: ml_collections.ConfigDict,
                      info: dataset.DatasetInfo
                      ) -> tuple[str | None, str | None, str | None]:
  """(selection split, report split, fallback warning) of a run.

  The selection split, ``config.evals.split`` ('val' by default), is
  evaluated during training; the checkpoint and the likelihood calibration
  are chosen on it. The report split, ``config.evals.report_split``
  ('test'), is evaluated once with the chosen checkpoint (and by ``--mode
  eval``) and chooses nothing. A data set without the selection split
  (built before ``data_prep.build --val_fraction``, or too small for one)
  falls back: the warning says so; training then evaluates the report
  split, uses the last checkpoint and fits no calibration.

  Returns:
    (selection split or None, report split or None (none, or the same as
    the selection split), the fallback's warning or None).
  """
  have = info.split_sizes
  selection = config.evals.split if config.evals.split in have else None
  report = config.evals.get('report_split', '')
  report = report if report in have and report != selection else None
  warning = None
  if selection is None and report is not None:
    warning = (
        f'{config.input.dataset_dir} has no {config.evals.split!r} split '
        f'(evals.split; it has {sorted(have)}): training evaluates '
        f'{report!r}, reported only, uses the last checkpoint and fits no '
        'likelihood calibration (likelihoods stay raw). Rebuild the data '
        'set with `python -m data_prep.build --val_fraction 0.1` for a '
        'validation split (docs/uncertainty.md).')
  return selection, report, warning
