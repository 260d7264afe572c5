"""Greedy, grammar-constrained decoding of the keypoint sequence.

The image is encoded once; a compiled `lax.while_loop` then emits one
position at a time (``<coord> x y <sep> ... <eos>``, `_grammar_step`) until
every sequence has emitted ``<eos>``. `cached_greedy_decode` (what
`predictor` compiles) carries a key/value cache ([B, Lc, heads, head_dim]
per layer) and runs ``model.decode_step`` on the new position only;
`greedy_decode` re-runs the decoder over the whole sequence each step and
is the reference the cached one reproduces token for token
(tests/test_decoding_cache.py).

Inputs (`input_fields`): ``image`` uint8 [B, S, S, 3] top-down crops;
``category_token`` int32 [B] for a category-conditioned model; for a CAPE
model ``model.SUPPORT_FIELDS`` (``support_image`` uint8 [B, shots, S, S,
3], ``support_keypoints`` float32 [B, shots, Kmax, 2] normalised,
``support_visible`` [B, shots, Kmax], ``num_keypoints`` int32 [B]). A
``full_image_memory`` model (PRTR end-to-end) reads whole images and
``memory_from_crop`` float32 [B, 2, 3], or ``image`` [M, H, W, 3] with
``memory_from_crop`` [M, N, 2, 3] (N boxes per image; B = M x N output
rows, image-major), and may take ``backbone_features`` ({level: [M, H_l,
W_l, C_l]}, e.g. the detector's) in place of ``image``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kpseq_jax.models import model as model_lib
from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib


CONFIDENCE_RADII_BINS = vocab_lib.CONFIDENCE_RADII_BINS
# Batch field that replaces ``image`` for a ``full_image_memory`` model:
# {level: [M, H_l, W_l, C_l]} backbone feature maps (module docstring).
BACKBONE_FEATURES_FIELD = 'backbone_features'


class KeypointState(NamedTuple):
  """What the decoder knows of each keypoint group so far (B = batch).

  xy: float32 [B, Kmax, 2] normalised crop (x, y).
  mass: float32 [B, Kmax, 2, R] per axis, the classifier's probability
    (softmax over the coordinate bins) within ``CONFIDENCE_RADII_BINS[r]``
    bins of the decoded bin.
  absent: float32 [B, Kmax] the probability of ``<absent>`` against the
    coordinate bins at the group's x step (0 without ``<absent>``).
  """
  xy: jax.Array
  mass: jax.Array
  absent: jax.Array

  @classmethod
  def zeros(cls, batch_size: int, max_num_keypoints: int) -> 'KeypointState':
    b, k, r = batch_size, max_num_keypoints, len(CONFIDENCE_RADII_BINS)
    return cls(xy=jnp.zeros([b, k, 2], jnp.float32),
               mass=jnp.zeros([b, k, 2, r], jnp.float32),
               absent=jnp.zeros([b, k], jnp.float32))


class _Choice(NamedTuple):
  """What the grammar makes of one step's outputs (B = batch)."""
  token: jax.Array  # int32 [B], the token emitted at this step (<pad> if done).
  value: jax.Array  # float32 [B], clipped regression value on this step's axis.
  is_xy: jax.Array  # bool scalar, this step emits an x or y coordinate.
  done: jax.Array  # bool [B], <eos> emitted at or before this step.
  num: jax.Array  # int32 [B], groups started so far.
  state: KeypointState  # With this step's value, mass and presence written.


def coordinate_mass(logits: jax.Array, bins: jax.Array, num_bins: int,
                    radii: tuple[int, ...] = CONFIDENCE_RADII_BINS
                    ) -> jax.Array:
  """The classifier's probability mass around a coordinate bin.

  The softmax is taken over the coordinate bins only (what the step may
  emit), so the mass is the model's own probability that the coordinate
  lies within ``r`` bins of ``bins``: the "probability mass around the
  decoded bin" confidence of issue 16, free because the bins already have a
  softmax (pix2seq's classifier; the score of a heatmap peak in
  DeepLabCut plays the same role).

  Args:
    logits: float [B, V] next-token logits; the first ``num_bins`` are the
      coordinate bins.
    bins: int32 [B] the decoded bin.
    num_bins: coordinate bins.
    radii: R radii in bins.

  Returns:
    float32 [B, R], in [0, 1].
  """
  p = jax.nn.softmax(logits[:, :num_bins].astype(jnp.float32), axis=-1)
  cdf = jnp.concatenate([jnp.zeros_like(p[:, :1]), jnp.cumsum(p, axis=-1)],
                        axis=-1)  # [B, nb + 1], cdf[:, i] = P(bin < i).
  r = jnp.asarray(radii, jnp.int32)[None, :]  # [1, R]
  hi = jnp.clip(bins[:, None] + r + 1, 0, num_bins)
  lo = jnp.clip(bins[:, None] - r, 0, num_bins)
  mass = (jnp.take_along_axis(cdf, hi, axis=1) -
          jnp.take_along_axis(cdf, lo, axis=1))
  return jnp.clip(mass, 0.0, 1.0)


