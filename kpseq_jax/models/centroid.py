"""Box detector as centre heatmaps: CenterNet on the project's backbone.

"Objects as Points" (Zhou et al. 2019, ``xingyizhou/CenterNet``): a fully
convolutional net predicts, on a grid at the finest feature level's stride,
a heatmap per class whose peaks are object centres, and at each cell the
sub-cell offset of the centre and the box's width and height. The same
design finds animals in SLEAP's top-down pipeline (its centroid model: a
confidence map of each animal's centre) and generalises from few labelled
frames because every cell is judged from its neighbourhood alone, where
the set predictor of `detector.py` (Deformable DETR) learns a global
assignment of queries from the training frames' layouts.

* Backbone: the keypoint models' (`model.ImageEncoder.setup_backbone`: a
  ResNet, or a ViT with ViTDet's pyramid).
* Neck: per level a 1x1 conv + GroupNorm(32) to ``d_model`` channels
  (`model.input_projection`, Deformable DETR's), summed top-down with 2x
  nearest upsampling onto the finest level (FPN's top-down path, Lin et
  al. 2017, without its 3x3 output conv).
* Heads (CenterNet's ``head_conv``): per output a 3x3 conv of
  ``head_width`` channels, ReLU, 1x1 conv: the heatmap logits (C, bias
  -2.19 = CenterNet's ``hm`` bias, prior 0.1), the centre's offset in
  cells (2) and the box's width and height in cells (2).
* Decoding (CenterNet's ``_nms``): a cell is a detection candidate only
  where its score is the maximum of its 3x3 neighbourhood; the others get
  logit `SUPPRESSED`. Every cell is then a query of `detector.top_detections`
  (Q = grid cells), so the detector's box predictor, box AP and NMS apply
  unchanged.

The loss is `training.detection_losses.centroid_loss`.

Variables: ``params``; ``batch_stats`` when ``resnet.norm`` is 'batch' or
'frozen_batch' (apply with ``mutable=['batch_stats']`` in training with
'batch').
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.models import model as model_lib
from kpseq_jax.models.conv import Conv

# CenterNet's heatmap bias (-2.19: sigmoid 0.1 at the start).
HEATMAP_BIAS = -2.19
# The logit of a cell that is not a local maximum (sigmoid 0).
SUPPRESSED = -1e4


class Head(nn.Module):
  """CenterNet's head: 3x3 conv, ReLU, 1x1 conv.

  Attributes:
    features: output channels.
    width: hidden channels (CenterNet's ``head_conv``, 64 for ResNets).
    bias: initial bias of the output.
    conv_impl: 'auto', 'xla' or 'gemm' (`conv.Conv`).
    dtype: compute dtype.
  """
  features: int
  width: int
  bias: float = 0.0
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, D] -> float32 [B, h, w, features]."""
    x = nn.relu(Conv(self.width, 3, impl=self.conv_impl, use_bias=True,
                     dtype=self.dtype)(x))
    y = Conv(self.features, 1, impl=self.conv_impl, use_bias=True,
             dtype=self.dtype)(x)
    return y.astype(jnp.float32) + self.bias


class Model(model_lib.ImageEncoder):
  """Images -> centre heatmaps, offsets and sizes (module docstring).

  Attributes:
    num_classes: C, object classes (a heatmap each).
    resnet: `ResNet`'s arguments but dtype (``configs/default.py``).
    encoder: the backbone, 'resnet' or 'vit'.
    vit: `vit.ViT`'s arguments but dtype, read with ``encoder='vit'``.
    feature_levels: levels of the neck, in increasing stride (e.g. ('c3',
      'c4', 'c5'): a stride-8 output grid); consecutive levels 2x apart.
    d_model: neck channels.
    head_width: the heads' hidden channels.
    max_objects: boxes per image the training data keeps (CenterNet's
      ``max_objs``).
    dtype: compute dtype; outputs are float32.
  """
  num_classes: int
  resnet: Mapping[str, Any]
  feature_levels: Tuple[str, ...] = ('c3', 'c4', 'c5')
  d_model: int = 64
  head_width: int = 64
  max_objects: int = 20
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
    conv_impl = self.setup_backbone()
    self.input_proj, self.input_norm = model_lib.input_projection(
        self.feature_levels, self.d_model, conv_impl, self.dtype)
    self.heatmap_head = Head(self.num_classes, self.head_width, HEATMAP_BIAS,
                             conv_impl, self.dtype)
    self.offset_head = Head(2, self.head_width, 0.0, conv_impl, self.dtype)
    self.size_head = Head(2, self.head_width, 0.0, conv_impl, self.dtype)

  def neck(self, maps: dict[str, jax.Array]) -> jax.Array:
    """Backbone maps -> [B, h, w, d_model] at the finest level's stride."""
    x = None
    for i in reversed(range(len(self.feature_levels))):
      f = self.input_norm[i](self.input_proj[i](maps[self.feature_levels[i]]))
      if x is not None:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # 2x nearest.
        f = f + x[:, :f.shape[1], :f.shape[2]]
      x = f
    return x

  def __call__(self, images: jax.Array, train: bool
               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The dense outputs (what the loss reads).

    Args:
      images: uint8 [B, H, W, 3] RGB 0..255; H, W multiples of 32 pixels.
      train: BatchNorm batch statistics.

    Returns:
      heatmap: float32 [B, h, w, C] logits; (h, w) = (H, W) / the finest
        level's stride.
      offset: float32 [B, h, w, 2] the centre's (x, y) offset from the
        cell's top-left corner, in cells.
      size: float32 [B, h, w, 2] the box's (w, h) in cells.
    """
    heatmap, offset, size, _ = self.dense(images, train)
    return heatmap, offset, size

  def dense(self, images: jax.Array, train: bool):
    """`__call__`'s (heatmap, offset, size), float32 [B, h, w, C / 2 / 2],
    and the backbone's maps {'c2': [B, H/4, W/4, C2], ...} (``dtype``)."""
    maps = self.backbone_features(images, train)
    x = self.neck(maps)
    return (self.heatmap_head(x), self.offset_head(x), self.size_head(x),
            maps)

  def detect_with_features(self, images: jax.Array, train: bool
                           ) -> Tuple[jax.Array, jax.Array,
                                      dict[str, jax.Array]]:
    """Every cell as a box query, as `detector.Model.detect_with_features`.

    Returns:
      logits: float32 [1, B, Q, C] (Q = h * w cells, row-major), a cell
        that is not the maximum of its 3x3 neighbourhood at `SUPPRESSED`.
      boxes: float32 [1, B, Q, 4] normalised (cx, cy, w, h) of the input.
      maps: the backbone's feature maps.
    """
    heatmap, offset, size, maps = self.dense(images, train)
    return (*dense_to_queries(heatmap, offset, size), maps)


def dense_to_queries(heatmap: jax.Array, offset: jax.Array, size: jax.Array
                     ) -> Tuple[jax.Array, jax.Array]:
  """Dense outputs -> `detector.top_detections` inputs (CenterNet's decode).

  Args:
    heatmap: float [B, h, w, C] logits.
    offset: float [B, h, w, 2] centre offset in cells.
    size: float [B, h, w, 2] box (w, h) in cells; negative counts as 0.

  Returns:
    logits: float32 [1, B, h * w, C], non-maxima at `SUPPRESSED`.
    boxes: float32 [1, B, h * w, 4] normalised (cx, cy, w, h).
  """
  b, h, w, c = heatmap.shape
  peak = jax.lax.reduce_window(heatmap, -jnp.inf, jax.lax.max,
                               (1, 3, 3, 1), (1, 1, 1, 1), 'SAME')
  logits = jnp.where(heatmap >= peak, heatmap, SUPPRESSED)
  cols, rows = jnp.meshgrid(jnp.arange(w, dtype=jnp.float32),
                            jnp.arange(h, dtype=jnp.float32))  # [h, w] each
  grid = jnp.stack([cols, rows], -1)  # [h, w, 2] (x, y) of the corner.
  scale = jnp.asarray([w, h], jnp.float32)
  centre = (grid + offset) / scale
  wh = jnp.maximum(size, 0.0) / scale
  boxes = jnp.concatenate([centre, wh], -1)
  return (logits.reshape(1, b, h * w, c).astype(jnp.float32),
          boxes.reshape(1, b, h * w, 4).astype(jnp.float32))
