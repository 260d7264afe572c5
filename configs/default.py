"""Paper configuration: Raster2Seq recipe on a top-down crop (MP-100 scale).

ResNet-50 at 512 px (2048 x 16 x 16 features), a 6-layer deformable decoder,
AdamW 1e-4, batch 2, 300 epochs with the learning rate x0.1 at epoch 200,
horizontal flip, random crop (scale/shift) and colour jitter; loss 1.0 * CE +
5.0 * L1 (Raster2Seq paper, training details).

Every field can be overridden on the command line, e.g.
``--config.num_epochs=10``; the dict is locked so a misspelt field is an
error. Other configs derive from this one with ``default.get_config()`` and
override a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the locked paper configuration."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: a data set written by `python -m data_prep.build`.
  c.dataset_dir = ''  # Directory holding the ArrayRecord data set.
  # 'supervised': one instance in, its category's keypoints out (the test
  # categories are trained on). 'cape': category-agnostic pose: episodes of
  # num_shots support instances (with keypoints) and a query of one
  # category; the model finds the support's keypoints in the query, for
  # categories never seen in training (kpseq_jax/data/episodes.py).
  c.setting = 'supervised'
  c.num_shots = 1  # CAPE: supports per episode (MP-100: 1 or 5).
  # CAPE training: every episode asks for its keypoints in a random order
  # (the same in supports and query), and for a random subset of at least
  # cape_min_keep_frac * K of them (1.0: all); CapeFormer's
  # support_order_dropout is the precedent.
  c.cape_permute_keypoints = True
  c.cape_min_keep_frac = 0.5
  # CAPE: match each support keypoint's feature against the query memory
  # and lay the decoder's reference points at the match (CapeFormer's
  # proposals), trained with an L1 loss of this weight (normalised crop
  # coordinates, as the l1 term).
  c.cape_proposals = True
  c.cape_proposal_l1_weight = 5.0
  # CAPE evaluation episodes (data_prep/episodes.py): with
  # cape_support_split '' the supports come from the evaluated split,
  # drawn by MP-100's protocol (per category cape_num_episodes episodes of
  # num_shots supports and cape_num_queries queries; MP-100 test: 200, val:
  # 100, 15 queries); with a split name (e.g. 'train') every evaluated
  # instance is a query once, with supports drawn from that split.
  c.cape_support_split = ''
  c.cape_num_episodes = 200
  c.cape_num_queries = 15
  # Skip (and report) categories with too few instances for an episode
  # instead of stopping with an error before training.
  c.cape_skip_small_categories = False
  # Evaluate with each episode's keypoints in a random order (the same in
  # supports and query): the model must follow the support.
  c.cape_eval_permuted = False
  c.train_split = 'train'
  c.eval_split = 'test'
  c.max_num_keypoints = 68  # Longest category in MP-100 -> 4 * 68 + 2 tokens.
  # Optional: a category token after <bos> (`<bos> <cat_k> <coord> x y ...`);
  # category k = index of its id among the data set's ids in increasing
  # order; the vocabulary holds max_num_categories category tokens.
  c.category_conditioning = False
  c.max_num_categories = 100  # MP-100.
  # Keypoint presence (issue 16): an <absent> token that the classifier may
  # emit at a keypoint's x (and then y) position, trained by the same
  # cross-entropy from the keypoints the data set says are not visible
  # (data sets built with `data_prep.build --unlabelled_means=absent`,
  # e.g. DeepLabCut's missing labels); pix2seq's INVISIBLE token. Off in
  # the paper config (its vocabulary has no <absent>).
  c.presence_token = False
  # Per-keypoint confidence = the classifier's probability mass within
  # +-confidence_radius_bins coordinate bins of the decoded x bin times the
  # same for y (kpseq_jax/inference/decoding.py). Bins are crop pixels when
  # num_bins = image_size_px.
  c.confidence_radius_bins = 2
  # OKS: per-keypoint sigma when the data set gives none for a category
  # and its layout is not COCO's 17 person keypoints (whose sigmas are
  # used); 0.1 is DeepLabCut's default for OKS-based evaluation.
  c.oks_default_sigma = 0.1
  c.bbox_scale = 1.25  # Top-down crop: bbox enlarged 1.25x, aspect kept.
  c.image_size_px = 512
  c.num_bins = 512  # One coordinate bin per pixel at 512 px.

  # Training-only augmentation.
  c.flip_prob = 0.5
  c.scale_range = (0.75, 1.25)  # Random crop: crop-size multiplier range.
  c.shift_frac = 0.1  # Random crop: centre shift as a fraction of crop size.
  c.rotation_deg = 0.0  # Max |rotation|; 0 disables (not in the paper).
  c.color_jitter = 0.2  # Brightness/contrast/saturation factor range +-.

  # Model.
  c.backbone_depth = 50
  # Backbone as in Raster2Seq's models/backbone.py (from Deformable DETR): an
  # ImageNet ResNet-50 with frozen BatchNorm (DETR's FrozenBatchNorm2d), of
  # which only layer2..layer4 train (stem and layer1 frozen:
  # backbone_frozen_stages=1, mmdetection's frozen_stages). Both expect
  # pretrained_backbone_path; training from scratch wants
  # --config.backbone_norm=batch --config.backbone_frozen_stages=-1 (what
  # configs/dlc_openfield.py does).
  c.backbone_norm = 'frozen_batch'  # 'batch' | 'group' | 'frozen_batch'.
  c.backbone_frozen_stages = 1  # -1: none; 0: stem; n: stem + layer1..n.
  # Convolutions: 'xla' (lax.conv), 'gemm' (1x1 convs and weight gradients as
  # matmuls; XLA:CPU's backward-filter conv is slow) or 'auto' ('gemm' on
  # CPU, 'xla' on GPU/TPU). Same parameters and values; see kpseq_jax/models/conv.py.
  c.backbone_conv_impl = 'auto'
  # ImageNet ResNet weights (torchvision/timm state dict, .safetensors, or
  # .pth with torch installed; see kpseq_jax/models/pretrained.py), loaded into the
  # backbone at initialisation. '' = random init. Nothing is downloaded.
  # With 'frozen_batch' the BatchNorm statistics and affine parameters stay
  # at the file's values, and frozen stages keep all of theirs. A directory
  # is a trained --workdir of this project (a keypoint model or the
  # detector, any config with the same backbone_depth): its latest
  # checkpoint's backbone (training/checkpointing.read_backbone).
  c.pretrained_backbone_path = ''
  c.feature_levels = ('c5',)  # Paper: one 16 x 16 level at stride 32.
  c.d_model = 256
  c.num_heads = 8
  c.num_layers = 6
  c.ffn_dim = 1024
  c.dropout = 0.1
  c.num_points = 4  # Deformable attention sampling points per head/level.
  c.compute_dtype = 'float32'  # 'float32' | 'bfloat16' (params stay f32).
  # Rematerialisation (nn.remat): recompute activations in the backward pass
  # per ResNet block / per decoder layer; less memory, more compute.
  c.remat_backbone = False
  c.remat_decoder = False
  # Coarse to fine across decoder layers (issue 19; kpseq_jax/models/decoder.py).
  # Iterative reference-point refinement (Deformable DETR's with_box_refine,
  # the official Raster2Seq's poly_refine): each layer predicts its own
  # (x, y) around where it sampled and the next layer samples there; the
  # intermediate points are trained by L1. Off in the paper config.
  c.decoder_refine_points = False
  # Auxiliary losses: CE + L1 on every decoder layer's output through the
  # shared heads, summed with the last layer's (the official Raster2Seq's
  # SetCriterion on all layers; DETR's aux_loss). Off in the paper config.
  c.decoder_aux_loss = False
  # Poseur's noisy reference points: std of Gaussian noise added to the
  # first layer's reference points in training, as a fraction of the crop
  # (normalised [0, 1] units); 0 disables.
  c.reference_point_noise_frac = 0.0
  # Loss of the (x, y) regressor: 'l1' (the paper's, weight l1_weight) or
  # 'laplace': a scale head predicts b per coordinate and the last layer's
  # coordinates are trained by the Laplace likelihood |e| / b + log 2b
  # (RLE's scale-aware loss without its flow, Li et al. ICCV 2021), with
  # the same weight; earlier layers (aux losses, refinement) keep the L1.
  c.coordinate_loss = 'l1'
  # Exponential moving average of the weights (params and BatchNorm
  # statistics) for evaluation, prediction and analysis; 0 disables (the
  # paper config: the paper does not average). Each step the average moves
  # by 1 - min(ema_decay, (1 + step) / (10 + step)) towards the new
  # weights (tf.train.ExponentialMovingAverage with num_updates), so the
  # random initialisation is forgotten within the first steps.
  c.ema_decay = 0.0

  # Detection stage (issue 18; PRTR's first stage, a Deformable DETR
  # detector; kpseq_jax/models/detector.py). task='detection' trains and
  # evaluates the detector instead of the keypoint model, on whole images:
  # every instance of an image is one target set. It shares the model
  # fields above (backbone_*, feature_levels, d_model, num_heads,
  # num_layers, ffn_dim, dropout, num_points, compute_dtype); its classes
  # are the data set's categories (at most max_num_categories).
  c.task = 'keypoints'  # 'keypoints' | 'detection'.
  # Whole image resized (aspect kept) onto a zero canvas of this (height,
  # width), top-left aligned in evaluation.
  c.detector_image_size_px = (480, 640)
  c.detector_num_queries = 20  # Boxes per image (instances kept: as many).
  c.detector_box_refine = True  # Deformable DETR's with_box_refine.
  # Deformable DETR's loss and matching weights (focal class, L1, GIoU).
  c.detector_class_weight = 2.0
  c.detector_l1_weight = 5.0
  c.detector_giou_weight = 2.0
  # Training augmentation: resize factor drawn from this range times the
  # fitting scale, the image placed at a random offset on the canvas.
  c.detector_scale_range = (0.75, 1.0)
  # The keypoint stage's input (PRTR's two variants): 'two_stage' decodes a
  # top-down crop of each box (image_size_px square); 'end_to_end' encodes
  # the whole image once, resized onto the detector_image_size_px canvas,
  # and samples its memory inside each box (model.full_image_memory;
  # trained on the same jittered crop boxes as top-down training).
  c.keypoint_stage = 'two_stage'
  # Flip test (MMPose's flip_test; Xiao et al., Simple Baselines, ECCV
  # 2018): at evaluation and prediction, also decode each top-down crop
  # mirrored and average the two, for categories with flip pairs (those
  # RandomFlip flips in training). Two decodes per batch; two_stage only.
  c.flip_test = False
  c.max_detections = 10  # Top-scoring boxes kept per image.
  # Detections below this score are dropped where boxes are used (predict,
  # analyze); box AP ranks all max_detections. An image with none above it
  # has an empty result, counted in the evaluation report.
  c.detection_score_threshold = 0.3

  # Loss (Raster2Seq: 1.0 * cross-entropy + 5.0 * L1).
  c.ce_weight = 1.0
  c.l1_weight = 5.0

  # Optimisation.
  c.batch_size = 2  # Global batch size.
  c.learning_rate = 1e-4
  c.weight_decay = 1e-4
  c.grad_clip_norm = 0.1  # Deformable DETR clips at 0.1; <= 0 disables.
  c.num_epochs = 300
  c.decay_epochs = (200,)  # Learning rate x decay_factor at each.
  c.decay_factor = 0.1
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  # A NaN/inf loss or gradient stops training naming the step; True instead
  # skips that update (state unchanged) and counts it in the metrics.
  c.skip_nonfinite_updates = False
  # With skipping on, this many skipped updates in a row stop training (the
  # model is not learning any more); <= 0 never stops.
  c.max_consecutive_skipped_updates = 100

  # Mesh: axis sizes of ('data', 'fsdp'); -1 means all remaining devices.
  # (N, 1): data parallel, replicated state; (1, N): fully sharded (FSDP).
  c.mesh_shape = (-1, 1)
  # How the train state is sharded (sharding.py; big_vision's
  # sharding_strategy): (regex, strategy) pairs, the first regex matching a
  # leaf's whole path ('params/decoder/...', 'opt_state/.../mu/decoder/...')
  # wins; strategy 'fsdp' or 'replicate'; unmatched leaves are replicated.
  # E.g. --config.sharding_rules="(('.*coord_embed', 'replicate'), ('.*', 'fsdp'))"
  c.sharding_rules = (('.*', 'fsdp'),)
  # 'fsdp' strategy: arrays with at least this many elements are split along
  # 'fsdp' on their largest divisible dimension; smaller ones are replicated.
  c.fsdp_min_param_elements = 2**14

  # Loop.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3
  c.eval_batch_size = 8
  # Evaluate eval_split every this many steps during training (0: only after
  # the last step); each evaluation logs PCK, updates TensorBoard and
  # overwrites eval_<split>.json.
  c.eval_every_steps = 0
  c.num_eval_examples = -1  # -1: the whole eval split.
  c.worker_count = 0  # Grain worker processes (0: in the main process).
  # Batches the input pipeline prepares ahead of the train step (Grain's own
  # default is 500), and its threads (0: the CPU count, at most 16); see
  # kpseq_jax/data/pipeline.py.
  c.prefetch_batches = 4
  c.data_threads = 0

  # Allowed values of enumerated fields, checked before anything compiles
  # (kpseq_jax/training/config_checks.py); configs add their own fields.
  c.field_choices = ml_collections.ConfigDict(
      dict(setting=('supervised', 'cape'),
           task=('keypoints', 'detection'),
           keypoint_stage=('two_stage', 'end_to_end'),
           coordinate_loss=('l1', 'laplace')))

  c.lock()
  return c
