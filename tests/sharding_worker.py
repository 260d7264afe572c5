"""Subprocess for the multi-device and multi-process tests (not a test).

Run as ``python tests/sharding_worker.py JSON_ARGS`` with XLA_FLAGS already
holding the simulated device count; prints one JSON line ``RESULT {...}``.

Modes (``args['mode']``):
  meshes: for each of ``args['meshes']`` (``[data, fsdp]``; ``[1, 1]`` uses
    the first device only) trains the smoke model ``args['steps']`` steps on
    the same batches; reports the losses and how many state arrays are split
    along 'fsdp'. With ``args['ckpt_dir']``, also saves mesh
    ``args['save_mesh']`` after step ``steps - 1`` and restores that
    checkpoint onto each of ``args['restore_meshes']`` to run the last step
    there.
  process: one of several processes (``coordinator``, ``num_processes``,
    ``process_id``): joins them with `distributed.initialize`, trains
    ``steps`` steps on mesh ``[-1, 1]`` over all processes' devices from
    this process's data shard, saves a checkpoint collectively to
    ``ckpt_dir``, reports the losses.
"""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import orbax.checkpoint as ocp

import conftest
from kpseq_jax.training import checkpointing
from kpseq_jax.runtime import distributed
from kpseq_jax.data import dataset
from kpseq_jax.data import pipeline
from kpseq_jax.runtime import sharding
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts


# (data, fsdp) on 8 devices: one device, and data x fsdp. (Pure
# data-parallel (8, 1) and pure fsdp (1, 8) each compiled one more step for
# what (4, 2) already splits both ways; CI time.)
MESHES = [[1, 1], [4, 2]]


def tiny_config(dataset_dir):
  """The smoke config, smaller still (compiling dominates these tests).

  Batch 8 splits over 8 devices; dropout 0 keeps the rng out of the
  comparison (BatchNorm stays: jit computes its statistics over the global
  batch on any mesh).
  """
  return conftest.smoke_config(dataset_dir, **{
      'input.batch_size': 8, 'model.transformer.dropout': 0.0,
      'model.transformer.num_layers': 1, 'model.feature_levels': ('c5',),
      'sharding.fsdp_min_param_elements': 1024})


def mesh_for(shape):
  devices = jax.devices()[:1] if tuple(shape) == (1, 1) else None
  return sharding.create_mesh(tuple(shape), devices)


class Trainer:
  """The production train step (`step.make_train_step`) on one mesh."""

  def __init__(self, config, train_size, mesh):
    self.config, self.mesh = config, mesh
    self.model = ts.create_model(config)
    self.tx = ts.create_optimizer(config)
    self.abstract = ts.abstract_train_state(config, self.model, self.tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract)
    self.step_fn = step_lib.make_train_step(
        config, self.model, self.tx,
        ts.learning_rate_schedule(config), shardings, mesh,
        donate=False)

  def init(self):
    return ts.create_train_state(self.config, self.model, self.tx, self.mesh)

  def place(self, state):
    """``state`` (from any mesh) moved into this mesh's shardings."""
    return jax.device_put(
        state, jax.tree.map(lambda a: a.sharding, self.abstract))

  def step(self, state, local_batch):
    batch = sharding.global_batch(
        {k: local_batch[k] for k in step_lib.train_fields(self.model)},
        self.mesh)
    with jax.set_mesh(self.mesh):
      state, metrics = self.step_fn(state, batch)
    return state, float(metrics['loss'])


def num_fsdp_sharded(tree) -> int:
  """How many arrays of ``tree`` are split along 'fsdp'."""
  return sum(sharding.FSDP_AXIS in jax.tree.leaves(tuple(a.sharding.spec))
             for a in jax.tree.leaves(tree))


def _save_from_one_replica():
  """Orbax writes each array from one replica, not split among them.

  On CPU, Orbax's default (replica-parallel saving) has every replica of an
  array write a slice of it, cut by an eagerly dispatched `lax.slice` that
  compiles once per array shape and slice: about 270 compilations for the
  tiny model on mesh (4, 2), 75 of this worker's 440 s on a busy 2-core
  machine. The arrays written, and restored, are the same; the
  multi-process test (`run_process`) keeps Orbax's default.
  """
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
      override=True)


