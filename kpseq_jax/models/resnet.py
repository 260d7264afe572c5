"""ResNet-18/34/50 backbone returning strides 8, 16 and 32 (NHWC).

Layout and parameter names follow torchvision ``torchvision/models/resnet.py``
(He et al., CVPR 2016; ResNet v1.5: the stride of a bottleneck is on its 3x3
conv), so a torchvision state dict maps onto the Flax tree by replacing the
block dot with an underscore, e.g.

    layer2.0.downsample.1.running_mean -> batch_stats/layer2_0/downsample_1/mean
    layer2.0.conv1.weight [O, I, kh, kw] -> params/layer2_0/conv1/kernel [kh, kw, I, O]
    bn1.weight / bn1.bias -> params/bn1/scale / params/bn1/bias

Padding is explicit (torch's symmetric padding), not ``'SAME'``, whose
stride-2 padding differs from torch on even sizes.

Normalisation (``norm``):
  * ``'batch'``: BatchNorm, batch statistics in training, running averages in
    ``batch_stats`` (torch momentum 0.1 == Flax momentum 0.9, eps 1e-5).
  * ``'frozen_batch'``: `FrozenBatchNorm`, DETR's ``FrozenBatchNorm2d``: the
    running averages always, as a fixed per-channel affine map; the
    ``batch_stats`` never change and no gradient reaches ``scale``/``bias``
    (still in ``params``, under BatchNorm's names, so ImageNet weights load
    the same way; the optimizer leaves them as they are, see
    ``train_state.frozen_labels``).
  * ``'group'``: GroupNorm with 32 groups, no ``batch_stats``.

Frozen stages (``frozen_stages``, mmdetection's name and meaning): -1 trains
everything; 0 freezes the stem (conv1, bn1); n >= 1 also layer1..layer n.
A frozen stage gets no gradient (``stop_gradient`` on its output, so XLA
computes no backward pass through it) and runs its BatchNorm on the running
averages. Deformable DETR, and Raster2Seq after it (``models/backbone.py``),
train only layer2..layer4 of an ImageNet ResNet with frozen BatchNorm:
``frozen_stages=1``, ``norm='frozen_batch'``.
"""

from __future__ import annotations

from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpseq_jax.models.conv import Conv

# torchvision: depth -> (block kind, blocks per stage).
_STAGES = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
}
_NORMS = ('batch', 'group', 'frozen_batch')
# torchvision initialises convs with kaiming_normal_(mode='fan_out', relu).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel: int, stride: int, dtype, impl: str,
          name: str) -> Conv:
  """Bias-free conv with torch-style symmetric padding ``kernel // 2``."""
  return Conv(features, kernel, stride, impl=impl, kernel_init=_conv_init,
              dtype=dtype, name=name)


def in_frozen_stage(module_name: str, frozen_stages: int) -> bool:
  """Whether a top-level ResNet submodule belongs to a frozen stage.

  Args:
    module_name: name of a direct child of `ResNet`: 'conv1', 'bn1' (the
      stem) or 'layer{stage}_{block}', e.g. 'layer1_2'.
    frozen_stages: as `ResNet.frozen_stages`.

  Raises:
    ValueError: a name that is neither the stem nor 'layer{n}_{m}'.
  """
  if module_name in ('conv1', 'bn1'):
    return frozen_stages >= 0
  if not module_name.startswith('layer') or '_' not in module_name:
    raise ValueError(f'not a ResNet submodule name: {module_name!r}')
  return int(module_name[len('layer'):].split('_')[0]) <= frozen_stages


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters (DETR's
  ``FrozenBatchNorm2d``, ``models/backbone.py`` of DETR / Deformable DETR).

  ``y = x * s + (bias - mean * s)`` with ``s = scale / sqrt(var + epsilon)``,
  the same values as ``nn.BatchNorm(use_running_average=True)`` and the same
  variables (``params``: scale, bias; ``batch_stats``: mean, var; shape [C],
  float32), but the four are behind ``stop_gradient``: the backward pass
  computes no reductions for their gradients, and the gradient clip sees
  zeros for them, as torch sees no ``.grad``.

  Attributes:
    epsilon: added to ``var`` (torchvision/DETR: 1e-5).
    dtype: compute dtype of ``y``.
  """
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., C] -> [..., C] in ``dtype``."""
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    s = jax.lax.stop_gradient(scale * jax.lax.rsqrt(var.value + self.epsilon))
    b = jax.lax.stop_gradient(bias) - jax.lax.stop_gradient(mean.value) * s
    return x.astype(self.dtype) * s.astype(self.dtype) + b.astype(self.dtype)


def _norm(kind: str, train: bool, dtype, name: str) -> nn.Module:
  """Normalisation layer of the given kind (see module docstring)."""
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, dtype=dtype, name=name)
  if kind == 'frozen_batch':
    return FrozenBatchNorm(epsilon=1e-5, dtype=dtype, name=name)
  if kind == 'group':
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, name=name)
  raise ValueError(f'norm must be one of {_NORMS}, got {kind!r}')


