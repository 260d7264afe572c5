"""Two local processes (coordinator on localhost) train together.

Each process has 2 simulated CPU devices, reads its own half of the data
and joins the other through `distributed.initialize`; the mesh (2, 2) spans
both, with parameters split along 'fsdp' across the processes. JAX 0.10's
CPU client runs the cross-process collectives over gloo.
"""

import socket

import numpy as np

from kpseq_jax.training import checkpointing
from kpseq_jax.runtime import distributed
from kpseq_jax.data import dataset
import sharding_worker
from sharding_worker import launch, result_of


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _single_device_trainer(dataset_dir) -> sharding_worker.Trainer:
  config = sharding_worker.tiny_config(dataset_dir)
  info = dataset.load_info(config.input.dataset_dir)
  return sharding_worker.Trainer(
      config, info.split_sizes[config.input.train_split],
      sharding_worker.mesh_for([1, 1]))


def test_multiprocess_environment_detection():
  assert distributed.multiprocess_environment({}) is None
  assert distributed.multiprocess_environment(
      {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert 'SLURM' in distributed.multiprocess_environment(
      {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'})
  assert 'TPU' in distributed.multiprocess_environment(
      {'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'})
  assert distributed.multiprocess_environment(
      {'TPU_WORKER_HOSTNAMES': 'localhost'}) is None
  assert distributed.multiprocess_environment(
      {'JAX_COORDINATOR_ADDRESS': 'h:1234'})
  assert distributed.initialize('auto') is False  # Nothing asked for here.


def test_two_processes_train_together_like_one(dlc_dataset, mesh_run,
                                               tmp_path):
  port = _free_port()
  ckpt_dir = tmp_path / 'ckpt'
  procs = [launch(dict(mode='process', dataset_dir=str(dlc_dataset),
                       steps=2, coordinator=f'localhost:{port}',
                       num_processes=2, process_id=i, mesh=[2, 2],
                       ckpt_dir=str(ckpt_dir)), 2)
           for i in range(2)]
  try:
    results = [result_of(p) for p in procs]
  finally:
    for p in procs:  # Never leave a process waiting for its peer.
      if p.poll() is None:
        p.kill()
  assert [r['process_index'] for r in results] == [0, 1]
  assert all(r['process_count'] == 2 and r['device_count'] == 4
             for r in results)
  assert results[0]['fsdp_sharded'] > 0
  assert results[0]['losses'] == results[1]['losses']  # One global value.
  # The same config on one device (`mesh_run`) sees the same global batches:
  # augmentation is seeded by an example's index in the global stream.
  want = mesh_run['losses']['1x1'][:2]
  np.testing.assert_allclose(results[0]['losses'], want, rtol=1e-5)

  # The checkpoint both processes wrote restores here, on one device.
  ckpt = checkpointing.Checkpointer(str(ckpt_dir))
  restored, step = ckpt.restore(_single_device_trainer(dlc_dataset).abstract)
  ckpt.close()
  assert step == 2 and int(restored.step) == 2
