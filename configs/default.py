"""Paper configuration: Raster2Seq's recipe on a top-down crop (MP-100 scale).

ResNet-50 at 512 px (2048 x 16 x 16 features), a 6-layer deformable decoder,
AdamW 1e-4, batch 2, 300 epochs with the learning rate x0.1 at epoch 200,
horizontal flip, random crop (scale/shift) and colour jitter; loss 1.0 * CE +
5.0 * L1 (Raster2Seq paper, training details). Epochs are stated in steps
here (docs/mp100.md: steps from a data set's size).

The groups hold the arguments of what they build, by those arguments' names:
``config.model`` is ``models/<model_name>.py``'s ``Model(**config.model,
vocab=..., max_seq_len=...)``, ``config.model.resnet`` the `ResNet`'s,
``config.model.transformer`` the decoder's. Any field can be overridden on
the command line (``--config.optim.num_train_steps=10``); the dict is locked,
so a misspelt field is an error. Enumerated fields are listed in
``field_choices`` (checked by training/config_checks.py).
"""

import ml_collections

# MP-100, split 1 lower bound of the CAPE train size (docs/mp100.md):
# 10,175 instances at batch 2 = 5,087 steps per epoch.
MP100_STEPS_PER_EPOCH = 5087


def model_config(model_name: str) -> ml_collections.ConfigDict:
  """``models/<model_name>.py``'s ``Model`` fields (paper sizes)."""
  m = ml_collections.ConfigDict(dict(
      # ImageNet ResNet-50 with frozen BatchNorm (DETR's FrozenBatchNorm2d);
      # stem and layer1 frozen (frozen_stages=1, mmdetection's). Both
      # expect model_init; from scratch: norm='batch', frozen_stages=-1.
      # conv_impl: 'xla', 'gemm' (1x1 convs and weight gradients as
      # matmuls) or 'auto' ('gemm' on CPU); same values (models/conv.py).
      resnet=dict(depth=50, norm='frozen_batch', frozen_stages=1,
                  conv_impl='auto', remat=False),
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
  loss = ml_collections.ConfigDict(dict(ce_weight=1.0, l1_weight=5.0))
  if model_name == 'cape':
    loss.proposal_l1_weight = 5.0
  return loss


def get_config(model_name: str = 'supervised') -> ml_collections.ConfigDict:
  """Returns the locked paper configuration of ``model_name``."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # kpseq_jax/models/<model_name>.py: 'supervised' (one crop in, its
  # category's keypoints out), 'cape' (support-conditioned: episodes of
  # support crops with keypoints and a query), 'end_to_end' (PRTR's: the
  # whole image on the detector.image_size_px canvas, its memory sampled
  # inside each box) or 'detector' (boxes).
  c.model_name = model_name
  c.model = model_config(model_name)
  # ImageNet ResNet weights (.safetensors / .pth, models/pretrained.py) or a
  # trained workdir with the same ResNet depth; '' = random init.
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
  # canvas (height, width), training resize range, boxes kept per image,
  # score below which predict/analyze drop a box.
  c.detector = dict(image_size_px=(480, 640), scale_range=(0.75, 1.0),
                    max_detections=10, score_threshold=0.3)

  # Decoding: flip test (MMPose's; two decodes per crop) and the
  # confidence's +- radius in coordinate bins.
  c.decode = dict(flip_test=False, confidence_radius_bins=2)

  # Evaluation of `split` every `every_steps` (0: after the last step only);
  # num_examples -1: the whole split. OKS sigma for categories without
  # their own (DeepLabCut's 0.1). `evaluators`: name -> {'type': ...,
  # constructor arguments} (kpseq_jax/evaluation/evaluate.py); empty: the
  # system's defaults (`evaluate.default_evals`).
  c.evals = dict(split='test', batch_size=8, every_steps=0, num_examples=-1,
                 oks_default_sigma=0.1, evaluators={})

  # Mesh ('data', 'fsdp') sizes (-1: the rest); (regex, 'fsdp'|'replicate')
  # rules on a leaf's path, first match wins; smaller arrays replicated.
  c.sharding = dict(mesh_shape=(-1, 1), rules=(('.*', 'fsdp'),),
                    fsdp_min_param_elements=2**14)

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3

  c.field_choices = field_choices(model_name)
  c.lock()
  return c


def field_choices(model_name: str) -> ml_collections.ConfigDict:
  """Allowed values of the enumerated fields, nested as the config."""
  choices = ml_collections.ConfigDict(dict(
      model_name=('supervised', 'cape', 'end_to_end', 'detector'),
      model=dict(resnet=dict(depth=(18, 34, 50),
                             norm=('batch', 'group', 'frozen_batch'),
                             frozen_stages=(-1, 0, 1, 2, 3, 4),
                             conv_impl=('auto', 'xla', 'gemm')),
                 coordinate_loss=('l1', 'laplace'),
                 dtype=('float32', 'bfloat16')),
      decode=dict(confidence_radius_bins=(0, 1, 2, 4, 8))))
  if model_name == 'detector':
    del choices.model['coordinate_loss']
  return choices
