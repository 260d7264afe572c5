"""Device mesh and shardings (``jax.jit`` with explicit shardings, no pmap).

The mesh has axes ``('data', 'fsdp')`` (``config.mesh_shape``). Batches are
split over both axes, so every device sees a distinct slice of the global
batch. Parameters and optimizer state follow the 'fsdp' rule of big_vision
(``big_vision/sharding.py``, ``fsdp``) and MaxText's ZeRO-3 layout: each
array of at least ``config.fsdp_min_param_elements`` elements is split along
'fsdp' on its largest dimension that the 'fsdp' size divides (ties: the
later dimension), everything else is replicated; all of it is replicated
over 'data'. A mesh ``(N, 1)`` is plain data parallelism with replicated
state; ``(1, N)`` is fully sharded data parallelism. The layout is a rule
over shapes rather than per-parameter logical-axis names because the
model's modules carry no axis annotations; Adam's moments have their
parameter's shape and therefore its sharding.

Activations: `constrain_batch` pins the image memory (the backbone output
that every decoder layer reads) to the batch split, so XLA never chooses to
shard it like the neighbouring sharded weights; it applies inside
``jax.set_mesh(mesh)`` (the train loop) and is a no-op without a mesh.
"""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The leading batch dim is split over both.
FSDP_AXIS = 'fsdp'


def create_mesh(mesh_shape: tuple[int, ...],
                devices: list[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices`` (default: all devices).

  Args:
    mesh_shape: sizes of (data, fsdp); one entry may be -1, meaning all
      remaining devices.
    devices: the devices, in mesh order (default `jax.devices()`, which
      spans all processes).

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


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int,
              min_elements: int) -> P:
  """The 'fsdp' rule for one array of ``shape``.

  Returns:
    ``P(..., 'fsdp', ...)`` with 'fsdp' on the largest dimension divisible
    by ``fsdp_size`` (the later one on ties) if the array has at least
    ``min_elements`` elements and ``fsdp_size > 1``; otherwise ``P()``
    (replicated). E.g. a [3, 3, 64, 128] kernel with fsdp 2 ->
    ``P(None, None, None, 'fsdp')``.
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = FSDP_AXIS
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    min_elements: int = 2**14) -> Any:
  """Shardings for every leaf of the (abstract) train state (`fsdp_spec`).

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`.
    mesh: the ('data', 'fsdp') mesh.
    min_elements: arrays smaller than this are replicated
      (``config.fsdp_min_param_elements``).

  Returns:
    the same pytree of `NamedSharding`.
  """
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp, min_elements)),
      abstract_state)


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` [B, ...] constrained to the batch split inside a mesh context.

  Under ``jax.set_mesh(mesh)`` with a ('data', 'fsdp') mesh, returns
  ``jax.lax.with_sharding_constraint(x, P(('data', 'fsdp')))``; without a
  mesh (tests, single-device decoding) returns ``x`` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


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