class _ResidualBlock(nn.Module):
  """Fields and shortcut shared by the two torchvision block kinds.

  Attributes:
    features: BasicBlock: output channels; Bottleneck: width of the 3x3
      conv (output channels ``4 * features``).
    stride: stride of the strided conv and of the shortcut.
    norm: 'batch' | 'group' | 'frozen_batch'.
    dtype: compute dtype.
    conv_impl: 'xla' | 'gemm' | 'auto' (see ``conv.py``).
  """
  features: int
  stride: int
  norm: str
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'auto'

  def _add_shortcut(self, x: jax.Array, y: jax.Array,
                    train: bool) -> jax.Array:
    """relu(shortcut(x) + y); the shortcut is torchvision's ``downsample``
    (1x1 conv + norm) when the stride or channel count changes."""
    out_features = y.shape[-1]
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, self.dtype, self.conv_impl,
                'downsample_0')(x)
      x = _norm(self.norm, train, self.dtype, 'downsample_1')(x)
    return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
  """torchvision ``BasicBlock``: 3x3 (stride) -> 3x3, expansion 1."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / stride, W / stride, features]."""
    y = _conv(self.features, 3, self.stride, self.dtype,
              self.conv_impl, 'conv1')(x)
    y = nn.relu(_norm(self.norm, train, self.dtype, 'bn1')(y))
    y = _conv(self.features, 3, 1, self.dtype,
              self.conv_impl, 'conv2')(y)
    y = _norm(self.norm, train, self.dtype, 'bn2')(y)
    return self._add_shortcut(x, y, train)


class Bottleneck(_ResidualBlock):
  """torchvision ``Bottleneck`` (v1.5): 1x1 -> 3x3 (stride) -> 1x1, expansion 4."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / stride, W / stride, 4 * features]."""
    y = _conv(self.features, 1, 1, self.dtype,
              self.conv_impl, 'conv1')(x)
    y = nn.relu(_norm(self.norm, train, self.dtype, 'bn1')(y))
    y = _conv(self.features, 3, self.stride, self.dtype,
              self.conv_impl, 'conv2')(y)
    y = nn.relu(_norm(self.norm, train, self.dtype, 'bn2')(y))
    y = _conv(4 * self.features, 1, 1, self.dtype,
              self.conv_impl, 'conv3')(y)
    y = _norm(self.norm, train, self.dtype, 'bn3')(y)
    return self._add_shortcut(x, y, train)


class ResNet(nn.Module):
  """ResNet backbone (torchvision layout) returning C3, C4, C5.

  Attributes:
    depth: 18, 34 (basic blocks) or 50 (bottleneck blocks).
    norm: 'batch' (default), 'group' or 'frozen_batch'; see module docstring.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are float32.
    remat: rematerialise each residual block's activations in the backward
      pass (``nn.remat``); forward values and parameter names unchanged.
    frozen_stages: -1 (train all), 0 (freeze the stem) or n in 1..4 (the
      stem and layer1..layer n); see the module docstring.
    width: channels of the stem and the first stage (torchvision's 64; the
      later stages double it). Smaller widths make a small, fast model
      (tests, tiny data sets) with no pretrained weights; 'group' norm
      needs a multiple of 32.
    conv_impl: how convolutions are computed, 'xla', 'gemm' or 'auto' (see
      ``conv.py``); the same parameters and, up to float32 summation order,
      the same values.

  Variables: ``params``; ``batch_stats`` for the two BatchNorm kinds (apply
  with ``mutable=['batch_stats']`` when ``train=True`` and ``norm='batch'``).

  Raises:
    ValueError: unknown ``depth`` or ``norm``; ``frozen_stages`` outside
      -1..4.
  """
  depth: int = 50
  norm: str = 'batch'
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  conv_impl: str = 'auto'
  frozen_stages: int = -1
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: float32 [B, H, W, 3], already normalised (ImageNet mean/std); H and
        W in pixels, ideally multiples of 32.
      train: batch statistics for ``norm='batch'``.

    Returns:
      {'c2': [B, H/4, W/4, C2], 'c3': [B, H/8, W/8, C3],
       'c4': [B, H/16, W/16, C4], 'c5': [B, H/32, W/32, C5]} in ``dtype``
      (sizes rounded up), with (C2, C3, C4, C5) = (64, 128, 256, 512) for
      depth 18/34 and (256, 512, 1024, 2048) for depth 50 at ``width`` 64
      (scaled by ``width / 64``).
    """
    if self.depth not in _STAGES:
      raise ValueError(f'depth must be one of {sorted(_STAGES)}, got {self.depth}')
    kind, blocks_per_stage = _STAGES[self.depth]
    block_cls = BasicBlock if kind == 'basic' else Bottleneck
    if self.remat:  # Block.__call__(self, x, train): train (2) is static.
      block_cls = nn.remat(block_cls, static_argnums=(2,))

    if not -1 <= self.frozen_stages <= len(blocks_per_stage):
      raise ValueError(f'frozen_stages must be in -1..{len(blocks_per_stage)}'
                       f', got {self.frozen_stages}')
    x = x.astype(self.dtype)
    stem_train = train and self.frozen_stages < 0
    x = _conv(self.width, 7, 2, self.dtype, self.conv_impl,
              'conv1')(x)  # [B, H/2, W/2, width]
    x = nn.relu(_norm(self.norm, stem_train, self.dtype, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2),
                    padding=((1, 1), (1, 1)))  # [B, H/4, W/4, width]
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    for stage, num_blocks in enumerate(blocks_per_stage):
      features = self.width * 2**stage
      frozen = stage + 1 <= self.frozen_stages
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(features, stride, self.norm, self.dtype,
                      self.conv_impl,
                      name=f'layer{stage + 1}_{block}')(x, train and not frozen)
      if frozen:
        x = jax.lax.stop_gradient(x)
      outputs[f'c{stage + 2}'] = x  # stride 2**(stage + 2)
    return outputs