def run_meshes(args):
  _save_from_one_replica()
  config = tiny_config(args['dataset_dir'])
  info = dataset.load_info(config.input.dataset_dir)
  train_size = info.split_sizes[config.input.train_split]
  it = iter(pipeline.create_train_dataset(config, info))
  batches = [next(it) for _ in range(args['steps'])]
  out = {'losses': {}, 'fsdp_sharded': {}, 'fsdp_sharded_params': {},
         'num_arrays': None,
         'restored_losses': {}}
  saved, trainers = None, {}  # One compiled step per mesh.
  initial = None
  for shape in args['meshes']:
    key = f'{shape[0]}x{shape[1]}'
    trainer = trainers[key] = Trainer(config, train_size, mesh_for(shape))
    if initial is None:  # One initialisation, placed on every mesh.
      initial = trainer.init()
    state = trainer.place(initial)
    out['fsdp_sharded'][key] = num_fsdp_sharded(state)
    out['fsdp_sharded_params'][key] = num_fsdp_sharded(state.params)
    out['num_arrays'] = len(jax.tree.leaves(state))
    losses = []
    for i, b in enumerate(batches):
      if shape == args.get('save_mesh') and i == len(batches) - 1:
        ckpt = checkpointing.Checkpointer(args['ckpt_dir'])
        ckpt.save(i, state)
        ckpt.wait()
        ckpt.close()
        saved = i
      state, loss = trainer.step(state, b)
      losses.append(loss)
    out['losses'][key] = losses
  for shape in args.get('restore_meshes', []):
    key = f'{shape[0]}x{shape[1]}'
    trainer = trainers.get(key) or Trainer(config, train_size,
                                           mesh_for(shape))
    ckpt = checkpointing.Checkpointer(args['ckpt_dir'])
    state, step = ckpt.restore(trainer.abstract)
    ckpt.close()
    assert step == saved, (step, saved)
    out['fsdp_sharded']['restored_' + key] = num_fsdp_sharded(state)
    _, loss = trainer.step(state, batches[-1])
    out['restored_losses'][key] = loss
  return out


def run_process(args):
  distributed.initialize('auto', args['coordinator'], args['num_processes'],
                         args['process_id'])
  config = tiny_config(args['dataset_dir'])
  config.sharding.mesh_shape = tuple(args.get('mesh', (-1, 1)))
  info = dataset.load_info(config.input.dataset_dir)
  train_size = info.split_sizes[config.input.train_split]
  trainer = Trainer(config, train_size,
                    sharding.create_mesh(config.sharding.mesh_shape))
  it = iter(pipeline.create_train_dataset(config, info))
  state, losses = trainer.init(), []
  for _ in range(args['steps']):
    state, loss = trainer.step(state, next(it))
    losses.append(loss)
  ckpt = checkpointing.Checkpointer(args['ckpt_dir'])
  ckpt.save(args['steps'], state, it)
  ckpt.wait()
  ckpt.close()
  return {'losses': losses, 'process_index': jax.process_index(),
          'process_count': jax.process_count(),
          'device_count': jax.device_count(),
          'fsdp_sharded': num_fsdp_sharded(state)}


def launch(args: dict, num_devices: int) -> subprocess.Popen:
  """Starts this script with ``num_devices`` CPU devices.

  Output goes to temporary files, not pipes: a process blocked on a full
  pipe would stall the collectives of the others.

  XLA:CPU's generated code at -O0, as in the rest of the suite
  (conftest.py): with the quarter-width ResNet the few steps are cheap and
  the compilations dominate (two processes: 73 -> 50 s, 2026-12-07).
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}'
             ' --xla_backend_optimization_level=0')
  out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), json.dumps(args)], env=env,
      stdout=out, stderr=err, text=True)
  proc.outputs = (out, err)
  return proc


def result_of(proc: subprocess.Popen, timeout: float = 900) -> dict:
  """The ``RESULT`` of a `launch`ed process; fails with its stderr tail."""
  proc.wait(timeout=timeout)
  out, err = proc.outputs
  out.seek(0)
  err.seek(0)
  lines = [l for l in out.read().splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, err.read()[-3000:]
  return json.loads(lines[-1][len('RESULT '):])


if __name__ == '__main__':
  a = json.loads(sys.argv[1])
  result = run_meshes(a) if a['mode'] == 'meshes' else run_process(a)
  print('RESULT ' + json.dumps(result), flush=True)
