"""Device mesh and shardings (``jax.jit`` with explicit shardings, no pmap).

The mesh has axes ``('data', 'fsdp')``. Batches are split over both axes
(every device sees a distinct slice). Parameters and optimizer state are
replicated for now; sharding them along ``fsdp`` is the scale-out issue's
work and only changes `state_shardings`.
"""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The leading batch dim is split over both.


def create_mesh(mesh_shape: tuple[int, ...],
                devices: list[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices`` (default: all devices).

  Args:
    mesh_shape: sizes of (data, fsdp); one entry may be -1, meaning all
      remaining devices.

  Raises:
    ValueError: if the sizes do not multiply to the device count.
  """
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} must have '
                     f'{len(MESH_AXES)} entries for axes {MESH_AXES}.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh_shape {tuple(mesh_shape)}: at most one -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if known == 0 or n % known:
      raise ValueError(f'mesh_shape {tuple(mesh_shape)} does not divide the '
                       f'{n} devices.')
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} has {np.prod(shape)} '
                     f'devices but {n} are available.')
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of the (abstract) train state: replicated."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray],
                 mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local numpy batches into global sharded arrays.

  Each process passes its own [B / processes, ...] slice;
  `jax.make_array_from_process_local_data` builds the [B, ...] array.

  Raises:
    ValueError: if a local batch does not split over the local devices.
  """
  s = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(v))
          for k, v in local_batch.items()}
