"""The keypoint sequence: ``<bos> <coord> x y <sep> ... <coord> x y <sep> <eos>``.

The one place that knows which position holds what (`vocab.py` knows the
token ids). Positions index the *targets*: target ``t`` is predicted from
the decoder output at input position ``t``, and input ``t`` is ``<bos>`` for
``t = 0`` and target ``t - 1`` after (teacher forcing).

Layout of the targets for K keypoints, with P prefix positions in front
(P = ``Vocab.num_prefix_tokens``: 1 with a category token, else 0)::

  t:       0 .. P-1     P + 4g + 0   P + 4g + 1   P + 4g + 2   P + 4g + 3   P + 4K
  target:  <cat_k>      <coord>      x_g          y_g          <sep>        <eos>
  role:    PREFIX       COORD        X            Y            SEP          COORD (group K)

so group ``g`` (keypoint ``g`` in the category's order) always sits at the
same positions, and the position after the last group is where the model
chooses ``<eos>`` instead of another ``<coord>``. A category with K
keypoints has ``4 K + 1 + P`` targets; sequences are padded to
``seq_len(max_num_keypoints, P)``.

Unlabelled keypoints (v = 0) keep their group so that group ``g`` is always
keypoint ``g``: their x and y *targets* get weight 0 (no cross-entropy, no
L1) and their x and y *inputs* are the ``<nocoord>`` token instead of a
coordinate (the model never sees a made-up position). ``<coord>``, ``<sep>``
and ``<eos>`` are always targets, so the model learns where the sequence
ends. The prefix (category) token is an input only (weight 0).

Absent keypoints (with a vocabulary that has ``<absent>``, and only those the
data set says are not visible): the group is ``<coord> <absent> <absent>
<sep>``; both ``<absent>`` are targets (cross-entropy, no L1) and inputs, so
the group keeps its four positions and the model learns presence from the
same cross-entropy (pix2seq's INVISIBLE token).

Regression targets: the outputs that predict a keypoint's x token and its y
token both regress that keypoint's (x, y); at decoding time x is read at the
x step and y at the y step (see `kpseq_jax/inference/decoding.py`).

The role helpers take Python ints, numpy arrays or jax arrays (also traced
ones, for the compiled decoder) and return the same kind.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kpseq_jax.sequence import vocab as vocab_lib

GROUP_SIZE = 4  # <coord> x y <sep>
# Roles: a position's offset inside its group, or PREFIX before the groups.
PREFIX = -1
COORD = 0
X = 1
Y = 2
SEP = 3
X_OFFSET, Y_OFFSET = X, Y  # Positions of x and y inside a group.


def seq_len(max_num_keypoints: int, num_prefix: int = 0) -> int:
  """Number of target (and input) positions for up to ``max_num_keypoints``
  groups behind ``num_prefix`` prefix tokens: ``4 Kmax + 1 + P``."""
  return GROUP_SIZE * max_num_keypoints + 1 + num_prefix


class Role(NamedTuple):
  """What a target position holds (int or int arrays, same shape)."""
  group: Any  # Keypoint index g (0-based); -1 in the prefix.
  phase: Any  # PREFIX, COORD, X, Y or SEP.


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def target_role(positions, num_prefix: int) -> Role:
  """Group and phase of target positions ``positions`` (see module table).

  Args:
    positions: int or int array of target positions t >= 0.
    num_prefix: P.

  Returns:
    `Role` with group ``(t - P) // 4`` and phase ``(t - P) % 4`` behind the
    prefix, (-1, PREFIX) in it.
  """
  xp = _xp(positions)
  rel = positions - num_prefix
  in_prefix = rel < 0
  return Role(group=xp.where(in_prefix, -1, rel // GROUP_SIZE),
              phase=xp.where(in_prefix, PREFIX, rel % GROUP_SIZE))


def input_role(positions, num_prefix: int) -> Role:
  """Group and phase of what *input* positions carry: input t carries
  target t - 1, so input 0 (``<bos>``) is (-1, PREFIX) like the prefix."""
  xp = _xp(positions)
  role = target_role(xp.maximum(positions - 1, 0), num_prefix)
  first = positions == 0
  return Role(group=xp.where(first, -1, role.group),
              phase=xp.where(first, PREFIX, role.phase))


def position(group, phase: int, num_prefix: int):
  """Target position of ``phase`` in keypoint group ``group``:
  ``P + 4 g + phase`` (``group = K, phase = COORD`` is the ``<eos>``
  position of a K-keypoint sequence)."""
  return num_prefix + GROUP_SIZE * group + phase


def _checked_instance(keypoints: np.ndarray, num_keypoints: int,
                      vocab: vocab_lib.Vocab, max_num_keypoints: int,
                      category_token: int | None, absent: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(keypoints float32 [K, 3], labelled bool [K], absent bool [K]) of
  `build_sequence`'s arguments, or the ValueError it documents."""
  if num_keypoints > max_num_keypoints:
    raise ValueError(f'num_keypoints={num_keypoints} exceeds '
                     f'max_num_keypoints={max_num_keypoints}.')
  if (category_token is None) != (vocab.num_prefix_tokens == 0):
    raise ValueError(f'category_token={category_token} does not fit the '
                     f'vocabulary ({vocab.num_categories} category tokens).')
  kps = np.asarray(keypoints, np.float32)[:num_keypoints]
  labelled = kps[:, 2] > 0  # [K]
  if absent is None:
    absent = np.zeros([num_keypoints], bool)
  absent = np.asarray(absent, bool)[:num_keypoints] & ~labelled  # [K]
  if absent.any() and not vocab.presence:
    raise ValueError('absent keypoints given to a vocabulary without '
                     '<absent> (config.vocab.presence_token=False).')
  return kps, labelled, absent