def absent_probability(logits: jax.Array, vocab: vocab_lib.Vocab
                       ) -> jax.Array:
  """float32 [B]: P(``<absent>``) against the coordinate bins at an x step
  (softmax over the bins and ``<absent>``, what the step may emit)."""
  logits = logits.astype(jnp.float32)
  coord = jax.nn.logsumexp(logits[:, :vocab.num_bins], axis=-1)
  return jax.nn.sigmoid(logits[:, vocab.absent] - coord)


def input_fields(model) -> tuple[str, ...]:
  """Names of the batch fields the decoders read (see module docstring)."""
  fields = ('image',)
  if model.vocab.num_prefix_tokens:
    fields += ('category_token',)
  if model.support_conditioning:
    fields += model_lib.SUPPORT_FIELDS
  if model.full_image_memory:
    fields += (model_lib.FROM_CROP_FIELD,)
  return fields


def _stops(vocab: vocab_lib.Vocab, max_num_keypoints: int, group: jax.Array,
           logits: jax.Array, num_groups: jax.Array | None) -> jax.Array:
  """bool [B]: a group start at group index ``group`` emits ``<eos>``: the
  model prefers it to ``<coord>`` or Kmax groups are done; exactly after
  ``num_groups`` groups when given."""
  if num_groups is None:
    return (logits[:, vocab.eos] > logits[:, vocab.coord]) | (
        group >= max_num_keypoints)
  return group >= num_groups


def _write_axis(state: KeypointState, write: jax.Array, g: jax.Array,
                axis: jax.Array, value: jax.Array, mass: jax.Array,
                p_absent: jax.Array) -> KeypointState:
  """``state`` with keypoint ``g``'s coordinate on ``axis`` (0 x, 1 y) set
  to ``value`` [B] (normalised), its mass [B, R] and absent probability
  [B], in the rows where ``write`` [B]."""
  rows = jnp.arange(write.shape[0])
  return KeypointState(
      xy=state.xy.at[rows, g, axis].set(
          jnp.where(write, value, state.xy[rows, g, axis])),
      mass=state.mass.at[rows, g, axis].set(
          jnp.where(write[:, None], mass, state.mass[rows, g, axis])),
      absent=state.absent.at[rows, g].set(
          jnp.where(write, p_absent, state.absent[rows, g])))


