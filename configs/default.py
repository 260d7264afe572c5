"""Paper configuration: Raster2Seq's recipe on a top-down crop (MP-100 scale).

ResNet-50 at 512 px (2048 x 16 x 16 features), a 6-layer deformable decoder,
AdamW 1e-4, batch 2, 300 epochs with the learning rate x0.1 at epoch 200,
horizontal flip, random crop (scale/shift) and colour jitter; loss 1.0 * CE +
5.0 * L1 (Raster2Seq paper, training details). Epochs are stated in steps
here (docs/mp100.md: steps from a data set's size).

The argument is ``<model_name>`` or ``<model_name>,<backbone>``
(`parse_arg`): ``configs/default.py:cape``; ``configs/default.py:supervised,mae``
swaps the ResNet-50 for ViTPose-B's plain ViT-B/16 (MAE weights),
``...,dinov2`` for a DINOv2 ViT-S/14 at 504 px (`VIT_BACKBONES`), both with
the ViT fine-tuning recipe (`vit_recipe`; docs/vit.md).

The groups hold the arguments of what they build, by those arguments' names:
``config.model`` is ``models/<model_name>.py``'s ``Model(**config.model,
vocab=..., max_seq_len=...)``, ``config.model.resnet`` the `ResNet`'s,
``config.model.vit`` the `vit.ViT`'s (used with ``model.encoder='vit'``),
``config.model.transformer`` the decoder's. Any field can be overridden on
the command line (``--config.optim.num_train_steps=10``); the dict is locked,
so a misspelt field is an error. Enumerated fields are listed in
``field_choices`` (checked by training/config_checks.py).
"""

import ml_collections

# MP-100, split 1 lower bound of the CAPE train size (docs/mp100.md):
# 10,175 instances at batch 2 = 5,087 steps per epoch.
MP100_STEPS_PER_EPOCH = 5087

MODEL_NAMES = ('supervised', 'cape', 'end_to_end', 'detector', 'centroid')

# ViT backbones a config argument names: `vit.ViT` fields matching the
# weights file ``--config.model_init`` loads (docs/vit.md's table;
# `vit_pretrained.vit_fields` reads them from a file), the crop size (a
# multiple of the patch) and the recipe's per-size values (`vit_recipe`).
VIT_BACKBONES = {
    # ViTPose-B (Xu et al. 2022): MAE's ImageNet ViT-B/16
    # (mae_pretrain_vit_base: 224 px, grid 14, class token with a position
    # embedding, no LayerScale). ViTPose's
    # configs/body/2d_kpt_sview_rgb_img/topdown_heatmap/coco/
    # ViTPose_base_coco_256x192.py: layer_decay_rate 0.75, drop_path_rate 0.3.
    'mae': dict(
        vit=dict(variant='B', patch_size=16, pos_embed_grid=14,
                 layer_scale_init=0.0, pos_interpolation='mae',
                 drop_path_rate=0.3),
        image_size_px=512, layer_decay=0.75),
    # DINOv2 ViT-S/14 (dinov2_vits14: 518 px, grid 37, LayerScale; EdgeCape's
    # default CAPE backbone); --config.model.vit.variant=B for dinov2_vitb14.
    # 504 px = 36 patches, the multiple of 14 nearest the paper's 512.
    # ViTPose-S (ViTPose_small_coco_256x192.py, commit 9295846):
    # layer_decay_rate 0.9, drop_path_rate 0.3.
    'dinov2': dict(
        vit=dict(variant='S', patch_size=14, pos_embed_grid=37,
                 layer_scale_init=1.0, pos_interpolation='dinov2',
                 drop_path_rate=0.3),
        image_size_px=504, layer_decay=0.9),
}


def parse_arg(arg: str | None, default_model: str = 'supervised'
              ) -> tuple[str, str]:
  """``'<model_name>[,<backbone>]'`` -> (model_name, backbone).

  Args:
    arg: the config argument (``configs/x.py:ARG``); None or '' for
      ``default_model`` with the ResNet.
    default_model: the system when ``arg`` names only a backbone or nothing.

  Returns:
    (model_name, backbone): backbone 'resnet' or a key of `VIT_BACKBONES`.

  Raises:
    ValueError: an unknown token or more than one system or backbone.
  """
  names, backbones = [], []
  for token in filter(None, (arg or '').split(',')):
    if token in MODEL_NAMES:
      names.append(token)
    elif token in VIT_BACKBONES or token == 'resnet':
      backbones.append(token)
    else:
      raise ValueError(f'config argument {arg!r}: {token!r} is neither a '
                       f'system {MODEL_NAMES} nor a backbone '
                       f'{("resnet",) + tuple(VIT_BACKBONES)}')
  if len(names) > 1 or len(backbones) > 1:
    raise ValueError(f'config argument {arg!r}: at most one system and one '
                     'backbone')
  return (names or [default_model])[0], (backbones or ['resnet'])[0]


