"""Checks that reject an impossible config before anything compiles."""

import jax
import ml_collections
import numpy as np

_LEVELS = ('c3', 'c4', 'c5')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field if ``config`` cannot work.

  Checked: ``dataset_dir`` set; ``image_size_px`` a positive multiple of 32
  (the backbone's stride); ``num_bins >= 2``; ``feature_levels`` a
  non-empty subset of c3/c4/c5; ``d_model`` divisible by ``num_heads``;
  batch sizes divisible by the device count; ``mesh_shape`` matching the
  devices; ``backbone_depth`` in 18/34/50.
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
  if not levels or any(l not in _LEVELS for l in levels):
    errors.append(f'feature_levels={levels} must be a non-empty subset of '
                  f'{_LEVELS}.')
  if config.d_model % config.num_heads:
    errors.append(f'd_model={config.d_model} is not divisible by '
                  f'num_heads={config.num_heads}.')
  if config.backbone_depth not in (18, 34, 50):
    errors.append(f'backbone_depth={config.backbone_depth} not in 18/34/50.')
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
