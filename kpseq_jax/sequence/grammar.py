"""The keypoint sequence: ``<bos> <coord> x y <sep> ... <coord> x y <sep> <eos>``.

With category conditioning (``Vocab.num_categories > 0``) the category token
follows ``<bos>``: ``<bos> <cat_k> <coord> x y <sep> ... <eos>``. It is an
input only (its target weight is 0); every later position moves by
``Vocab.num_prefix_tokens`` = 1 (``seq_len(..., num_prefix)``).

One group of four tokens per keypoint, in the category's keypoint order, then
``<eos>``. A category with K keypoints has ``4 K + 1`` target tokens; the
decoder input is the target shifted right behind ``<bos>``. Sequences are
padded to ``seq_len(max_num_keypoints) = 4 * max_num_keypoints + 1``.

Unlabelled keypoints (v = 0) keep their group so that group ``k`` is always
keypoint ``k``: their x and y *targets* get weight 0 (no cross-entropy, no L1)
and their x and y *inputs* are the ``<nocoord>`` token instead of a coordinate
(the model never sees a made-up position). ``<coord>``, ``<sep>`` and
``<eos>`` are always targets, so the model learns where the sequence ends.

Regression targets: the outputs that predict a keypoint's x token and its y
token both regress that keypoint's (x, y); at decoding time x is read at the
x step and y at the y step (see `decoding.py`).
"""

import numpy as np

from kpseq_jax import vocab as vocab_lib

GROUP_SIZE = 4  # <coord> x y <sep>
X_OFFSET = 1  # Position of x inside a group.
Y_OFFSET = 2  # Position of y inside a group.


def seq_len(max_num_keypoints: int, num_prefix: int = 0) -> int:
  """Number of target (and input) tokens for up to ``max_num_keypoints``
  (plus ``num_prefix`` category tokens)."""
  return GROUP_SIZE * max_num_keypoints + 1 + num_prefix


def build_sequence(keypoints: np.ndarray, num_keypoints: int,
                   vocab: vocab_lib.Vocab, max_num_keypoints: int,
                   category_token: int | None = None) -> dict[str, np.ndarray]:
  """Tokenises one instance's keypoints for teacher-forced training.

  Args:
    keypoints: float32 [Kmax, 3] (x, y, v), x and y normalised to [0, 1] in
      the crop, v > 0 for labelled keypoints; rows >= num_keypoints ignored.
    num_keypoints: K, the category's keypoint count (K <= Kmax).
    vocab: token layout.
    max_num_keypoints: Kmax; fixes the padded length L = 4 Kmax + 1.
    category_token: with category conditioning, the ``vocab.category(i)``
      token put after ``<bos>`` (L = 4 Kmax + 2); None without.

  Returns:
    dict of numpy arrays, L = seq_len(max_num_keypoints, prefix):
      input_tokens int32 [L]: ``<bos>`` then the target shifted right, with
        ``<nocoord>`` at the x/y of unlabelled keypoints.
      input_coords float32 [L]: the normalised value fed to the coordinate
        embedding at x/y inputs (0 elsewhere).
      target_tokens int32 [L]: target token ids, ``<pad>`` after ``<eos>``.
      target_coords float32 [L, 2]: normalised (x, y) of the keypoint that
        the position's target belongs to (0 elsewhere).
      token_weights float32 [L]: 1 where cross-entropy applies.
      coord_weights float32 [L]: 1 where the L1 loss applies (x and y
        targets of labelled keypoints).

  Raises:
    ValueError: if num_keypoints > max_num_keypoints.
  """
  if num_keypoints > max_num_keypoints:
    raise ValueError(f'num_keypoints={num_keypoints} exceeds '
                     f'max_num_keypoints={max_num_keypoints}.')
  length = seq_len(max_num_keypoints)
  kps = np.asarray(keypoints, np.float32)[:num_keypoints]
  labelled = kps[:, 2] > 0  # [K]
  xy = np.clip(kps[:, :2], 0.0, 1.0)  # [K, 2]
  xy_tokens = vocab.quantize(xy)  # [K, 2]

  target = np.full([length], vocab.pad, np.int32)
  token_w = np.zeros([length], np.float32)
  coord_w = np.zeros([length], np.float32)
  target_coords = np.zeros([length, 2], np.float32)
  group = np.arange(num_keypoints) * GROUP_SIZE  # Group start per keypoint.
  target[group] = vocab.coord
  target[group + 3] = vocab.sep
  target[GROUP_SIZE * num_keypoints] = vocab.eos
  token_w[:GROUP_SIZE * num_keypoints + 1] = 1.0
  for offset, axis in ((X_OFFSET, 0), (Y_OFFSET, 1)):
    target[group + offset] = np.where(labelled, xy_tokens[:, axis], vocab.pad)
    token_w[group + offset] = labelled
    coord_w[group + offset] = labelled
    target_coords[group + offset] = xy

  input_tokens = np.concatenate([[vocab.bos], target[:-1]]).astype(np.int32)
  input_coords = np.zeros([length], np.float32)
  for offset, axis in ((X_OFFSET, 0), (Y_OFFSET, 1)):
    pos = group + offset + 1  # Input position that carries this target.
    input_tokens[pos] = np.where(labelled, xy_tokens[:, axis], vocab.nocoord)
    input_coords[pos] = np.where(labelled, xy[:, axis], 0.0)
  if category_token is not None:  # <bos> <cat> <coord> ...: shift by one.
    input_tokens = np.concatenate(
        [[vocab.bos, category_token], input_tokens[1:]]).astype(np.int32)
    input_coords = np.concatenate([[0.0, 0.0], input_coords[1:]]).astype(
        np.float32)
    target = np.concatenate([[category_token], target]).astype(np.int32)
    target_coords = np.concatenate([np.zeros([1, 2], np.float32),
                                    target_coords])
    token_w = np.concatenate([[0.0], token_w]).astype(np.float32)
    coord_w = np.concatenate([[0.0], coord_w]).astype(np.float32)
  return dict(input_tokens=input_tokens, input_coords=input_coords,
              target_tokens=target, target_coords=target_coords,
              token_weights=token_w, coord_weights=coord_w)