def vit_config() -> ml_collections.ConfigDict:
  """``config.model.vit``: `vit.ViT`'s arguments but dtype (models/vit.py
  documents each), ViTPose-B's backbone (``VIT_BACKBONES['mae']``) unless a
  config sets them."""
  return ml_collections.ConfigDict(dict(
      variant='B', patch_size=16,
      width=0, depth=0, num_heads=0,  # > 0 overrides the variant's.
      mlp_ratio=4.0, class_token=True, num_registers=0,
      # Stored position grid (cells per side) and its prefix entries; the
      # grid is resampled to the input's by pos_interpolation.
      pos_embed_grid=14, pos_embed_prefix_tokens=1, pos_interpolation='mae',
      layer_scale_init=0.0,  # 0: no LayerScale (DINOv2: 1.0).
      drop_path_rate=0.3,  # The last block's; 0 for the first.
      window_size=0, global_blocks=(),  # ViTDet windowed attention, 0: off.
      pyramid_dim=256,  # Channels of the c3/c4/c5 maps (ViTDet's 256).
      conv_impl='auto', remat=False))


def vit_recipe(c: ml_collections.ConfigDict, backbone: str) -> None:
  """Puts the ViT ``backbone`` (`VIT_BACKBONES`) and its fine-tuning
  recipe into the paper config ``c`` in place.

  Model: ``encoder='vit'`` with the backbone's fields, the c4 map only
  (stride 16 / 14 px: the ViT's own output, which ViTPose's head reads; the
  paper reads the ResNet's stride-32 c5), the backbone's crop size.
  Optimizer (ViTPose's ``optimizer``/``lr_config``, MAE's
  ``util/lr_decay.py``; training/layer_decay.py): layer-wise rate decay,
  weight decay 0.1 on matrices only, linear warm-up over 500 steps from
  0.001 x the rate. Kept from the paper: its rate 1e-4 at batch 2 for the
  decoder, which trains from scratch as in Raster2Seq (ViTPose's 5e-4 is at
  batch 512 for a heatmap head; the last ViT block gets layer_decay x 1e-4,
  the patch embedding layer_decay^13 x 1e-4), its clipping and schedule.
  """
  spec = VIT_BACKBONES[backbone]
  c.model.encoder = 'vit'
  c.model.vit.update(spec['vit'])
  c.model.feature_levels = ('c4',)
  c.input.image_size_px = spec['image_size_px']
  c.optim.update(layer_decay=spec['layer_decay'], weight_decay=0.1,
                 warmup_steps=500)


def model_config(model_name: str) -> ml_collections.ConfigDict:
  """``models/<model_name>.py``'s ``Model`` fields (paper sizes)."""
  m = ml_collections.ConfigDict(dict(
      # ImageNet ResNet-50 with frozen BatchNorm (DETR's FrozenBatchNorm2d);
      # stem and layer1 frozen (frozen_stages=1, mmdetection's). Both
      # expect model_init; from scratch: norm='batch', frozen_stages=-1.
      # conv_impl: 'xla', 'gemm' (1x1 convs and weight gradients as
      # matmuls) or 'auto' ('gemm' on CPU); same values (models/conv.py).
      # width: stem and layer1 channels (torchvision's 64, pretrained files).
      resnet=dict(depth=50, norm='frozen_batch', frozen_stages=1,
                  conv_impl='auto', remat=False, width=64),
      # The backbone: 'resnet' (model.resnet) or 'vit' (model.vit,
      # `vit_config`: a plain ViT and ViTDet's c3/c4/c5 pyramid, no c2).
      encoder='resnet',
      vit=vit_config(),
      feature_levels=('c5',),  # Paper: one 16 x 16 level at stride 32.
      d_model=256,
      # Decoder layers (models/decoder.py).
      transformer=dict(num_layers=6, num_heads=8, ffn_dim=1024, dropout=0.1,
                       num_points=4),
      dtype='float32',  # Compute dtype; parameters stay float32.
  ))
  if model_name == 'detector':
    # Deformable DETR: boxes per image; with_box_refine.
    m.update(num_queries=20, box_refine=True)
    return m
  if model_name == 'centroid':
    # CenterNet: no decoder; the neck's width, its heads' head_conv (64),
    # boxes kept per training image (its max_objs).
    del m['transformer']
    m.update(feature_levels=('c3', 'c4', 'c5'), d_model=64, head_width=64,
             max_objects=20)
    return m
  # refine_points: each layer predicts its (x, y) and the next samples
  # there (Deformable DETR's with_box_refine). reference_noise: std of
  # Poseur's training noise on the first reference points, normalised
  # [0, 1] units. remat: per layer.
  m.transformer.update(remat=False, refine_points=False, reference_noise=0.0)
  # aux_loss: CE + L1 on every decoder layer (DETR's). coordinate_loss:
  # 'l1' or 'laplace' (a scale head, RLE's likelihood without its flow).
  m.update(aux_loss=False, coordinate_loss='l1')
  if model_name == 'cape':
    # CapeFormer's proposals: reference points at each support keypoint's
    # match in the query memory.
    m.proposals = True
  return m


