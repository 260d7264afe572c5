"""DeepLabCut open-field mouse (4 keypoints) sized for 2 CPU cores.

A ResNet-18 from scratch at 128 px with multi-scale features (strides
8/16/32), a 3-layer decoder with reference-point refinement and flip test;
batch 16, 1,500 steps. Trains to a held-out result on
`../shared/data/dlc_openfield` in the time the README states (measurements:
docs/precision.md, docs/results.md). The mouse is seen from above in any
orientation, so random rotation is on.

``configs/dlc_openfield.py:vit`` swaps the ResNet-18 for a ViT-S trained
from scratch at the same budget (crop, batch, steps, rate, decoder): patch
16, so that the 128 px crop stays as it is (128 is not a multiple of 14)
and the pyramid's c3/c4/c5 maps are 16/8/4 cells, the ResNet's sizes, so
only the backbone differs; its position grid is the input's 8 x 8 (no
resampling), no class token (nothing reads it), a 128-channel pyramid (the
decoder's width), drop path 0.1 and a 100-step linear warm-up (DeiT's
defaults for a ViT from scratch, ``--drop-path 0.1``, warm-up epochs); no
layer decay (a fine-tuning device).

Build the data set first:
  python -m data_prep.build --image-root ../shared/data/dlc_openfield/images \
    --annotations ../shared/data/dlc_openfield/annotations/train.json \
    --annotations ../shared/data/dlc_openfield/annotations/test.json \
    --out data/dlc_openfield
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None for the ResNet-18, 'vit' for the ViT-S from scratch.

  Raises:
    ValueError: another argument.
  """
  if arg not in (None, '', 'vit'):
    raise ValueError(f'configs/dlc_openfield.py:{arg}: the argument must be '
                     'vit or nothing.')
  c = default.get_config()
  c.max_num_keypoints = 4
  c.input.dataset_dir = 'data/dlc_openfield'
  c.input.batch_size = 16
  c.input.image_size_px = 128
  c.input.rotation_deg = 180.0
  c.vocab.num_bins = 128
  # No ImageNet weights: the whole backbone trains, with batch statistics.
  c.model.resnet.update(depth=18, norm='batch', frozen_stages=-1)
  c.model.feature_levels = ('c3', 'c4', 'c5')
  c.model.d_model = 128
  c.model.transformer.update(num_layers=3, num_heads=4, ffn_dim=512,
                             refine_points=True)
  c.optim.learning_rate = 5e-4
  c.optim.num_train_steps = 1500
  c.optim.decay_steps = (1200,)
  c.decode.flip_test = True
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.evals.batch_size = 23  # The 23 held-out frames.
  c.evals.every_steps = 500
  if arg == 'vit':
    c.model.encoder = 'vit'
    c.model.vit.update(variant='S', patch_size=16, class_token=False,
                       pos_embed_grid=8, pos_embed_prefix_tokens=0,
                       drop_path_rate=0.1, pyramid_dim=128)
    c.optim.warmup_steps = 100
  return c
