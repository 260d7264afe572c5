"""Model, optimizer and the sharded `TrainState` built from a config.

Parameters are created abstractly with `jax.eval_shape` first, their
shardings derived from the mesh, and then materialised by
``jax.jit(init, out_shardings=...)`` so no host builds an unsharded copy it
does not need (MaxText's pattern).
"""

import functools
import importlib
import os
from typing import Any

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kpseq_jax.data import detection
from kpseq_jax.models import model as model_lib
from kpseq_jax.models import pretrained
from kpseq_jax.models import resnet
from kpseq_jax.models import vit as vit_lib
from kpseq_jax.models import vit_pretrained
from kpseq_jax.sequence import grammar
from kpseq_jax.runtime import sharding
from kpseq_jax.sequence import vocab as vocab_lib
from kpseq_jax.training import checkpointing
from kpseq_jax.training import layer_decay


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; saved by Orbax.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics ({} without BatchNorm).
    opt_state: optax state of `create_optimizer`.
    rng: uint32 [2] PRNG key for dropout, folded with `step` each step.
    ema: with ``config.optim.ema_decay`` > 0, the exponential moving average of
      the weights, ``{'params': ..., 'batch_stats': ...}`` shaped as those
      fields (`step.update_ema`); ``{}`` without one.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  ema: Any = flax.struct.field(default_factory=dict)

  def inference_variables(self) -> dict:
    """The Flax variables to evaluate and predict with: the moving average
    of the weights when the state has one, else ``params`` and
    ``batch_stats``."""
    if self.ema:
      return dict(self.ema)
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_model(config: ml_collections.ConfigDict):
  """``kpseq_jax/models/<config.model_name>.py``'s ``Model(**config.model)``
  with the arguments that come from the data: the vocabulary and sequence
  length of a keypoint model, the classes (``max_num_categories``) of the
  detector (big_vision's ``importlib`` by name).

  Raises:
    ModuleNotFoundError: no module of that name under ``kpseq_jax/models``.
  """
  module = importlib.import_module(f'kpseq_jax.models.{config.model_name}')
  fields = flax.core.freeze(config.model.to_dict())  # Hashable modules.
  if config.model_name in detection.BOX_MODELS:
    return module.Model(num_classes=config.max_num_categories, **fields)
  return module.Model(vocab=vocab_lib.from_config(config),
                      max_seq_len=sequence_length(config), **fields)


def sequence_length(config: ml_collections.ConfigDict) -> int:
  """L, input (and target) positions of a run's sequences:
  `grammar.seq_len` of ``max_num_keypoints`` behind the vocabulary's
  prefix tokens."""
  return grammar.seq_len(config.max_num_keypoints,
                         vocab_lib.from_config(config).num_prefix_tokens)


