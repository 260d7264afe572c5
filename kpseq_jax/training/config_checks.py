"""Checks that reject an impossible config before anything compiles."""

import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.models import conv as conv_lib
from kpseq_jax.models import model as model_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.sequence import vocab as vocab_lib


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field if ``config`` cannot work.

  Checked: ``dataset_dir`` set; ``image_size_px`` a positive multiple of 32
  (the backbone's stride); ``num_bins >= 2``; ``feature_levels`` a
  non-empty subset of c2/c3/c4/c5; ``d_model`` divisible by ``num_heads``;
  batch sizes divisible by the device count; ``mesh_shape`` matching the
  devices; ``backbone_depth`` in 18/34/50; ``backbone_conv_impl`` known;
  ``backbone_norm`` known; ``backbone_frozen_stages`` in -1..4;
  ``prefetch_batches >= 1``, ``data_threads >= 0``;
  ``sharding_rules`` well formed; every field named in
  ``config.field_choices`` (a config's own enumerations, e.g.
  ``configs/mp100.py``'s ``split``) set to one of its choices; with
  ``setting='cape'``: ``num_shots >= 1``, no category conditioning,
  ``cape_min_keep_frac`` in (0, 1], episode counts >= 1.
  """
  errors = []
  if not config.dataset_dir:
    errors.append('dataset_dir is empty: pass --config.dataset_dir=DIR '
                  '(a data set from `python -m data_prep.build`).')
  if config.image_size_px <= 0 or config.image_size_px % 32:
    errors.append(f'image_size_px={config.image_size_px} must be a positive '
                  'multiple of 32 (the ResNet stride).')
  if config.num_bins < 2:
    errors.append(f'num_bins={config.num_bins} must be >= 2.')
  levels = tuple(config.feature_levels)
  if not levels or any(l not in model_lib.FEATURE_LEVELS for l in levels):
    errors.append(f'feature_levels={levels} must be a non-empty subset of '
                  f'{model_lib.FEATURE_LEVELS}.')
  if config.d_model % config.num_heads:
    errors.append(f'd_model={config.d_model} is not divisible by '
                  f'num_heads={config.num_heads}.')
  if config.backbone_conv_impl not in conv_lib.IMPLS:
    errors.append(f'backbone_conv_impl={config.backbone_conv_impl!r} not in '
                  f'{conv_lib.IMPLS}.')
  if config.backbone_depth not in (18, 34, 50):
    errors.append(f'backbone_depth={config.backbone_depth} not in 18/34/50.')
  try:
    sharding.check_rules(config.sharding_rules)
  except ValueError as e:
    errors.append(str(e))
  if config.backbone_norm not in ('batch', 'group', 'frozen_batch'):
    errors.append(f'backbone_norm={config.backbone_norm!r} not in batch, '
                  'group, frozen_batch.')
  if config.prefetch_batches < 1 or config.data_threads < 0:
    errors.append(f'prefetch_batches={config.prefetch_batches} must be >= 1 '
                  f'and data_threads={config.data_threads} >= 0 (0: the CPU '
                  'count).')
  if not -1 <= config.backbone_frozen_stages <= 4:
    errors.append(f'backbone_frozen_stages={config.backbone_frozen_stages} '
                  'not in -1 (none), 0 (stem), 1..4 (stem + layer1..n).')
  for name, choices in config.field_choices.items():
    if config[name] not in choices:
      errors.append(f'{name}={config[name]!r} is not one of {tuple(choices)}.')
  if config.setting == 'cape':
    if config.num_shots < 1:
      errors.append(f'num_shots={config.num_shots} must be >= 1 (CAPE).')
    if config.category_conditioning:
      errors.append('category_conditioning=True with setting=cape: a CAPE '
                    'model is told what to find by its supports, never by a '
                    'category token.')
    if not 0 < config.cape_min_keep_frac <= 1:
      errors.append(f'cape_min_keep_frac={config.cape_min_keep_frac} must '
                    'be in (0, 1].')
    for name in ('cape_num_episodes', 'cape_num_queries'):
      if config[name] < 1:
        errors.append(f'{name}={config[name]} must be >= 1.')
  if config.presence_token and config.setting == 'cape':
    errors.append('presence_token=True with setting=cape: keypoint presence '
                  'is not implemented for support-conditioned episodes yet.')
  if config.confidence_radius_bins not in vocab_lib.CONFIDENCE_RADII_BINS:
    errors.append(f'confidence_radius_bins={config.confidence_radius_bins} '
                  f'is not one of {vocab_lib.CONFIDENCE_RADII_BINS}.')
  if not config.oks_default_sigma >= 0:
    errors.append(f'oks_default_sigma={config.oks_default_sigma} must be >= '
                  '0 (0: every category needs its own sigmas).')
  if not 0 <= config.reference_point_noise_frac < 0.5:
    errors.append(f'reference_point_noise_frac='
                  f'{config.reference_point_noise_frac} must be in [0, 0.5) '
                  '(a fraction of the crop).')
  if not 0 <= config.ema_decay < 1:
    errors.append(f'ema_decay={config.ema_decay} must be in [0, 1) (0: no '
                  'moving average of the weights).')
  if (config.decoder_aux_loss or config.decoder_refine_points) and (
      config.num_layers < 2):
    errors.append('decoder_aux_loss / decoder_refine_points need '
                  f'num_layers >= 2 (got {config.num_layers}): they work on '
                  'the layers before the last.')
  if config.task == 'detection' or config.keypoint_stage == 'end_to_end':
    hw = tuple(config.detector_image_size_px)
    if len(hw) != 2 or min(hw) < 32:
      errors.append(f'detector_image_size_px={hw} must be (height, width) '
                    'of at least 32 px each.')
  if config.task == 'detection':
    lo, hi = config.detector_scale_range
    if not 0 < lo <= hi <= 1:
      errors.append(f'detector_scale_range={(lo, hi)} must satisfy 0 < lo '
                    '<= hi <= 1 (a fraction of the scale that fits the '
                    'canvas).')
    if not 1 <= config.max_detections <= (config.detector_num_queries *
                                          config.max_num_categories):
      errors.append(f'max_detections={config.max_detections} must be in 1 '
                    '.. detector_num_queries x max_num_categories.')
    if config.setting != 'supervised':
      errors.append('task=detection needs setting=supervised (the detector '
                    'has no support images).')
  elif config.keypoint_stage == 'end_to_end':
    if any(v % 32 for v in tuple(config.detector_image_size_px)):
      errors.append('keypoint_stage=end_to_end encodes the '
                    'detector_image_size_px canvas: '
                    f'{tuple(config.detector_image_size_px)} must be '
                    'multiples of 32 (the ResNet stride).')
    if config.setting != 'supervised':
      errors.append('keypoint_stage=end_to_end needs setting=supervised '
                    '(support crops of whole images are not built).')
  if config.max_num_keypoints < 1:
    errors.append(f'max_num_keypoints={config.max_num_keypoints} must be '
                  '>= 1.')
  n = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % n:
      errors.append(f'{name}={config[name]} is not divisible by the {n} '
                    'devices.')
  shape = tuple(config.mesh_shape)
  if -1 not in shape and int(np.prod(shape)) != n:
    errors.append(f'mesh_shape={shape} has {int(np.prod(shape))} devices, '
                  f'but {n} are available.')
  if errors:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(errors))


def frozen_without_weights(config: ml_collections.ConfigDict) -> str:
  """A warning if the backbone is partly frozen at a random initialisation.

  Frozen BatchNorm with random-init statistics (mean 0, var 1) is the
  identity, and frozen stages keep their random weights: that is the
  paper's fine-tuning recipe without the ImageNet weights it assumes.

  Returns:
    The message, or '' when nothing is frozen or weights are loaded.
  """
  if config.pretrained_backbone_path:
    return ''
  frozen = []
  if config.backbone_norm == 'frozen_batch':
    frozen.append('backbone_norm=frozen_batch')
  if config.backbone_frozen_stages >= 0:
    frozen.append(f'backbone_frozen_stages={config.backbone_frozen_stages}')
  if not frozen:
    return ''
  return (f'{" and ".join(frozen)} with no pretrained_backbone_path: the '
          'frozen parts keep their random initialisation (frozen BatchNorm '
          'is then the identity). Pass --config.pretrained_backbone_path='
          'resnet50.safetensors (ImageNet weights, as the paper), or train '
          'from scratch with --config.backbone_norm=batch '
          '--config.backbone_frozen_stages=-1.')


def check_dataset(config: ml_collections.ConfigDict,
                  info: dataset.DatasetInfo) -> None:
  """Raises ValueError if the data set does not fit ``config``.

  Checked (against the category table `data_prep` stored in the data set's
  metadata): every category's K is at most ``max_num_keypoints`` (the
  sequence holds `grammar.seq_len` = ``4 * max_num_keypoints + 1`` targets,
  plus the category token with category conditioning), the configured
  train/eval splits exist, with category conditioning the vocabulary
  has a token for every category, and with ``setting='cape'`` the train,
  eval and support splits have episode pools (`data_prep.episodes`).

  Args:
    config: the run's config.
    info: `dataset.DatasetInfo` of ``config.dataset_dir``.
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
        f'{config.dataset_dir} (largest: {cid}:{name} with K={k}); set '
        f'--config.max_num_keypoints={k} or more.')
  for name in ('train_split', 'eval_split'):
    if config[name] not in info.split_sizes:
      errors.append(f'{name}={config[name]!r} is not a split of '
                    f'{config.dataset_dir} (it has {sorted(info.split_sizes)}).')
  if config.setting == 'cape':
    for name in ('train_split', 'eval_split', 'cape_support_split'):
      split = config[name]
      if not split or split not in info.split_sizes:
        continue  # '' = the eval split; a missing split is reported above.
      if split not in info.episode_pools:
        why = info.episode_pool_errors.get(
            split, 'the data set was built without episode pools; rebuild '
            'it with `python -m data_prep.build`')
        errors.append(f'{name}={split!r} has no CAPE episode pool in '
                      f'{config.dataset_dir}: {why}')
    if (config.cape_support_split and
        config.cape_support_split not in info.split_sizes):
      errors.append(f'cape_support_split={config.cape_support_split!r} is '
                    f'not a split of {config.dataset_dir} (it has '
                    f'{sorted(info.split_sizes)}).')
  if config.presence_token and info.unlabelled_means != 'absent':
    errors.append(
        f'presence_token=True, but {config.dataset_dir} records '
        f'unlabelled_means={info.unlabelled_means!r}: no keypoint is known '
        'to be absent, so <absent> would never be a target. If a missing '
        'label means "not visible" in this data (DeepLabCut), rebuild it '
        'with `python -m data_prep.build --unlabelled_means=absent`; '
        'otherwise set --config.presence_token=False.')
  n = len(info.categories)
  if config.task == 'detection' and n > config.max_num_categories:
    errors.append(f'max_num_categories={config.max_num_categories} is smaller '
                  f'than the data set\'s {n} categories (the detector\'s '
                  f'classes): pass --config.max_num_categories={n}.')
  if config.category_conditioning and n > config.max_num_categories:
    errors.append(f'max_num_categories={config.max_num_categories} is smaller '
                  f'than the data set\'s {n} categories (category '
                  f'conditioning): pass --config.max_num_categories={n}.')
  if errors:
    raise ValueError('Invalid config for the data set:\n  ' +
                     '\n  '.join(errors))