def _grammar_step(vocab: vocab_lib.Vocab, max_num_keypoints: int,
                  t: jax.Array, logits: jax.Array, xy: jax.Array,
                  done: jax.Array, num: jax.Array,
                  state: KeypointState,
                  category_tokens: jax.Array | None = None,
                  num_groups: jax.Array | None = None) -> _Choice:
  """Greedy, grammar-constrained choice of the target at position ``t``:
  what it may hold comes from `grammar.target_role`. The prefix
  emits ``category_tokens``; a group start emits ``<coord>`` or ``<eos>``
  (``<eos>`` forced after ``max_num_keypoints`` groups, or exactly after
  ``num_groups`` when given); x and y emit the regression output on their
  axis, quantised by the vocabulary; the fourth position emits ``<sep>``.
  With ``<absent>`` in the vocabulary, the x step emits ``<absent>`` when
  its probability (`absent_probability`) exceeds 1/2, and the y step of
  such a group emits ``<absent>`` too; the keypoint's (x, y) is the
  regression output either way (its best coordinate).

  Args:
    vocab: token layout.
    max_num_keypoints: Kmax.
    t: int32 scalar, the target position (the input position whose output
      is read).
    logits: float32 [B, V] next-token logits at ``t``.
    xy: float32 [B, 2] regression output at ``t``, normalised.
    done: bool [B], sequences that already emitted ``<eos>``.
    num: int32 [B], groups started so far.
    state: the `KeypointState` so far.
    category_tokens: int32 [B] category tokens (conditioning only).
    num_groups: int32 [B], the number of groups to generate (K from a
      support set); None: the model chooses ``<eos>``.
  """
  b = logits.shape[0]
  role = grammar.target_role(t, vocab.num_prefix_tokens)
  is_start = role.phase == grammar.COORD
  stop = _stops(vocab, max_num_keypoints, role.group, logits, num_groups)
  start_tok = jnp.where(stop, vocab.eos, vocab.coord)
  is_xy = (role.phase == grammar.X) | (role.phase == grammar.Y)
  axis = jnp.where(role.phase == grammar.X, 0, 1)
  value = jnp.clip(jnp.where(axis == 0, xy[:, 0], xy[:, 1]), 0.0, 1.0)
  bins = vocab.quantize(value)
  g = jnp.clip(role.group, 0, max_num_keypoints - 1)
  rows = jnp.arange(b)
  xy_tok = bins
  p_absent = state.absent[rows, g]
  if vocab.presence:
    p_absent = jnp.where(role.phase == grammar.X,
                         absent_probability(logits, vocab), p_absent)
    xy_tok = jnp.where(p_absent > 0.5, vocab.absent, bins)
  tok = jnp.where(is_start, start_tok,
                  jnp.where(is_xy, xy_tok, vocab.sep))
  if vocab.num_prefix_tokens:
    tok = jnp.where(role.phase == grammar.PREFIX, category_tokens, tok)
  tok = jnp.where(done, vocab.pad, tok)
  new_done = done | (is_start & stop)
  num = num + (is_start & ~new_done).astype(jnp.int32)
  write = is_xy & ~done
  mass = coordinate_mass(logits, bins, vocab.num_bins)  # [B, R]
  state = _write_axis(state, write, g, axis, value, mass, p_absent)
  return _Choice(token=tok, value=value, is_xy=is_xy, done=new_done, num=num,
                 state=state)


def _outputs(vocab: vocab_lib.Vocab, tokens: jax.Array, state: KeypointState,
             num: jax.Array, max_num_keypoints: int) -> dict[str, jax.Array]:
  """The decode result dict; keypoint rows >= ``num`` become NaN."""
  valid = jnp.arange(max_num_keypoints)[None, :] < num[:, None]
  out = dict(keypoints=jnp.where(valid[..., None], state.xy, jnp.nan),
             num_keypoints=num, tokens=tokens,
             confidence=jnp.where(valid[..., None],
                                  state.mass[:, :, 0] * state.mass[:, :, 1],
                                  jnp.nan))
  if vocab.presence:
    out['presence'] = jnp.where(valid, 1.0 - state.absent, jnp.nan)
  return out


class _Encoded(NamedTuple):
  """An input batch encoded once for the whole decoding loop.

  ``memory`` holds M images' features; with ``boxes_per_image`` N > 1 its
  ``from_crop`` already has the M x N boxes' rows and `_per_box` repeats
  the features (or their projected values, once) to match.
  """
  memory: model_lib.Memory
  prefix: model_lib.SupportPrefix | None
  category_tokens: jax.Array | None
  num_groups: jax.Array | None
  batch_size: int
  boxes_per_image: int = 1


def _per_box(memory, n: int):
  """`Memory` or `ProjectedMemory` of M images -> that of their M x N
  boxes (image-major rows); unchanged for n = 1."""
  if n == 1:
    return memory
  repeat = lambda a: jnp.repeat(a, n, axis=0)
  if isinstance(memory, model_lib.ProjectedMemory):
    return memory.replace(values=tuple(map(repeat, memory.values)))
  return memory.replace(features=repeat(memory.features))


