"""Tests for kpseq_jax.conv: the matmul-gradient conv equals lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from kpseq_jax.models import conv
from kpseq_jax.models import resnet
from kpseq_jax.models.resnet import ResNet


def _xla_reference(x, kernel, stride):
  """lax.conv with torch padding k // 2, written out independently."""
  p = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((p, p), (p, p)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('k,stride,hw,cin,cout', [
    (1, 1, (6, 5), 8, 12),
    (1, 2, (7, 9), 12, 8),   # odd sizes: strided 1x1 keeps ceil(H / 2).
    (3, 1, (6, 5), 4, 6),
    (3, 2, (7, 8), 6, 4),
    (7, 2, (11, 10), 3, 5),  # the ResNet stem.
])
def test_gemm_conv_matches_lax_conv_values_and_gradients(k, stride, hw, cin,
                                                         cout):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(k * 10 + stride), 3)
  x = jax.random.normal(kx, (2, *hw, cin))
  kernel = jax.random.normal(kw, (k, k, cin, cout))
  want, want_vjp = jax.vjp(lambda a, b: _xla_reference(a, b, stride), x,
                           kernel)
  got, got_vjp = jax.vjp(
      jax.jit(lambda a, b: conv.conv2d(a, b, stride, 'gemm')), x, kernel)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  dy = jax.random.normal(kd, want.shape)
  for g, w, name in zip(got_vjp(dy), want_vjp(dy), ('dx', 'dkernel')):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3, err_msg=name)


def test_bfloat16_weight_gradient_keeps_kernel_dtype_and_value():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 8)) * 0.1

  def loss(kern, dtype):
    y = conv.conv2d(x.astype(dtype), kern.astype(dtype), 1, 'gemm')
    return jnp.sum(y.astype(jnp.float32) ** 2)

  g16 = jax.grad(loss)(kernel, jnp.bfloat16)
  g32 = jax.grad(loss)(kernel, jnp.float32)
  assert g16.dtype == jnp.float32  # Through the cast back to the f32 param.
  np.testing.assert_allclose(g16, g32, rtol=5e-2, atol=5e-2 * float(
      jnp.max(jnp.abs(g32))))


def test_im2col_row_order_is_hwio():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  cols = conv.im2col(x, 3, 1)
  assert cols.shape == (2, 4, 4, 27)
  # Centre tap (i = j = 1) of output (0, 1, 2) is x[0, 1, 2, :].
  np.testing.assert_array_equal(cols[0, 1, 2, 4 * 3:5 * 3], x[0, 1, 2])
  # Tap (0, 0) of output (0, 0, 0) lies in the zero padding.
  np.testing.assert_array_equal(cols[0, 0, 0, :3], 0.0)


def test_resolve_impl_and_errors():
  assert conv.resolve_impl('auto') == (
      'gemm' if jax.default_backend() == 'cpu' else 'xla')
  assert conv.resolve_impl('xla') == 'xla'
  with pytest.raises(ValueError, match='conv impl must be one of'):
    conv.resolve_impl('cudnn')
  with pytest.raises(ValueError, match='input channels'):
    conv.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 4, 8)), 1)
  with pytest.raises(ValueError, match='k odd'):
    conv.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((2, 2, 3, 8)), 1)


def _random_variables(shapes, seed):
  """Variables of the ``shapes`` tree drawn with numpy (He-normal kernels,
  unit scales and variances, zero biases and means): no init to compile."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.standard_normal(s.shape) *
              np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(s.shape,
                                                               s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


class _Bottlenecks(nn.Module):
  """ResNet-50's block kind as its first stages use it: a stride-1
  bottleneck whose shortcut projects 3 -> 64 channels, then a stride-2 one
  (the stride on the 3x3 conv and the shortcut); two blocks check what the
  16 of a ResNet-50 would."""
  conv_impl: str

  @nn.compact
  def __call__(self, x, train):
    x = resnet.Bottleneck(16, 1, 'batch', conv_impl=self.conv_impl,
                          name='layer1_0')(x, train)
    return {'c3': resnet.Bottleneck(16, 2, 'batch', conv_impl=self.conv_impl,
                                    name='layer2_0')(x, train)}


# Values and gradients through both block kinds; ResNet-50 whole (53 convs,
# 47 s of compiling) adds no computation the bottlenecks do not have, and
# its wiring is checked by tracing below.
@pytest.mark.parametrize('make', [lambda impl: ResNet(depth=18,
                                                      conv_impl=impl),
                                  lambda impl: _Bottlenecks(impl)],
                         ids=['resnet18', 'bottleneck'])
def test_resnet_gemm_and_xla_share_parameters_and_outputs(make):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  xla_model = make('xla')
  gemm_model = make('gemm')
  shapes = [jax.eval_shape(lambda m=m: m.init(jax.random.PRNGKey(1), x,
                                              train=False))
            for m in (xla_model, gemm_model)]
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes[0]) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), shapes[1]))
  variables = _random_variables(shapes[0], 18)

  def loss(model, params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True,
                         mutable=['batch_stats'])
    return sum(jnp.mean(v ** 2) for v in out.values())

  want, want_grad = jax.jit(jax.value_and_grad(
      lambda p: loss(xla_model, p)))(variables['params'])
  got, got_grad = jax.jit(jax.value_and_grad(lambda p: loss(gemm_model, p)))(
      variables['params'])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grad),
                          jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(
        g, w, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(w))) + 1e-7,
        err_msg=jax.tree_util.keystr(path))


def test_resnet50_gemm_has_the_xla_parameters_and_every_conv_is_gemm():
  """Traced, not compiled: the same variables, and each of ResNet-50's 53
  convs is the matmul-gradient conv (its custom VJP) with 'gemm', none with
  'xla'."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  models = [ResNet(depth=50, conv_impl=impl) for impl in ('xla', 'gemm')]
  shapes = [jax.eval_shape(lambda m=m: m.init(jax.random.PRNGKey(1),
                                              jnp.zeros(x.shape),
                                              train=False))
            for m in models]
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes[0]) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), shapes[1]))
  num_convs = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(
      shapes[0]['params']) if p[-1].key == 'kernel')
  assert num_convs == 53
  for model, want in zip(models, (0, num_convs)):
    jaxpr = jax.make_jaxpr(lambda v, a, m=model: m.apply(
        v, a, train=True, mutable=['batch_stats']))(shapes[0], x)
    assert str(jaxpr).count('custom_vjp_call') == want, model.conv_impl


def test_conv_module_bias_has_nn_conv_names():
  x = jnp.ones((1, 4, 4, 3))
  variables = conv.Conv(5, 1, use_bias=True).init(jax.random.PRNGKey(0), x)
  reference = jax.eval_shape(
      lambda: nn.Conv(5, (1, 1)).init(jax.random.PRNGKey(0), x))
  assert (jax.tree.map(jnp.shape, variables) ==
          jax.tree.map(jnp.shape, reference))
