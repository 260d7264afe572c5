"""Multi-process start-up: `jax.distributed.initialize` when asked or needed.

One process per host (TPU VM pod worker, SLURM task, or a local process in
tests). Every process runs the same program; `jax.devices()` then spans all
hosts, each process reads its own shard of the data
(`kpseq_jax.data.pipeline`), builds global batches with
`jax.make_array_from_process_local_data` (`sharding.global_batch`), only
process 0 writes logs and reports, and Orbax writes checkpoints collectively.
"""

import os
from typing import Mapping

from absl import logging
import jax


def multiprocess_environment(env: Mapping[str, str] = os.environ
                             ) -> str | None:
  """Why ``env`` looks like one process of several, or None.

  Recognised: ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself); a SLURM job
  with more than one task (``SLURM_NTASKS``/``SLURM_NPROCS`` > 1); a TPU
  slice with several hosts (``TPU_WORKER_HOSTNAMES`` listing more than one,
  as GKE sets it, or ``MEGASCALE_COORDINATOR_ADDRESS``). A GCE TPU VM pod
  sets none of these (JAX reads its metadata server), so `launch.sh`
  passes ``--distributed=on`` there.
  """
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS is set'
  ntasks = env.get('SLURM_NTASKS') or env.get('SLURM_NPROCS')
  if env.get('SLURM_JOB_ID') and ntasks and ntasks.isdigit() and int(ntasks) > 1:
    return f'SLURM job with {ntasks} tasks'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return f'TPU slice with {len(hosts)} hosts'
  if env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)'
  return None


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to the others, if there are others.

  Args:
    mode: 'off' never initializes; 'on' always does (arguments left None are
      auto-detected by JAX from the cluster: TPU VM metadata, SLURM, MPI);
      'auto' does when any argument is given or
      `multiprocess_environment` recognises the environment.
    coordinator_address: 'host:port' of process 0.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if `jax.distributed.initialize` was called.

  Raises:
    ValueError: for an unknown ``mode``, or arguments given with 'off'.
  """
  explicit = any(v is not None for v in
                 (coordinator_address, num_processes, process_id))
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f'distributed mode {mode!r} not in auto/on/off.')
  if mode == 'off':
    if explicit:
      raise ValueError('--distributed=off contradicts --coordinator_address/'
                       '--num_processes/--process_id.')
    return False
  reason = 'requested' if (mode == 'on' or explicit) else (
      multiprocess_environment())
  if reason is None:
    return False
  logging.info('jax.distributed.initialize (%s): coordinator %s, '
               'process %s of %s', reason, coordinator_address or 'auto',
               'auto' if process_id is None else process_id,
               'auto' if num_processes is None else num_processes)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  return True
