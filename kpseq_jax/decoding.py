"""Greedy autoregressive decoding of the keypoint sequence.

The image is encoded once; a compiled `lax.while_loop` then runs the decoder
position by position, stopping when every sequence has emitted ``<eos>`` (or
at the maximum length). This version re-runs the decoder over the whole
prefix at each position (no key/value cache): it is the reference that a
cached decoder must reproduce token for token.

The sequence grammar ``<coord> x y <sep> ... <eos>`` is enforced: at a group
start only ``<coord>`` or ``<eos>`` may be chosen (``<eos>`` is forced after
``max_num_keypoints`` groups), x and y positions take a coordinate, the
fourth position is ``<sep>``. The coordinate of an x (y) step is the
regression head's x (y) output at that step, normalised [0, 1] and clipped;
it is fed back through the bilinear coordinate embedding with the token
``quantize(value)`` (see `sequence.py`).
"""

import functools

import jax
import jax.numpy as jnp

from kpseq_jax import sequence
from kpseq_jax import vocab as vocab_lib


def greedy_decode(model, variables, images: jax.Array,
                  max_num_keypoints: int) -> dict[str, jax.Array]:
  """Generates keypoint sequences for a batch of crops.

  Args:
    model: a `KeypointSequenceModel` (static).
    variables: its variables ({'params', 'batch_stats'}).
    images: uint8 [B, S, S, 3] top-down crops.
    max_num_keypoints: Kmax; at most Kmax groups are generated.

  Returns:
    dict with
      keypoints: float32 [B, Kmax, 2] normalised crop (x, y); rows at and
        after ``num_keypoints`` are NaN.
      num_keypoints: int32 [B], groups emitted before ``<eos>``.
      tokens: int32 [B, L] decoder input tokens (``<bos>`` + generated).
  """
  vocab = vocab_lib.Vocab(model.num_bins)
  length = sequence.seq_len(max_num_keypoints)
  b = images.shape[0]
  memory = model.apply(variables, images, train=False, method=model.encode)

  def logits_at(tokens, coords, t):
    logits, xy = model.apply(variables, memory, tokens, coords, train=False,
                             method=model.decode)  # [B, L, V], [B, L, 2]
    return (jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False),
            jax.lax.dynamic_index_in_dim(xy, t, 1, keepdims=False))

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < length) & ~jnp.all(done)

  def body(carry):
    t, tokens, coords, kps, done, num = carry
    logits, xy = logits_at(tokens, coords, t)  # [B, V], [B, 2]
    phase = t % sequence.GROUP_SIZE
    group = t // sequence.GROUP_SIZE
    # Group start: <coord> or <eos>.
    stop = (logits[:, vocab.eos] > logits[:, vocab.coord]) | (
        group >= max_num_keypoints)
    start_tok = jnp.where(stop, vocab.eos, vocab.coord)
    # x / y step: the regression output on that axis.
    value = jnp.clip(jnp.where(phase == sequence.X_OFFSET, xy[:, 0], xy[:, 1]),
                     0.0, 1.0)
    coord_tok = jnp.clip(jnp.round(value * (vocab.num_bins - 1)), 0,
                         vocab.num_bins - 1).astype(jnp.int32)
    is_xy = (phase == sequence.X_OFFSET) | (phase == sequence.Y_OFFSET)
    tok = jnp.where(phase == 0, start_tok,
                    jnp.where(is_xy, coord_tok, vocab.sep))
    tok = jnp.where(done, vocab.pad, tok)
    new_done = done | ((phase == 0) & stop)
    num = num + ((phase == 0) & ~new_done).astype(jnp.int32)
    axis = jnp.where(phase == sequence.X_OFFSET, 0, 1)
    g = jnp.minimum(group, max_num_keypoints - 1)
    write = is_xy & ~done
    kps = kps.at[jnp.arange(b), g, axis].set(
        jnp.where(write, value, kps[jnp.arange(b), g, axis]))
    nxt = jnp.minimum(t + 1, length - 1)
    feed = t + 1 < length
    tokens = tokens.at[:, nxt].set(jnp.where(feed, tok, tokens[:, nxt]))
    coords = coords.at[:, nxt].set(
        jnp.where(feed & is_xy, value, coords[:, nxt]))
    return t + 1, tokens, coords, kps, new_done, num

  tokens = jnp.full([b, length], vocab.pad, jnp.int32).at[:, 0].set(vocab.bos)
  init = (jnp.int32(0), tokens, jnp.zeros([b, length], jnp.float32),
          jnp.zeros([b, max_num_keypoints, 2], jnp.float32),
          jnp.zeros([b], bool), jnp.zeros([b], jnp.int32))
  _, tokens, _, kps, _, num = jax.lax.while_loop(cond, body, init)
  valid = jnp.arange(max_num_keypoints)[None, :] < num[:, None]
  kps = jnp.where(valid[..., None], kps, jnp.nan)
  return dict(keypoints=kps, num_keypoints=num, tokens=tokens)


def make_decode_fn(model, max_num_keypoints: int, variables_sharding,
                   batch_sharding):
  """Jitted ``fn(variables, images) -> greedy_decode(...)`` with shardings."""
  fn = functools.partial(greedy_decode, model,
                         max_num_keypoints=max_num_keypoints)
  return jax.jit(fn, in_shardings=(variables_sharding, batch_sharding),
                 out_shardings=batch_sharding)
