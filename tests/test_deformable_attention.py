"""Tests for kpseq_jax.deformable_attention."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.models import deformable_attention as da

# 1 level, H=2, W=3, one head of dim 1: value[i, j] = 3 i + j + 1.
_MAP = np.array([[1., 2., 3.], [4., 5., 6.]], np.float32)
_SHAPES = ((2, 3),)


def _sample_map(points_xy, weights=None):
  """Samples _MAP at normalised points [Lq, P, 2] -> [Lq]."""
  points = np.asarray(points_xy, np.float32)
  num_queries, num_points, _ = points.shape
  value = jnp.asarray(_MAP.reshape(1, 6, 1, 1))  # [B=1, S=6, M=1, Dh=1]
  locations = jnp.asarray(points.reshape(1, num_queries, 1, 1, num_points, 2))
  if weights is None:
    weights = np.ones((num_queries, num_points), np.float32)
  weights = jnp.asarray(
      np.asarray(weights, np.float32).reshape(1, num_queries, 1, 1, num_points))
  out = da.ms_deform_attn_sample(value, _SHAPES, locations, weights)
  assert out.shape == (1, num_queries, 1)
  return np.asarray(out[0, :, 0])


def _centre(i, j):
  """Normalised (x, y) of the centre of pixel (row i, column j) of _MAP."""
  return ((j + 0.5) / 3, (i + 0.5) / 2)


def test_pixel_centres_give_exact_values():
  points = [[_centre(i, j)] for i in range(2) for j in range(3)]
  np.testing.assert_allclose(_sample_map(points), _MAP.reshape(-1), atol=1e-6)


def test_between_centres_is_bilinear_mix():
  # x_pix = 0.5 (between columns 0 and 1), y_pix = 0.25:
  # 0.75 * (0.5 * 1 + 0.5 * 2) + 0.25 * (0.5 * 4 + 0.5 * 5) = 2.25.
  # x_pix = 1.75, y_pix = 0.5: 0.5 * (0.25 * 2 + 0.75 * 3) + 0.5 * (0.25 * 5
  # + 0.75 * 6) = 4.25.
  points = [[(1.0 / 3, 0.75 / 2)], [(2.25 / 3, 0.5)]]
  np.testing.assert_allclose(_sample_map(points), [2.25, 4.25], atol=1e-6)


def test_outside_is_zero_padded():
  points = [
      [(0.0, 0.0)],  # Top-left border: 0.25 * 1 (three corners outside).
      [(1.0, 1.0)],  # Bottom-right border: 0.25 * 6.
      [(0.0, 0.25)],  # Left border, row 0 centre: 0.5 * 1.
      [(1.5, 0.5)],  # Far right: every corner outside.
      [(-0.5, -2.0)],  # Far top-left.
  ]
  np.testing.assert_allclose(_sample_map(points), [0.25, 1.5, 0.5, 0.0, 0.0],
                             atol=1e-6)


def test_attention_weights_combine_points():
  points = [[_centre(1, 2), _centre(0, 0)]]  # Values 6 and 1.
  out = _sample_map(points, weights=[[0.3, 0.7]])
  np.testing.assert_allclose(out, [0.3 * 6 + 0.7 * 1], atol=1e-6)


def _grid_sample_reference(value, shapes, locations, weights):
  """Slow loop reference: grid_sample(bilinear, zeros, align_corners=False).

  value [B, S, M, D], locations [B, Lq, M, L, P, 2], weights [B, Lq, M, L, P]
  -> [B, Lq, M * D].
  """
  batch, _, heads, dim = value.shape
  _, num_queries, _, levels, points, _ = locations.shape
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  out = np.zeros((batch, num_queries, heads, dim), np.float64)
  for b, q, m, l, p in itertools.product(range(batch), range(num_queries),
                                         range(heads), range(levels),
                                         range(points)):
    height, width = shapes[l]
    x = locations[b, q, m, l, p, 0] * width - 0.5
    y = locations[b, q, m, l, p, 1] * height - 0.5
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    sample = np.zeros(dim)
    for yi in (y0, y0 + 1):
      for xi in (x0, x0 + 1):
        if 0 <= xi < width and 0 <= yi < height:
          w = (1 - abs(x - xi)) * (1 - abs(y - yi))
          sample += w * value[b, starts[l] + yi * width + xi, m]
    out[b, q, m] += weights[b, q, m, l, p] * sample
  return out.reshape(batch, num_queries, heads * dim)


def test_matches_loop_reference_two_levels():
  shapes = ((3, 5), (2, 4))
  batch, num_queries, heads, dim, points = 2, 3, 2, 3, 2
  rng = np.random.default_rng(0)
  total = sum(h * w for h, w in shapes)
  value = rng.normal(size=(batch, total, heads, dim)).astype(np.float32)
  # Include points outside [0, 1] to exercise the zero padding.
  locations = rng.uniform(-0.2, 1.2, size=(batch, num_queries, heads, 2,
                                           points, 2)).astype(np.float32)
  weights = rng.uniform(size=(batch, num_queries, heads, 2,
                              points)).astype(np.float32)
  expected = _grid_sample_reference(value, shapes, locations, weights)
  out = da.ms_deform_attn_sample(jnp.asarray(value), shapes,
                                 jnp.asarray(locations), jnp.asarray(weights))
  assert out.shape == (batch, num_queries, heads * dim)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def test_jit_and_exact_gradients():
  value = jnp.asarray(_MAP.reshape(1, 6, 1, 1))
  weights = jnp.ones((1, 1, 1, 1, 1))

  @jax.jit
  def sample(value, location):
    locations = location.reshape(1, 1, 1, 1, 1, 2)
    return da.ms_deform_attn_sample(value, _SHAPES, locations, weights)[0, 0, 0]

  # x_pix = 0.5, y_pix = 0.25 (value 2.25, see above).
  location = jnp.array([1.0 / 3, 0.75 / 2])
  np.testing.assert_allclose(sample(value, location), 2.25, atol=1e-6)
  d_value, d_location = jax.grad(sample, argnums=(0, 1))(value, location)
  # d/d value = the four bilinear weights.
  np.testing.assert_allclose(
      np.asarray(d_value).reshape(2, 3),
      [[0.375, 0.375, 0.0], [0.125, 0.125, 0.0]], atol=1e-6)
  # d/dx_pix = 0.75 * (2 - 1) + 0.25 * (5 - 4) = 1, times W = 3 per unit x;
  # d/dy_pix = 0.5 * (4 - 1) + 0.5 * (5 - 2) = 3, times H = 2 per unit y.
  np.testing.assert_allclose(d_location, [3.0, 6.0], atol=1e-5)


def _coordinate_reader():
  """A module whose 4 heads read, along +x, +y, -x, -y at one pixel of
  each level, a memory whose channels are the pixel's column j (heads 0, 2)
  and row i (heads 1, 3): its output says where it sampled.

  Returns:
    (module, params, query [1, 1, 4], value_input [1, S, 4], shapes).
  """
  shapes = ((4, 8), (8, 4))
  module = da.MultiScaleDeformableAttention(
      d_model=4, num_heads=4, num_levels=2, num_points=1)
  levels = []
  for height, width in shapes:
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    levels.append(np.stack([j, i, j, i], -1).reshape(height * width, 4))
  value_input = jnp.asarray(np.concatenate(levels)[None], jnp.float32)  # [1, S, 4]
  query = jnp.ones((1, 1, 4))
  params = module.init(jax.random.PRNGKey(0), query, jnp.full((1, 1, 2), 0.5),
                       value_input, shapes)['params']
  for name in ('value_proj', 'output_proj'):
    params[name] = {'kernel': jnp.eye(4), 'bias': jnp.zeros(4)}
  return module, params, query, value_input, shapes


def test_module_offsets_are_in_pixels_of_each_level():
  """At init, head m samples one pixel of its level along its direction."""
  module, params, query, value_input, shapes = _coordinate_reader()
  reference = jnp.full((1, 1, 2), 0.5)
  np.testing.assert_array_equal(params['sampling_offsets']['kernel'], 0.0)
  np.testing.assert_allclose(
      params['sampling_offsets']['bias'].reshape(4, 2, 1, 2)[:, 0, 0],
      [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)
  out = module.apply({'params': params}, query, reference, value_input, shapes)
  # Reference (0.5, 0.5) is pixel (x, y) = (3.5, 1.5) on level 0 (W=8, H=4)
  # and (1.5, 3.5) on level 1 (W=4, H=8); weights are uniform (0.5 each).
  # Head 0 (+x): (4.5 + 2.5) / 2; head 1 (+y): (2.5 + 4.5) / 2;
  # head 2 (-x): (2.5 + 0.5) / 2; head 3 (-y): (0.5 + 2.5) / 2.
  np.testing.assert_allclose(out[0, 0], [3.5, 3.5, 1.5, 1.5], atol=1e-5)

  split = module.apply(
      {'params': params}, query, reference,
      module.apply({'params': params}, value_input,
                   method=da.MultiScaleDeformableAttention.project_value),
      shapes, method=da.MultiScaleDeformableAttention.attend)
  np.testing.assert_array_equal(split, out)


def test_sampling_transform_moves_and_scales_the_whole_pattern():
  """A box covering x in [0.25, 0.75], y in [0, 0.5] of the memory: the
  reference point and every offset are mapped into it (PRTR end-to-end)."""
  module, params, query, value_input, shapes = _coordinate_reader()
  reference = jnp.full((1, 1, 2), 0.5)
  value = module.apply({'params': params}, value_input,
                       method=da.MultiScaleDeformableAttention.project_value)

  def attend(transform):
    return module.apply({'params': params}, query, reference, value, shapes,
                        transform,
                        method=da.MultiScaleDeformableAttention.attend)

  identity = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
  np.testing.assert_allclose(attend(identity), attend(None), atol=1e-6)
  box = jnp.array([[[0.5, 0.0, 0.25], [0.0, 0.5, 0.0]]])
  # (0.5, 0.5) -> (0.5, 0.25); a one-pixel offset shrinks to half a pixel.
  # Pixel = location * size - 0.5. Head 0 (+x): level 0 x = (0.5 + 0.5 / 8)
  # * 8 - 0.5 = 4.0, level 1 x = (0.5 + 0.5 / 4) * 4 - 0.5 = 2.0; head 1
  # (+y): (0.25 + 0.5 / 4) * 4 - 0.5 = 1.0 and (0.25 + 0.5 / 8) * 8 - 0.5 =
  # 2.0; head 2 (-x): 3.0 and 1.0; head 3 (-y): 0.0 and 1.0.
  np.testing.assert_allclose(attend(box)[0, 0], [3.0, 1.5, 2.0, 0.5],
                             atol=1e-5)


def test_rejects_mismatched_shapes():
  value = jnp.zeros((1, 7, 1, 1))
  with pytest.raises(ValueError, match='S=7 positions.*sum to 6'):
    da.ms_deform_attn_sample(value, _SHAPES, jnp.zeros((1, 1, 1, 1, 1, 2)),
                             jnp.zeros((1, 1, 1, 1, 1)))