def _encode(model, variables, inputs: dict[str, jax.Array]) -> _Encoded:
  """Encodes the query (and support) crops of ``inputs``.

  Raises:
    KeyError: if ``inputs`` lacks one of `input_fields` (``image`` may be
      replaced by ``backbone_features``).
    ValueError: ``backbone_features`` for a model that is not
      ``full_image_memory`` or is support conditioned.
  """
  features = inputs.get(BACKBONE_FEATURES_FIELD)
  if features is not None and (model.support_conditioning
                               or not model.full_image_memory):
    raise ValueError(f'{BACKBONE_FEATURES_FIELD} replaces whole images of a '
                     'full_image_memory model without a support set.')
  missing = [f for f in input_fields(model) if f not in inputs
             and not (f == 'image' and features is not None)]
  if missing:
    raise KeyError(f'decoding needs the batch fields {missing} (inputs of '
                   f'this model: {input_fields(model)}).')
  prefix = num_groups = None
  if features is not None:
    memory = model.apply(variables, features, method=model.encode_features)
  elif model.support_conditioning:
    support = model_lib.SupportSet.from_batch(inputs)
    memory, support_memory = model.apply(
        variables, inputs['image'], support.images, train=False,
        method=model.encode_with_support)
    num_groups = support.num_keypoints.astype(jnp.int32)
    prefix = model.apply(variables, memory, support_memory, support,
                         method=model.episode_prefix)
  else:
    memory = model.apply(variables, inputs['image'], train=False,
                         method=model.encode)
  category_tokens = inputs.get('category_token')
  batch_size, boxes_per_image = memory.features.shape[0], 1
  if model.full_image_memory:  # Whole images; the tokens live in boxes.
    from_crop = inputs[model_lib.FROM_CROP_FIELD]
    if from_crop.ndim == 4:  # [M, N, 2, 3]: one encoder pass per image.
      boxes_per_image = from_crop.shape[1]
      from_crop = from_crop.reshape(-1, 2, 3)
      if category_tokens is not None:
        category_tokens = category_tokens.reshape(-1)
      batch_size = from_crop.shape[0]
    memory = memory.replace(from_crop=from_crop)
  return _Encoded(memory=memory, prefix=prefix,
                  category_tokens=category_tokens,
                  num_groups=num_groups, batch_size=batch_size,
                  boxes_per_image=boxes_per_image)


def _write_next(seq: jax.Array, t: jax.Array, value: jax.Array,
                where: jax.Array | bool = True) -> jax.Array:
  """``seq`` [B, L] with column t + 1 set to ``value`` [B] in the rows
  ``where``; unchanged when t + 1 = L (the last target feeds nothing)."""
  length = seq.shape[1]
  nxt = jnp.minimum(t + 1, length - 1)
  return seq.at[:, nxt].set(
      jnp.where((t + 1 < length) & where, value, seq[:, nxt]))


def greedy_decode(model, variables, inputs: dict[str, jax.Array],
                  max_num_keypoints: int) -> dict[str, jax.Array]:
  """Generates keypoint sequences for a batch of crops (full recompute, the
  reference: each step re-runs ``model.decode`` over all positions).

  Args:
    model: a keypoint `Model` (`supervised`, `cape`, `end_to_end`; static).
    variables: its variables ({'params', 'batch_stats'}).
    inputs: the `input_fields` of a batch (module docstring).
    max_num_keypoints: Kmax; at most Kmax groups are generated.

  Returns:
    dict with
      keypoints: float32 [B, Kmax, 2] normalised crop (x, y); rows at and
        after ``num_keypoints`` are NaN.
      confidence: float32 [B, Kmax, R] per keypoint, `coordinate_mass` of
        x times that of y, for the R radii ``CONFIDENCE_RADII_BINS`` (NaN
        rows likewise).
      presence: float32 [B, Kmax], 1 - P(``<absent>``) at the x step (only
        with ``<absent>`` in the vocabulary; NaN rows likewise).
      num_keypoints: int32 [B], groups emitted before ``<eos>``.
      tokens: int32 [B, L] decoder input tokens (``<bos>`` + generated,
        ``<pad>`` after ``<eos>``), L = 4 Kmax + 1 (+ 1 with a category).

  Raises:
    KeyError: if ``inputs`` lacks one of `input_fields`.
  """
  vocab = model.vocab
  length = grammar.seq_len(max_num_keypoints, vocab.num_prefix_tokens)
  enc = _encode(model, variables, inputs)
  b = enc.batch_size
  memory = _per_box(enc.memory, enc.boxes_per_image)

  def logits_at(tokens, coords, t):
    logits, xy = model.apply(variables, memory, tokens, coords,
                             train=False, prefix=enc.prefix,
                             method=model.decode)  # [B, L, V], [B, L, 2]
    return (jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False),
            jax.lax.dynamic_index_in_dim(xy, t, 1, keepdims=False))

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < length) & ~jnp.all(done)

  def body(carry):
    t, tokens, coords, kps, done, num = carry
    logits, xy = logits_at(tokens, coords, t)  # [B, V], [B, 2]
    c = _grammar_step(vocab, max_num_keypoints, t, logits, xy, done, num, kps,
                      enc.category_tokens, enc.num_groups)
    tokens = _write_next(tokens, t, c.token)
    coords = _write_next(coords, t, c.value, c.is_xy)
    return t + 1, tokens, coords, c.state, c.done, c.num

  tokens = jnp.full([b, length], vocab.pad, jnp.int32).at[:, 0].set(vocab.bos)
  init = (jnp.int32(0), tokens, jnp.zeros([b, length], jnp.float32),
          KeypointState.zeros(b, max_num_keypoints),
          jnp.zeros([b], bool), jnp.zeros([b], jnp.int32))
  _, tokens, _, kps, _, num = jax.lax.while_loop(cond, body, init)
  return _outputs(vocab, tokens, kps, num, max_num_keypoints)