def steps_per_epoch(config: ml_collections.ConfigDict, train_size: int) -> int:
  """Optimizer steps in one pass over ``train_size`` examples (>= 1); for
  the log only (the schedule is in steps)."""
  return max(1, train_size // config.input.batch_size)


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> optax.Schedule:
  """Constant ``optim.learning_rate``, x ``optim.decay_factor`` at each of
  ``optim.decay_steps`` (the paper's step decay, x0.1 at epoch 200 of
  300, in optimizer steps); with ``optim.warmup_steps`` > 0 times mmcv's
  linear warm-up from 0.001 x (ViTPose's ``lr_config``,
  `layer_decay.warmup_step_schedule`)."""
  o = config.optim
  if o.warmup_steps > 0:
    return layer_decay.warmup_step_schedule(
        o.learning_rate, o.warmup_steps, WARMUP_RATIO, o.decay_steps,
        o.decay_factor)
  boundaries = {int(s): o.decay_factor for s in o.decay_steps}
  return optax.piecewise_constant_schedule(o.learning_rate, boundaries)


# mmcv's ``warmup_ratio`` in ViTPose's configs: the warm-up starts at
# 0.001 x the rate.
WARMUP_RATIO = 0.001


def vit_depth(config: ml_collections.ConfigDict) -> int:
  """Blocks of ``config.model.vit`` (its variant's unless overridden)."""
  return vit_lib.ViT(**config.model.vit).dims()[1]


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter) with optional global-norm clipping.

  With ``optim.layer_decay`` > 0 (the ViT only): MAE / ViTPose's layer-wise
  rate decay (`layer_decay.layer_decay_adamw` over ``params['backbone']``:
  the ViT's block i at ``layer_decay ** (depth - i)`` x the rate, its
  embeddings at ``layer_decay ** (depth + 1)``, the rest at the rate;
  weight decay on matrices only).

  ResNet only: frozen parameters (`frozen_labels`: the backbone's BatchNorm
  ``scale`` and ``bias`` with ``resnet.norm='frozen_batch'``, every
  parameter of a stage frozen by ``resnet.frozen_stages``) get no update,
  weight decay included, as parameters with ``requires_grad=False`` in
  DETR's ``models/backbone.py``. Their gradients are zero
  (``stop_gradient`` in ``resnet.py``), so they add nothing to the clipped
  global norm. The ViT has no frozen parts; ``model.resnet`` is not read.

  Raises:
    ValueError: ``optim.layer_decay`` > 0 with ``model.encoder='resnet'``.
  """
  o, schedule = config.optim, learning_rate_schedule(config)
  if o.layer_decay > 0:
    if config.model.encoder != 'vit':
      raise ValueError(f'optim.layer_decay={o.layer_decay} decays the rate '
                       "over a ViT's blocks: set model.encoder='vit' or "
                       'optim.layer_decay=0.')
    adamw = layer_decay.layer_decay_adamw(
        schedule, vit_depth(config), o.layer_decay, o.weight_decay)
  else:
    adamw = optax.adamw(schedule, weight_decay=o.weight_decay)
  r = config.model.resnet
  if config.model.encoder == 'resnet' and (r.norm == 'frozen_batch' or
                                           r.frozen_stages >= 0):
    adamw = optax.multi_transform(
        {'train': adamw, 'frozen': optax.set_to_zero()},
        functools.partial(frozen_labels, norm=r.norm,
                          frozen_stages=r.frozen_stages))
  if o.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
  return adamw


def frozen_labels(params: Any, norm: str = 'frozen_batch',
                  frozen_stages: int = -1) -> Any:
  """'frozen' or 'train' per leaf of ``params`` (the model's tree).

  'frozen': under ``backbone``, a BatchNorm ``scale``/``bias`` when ``norm``
  is 'frozen_batch' (the ResNet's convs have no bias, so these are exactly
  its norm parameters), and every leaf of a frozen stage
  (`resnet.in_frozen_stage`).
  """
  def label(path, _):
    if path[0] != 'backbone':
      return 'train'
    if norm == 'frozen_batch' and path[-1] in ('scale', 'bias'):
      return 'frozen'
    return ('frozen' if resnet.in_frozen_stage(path[1], frozen_stages)
            else 'train')
  return flax.traverse_util.path_aware_map(label, params)


def dummy_inputs(config: ml_collections.ConfigDict,
                 batch_size: int = 1) -> dict:
  """Zero model inputs of the configured shapes, for init and eval_shape.

  Returns:
    keyword arguments of the model's ``__call__``: images uint8
    [B, S, S, 3], input_tokens int32 [B, L], input_coords float32 [B, L],
    and for ``model_name='cape'`` a `model.SupportSet` of
    ``cape.num_shots`` shots; for 'detector' only images uint8
    [B, H, W, 3] of ``detector.image_size_px``; for 'end_to_end' images of
    that canvas and an identity ``memory_from_crop`` [B, 2, 3].
  """
  if config.model_name in detection.BOX_MODELS:
    h, w = config.detector.image_size_px
    return dict(images=jnp.zeros([batch_size, h, w, 3], jnp.uint8))
  s, kmax = config.input.image_size_px, config.max_num_keypoints
  length = sequence_length(config)
  out = dict(images=jnp.zeros([batch_size, s, s, 3], jnp.uint8),
             input_tokens=jnp.zeros([batch_size, length], jnp.int32),
             input_coords=jnp.zeros([batch_size, length], jnp.float32))
  if config.model_name == 'end_to_end':
    h, w = config.detector.image_size_px
    out['images'] = jnp.zeros([batch_size, h, w, 3], jnp.uint8)
    out['memory_from_crop'] = jnp.tile(jnp.eye(2, 3)[None], (batch_size, 1, 1))
  if config.model_name == 'cape':
    shots = config.cape.num_shots
    out['support'] = model_lib.SupportSet(
        images=jnp.zeros([batch_size, shots, s, s, 3], jnp.uint8),
        keypoints=jnp.zeros([batch_size, shots, kmax, 2], jnp.float32),
        visible=jnp.zeros([batch_size, shots, kmax], jnp.float32),
        num_keypoints=jnp.full([batch_size], kmax, jnp.int32))
  return out


def _init_fn(config: ml_collections.ConfigDict,
             model,
             tx: optax.GradientTransformation):
  """``init(rng) -> TrainState`` for the configured shapes."""

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({'params': params_rng, 'dropout': dropout_rng},
                           **dummy_inputs(config), train=False)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=dropout_rng,
                      ema=initial_ema(config, params, batch_stats))

  return init


def initial_ema(config: ml_collections.ConfigDict, params: Any,
                batch_stats: Any) -> dict:
  """`TrainState.ema` at step 0: a copy of the weights with
  ``config.optim.ema_decay`` > 0, else ``{}``."""
  if config.optim.ema_decay <= 0:
    return {}
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return {'params': copy(params), 'batch_stats': copy(batch_stats)}


def abstract_train_state(config: ml_collections.ConfigDict,
                         model,
                         tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shapes, dtypes and shardings without allocating it.

  Returns:
    TrainState of `jax.ShapeDtypeStruct` leaves carrying their
    `NamedSharding` (a restore target for Orbax).
  """
  abstract = jax.eval_shape(_init_fn(config, model, tx),
                            jax.random.PRNGKey(config.seed))
  shardings = sharding.state_shardings(abstract, mesh,
                                       config.sharding.fsdp_min_param_elements,
                                       config.sharding.rules)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def create_train_state(config: ml_collections.ConfigDict,
                       model,
                       tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the state directly into its shardings (`jax.jit` with
  ``out_shardings`` from `abstract_train_state`), then puts the backbone
  weights of ``config.model_init`` in: a trained workdir's backbone
  (`checkpointing.read_backbone`, either encoder), a ResNet state dict
  (`pretrained.load_backbone`) or, with ``model.encoder='vit'``, a timm /
  DINOv2 / MAE ``.safetensors`` (`vit_pretrained.load_vit`; the ViT's
  pyramid keeps its initialisation).

  Raises:
    FileNotFoundError, ValueError: from those loaders (a file that does
      not match the configured backbone names every mismatch).
  """
  abstract = abstract_train_state(config, model, tx, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  state = jax.jit(_init_fn(config, model, tx), out_shardings=shardings)(
      jax.random.PRNGKey(config.seed))
  if path := config.model_init:
    # AdamW's initial moments are zeros whatever the parameters, so only
    # params and batch_stats change; each array keeps its sharding.
    if os.path.isdir(path):  # A trained workdir (e.g. the detector's).
      params, batch_stats = pretrained.place_backbone(
          *checkpointing.read_backbone(path), state.params,
          state.batch_stats, path)
    elif config.model.encoder == 'vit':  # No BatchNorm statistics.
      params = vit_pretrained.load_vit(path, state.params)
      batch_stats = state.batch_stats
    else:
      params, batch_stats = pretrained.load_backbone(
          path, state.params, state.batch_stats)
    state = state.replace(
        params=jax.device_put(params, shardings.params),
        batch_stats=jax.device_put(batch_stats, shardings.batch_stats))
    if state.ema:  # The average starts from the loaded weights too.
      state = state.replace(ema=jax.device_put(
          {'params': params, 'batch_stats': batch_stats}, shardings.ema))
  return state
