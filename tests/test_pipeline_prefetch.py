"""The input pipeline prepares only ``prefetch_batches`` ahead (pipeline.py),
not Grain's default of 500 elements on 16 threads."""

import threading
import time

import grain
import numpy as np
import pytest

from configs import smoke
from kpseq_jax.data import pipeline


class _Count(grain.transforms.Map):
  """Counts the examples the pipeline has prepared."""

  def __init__(self):
    self.lock, self.n = threading.Lock(), 0

  def map(self, x):
    with self.lock:
      self.n += 1
    return {'x': np.full([4], x, np.int32)}


def _prepared_after_one_batch(config) -> int:
  count = _Count()
  ds = grain.MapDataset.range(100_000).map(count)
  it = iter(pipeline.shard_and_batch(config, ds))
  first = next(it)
  assert first['x'].shape == (config.input.batch_size, 4)
  time.sleep(1.0)  # Let the prefetch threads run as far as they may.
  return count.n


@pytest.mark.parametrize('prefetch_batches', [1, 4])
def test_training_stream_runs_at_most_prefetch_batches_ahead(prefetch_batches):
  config = smoke.get_config()
  config.input.batch_size, config.input.data_threads = 8, 2
  config.input.prefetch_batches = prefetch_batches
  prepared = _prepared_after_one_batch(config)
  # The consumed batch, the buffer, and one batch per thread in the making.
  bound = ((1 + prefetch_batches + config.input.data_threads)
           * config.input.batch_size)
  assert config.input.batch_size * (1 + prefetch_batches) <= prepared <= bound


def test_evaluation_examples_are_prefetched_a_few_batches_ahead():
  config = smoke.get_config()
  config.evals.batch_size = 4
  config.input.data_threads = config.input.prefetch_batches = 2
  count = _Count()
  ds = grain.MapDataset.range(10_000).map(count)
  batches = pipeline.padded_batches(ds, config.evals.batch_size,
                                    pipeline.eval_read_options(config))
  assert next(batches)['x'].shape == (4, 4)
  time.sleep(1.0)
  # 1 batch read + 2 batches of examples ahead + one per thread in the making.
  assert count.n <= (1 + 2) * 4 + 2
