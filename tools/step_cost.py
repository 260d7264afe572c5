"""Train-step time of two configs, alternating in one process.

  python tools/step_cost.py --config configs/dlc_openfield.py \\
      --other configs/dlc_openfield_detector.py \\
      "--other.model.feature_levels=('c2', 'c3', 'c4', 'c5')" \\
      --other.optim.num_train_steps=1650 --rounds 3 --steps 10

Builds each config's train state, optimizer and jitted train step exactly as
`train.train_and_evaluate` does (`train_state`, `step.make_train_step`;
the detector's for ``task='detection'``), takes one real batch of each from
its own training pipeline, compiles both, and then times ``--steps`` steps
of each, alternating ``--rounds`` times (config, other, config, ...), the
same batch every step. Prints the median seconds per step of each, their
ratio, XLA's FLOP count per step, and the ratio of whole schedules
(``num_train_steps`` x seconds per step): whether one trains "in about the
time" of the other on this machine. A measuring tool for docs/, not part
of the package.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.data import pipeline
from kpseq_jax.runtime import sharding
from kpseq_jax.runtime import xla_flags
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'First config.',
                                lock_config=True)
config_flags.DEFINE_config_file('other', None, 'Second config.',
                                lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')


def _setup(config):
  """(compiled step, state, batch, total steps, GFLOP per step)."""
  info = dataset.load_info(config.input.dataset_dir)
  detecting = config.model_name == 'detector'
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  state = ts.create_train_state(config, model, tx, mesh)
  data = (detection.create_train_dataset(config, info) if detecting
          else pipeline.create_train_dataset(config, info))
  local = next(iter(data))
  batch = sharding.global_batch(
      {k: local[k] for k in step_lib.train_fields(model)}, mesh)
  step_fn = step_lib.make_train_step(
      config, model, tx, ts.learning_rate_schedule(config),
      jax.tree.map(lambda a: a.sharding, state), mesh)
  compiled = step_fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop = float((cost or {}).get('flops', float('nan'))) / 1e9
  return compiled, state, batch, config.optim.num_train_steps, gflop


def _time(compiled, state, batch, steps):
  """(seconds per step over ``steps`` steps, the new state): the step
  donates its state, so each call takes the previous call's."""
  state, metrics = compiled(state, batch)  # Warm.
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t) / steps, state


def main(argv):
  del argv
  xla_flags.set_defaults()
  names = ('config', 'other')
  setups = {n: _setup(getattr(FLAGS, n)) for n in names}
  times = {n: [] for n in names}
  for r in range(FLAGS.rounds):
    for n in names:
      compiled, state, batch, total, gflop = setups[n]
      seconds, state = _time(compiled, state, batch, FLAGS.steps)
      setups[n] = (compiled, state, batch, total, gflop)
      times[n].append(seconds)
      print(f'round {r + 1} {n}: {times[n][-1]:.3f} s/step', flush=True)
  med = {n: float(np.median(times[n])) for n in names}
  for n in names:
    total = setups[n][3]
    print(f'{n}: {med[n]:.3f} s/step (median of '
          f'{[round(x, 3) for x in times[n]]}), '
          f'{setups[n][4]:.1f} GFLOP/step, {total} steps = '
          f'{total * med[n] / 60:.1f} min of steps')
  print(f'other / config: {med["other"] / med["config"]:.2f}x per step, '
        f'{setups["other"][3] * med["other"] / (setups["config"][3] * med["config"]):.2f}x '
        'per schedule')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'other'])
  app.run(main)
