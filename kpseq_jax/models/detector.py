"""Box detector: ResNet + deformable transformer decoder (Deformable DETR).

The first stage of PRTR (Li et al., "Pose Recognition with Cascade
Transformers", CVPR 2021; issue 18): a DETR-style set predictor of object
boxes, built as the single-stage Deformable DETR (Zhu et al., ICLR 2021;
``fundamentalvision/Deformable-DETR``) without its transformer encoder:

* Memory: the keypoint model's encoder (`model.normalize_images`, `ResNet`,
  `model.input_projection`, `model.image_memory`): per-level 1x1 conv +
  GroupNorm(32), DETR sine position encoding and a learned level embedding
  added to the features (`model.ImageEncoder`, as the keypoint models).
  There is no encoder layer; position is folded into the memory.
* Queries (``models/deformable_transformer.py``
  ``DeformableTransformer.forward``, single stage): a learned table
  ``query_embed`` [Q, 2 D] split into the query position (first half) and
  the content (second half); the first reference points are
  ``sigmoid(reference_points(query_pos))`` (Linear(D, 2), xavier_uniform).
* Decoder layers (``DeformableTransformerDecoderLayer``): self-attention
  among the Q queries (no mask) with the query position added to queries
  and keys, deformable cross-attention with the position added to the
  query, ReLU FFN, each followed by dropout, residual and post-LayerNorm:
  `decoder.DecoderLayer` with ``query_pos``.
* Heads (``models/deformable_detr.py``): per layer a class Linear
  (``num_classes`` sigmoid logits, no background class, bias
  ``-log((1 - 0.01) / 0.01)``) and DETR's 3-layer box MLP (`BoxHead`, last
  layer zero, its w/h bias -2 in the first head) predicting a cxcywh delta
  in inverse-sigmoid space around the layer's reference: ``box =
  sigmoid(delta + inverse_sigmoid(reference))`` with a 2-D reference
  (x, y) shifting only the centre.
* Iterative box refinement (``box_refine``, Deformable DETR's
  ``with_box_refine``): every layer has its own heads, and layer l + 1's
  reference is ``stop_gradient(box_l)``, so its delta is relative to the
  whole refined box. Without it, the heads are shared by all layers and
  every layer uses the first reference points.

Deviation: Deformable DETR samples around a 4-D reference box (offsets
scaled by ``num_points`` and half the box size). `MultiScaleDeformableAttention`
takes 2-D reference points (offsets in cells of each level), so every layer
samples around the centre (cx, cy) of its reference box; only the box
prediction uses the reference's width and height.

Outputs: every layer's logits and boxes (the last is the prediction, the
others feed the auxiliary losses of `training.detection_losses.set_loss`);
`top_detections` is Deformable DETR's ``PostProcess``.

Variables: ``params``; ``batch_stats`` when ``resnet.norm`` is 'batch' or
'frozen_batch' (apply with ``mutable=['batch_stats']`` in training with
'batch'); rng ``dropout`` when ``train=True`` and ``dropout > 0``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.models import model as model_lib
from kpseq_jax.models.decoder import DecoderLayer
from kpseq_jax.models.decoder import inverse_sigmoid
from kpseq_jax.runtime import sharding
from kpseq_jax.models import box_ops

# Deformable DETR: class bias so every sigmoid starts at the prior 0.01.
_PRIOR_PROB = 0.01
_CLASS_BIAS = -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB)
# Deformable DETR: bbox_embed[0].layers[-1].bias[2:] = -2 (w = h = sigmoid(-2)
# = 0.12 of the image at the start).
_FIRST_WH_BIAS = -2.0


class BoxHead(nn.Module):
  """DETR's ``MLP(D, D, 4, 3)`` box head: D -> D -> D -> 4, ReLU between.

  The last layer has zero kernel and bias (0, 0, wh_bias, wh_bias)
  (Deformable DETR ``models/deformable_detr.py``), so a head starts by
  predicting its reference (and, with ``wh_bias``, a small box).

  Attributes:
    d_model: hidden width D.
    wh_bias: initial bias of the w and h outputs.
    dtype: compute dtype; parameters float32.
  """
  d_model: int
  wh_bias: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> float32 [..., 4], a (cx, cy, w, h) delta in logit space."""
    def bias_init(key, shape, dtype=jnp.float32):
      del key, shape
      return jnp.asarray([0.0, 0.0, self.wh_bias, self.wh_bias], dtype)

    x = nn.relu(nn.Dense(self.d_model, dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(self.d_model, dtype=self.dtype)(x))
    return nn.Dense(4, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    bias_init=bias_init)(x).astype(jnp.float32)


class Model(model_lib.ImageEncoder):
  """Images -> per-layer class logits and boxes (module docstring).

  Attributes:
    num_classes: C, object classes (sigmoid outputs, no background).
    num_queries: Q, boxes predicted per image (Deformable DETR: 300).
    box_refine: iterative box refinement with per-layer heads (module
      docstring); False shares the heads and keeps the first references.
    resnet: `ResNet`'s arguments but dtype (``configs/default.py``).
    encoder: the backbone, 'resnet' or 'vit' (`model.ImageEncoder`).
    vit: `vit.ViT`'s arguments but dtype, read with ``encoder='vit'``.
    transformer: the decoder layers': num_layers, num_heads, ffn_dim,
      dropout, num_points (`decoder.DecoderLayer`).
    feature_levels: subset of ('c2', 'c3', 'c4', 'c5') (strides 4, 8, 16,
      32); Deformable DETR uses C3-C5 (plus a strided C6 not built here).
    d_model: transformer width (256).
    dtype: compute dtype; parameters, logits and boxes are float32.
  """
  num_classes: int
  resnet: Mapping[str, Any]
  transformer: Mapping[str, Any]
  num_queries: int = 20
  box_refine: bool = True
  feature_levels: Tuple[str, ...] = ('c3', 'c4', 'c5')
  d_model: int = 256
  encoder: str = 'resnet'
  vit: Mapping[str, Any] | None = None
  dtype: Any = 'float32'

  # Batch fields of the train step (`kpseq_jax/data/detection.py`).
  train_fields = ('image', 'boxes', 'labels', 'box_valid')

  @staticmethod
  def inputs(batch: dict) -> dict:
    """``__call__``'s array arguments from a batch."""
    return dict(images=batch['image'])

  def setup(self):
    self.setup_encoder()
    # nn.Embedding(num_queries, 2 * d_model): torch's default N(0, 1).
    self.query_embed = self.param(
        'query_embed', nn.initializers.normal(stddev=1.0),
        (self.num_queries, 2 * self.d_model))
    self.reference_points = nn.Dense(
        2, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    t = self.transformer
    self.layers = [
        DecoderLayer(self.d_model, t['num_heads'], t['ffn_dim'], t['dropout'],
                     len(self.feature_levels), t['num_points'],
                     dtype=self.dtype, name=f'layers_{i}')
        for i in range(t['num_layers'])]
    num_heads = t['num_layers'] if self.box_refine else 1
    self.class_heads = [
        nn.Dense(self.num_classes, dtype=self.dtype,
                 bias_init=nn.initializers.constant(_CLASS_BIAS),
                 name=f'class_heads_{i}') for i in range(num_heads)]
    self.box_heads = [
        BoxHead(self.d_model, _FIRST_WH_BIAS if i == 0 else 0.0, self.dtype,
                name=f'box_heads_{i}') for i in range(num_heads)]

  def decode(self, memory: model_lib.Memory, train: bool
             ) -> Tuple[jax.Array, jax.Array]:
    """The decoder and heads on an encoded image (module docstring).

    Args:
      memory: `encode` output, features [B, S, d_model].
      train: dropout (needs the 'dropout' rng when ``dropout > 0``).

    Returns:
      (logits, boxes) as `__call__`.
    """
    batch = memory.features.shape[0]
    shape = (batch, self.num_queries, self.d_model)
    query_pos, content = jnp.split(self.query_embed, 2, axis=-1)  # [Q, D] each
    reference = nn.sigmoid(
        self.reference_points(query_pos).astype(jnp.float32))  # [Q, 2]
    reference = jnp.broadcast_to(reference, shape[:2] + (2,))  # [B, Q, 2]
    query_pos = jnp.broadcast_to(query_pos.astype(self.dtype), shape)
    x = jnp.broadcast_to(content.astype(self.dtype), shape)  # [B, Q, D]
    all_logits, all_boxes = [], []
    for i, layer in enumerate(self.layers):
      x = layer(x, reference[..., :2], memory.features, memory.spatial_shapes,
                None, train, query_pos)  # [B, Q, D]
      head = i if self.box_refine else 0
      all_logits.append(self.class_heads[head](x).astype(jnp.float32))
      offset = inverse_sigmoid(reference)  # [B, Q, 2] or [B, Q, 4]
      if offset.shape[-1] == 2:  # A point: the delta's w, h stand alone.
        offset = jnp.pad(offset, ((0, 0), (0, 0), (0, 2)))
      box = nn.sigmoid(self.box_heads[head](x) + offset)  # [B, Q, 4]
      all_boxes.append(box)
      if self.box_refine:
        reference = jax.lax.stop_gradient(box)  # Deformable DETR detach().
    return jnp.stack(all_logits), jnp.stack(all_boxes)

  def __call__(self, images: jax.Array, train: bool
               ) -> Tuple[jax.Array, jax.Array]:
    """Detects boxes: ``decode(encode(images))``.

    Args:
      images: uint8 [B, H, W, 3] RGB 0..255; H, W multiples of 32 pixels.
      train: dropout (needs the 'dropout' rng when ``dropout > 0``) and
        BatchNorm batch statistics.

    Returns:
      logits: float32 [L, B, Q, num_classes], sigmoid class logits of every
        decoder layer (L = num_layers; the last is the prediction).
      boxes: float32 [L, B, Q, 4], (cx, cy, w, h) normalised to [0, 1] of
        the input image, every layer.
    """
    logits, boxes, _ = self.detect_with_features(images, train)
    return logits, boxes

  def detect_with_features(self, images: jax.Array, train: bool
                           ) -> Tuple[jax.Array, jax.Array,
                                      dict[str, jax.Array]]:
    """`__call__` that also returns the backbone's feature maps, so a
    keypoint stage can read them instead of running its own backbone pass
    (PRTR's end-to-end variant, Li et al., CVPR 2021).

    Args:
      images, train: as `__call__`.

    Returns:
      (logits, boxes) as `__call__`, and `backbone_features`' maps
      {'c2': [B, H/4, W/4, C2], ..., 'c5'} (``dtype``). Under `jax.jit`
      the maps nobody reads cost nothing (dead-code elimination).
    """
    maps = self.backbone_features(images, train)
    memory = self.encode_features(maps)
    # Keep the memory split by batch under a ('data', 'fsdp') mesh.
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features))
    logits, boxes = self.decode(memory, train)
    return logits, boxes, maps