def _layout(vocab: vocab_lib.Vocab, num_keypoints: int, length: int,
            category_token: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(target_tokens int32 [L], token_weights float32 [L]) of the sequence's
  structure: the category token (an input only: weight 0), ``<coord>`` and
  ``<sep>`` of each group and ``<eos>``, weight 1 from the first group to
  ``<eos>``; x/y targets are left ``<pad>`` for `build_sequence`."""
  p = vocab.num_prefix_tokens
  groups = np.arange(num_keypoints)
  end = position(num_keypoints, COORD, p)  # The <eos> position.
  target = np.full([length], vocab.pad, np.int32)
  token_w = np.zeros([length], np.float32)
  if p:
    target[0] = category_token
  target[position(groups, COORD, p)] = vocab.coord
  target[position(groups, SEP, p)] = vocab.sep
  target[end] = vocab.eos
  token_w[p:end + 1] = 1.0
  return target, token_w


def build_sequence(keypoints: np.ndarray, num_keypoints: int,
                   vocab: vocab_lib.Vocab, max_num_keypoints: int,
                   category_token: int | None = None,
                   absent: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Tokenises one instance's keypoints for teacher-forced training.

  Args:
    keypoints: float32 [Kmax, 3] (x, y, v), x and y normalised to [0, 1] in
      the crop, v > 0 for labelled keypoints; rows >= num_keypoints ignored.
    num_keypoints: K, the category's keypoint count (K <= Kmax).
    vocab: token layout; with ``vocab.num_prefix_tokens`` = 1 (category
      conditioning) ``category_token`` is required.
    max_num_keypoints: Kmax; fixes the padded length L = `seq_len`.
    category_token: the ``vocab.category(i)`` input after ``<bos>``.
    absent: bool [>= num_keypoints] keypoints known not to be visible (need
      ``vocab.presence``; a labelled keypoint is never absent); None = none.

  Returns:
    dict of numpy arrays, L = seq_len(max_num_keypoints, P):
      input_tokens int32 [L]: ``<bos>`` then the targets shifted right,
        with ``<nocoord>`` at the x/y of unlabelled keypoints.
      input_coords float32 [L]: coordinate-embedding input at x/y, else 0.
      target_tokens int32 [L]: target token ids, ``<pad>`` after ``<eos>``.
      target_coords float32 [L, 2]: (x, y) of the position's keypoint, else 0.
      token_weights float32 [L]: 1 where cross-entropy applies.
      coord_weights float32 [L]: 1 at x/y targets of labelled keypoints (L1).

  Raises:
    ValueError: num_keypoints > Kmax, a category token missing (or given)
      against ``vocab.num_prefix_tokens``, or ``absent`` without <absent>.
  """
  kps, labelled, absent = _checked_instance(
      keypoints, num_keypoints, vocab, max_num_keypoints, category_token,
      absent)
  p = vocab.num_prefix_tokens
  length = seq_len(max_num_keypoints, p)
  absent_tok = vocab.absent if vocab.presence else vocab.pad
  xy = np.clip(kps[:, :2], 0.0, 1.0)  # [K, 2]
  xy_tokens = vocab.quantize(xy)  # [K, 2]
  target, token_w = _layout(vocab, num_keypoints, length, category_token)
  coord_w = np.zeros([length], np.float32)
  target_coords = np.zeros([length, 2], np.float32)
  input_tokens = np.concatenate([[vocab.bos], target[:-1]]).astype(np.int32)
  input_coords = np.zeros([length], np.float32)
  for phase, axis in ((X, 0), (Y, 1)):
    pos = position(np.arange(num_keypoints), phase, p)
    target[pos] = np.where(labelled, xy_tokens[:, axis],
                           np.where(absent, absent_tok, vocab.pad))
    token_w[pos] = labelled | absent
    coord_w[pos] = labelled
    target_coords[pos] = xy
    input_tokens[pos + 1] = np.where(
        labelled, xy_tokens[:, axis],
        np.where(absent, absent_tok, vocab.nocoord))
    input_coords[pos + 1] = np.where(labelled, xy[:, axis], 0.0)
  return dict(input_tokens=input_tokens, input_coords=input_coords,
              target_tokens=target, target_coords=target_coords,
              token_weights=token_w, coord_weights=coord_w)
