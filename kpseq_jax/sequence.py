"""The keypoint sequence: ``<bos> <coord> x y <sep> ... <coord> x y <sep> <eos>``.

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


def seq_len(max_num_keypoints: int) -> int:
  """Number of target (and input) tokens for up to ``max_num_keypoints``."""
  return GROUP_SIZE * max_num_keypoints + 1


def build_sequence(keypoints: np.ndarray, num_keypoints: int,
                   vocab: vocab_lib.Vocab,
                   max_num_keypoints: int) -> dict[str, np.ndarray]:
  """Tokenises one instance's keypoints for teacher-forced training.

  Args:
    keypoints: float32 [Kmax, 3] (x, y, v), x and y normalised to [0, 1] in
      the crop, v > 0 for labelled keypoints; rows >= num_keypoints ignored.
    num_keypoints: K, the category's keypoint count (K <= Kmax).
    vocab: token layout.
    max_num_keypoints: Kmax; fixes the padded length L = 4 Kmax + 1.

  Returns:
    dict of numpy arrays, L = seq_len(max_num_keypoints):
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
  return dict(input_tokens=input_tokens, input_coords=input_coords,
              target_tokens=target, target_coords=target_coords,
              token_weights=token_w, coord_weights=coord_w)
