"""Layer-wise learning-rate decay for a ViT backbone (MAE / ViTPose recipe).

AdamW whose learning rate for a ViT parameter is scaled by
``layer_decay ** (depth + 1 - layer_id)`` (`layer_id`): the patch embedding,
position embeddings and class/register tokens (id 0) get
``layer_decay ** (depth + 1)``, block i (id i + 1) ``layer_decay **
(depth - i)``, and everything else -- the ViT's final norm, its pyramid,
the input projections and the decoder -- the full rate (id depth + 1).
Same ids and scales as MAE's ``util/lr_decay.py`` (``get_layer_id_for_vit``,
``layer_scales``), ViTPose's ``mmcv_custom/layer_decay_optimizer_constructor.py``
and ViTDet's ``get_vit_lr_decay_rate``; as in torch's per-group ``lr``, the
scale multiplies the decoupled weight decay too.

Weight decay: none on 1-D parameters (biases, norms, LayerScale gammas),
position embeddings and class/register tokens (MAE's ``param_groups_lrd``
with ``no_weight_decay_list = {pos_embed, cls_token}``; ViTPose's
constructor exempts 1-D parameters, biases and ``pos_embed`` but decays
the class token).

Defaults (`VITPOSE_B`), from ViTPose's
``configs/body/2d_kpt_sview_rgb_img/topdown_heatmap/coco/ViTPose_base_coco_256x192.py``:
AdamW lr 5e-4 at batch 512 (8 GPUs x 64), betas (0.9, 0.999), weight decay
0.1, layer decay 0.75 for 12 blocks (ViTPose-L: 0.8, -H: 0.85; MAE's
ImageNet fine-tuning: 0.65 for B, 0.75 for L), gradient clip 1.0, linear
warm-up over 500 steps from 0.001 x lr, steps x0.1 at epochs 170 and 200 of
210, drop path 0.3 (-L 0.5; ViTPose-S at commit 9295846: drop path 0.3,
layer decay 0.9).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax.numpy as jnp
import optax

# ViTPose-B's recipe (module docstring); lr at its global batch 512.
VITPOSE_B = dict(learning_rate=5e-4, weight_decay=0.1, layer_decay=0.75,
                 b1=0.9, b2=0.999, grad_clip_norm=1.0, warmup_steps=500,
                 warmup_ratio=0.001, drop_path_rate=0.3)
_EMBEDDINGS = ('patch_embed', 'pos_embed', 'cls_token', 'reg_token')
_NO_DECAY = ('pos_embed', 'cls_token', 'reg_token')


def layer_id(path: Sequence[str], depth: int,
             backbone_key: str = 'backbone') -> int:
  """MAE's ``get_layer_id_for_vit`` on a Flax parameter path.

  Args:
    path: keys from the params root, e.g. ('backbone', 'blocks_3', 'attn',
      'qkv', 'kernel').
    depth: the ViT's number of blocks.
    backbone_key: the ViT's module name at the params root.

  Returns:
    0 for the ViT's embeddings, i + 1 for its block i, depth + 1 otherwise.
  """
  if len(path) < 2 or path[0] != backbone_key:
    return depth + 1
  if path[1] in _EMBEDDINGS:
    return 0
  if path[1].startswith('blocks_'):
    return int(path[1][len('blocks_'):]) + 1
  return depth + 1


def _labels(depth: int, backbone_key: str) -> Callable[[Any], Any]:
  def labels(params):
    return flax.traverse_util.path_aware_map(
        lambda path, _: f'layer_{layer_id(path, depth, backbone_key)}',
        params)
  return labels


def decay_mask(params: Any) -> Any:
  """True where AdamW's weight decay applies (module docstring): arrays of
  2 or more dimensions other than position embeddings and tokens."""
  return flax.traverse_util.path_aware_map(
      lambda path, x: jnp.ndim(x) > 1 and path[-1] not in _NO_DECAY, params)


def warmup_step_schedule(learning_rate: float, warmup_steps: int,
                         warmup_ratio: float, decay_steps: Sequence[int] = (),
                         decay_factor: float = 0.1) -> optax.Schedule:
  """mmcv's linear warm-up on a step schedule (ViTPose's ``lr_config``).

  lr(t) = learning_rate * decay_factor ** #{b in decay_steps: t >= b}
  * (warmup_ratio + (1 - warmup_ratio) * min(t / warmup_steps, 1)); steps
  are optimizer steps.
  """
  steps = optax.piecewise_constant_schedule(
      learning_rate, {int(b): decay_factor for b in decay_steps})

  def schedule(step):
    frac = (jnp.minimum(step / warmup_steps, 1.0) if warmup_steps > 0
            else 1.0)
    return steps(step) * (warmup_ratio + (1.0 - warmup_ratio) * frac)
  return schedule


def layer_decay_adamw(learning_rate: float | optax.Schedule, depth: int,
                      layer_decay: float = 0.75, weight_decay: float = 0.1,
                      b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                      backbone_key: str = 'backbone'
                      ) -> optax.GradientTransformation:
  """AdamW with layer-wise learning-rate decay for ``params[backbone_key]``.

  The update of a parameter with `layer_id` k is ``-lr(t) * layer_decay **
  (depth + 1 - k) * (adam(g) + weight_decay * p * decay_mask)``: torch
  AdamW with one parameter group per layer (MAE ``param_groups_lrd``).

  Args:
    learning_rate: base rate or schedule (e.g. `warmup_step_schedule`).
    depth: the ViT's number of blocks.
    layer_decay: per-block factor (1.0: plain AdamW).
    weight_decay: decoupled weight decay (`decay_mask` leaves only).
    b1, b2, eps: Adam's.
    backbone_key: the ViT's module name at the params root.

  Returns:
    an ``optax.GradientTransformation`` over the model's params tree
    (chain it after gradient clipping).
  """
  scales = {f'layer_{k}': optax.scale(layer_decay ** (depth + 1 - k))
            for k in range(depth + 2)}
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.multi_transform(scales, _labels(depth, backbone_key)),
      optax.scale_by_learning_rate(learning_rate))