def loss_config(model_name: str) -> ml_collections.ConfigDict:
  """The weights of ``model_name``'s loss: Raster2Seq's 1.0 * CE + 5.0 * L1
  (normalised crop units; CAPE: + the proposals' L1); the detector:
  Deformable DETR's focal class, box L1 and GIoU weights."""
  if model_name == 'detector':
    return ml_collections.ConfigDict(
        dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0))
  if model_name == 'centroid':  # CenterNet's hm, off and wh weights.
    return ml_collections.ConfigDict(
        dict(heatmap_weight=1.0, offset_weight=1.0, size_weight=0.1))
  loss = ml_collections.ConfigDict(dict(ce_weight=1.0, l1_weight=5.0))
  if model_name == 'cape':
    loss.proposal_l1_weight = 5.0
  return loss


def get_config(arg: str = 'supervised') -> ml_collections.ConfigDict:
  """Returns the locked paper configuration of ``arg`` (`parse_arg`:
  ``'<model_name>[,<backbone>]'``; a ViT backbone applies `vit_recipe`)."""
  model_name, backbone = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # kpseq_jax/models/<model_name>.py: 'supervised' (one crop in, its
  # category's keypoints out), 'cape' (support-conditioned: episodes of
  # support crops with keypoints and a query), 'end_to_end' (PRTR's: the
  # whole image on the detector.image_size_px canvas, its memory sampled
  # inside each box), 'detector' (boxes: Deformable DETR) or 'centroid'
  # (boxes: CenterNet's centre heatmaps).
  c.model_name = model_name
  c.model = model_config(model_name)
  # Backbone weights at initialisation: with the ResNet an ImageNet state
  # dict (.safetensors / .pth, models/pretrained.py), with the ViT a timm,
  # DINOv2 or MAE .safetensors (models/vit_pretrained.py; model.vit must
  # match it); or a trained workdir with the same backbone; '' = random.
  c.model_init = ''
  c.max_num_keypoints = 68  # Longest MP-100 category: 4 * 68 + 2 tokens.
  c.max_num_categories = 100  # Category tokens / detector classes.

  # Data set (`python -m data_prep.build`), crop and training augmentation.
  c.input = dict(
      dataset_dir='', train_split='train',
      batch_size=2,  # Global.
      image_size_px=512, bbox_scale=1.25,  # bbox enlarged 1.25x, aspect kept.
      flip_prob=0.5, scale_range=(0.75, 1.25), shift_frac=0.1,
      rotation_deg=0.0, color_jitter=0.2,
      # Grain: worker processes, batches prepared ahead, threads (0: CPUs).
      worker_count=0, prefetch_batches=4, data_threads=0)

  # Tokens: coordinate bins, <absent> (keypoint presence, pix2seq's
  # INVISIBLE), a category token after <bos>.
  c.vocab = dict(num_bins=512, presence_token=False,
                 category_conditioning=False)

  c.loss = loss_config(model_name)

  c.optim = dict(
      learning_rate=1e-4, weight_decay=1e-4,  # AdamW.
      # > 0: the ViT's layer-wise rate decay (rate x layer_decay ** (depth
      # + 1 - layer id), training/layer_decay.py; weight decay then skips
      # vectors, position embeddings and tokens); 0: plain AdamW.
      layer_decay=0.0,
      # Linear warm-up from 0.001 x the rate over this many steps (mmcv's,
      # ViTPose's); 0: none.
      warmup_steps=0,
      grad_clip_norm=0.1,  # Deformable DETR's; <= 0 disables.
      num_train_steps=300 * MP100_STEPS_PER_EPOCH,
      # The rate is multiplied by decay_factor at each.
      decay_steps=(200 * MP100_STEPS_PER_EPOCH,),
      decay_factor=0.1,
      # True: a NaN/inf update is skipped and counted (False: stop); this
      # many in a row stop training (<= 0: never).
      skip_nonfinite_updates=False, max_consecutive_skipped_updates=100,
      # Moving average of the weights for evaluation and prediction; the
      # average moves by 1 - min(ema_decay, (1 + step) / (10 + step)).
      ema_decay=0.0)

  # CAPE episodes (model_name='cape', data/episodes.py): supports per
  # episode; training asks for a random order and a random subset of at
  # least min_keep_frac * K keypoints (CapeFormer). Evaluation: with
  # support_split '' MP-100's protocol (num_episodes per category of
  # num_queries queries), else every instance a query, supports from it.
  c.cape = dict(num_shots=1, permute_keypoints=True, min_keep_frac=0.5,
                support_split='', num_episodes=200, num_queries=15,
                skip_small_categories=False, eval_permuted=False)

  # Whole-image boxes (the detector and the end-to-end keypoint stage):
  # canvas (height, width), training resize range (x the fitting scale;
  # above 1 a random crop), vertical flips in training, boxes kept per
  # image, score below which predict/analyze drop a box, IoU above which
  # they drop a box overlapping a better one (NMS; 1: none, DETR's way).
  c.detector = dict(image_size_px=(480, 640), scale_range=(0.75, 1.0),
                    vertical_flip_prob=0.0, max_detections=10,
                    score_threshold=0.3, nms_iou=1.0)

  # Decoding: flip test (MMPose's; two decodes per crop), the
  # confidence's +- radius in coordinate bins, and how many times analyze
  # and detected-box evaluation cut each box again from its pose by the
  # SLEAP/DeepLabCut import's box rule (inference/pose_boxes.py).
  c.decode = dict(flip_test=False, confidence_radius_bins=2,
                  pose_box_passes=0)

  # Evaluation of `split` every `every_steps` and after the last step (0:
  # last only); the checkpoint and the likelihood calibration are chosen
  # on it. `report_split` is evaluated once with the chosen checkpoint and
  # by --mode eval; it chooses nothing. num_examples -1: the whole split.
  # OKS sigma for categories without their own (DeepLabCut's 0.1).
  # `evaluators`: name -> {'type': ..., constructor arguments}
  # (kpseq_jax/evaluation/evaluate.py); empty: the system's defaults.
  c.evals = dict(split='val', report_split='test', batch_size=8,
                 every_steps=0, num_examples=-1, oks_default_sigma=0.1,
                 evaluators={})

  # Likelihood calibration on evals.split (evaluation/calibration_fit.py):
  # P(keypoint within hit_alpha x max(box w, h)); why 0.05 and not PCK's
  # 0.2: there. Fewer known keypoints than min_keypoints: none fitted.
  # A box whose max(w, h) is under 1/box_range_factor x the smallest or
  # over box_range_factor x the largest training box gets calibrated
  # likelihood 0 and a warning (inference/box_range.py says why 2).
  # method: 'auto' picks isotonic or Platt by cross-validated Brier score.
  c.calibration = dict(hit_alpha=0.05, min_keypoints=20,
                       box_range_factor=2.0, method='auto')

  # Mesh ('data', 'fsdp') sizes (-1: the rest); (regex, 'fsdp'|'replicate')
  # rules on a leaf's path, first match wins; smaller arrays replicated.
  c.sharding = dict(mesh_shape=(-1, 1), rules=(('.*', 'fsdp'),),
                    fsdp_min_param_elements=2**14)

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3

  c.field_choices = field_choices(model_name)
  if backbone != 'resnet':
    vit_recipe(c, backbone)
  c.lock()
  return c


def field_choices(model_name: str) -> ml_collections.ConfigDict:
  """Allowed values of the enumerated fields, nested as the config."""
  choices = ml_collections.ConfigDict(dict(
      model_name=MODEL_NAMES,
      model=dict(resnet=dict(depth=(18, 34, 50),
                             norm=('batch', 'group', 'frozen_batch'),
                             frozen_stages=(-1, 0, 1, 2, 3, 4),
                             conv_impl=('auto', 'xla', 'gemm')),
                 encoder=('resnet', 'vit'),
                 vit=dict(variant=('S', 'B', 'L'),
                          pos_interpolation=('dinov2', 'timm', 'mae'),
                          conv_impl=('auto', 'xla', 'gemm')),
                 coordinate_loss=('l1', 'laplace'),
                 dtype=('float32', 'bfloat16')),
      decode=dict(confidence_radius_bins=(0, 1, 2, 4, 8)),
      calibration=dict(method=('auto', 'isotonic', 'platt'))))
  if model_name in ('detector', 'centroid'):
    del choices.model['coordinate_loss']
  return choices
