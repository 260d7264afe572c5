"""Token layout of the keypoint sequence: the one place that knows token ids.

Ids ``0 .. num_bins - 1`` are coordinate bins; the special tokens follow:

===========  ==================  ===============================================
name         id                  meaning
===========  ==================  ===============================================
pad          num_bins + 0        padding after ``<eos>`` (never a target)
bos          num_bins + 1        start of sequence (decoder input only)
coord        num_bins + 2        a keypoint group starts: ``<coord> x y <sep>``
sep          num_bins + 3        a keypoint group ends
eos          num_bins + 4        end of sequence
nocoord      num_bins + 5        input stand-in for the x or y of an unlabelled
                                 keypoint (v = 0); never a target
absent       num_bins + 6        optional (``presence=True``): the keypoint is
                                 not visible; target and input at the x and y
                                 of an absent keypoint (``<coord> <absent>
                                 <absent> <sep>``)
category i   num_bins + S + i    optional (``num_categories > 0``): the
                                 category, input right after ``<bos>``
                                 (``config.vocab.category_conditioning``);
                                 i is the category's index among the data
                                 set's ids
                                 in increasing order; never a target.
                                 S = `num_special_tokens` (6, or 7 with
                                 ``<absent>``)
===========  ==================  ===============================================

``<absent>`` follows pix2seq's keypoint task, whose ``INVISIBLE`` token marks
a keypoint that is not visible (google-research/pix2seq
``tasks/keypoint_detection.py``). It is not the same as ``<nocoord>``: a
keypoint the data set does not label (COCO's v = 0) is unknown and is never
a target; one the data set says is not visible (DeepLabCut's missing label)
is a target, ``<absent>``. Which of the two v = 0 means is a property of the
data set (`kpseq_jax.data.dataset.DatasetInfo.unlabelled_means`).

Quantisation follows pix2seq (Chen et al. 2022, ``quantize`` in
google-research/pix2seq ``data/data_utils.py``): a normalised coordinate
``c`` in [0, 1] maps to bin ``round(c * (num_bins - 1))`` and bin ``t`` maps
back to ``t / (num_bins - 1)``. The round-trip error is therefore at most half
a bin, ``0.5 / (num_bins - 1)`` in normalised units (``0.5 * S / (num_bins -
1)`` pixels on an ``S``-pixel crop), exactly that bound at bin mid-points.
The model's regression head and the bilinear coordinate embedding work on the
continuous value, so this error bounds only the classifier's targets.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

NUM_SPECIAL_TOKENS = 6  # Without the optional <absent>.
# Radii (coordinate bins) at which the decoders measure a keypoint's
# confidence, the classifier's probability mass within r bins of the decoded
# bin (`kpseq_jax.inference.decoding.coordinate_mass`);
# ``config.decode.confidence_radius_bins`` picks the reported one, the others
# feed the calibration comparison.
CONFIDENCE_RADII_BINS = (0, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token ids for a vocabulary of ``num_bins`` coordinate bins.

  Attributes:
    num_bins: number of coordinate bins (>= 2); bins are token ids
      ``0 .. num_bins - 1``.
    num_categories: category tokens after the special tokens (0: no
      category conditioning).
    presence: the vocabulary has the ``<absent>`` token (keypoint presence,
      ``config.vocab.presence_token``).

  Raises:
    ValueError: if ``num_bins < 2`` or ``num_categories < 0``.
  """

  num_bins: int
  num_categories: int = 0
  presence: bool = False

  def __post_init__(self):
    if self.num_bins < 2:
      raise ValueError(f'num_bins must be >= 2, got {self.num_bins}.')
    if self.num_categories < 0:
      raise ValueError(f'num_categories must be >= 0, got '
                       f'{self.num_categories}.')

  @property
  def pad(self) -> int:
    return self.num_bins

  @property
  def bos(self) -> int:
    return self.num_bins + 1

  @property
  def coord(self) -> int:
    return self.num_bins + 2

  @property
  def sep(self) -> int:
    return self.num_bins + 3

  @property
  def eos(self) -> int:
    return self.num_bins + 4

  @property
  def nocoord(self) -> int:
    return self.num_bins + 5

  @property
  def absent(self) -> int:
    """The ``<absent>`` token.

    Raises:
      ValueError: if the vocabulary has no ``<absent>`` (``presence=False``).
    """
    if not self.presence:
      raise ValueError('this vocabulary has no <absent> token (presence is '
                       'off: config.vocab.presence_token=False).')
    return self.num_bins + NUM_SPECIAL_TOKENS

  @property
  def num_special_tokens(self) -> int:
    """Special tokens after the bins: 6, or 7 with ``<absent>``."""
    return NUM_SPECIAL_TOKENS + int(self.presence)

  def category(self, index):
    """Token id of the category with index ``index`` (int or array)."""
    return self.num_bins + self.num_special_tokens + index

  @property
  def num_prefix_tokens(self) -> int:
    """Input tokens between ``<bos>`` and the first group: 1 with category
    tokens (``<bos> <cat> <coord> ...``), else 0."""
    return 1 if self.num_categories else 0

  @property
  def vocab_size(self) -> int:
    """Number of token ids: ``num_bins + num_special_tokens +
    num_categories``."""
    return self.num_bins + self.num_special_tokens + self.num_categories

  @property
  def num_non_coordinate_tokens(self) -> int:
    """Special and category tokens: the rows of the model's token table
    indexed by `non_coordinate_index`."""
    return self.vocab_size - self.num_bins

  def is_coordinate(self, tokens):
    """Boolean mask of coordinate-bin tokens; same shape as ``tokens``.

    Works on numpy and jax arrays of integer token ids.
    """
    return tokens < self.num_bins

  def non_coordinate_index(self, tokens):
    """Row of a special or category token in a table of
    `num_non_coordinate_tokens` rows: ``token - num_bins``, clipped into
    the table (coordinate tokens map to row 0; mask them with
    `is_coordinate`). numpy or jax int arrays, same shape."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    return xp.clip(tokens - self.num_bins, 0,
                   self.num_non_coordinate_tokens - 1)

  def quantize(self, coords):
    """Normalised coordinates -> coordinate-bin token ids.

    Args:
      coords: float array, any shape, normalised to [0, 1]; values outside
        are clipped to the nearest end bin. A numpy array is quantised in
        float64; a jax array (e.g. inside the compiled decoder) in its own
        float32, with the same round-half-to-even rule.

    Returns:
      int32 array of the same shape and kind with values in
      ``0 .. num_bins - 1``: ``round(coords * (num_bins - 1))`` (pix2seq).
    """
    if isinstance(coords, jax.Array):
      bins = jnp.round(coords * (self.num_bins - 1))
      return jnp.clip(bins, 0, self.num_bins - 1).astype(jnp.int32)
    bins = np.rint(np.asarray(coords, np.float64) * (self.num_bins - 1))
    return np.clip(bins, 0, self.num_bins - 1).astype(np.int32)

  def dequantize(self, tokens):
    """Coordinate-bin token ids -> normalised coordinates in [0, 1].

    Args:
      tokens: integer array (numpy or jax), any shape, values in
        ``0 .. num_bins - 1``.

    Returns:
      float32 array of the same shape: ``tokens / (num_bins - 1)``.
    """
    return tokens.astype(np.float32) / np.float32(self.num_bins - 1)

  @property
  def max_roundtrip_error(self) -> float:
    """Largest ``|dequantize(quantize(c)) - c|`` for c in [0, 1]: half a bin."""
    return 0.5 / (self.num_bins - 1)


def from_config(config: ml_collections.ConfigDict) -> Vocab:
  """The vocabulary of a run: ``num_bins`` bins, ``max_num_categories``
  category tokens when ``category_conditioning`` is on, ``<absent>`` when
  ``presence_token`` is on."""
  return Vocab(config.vocab.num_bins, config.max_num_categories
               if config.vocab.category_conditioning else 0,
               presence=config.vocab.presence_token)
