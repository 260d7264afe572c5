"""Seconds-long configuration for tests: tiny model, 64 px, 2 steps."""

import ml_collections

from configs import dlc_openfield


def get_config() -> ml_collections.ConfigDict:
  c = dlc_openfield.get_config()
  c.image_size_px = 64
  c.num_bins = 64
  c.feature_levels = ('c4', 'c5')
  c.d_model = 32
  c.num_heads = 2
  c.num_layers = 2
  c.ffn_dim = 64
  c.batch_size = 4
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.eval_batch_size = 8
  c.num_eval_examples = 8
  # One decode per batch: the tests' compile time (tests/test_flip_test.py
  # turns it on where it is the subject).
  c.flip_test = False
  # The tests' model as before refinement went into dlc_openfield.py
  # (tests/test_refinement.py turns it on where it is the subject).
  c.decoder_refine_points = False
  return c
