"""2-D convolution for the ResNet backbone, with a matmul weight gradient.

XLA:CPU computes a convolution's weight gradient ("backward-filter") as a
convolution with the batch and feature dimensions swapped, preceded by a
transpose of the activations to [C, H, W, B]. With the paper's batch of 2
that convolution has 2 output features: on this project's benchmark machine
(2 AMD EPYC cores, jax 0.10.2) it ran at 66 GFLOP/s against a 440 GFLOP/s
matmul peak and, with the transposes, took about 60% of the paper-config
train step (``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` profile; see
README "Benchmark"). 1x1 convolutions with large spatial extent fared no
better forward. The same arithmetic written as matmuls runs much closer to
the peak.

``conv2d(..., impl='gemm')`` therefore computes, with identical results up to
float32 summation order (a custom VJP in both cases):

* 1x1 convolutions: forward a matmul over channels (``[B, H, W, C] @
  [C, D]``) of the (strided) input; input gradient ``dy @ W^T``.
* k x k convolutions: XLA's convolution forward and input gradient (near
  peak when timed alone).
* every weight gradient: the matmul ``cols^T @ dy``, where ``cols`` is the
  input for 1x1 and the im2col patches [B*Ho*Wo, k*k*C] (the k*k shifted,
  strided views of the padded input) for k x k (Chellapilla et al. 2006,
  "High performance convolutional neural networks for document
  processing"; Caffe's im2col). The narrower operand is transposed as a
  plain copy behind an optimization barrier (`_weight_grad`).

``impl='xla'`` is the plain ``lax.conv_general_dilated`` (what ``nn.Conv``
does); ``'auto'`` picks ``'gemm'`` on the CPU and ``'xla'`` on GPU/TPU, whose
compilers have their own backward-filter convolution kernels (cuDNN, the TPU
convolution emitter); 'gemm' has not been timed there. Both are ordinary JAX
ops (dot_general, slices, lax.conv) and run correctly on every backend.

Padding is torch's symmetric ``kernel // 2`` (see ``resnet.py``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'gemm')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str) -> str:
  """'auto' -> 'gemm' on the CPU backend, 'xla' otherwise.

  Raises:
    ValueError: ``impl`` not in `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'gemm' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = kernel_size // 2
  return ((p, p), (p, p))


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (stride, stride),
                                  _padding(kernel.shape[0]),
                                  dimension_numbers=_DIMS)


def im2col(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """Patches of ``x`` for a k x k, stride-s conv with padding k // 2.

  Args:
    x: [B, H, W, C].
    kernel_size: k.
    stride: s.

  Returns:
    [B, Ho, Wo, k*k*C], Ho = (H + 2 (k // 2) - k) // s + 1 (likewise Wo);
    channel index (i * k + j) * C + c holds padded x[b, s*h + i, s*w + j, c],
    the row order of an HWIO kernel reshaped to [k*k*C, D].
  """
  k, s = kernel_size, stride
  p = k // 2
  _, h, w, _ = x.shape
  ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate(
      [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]
       for i in range(k) for j in range(k)], axis=-1)


def _weight_grad(a: jax.Array, dy: jax.Array) -> jax.Array:
  """``a^T @ dy`` for a [M, K], dy [M, D] -> [K, D] float32.

  A matmul contracting the long M axis of both operands needs one of them
  transposed; this transposes the narrower one (fewer bytes) as a plain copy.
  The optimization barrier stops XLA from fusing that transpose into the
  operand's producer (typically the BatchNorm backward), which XLA:CPU emits
  as a strided loop several times slower than the copy plus the
  elementwise work.
  """
  if dy.shape[1] <= a.shape[1]:
    dy_t = jnp.transpose(lax.optimization_barrier(dy))  # [D, M]
    return jnp.dot(dy_t, a, preferred_element_type=jnp.float32).T
  a_t = jnp.transpose(lax.optimization_barrier(a))  # [K, M]
  return jnp.dot(a_t, dy, preferred_element_type=jnp.float32)


def _gemm_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  if kernel.shape[0] == 1:
    return jnp.einsum('bhwc,cd->bhwd', x[:, ::stride, ::stride],
                      kernel[0, 0])
  return _xla_conv(x, kernel, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul_wgrad(x: jax.Array, kernel: jax.Array,
                       stride: int) -> jax.Array:
  return _gemm_conv(x, kernel, stride)


def _conv_fwd(x, kernel, stride):
  return _gemm_conv(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _gemm_conv(x_, kernel, stride), x)
  (dx,) = input_vjp(dy)
  k, d = kernel.shape[0], kernel.shape[-1]
  if k == 1:
    cols = x[:, ::stride, ::stride]
  else:
    cols = im2col(x, k, stride)
  dkernel = _weight_grad(cols.reshape(-1, cols.shape[-1]), dy.reshape(-1, d))
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv_matmul_wgrad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int,
           impl: str = 'xla') -> jax.Array:
  """Bias-free NHWC convolution with torch-style padding ``k // 2``.

  Args:
    x: [B, H, W, C], any float dtype (cast by the caller).
    kernel: [k, k, C, D] (HWIO), same dtype as ``x``; k odd.
    stride: spatial stride s.
    impl: 'xla', 'gemm' or 'auto' (module docstring).

  Returns:
    [B, Ho, Wo, D], Ho = (H + 2 (k // 2) - k) // s + 1.

  Raises:
    ValueError: unknown ``impl``, non-square or even kernel, or channel
      mismatch.
  """
  impl = resolve_impl(impl)
  k = kernel.shape[0]
  if kernel.ndim != 4 or kernel.shape[1] != k or k % 2 == 0:
    raise ValueError(f'kernel must be [k, k, C, D] with k odd, got '
                     f'{kernel.shape}')
  if kernel.shape[2] != x.shape[-1]:
    raise ValueError(f'kernel expects {kernel.shape[2]} input channels, '
                     f'x has {x.shape[-1]}')
  if impl == 'xla':
    return _xla_conv(x, kernel, stride)
  return _conv_matmul_wgrad(x, kernel, stride)


class Conv(nn.Module):
  """``nn.Conv`` replacement with padding ``k // 2``: a ``kernel`` parameter
  [k, k, C_in, features] and, with ``use_bias``, a zero-initialised ``bias``
  [features] (the names and shapes of ``nn.Conv``, so checkpoints and the
  torchvision mapping are unchanged).

  Attributes:
    features: output channels D.
    kernel_size: k (odd).
    stride: s.
    impl: 'xla', 'gemm' or 'auto' (module docstring).
    kernel_init: initialiser of the float32 kernel.
    use_bias: add a learned bias.
    dtype: compute dtype; the parameters are cast to it.
  """
  features: int
  kernel_size: int
  stride: int = 1
  impl: str = 'auto'
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, Ho, Wo, features] in ``dtype``."""
    kernel = self.param(
        'kernel', self.kernel_init,
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
               self.impl)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
