"""bfloat16 compute keeps float32 params/outputs; remat keeps the values."""

import jax
import jax.numpy as jnp
import numpy as np

import conftest
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib

KMAX = 2
LENGTH = grammar.seq_len(KMAX)


def _model(remat_backbone=False, remat_decoder=False, **kw):
  return conftest.tiny_model(
      vocab=vocab_lib.Vocab(16), resnet=dict(depth=18, remat=remat_backbone),
      feature_levels=('c4', 'c5'), d_model=32,
      transformer=dict(num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0,
                       remat=remat_decoder),
      max_seq_len=LENGTH, **kw)


def _inputs():
  images = jax.random.randint(jax.random.PRNGKey(0), [2, 64, 64, 3], 0,
                              255).astype(jnp.uint8)
  return images, jnp.zeros([2, LENGTH], jnp.int32), jnp.zeros([2, LENGTH])


def _init(model, inputs):
  # Jitted: one compilation instead of hundreds of eagerly dispatched ops.
  return jax.jit(lambda: model.init(jax.random.PRNGKey(1), *inputs,
                                    train=False))()


def _loss(model, params, batch_stats, inputs):
  (logits, coords), _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, *inputs, train=True,
      mutable=['batch_stats'])
  return jnp.mean(logits ** 2) + jnp.mean(coords), (logits, coords)


def test_bfloat16_computes_in_bf16_with_f32_params_and_outputs():
  """Dtypes are static in JAX, so abstract evaluation (`jax.eval_shape`,
  `jax.make_jaxpr`) sees exactly the dtypes a compiled run returns,
  without compiling the model's init and gradient (a minute on 2 cores)."""
  model = _model(dtype=jnp.bfloat16)
  inputs = _inputs()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1),
                                                *inputs, train=False))
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(variables['params']))
  loss = lambda p, stats: _loss(model, p, stats, inputs)
  grads, (logits, coords) = jax.eval_shape(
      jax.grad(loss, has_aux=True), variables['params'],
      variables['batch_stats'])
  assert logits.dtype == jnp.float32 and coords.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  # Every convolution and matmul of the forward pass runs on bf16 operands.
  jaxpr = jax.make_jaxpr(loss)(variables['params'], variables['batch_stats'])
  heavy = []

  def walk(jx):  # Into pjit / custom_jvp sub-jaxprs too.
    for e in jx.eqns:
      if e.primitive.name in ('conv_general_dilated', 'dot_general'):
        heavy.append(e)
      for p in e.params.values():
        if hasattr(p, 'jaxpr'):
          walk(p.jaxpr if hasattr(p.jaxpr, 'eqns') else p.jaxpr.jaxpr)

  walk(jaxpr.jaxpr)
  assert len(heavy) > 20
  dtypes = {tuple(str(v.aval.dtype) for v in e.invars) for e in heavy}
  assert dtypes == {('bfloat16', 'bfloat16')}, dtypes


def test_remat_same_params_values_and_grads():
  """Backbone and decoder rematerialised together (one compilation; a
  wrong value or gradient from either fails the comparison)."""
  inputs = _inputs()
  base, remat = _model(), _model(remat_backbone=True, remat_decoder=True)
  variables = _init(base, inputs)
  # The same variables (names, shapes, dtypes); abstractly, as one init
  # compilation is enough.
  v_remat = jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(1), *inputs,
                                              train=False))
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), variables) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), v_remat))
  grad = lambda m: jax.jit(jax.grad(lambda p: _loss(
      m, p, variables['batch_stats'], inputs)[0]))(variables['params'])
  for a, b in zip(jax.tree.leaves(grad(base)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
