"""Token layout, quantisation round trip and the tokens of known instances."""

import numpy as np
import pytest

from kpseq_jax.sequence import grammar
from kpseq_jax.sequence import vocab as vocab_lib


def test_special_token_ids_follow_the_bins():
  v = vocab_lib.Vocab(num_bins=10)
  assert (v.pad, v.bos, v.coord, v.sep, v.eos, v.nocoord) == (
      10, 11, 12, 13, 14, 15)
  assert v.vocab_size == 16
  np.testing.assert_array_equal(v.is_coordinate(np.array([0, 9, 10, 15])),
                                [True, True, False, False])


def test_num_bins_below_two_is_rejected():
  with pytest.raises(ValueError, match='num_bins'):
    vocab_lib.Vocab(num_bins=1)


def test_quantize_exact_values():
  v = vocab_lib.Vocab(num_bins=11)  # Bin width 0.1.
  np.testing.assert_array_equal(
      v.quantize(np.array([0.0, 0.04, 0.05001, 0.5, 1.0, -0.3, 1.7])),
      [0, 0, 1, 5, 10, 0, 10])
  np.testing.assert_allclose(v.dequantize(np.array([0, 5, 10])),
                             [0.0, 0.5, 1.0])


@pytest.mark.parametrize('num_bins', [2, 11, 128, 1000])
def test_roundtrip_error_is_at_most_half_a_bin_and_reaches_it(num_bins):
  v = vocab_lib.Vocab(num_bins)
  c = np.linspace(0, 1, 100_001)
  err = np.abs(v.dequantize(v.quantize(c)) - c)
  assert err.max() <= v.max_roundtrip_error + 1e-6
  assert v.max_roundtrip_error == pytest.approx(0.5 / (num_bins - 1))
  # The bound is tight: the middle between two bins is half a bin away.
  mid = np.array([0.5 / (num_bins - 1)])
  assert np.abs(v.dequantize(v.quantize(mid)) - mid)[0] == pytest.approx(
      v.max_roundtrip_error, rel=1e-5)


def test_tokens_of_a_known_instance():
  v = vocab_lib.Vocab(num_bins=11)
  c, s, e, p, b, n = v.coord, v.sep, v.eos, v.pad, v.bos, v.nocoord
  # 2 keypoints, the second unlabelled, padded to Kmax = 3.
  kps = np.array([[0.2, 0.7, 2], [0.9, 0.1, 0], [0, 0, 0]], np.float32)
  out = grammar.build_sequence(kps, 2, v, max_num_keypoints=3)
  assert grammar.seq_len(3) == 13
  np.testing.assert_array_equal(
      out['target_tokens'], [c, 2, 7, s, c, p, p, s, e, p, p, p, p])
  np.testing.assert_array_equal(
      out['input_tokens'], [b, c, 2, 7, s, c, n, n, s, e, p, p, p])
  np.testing.assert_allclose(
      out['input_coords'], [0, 0, 0.2, 0.7, 0, 0, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      out['token_weights'], [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      out['coord_weights'], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(out['target_coords'][1], [0.2, 0.7])
  np.testing.assert_allclose(out['target_coords'][2], [0.2, 0.7])
  np.testing.assert_allclose(out['target_coords'][0], [0, 0])


def test_more_keypoints_than_kmax_is_an_error():
  v = vocab_lib.Vocab(num_bins=11)
  with pytest.raises(ValueError, match='max_num_keypoints'):
    grammar.build_sequence(np.zeros([3, 3]), 3, v, max_num_keypoints=2)