def top_detections(logits: jax.Array, boxes: jax.Array, k: int
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The k best (query, class) pairs of each image (Deformable DETR's
  ``PostProcess``, ``models/deformable_detr.py``, without the scaling to
  pixels).

  Every query scores every class with its sigmoid; the top k of the Q * C
  scores are kept, so one query can appear with several classes.

  Args:
    logits: float [B, Q, C], the last layer's logits.
    boxes: float [B, Q, 4] cxcywh normalised.
    k: detections per image, 1 <= k <= Q * C.

  Returns:
    scores: float32 [B, k] in (0, 1), descending.
    labels: int32 [B, k], 0-based class.
    boxes: float32 [B, k, 4] (x0, y0, x1, y1) normalised.
  """
  batch, num_queries, num_classes = logits.shape
  if not 1 <= k <= num_queries * num_classes:
    raise ValueError(f'k={k} outside 1..{num_queries * num_classes} '
                     f'(queries x classes)')
  prob = nn.sigmoid(logits.astype(jnp.float32)).reshape(batch, -1)  # [B, Q*C]
  scores, index = jax.lax.top_k(prob, k)  # [B, k]
  query = index // num_classes
  labels = (index % num_classes).astype(jnp.int32)
  xyxy = box_ops.cxcywh_to_xyxy(boxes.astype(jnp.float32))  # [B, Q, 4]
  return scores, labels, jnp.take_along_axis(xyxy, query[..., None], axis=1)