def init_cache(step_model, variables, memory, batch_size: int, length: int,
               prefix: model_lib.SupportPrefix | None = None):
  """Zero self-attention caches of ``step_model`` for a prefix and
  ``length`` sequence positions.

  Shapes come from an abstract (``jax.eval_shape``) full-length call of
  ``decode``, the flax way of sizing a ``decode=True`` cache; nothing but
  the zeros is computed.

  Args:
    step_model: a keypoint `Model` with ``cache_decoding=True``.
    variables: its {'params', ...} (only shapes are read).
    memory: ``model.encode`` output (only shapes are read).
    batch_size: B.
    length: L, sequence positions.
    prefix: the support prefix (P positions; only shapes are read).

  Returns:
    the 'cache' collection: per layer ``cached_key``/``cached_value``
    [B, P + L, heads, d_model / heads] in the compute dtype and
    ``cache_index`` int32 0.
  """
  def full_call():
    _, mutated = step_model.apply(
        variables, memory, jnp.zeros([batch_size, length], jnp.int32),
        jnp.zeros([batch_size, length], jnp.float32), train=False,
        prefix=prefix, method=step_model.decode, mutable=['cache'])
    return mutated['cache']

  shapes = jax.eval_shape(full_call)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cached_greedy_decode(model, variables, inputs: dict[str, jax.Array],
                         max_num_keypoints: int) -> dict[str, jax.Array]:
  """`greedy_decode` with a key/value cache: same tokens and coordinates.

  Encodes once, projects every layer's deformable values once, writes the
  support prefix to the cache once (``model.prefill``), then runs
  ``model.decode_step`` on one position per iteration of a
  `lax.while_loop` whose carry holds the [B, Lc, heads, head_dim] caches.

  Args and returns: as `greedy_decode` (``model`` may be built with or
  without ``cache_decoding``; a cached copy is cloned from it).
  """
  vocab = model.vocab
  length = grammar.seq_len(max_num_keypoints, vocab.num_prefix_tokens)
  step_model = model.for_cached_decoding()
  enc = _encode(step_model, variables, inputs)
  b, prefix = enc.batch_size, enc.prefix
  # Values projected once per image, then repeated per box.
  projected = _per_box(step_model.apply(
      variables, enc.memory, method=step_model.project_values),
                       enc.boxes_per_image)
  cache = init_cache(step_model, variables,
                     _per_box(enc.memory, enc.boxes_per_image), b, length,
                     prefix)
  cache_length = length + (0 if prefix is None else prefix.valid.shape[1])
  if prefix is not None:
    _, mutated = step_model.apply(
        {**variables, 'cache': cache}, projected, prefix, cache_length,
        method=step_model.prefill, mutable=['cache'])
    cache = mutated['cache']

  def cond(carry):
    t, *_, done, _ = carry
    return (t < length) & ~jnp.all(done)

  def body(carry):
    t, cache, tok_in, coord_in, tokens, kps, done, num = carry
    (logits, xy), mutated = step_model.apply(
        {**variables, 'cache': cache}, projected, tok_in, coord_in, t,
        cache_length, prefix, method=step_model.decode_step,
        mutable=['cache'])  # [B, V], [B, 2]
    c = _grammar_step(vocab, max_num_keypoints, t, logits, xy, done, num, kps,
                      enc.category_tokens, enc.num_groups)
    tokens = _write_next(tokens, t, c.token)
    coord_in = jnp.where(c.is_xy, c.value, 0.0)
    return (t + 1, mutated['cache'], c.token, coord_in, tokens, c.state,
            c.done, c.num)

  tokens = jnp.full([b, length], vocab.pad, jnp.int32).at[:, 0].set(vocab.bos)
  init = (jnp.int32(0), cache, tokens[:, 0], jnp.zeros([b], jnp.float32),
          tokens, KeypointState.zeros(b, max_num_keypoints),
          jnp.zeros([b], bool), jnp.zeros([b], jnp.int32))
  carry = jax.lax.while_loop(cond, body, init)
  tokens, kps, num = carry[4], carry[5], carry[7]
  return _outputs(vocab, tokens, kps, num, max_num_keypoints)
