"""Multi-head self-attention with a key/value cache that takes chunks.

The parameters, their names (``query``, ``key``, ``value``, ``out``), their
initialisation and the dropout on the attention weights are those of
``flax.linen.MultiHeadDotProductAttention`` (a model trained with either
computes the same function), and the attention itself is
``flax.linen.dot_product_attention``. What differs is the cache: flax's
``decode=True`` appends exactly one position per call and builds the causal
mask itself, while `SelfAttention` writes a chunk of T positions per call
(T = 1 for a generation step, T = P to write a support prefix at once, see
`decoder.py`) and takes the mask from the caller, who knows which cache
positions are valid (prefix padding) and which are in the future. This is
the chunked prefill of MaxText's and other LLM decoders' KV caches.

Cache ('cache' collection, ``decode=True``): ``cached_key`` and
``cached_value`` [B, Lc, heads, head_dim] in the compute dtype and
``cache_index`` int32, the next position to write. It is created, zero, by
a first call on a full-length (Lc) input, as flax sizes its cache
(`kpseq_jax.inference.decoding.init_cache`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


class SelfAttention(nn.Module):
  """Multi-head self-attention (flax ``MultiHeadDotProductAttention``'s).

  Attributes:
    num_heads: heads; the width D must be divisible by it.
    dropout_rate: dropout on the attention weights (broadcast over batch and
      heads, as flax's ``broadcast_dropout=True``).
    decode: cache mode: each call writes its T positions' keys and values
      at ``cache_index`` and attends over the whole cache.
    dtype: compute dtype; parameters float32.
  """
  num_heads: int
  dropout_rate: float = 0.0
  decode: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               deterministic: bool,
               pos: jax.Array | None = None) -> jax.Array:
    """Attends the T positions of ``x``.

    Args:
      x: [B, T, D] inputs.
      mask: bool, broadcastable to [B, heads, T, Lk] (True = may attend;
        Lk = T, or the cache length Lc with a cache); None: no mask.
      deterministic: no dropout.
      pos: [B, T, D] position embedding added to the query and key inputs
        only, not to the values (DETR's ``q = k = with_pos_embed(tgt,
        query_pos)``, ``facebookresearch/detr`` ``models/transformer.py``);
        None: none.

    Returns:
      [B, T, D] in ``dtype``.

    Raises:
      ValueError: in cache mode, T larger than the cache.
    """
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'width {features} is not divisible by '
                       f'{self.num_heads} heads')
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype,
        features=(self.num_heads, features // self.num_heads))
    qk = x if pos is None else x + pos.astype(x.dtype)  # [B, T, D]
    query = dense(name='query')(qk)  # [B, T, H, Dh]
    key = dense(name='key')(qk)
    value = dense(name='value')(x)
    if self.decode:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape,
                                 key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   value.shape, value.dtype)
      index = self.variable('cache', 'cache_index',
                            lambda: jnp.array(0, jnp.int32))
      if initialized:
        length = cached_key.value.shape[1]
        if key.shape[1] > length:
          raise ValueError(f'{key.shape[1]} positions do not fit in a cache '
                           f'of {length}')
        start = (0, index.value, 0, 0)
        key = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                             start)
        cached_key.value, cached_value.value = key, value
        index.value = index.value + x.shape[1]
    dropout_rng = (self.make_rng('dropout')
                   if self.dropout_rate > 0.0 and not deterministic else None)
    y = nn.dot_product_attention(
        query, key, value, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=True,
        deterministic=deterministic or self.dropout_rate == 0.0,
        dtype=self.dtype)  # [B, T, H, Dh]
    return nn.DenseGeneral(features, axis=(-2, -1), dtype=self.dtype,
                           name='out')(y)
