"""Device mesh and shardings (``jax.jit`` with explicit shardings, no pmap).

The mesh has axes ``('data', 'fsdp')`` (``config.sharding.mesh_shape``).
Batches are split over both axes, so every device sees a distinct slice of
the global batch. Parameters and optimizer state follow
``config.sharding.rules``, rules kept as config data as big_vision's
``sharding_strategy`` (``big_vision/sharding.py``): ``(regex, strategy)``
pairs, the first regex that matches a leaf's whole path (`leaf_path`, e.g.
``params/decoder/layer_0/ffn_1/kernel`` or
``opt_state/1/0/mu/decoder/layer_0/ffn_1/kernel``; start a pattern with
``.*`` to catch a parameter and its Adam moments) chooses the strategy:

* ``'fsdp'``: big_vision's ``fsdp`` and MaxText's ZeRO-3 layout: an array of
  at least ``config.sharding.fsdp_min_param_elements`` elements is split
  along 'fsdp' on its largest dimension that the 'fsdp' size divides (ties:
  the later dimension), a smaller one is replicated (`fsdp_spec`);
* ``'replicate'``: replicated.

A leaf no rule matches is replicated. Everything is replicated over 'data'.
The default ``(('.*', 'fsdp'),)`` with a mesh ``(N, 1)`` is plain data
parallelism with replicated state; with ``(1, N)`` fully sharded data
parallelism. Rules match names and strategies read shapes because the
model's modules carry no logical-axis annotations; Adam's moments have
their parameter's shape and therefore, under a ``.*`` pattern, its sharding.

Activations: `constrain_batch` pins the image memory (the backbone output
that every decoder layer reads) to the batch split, so XLA never chooses to
shard it like the neighbouring sharded weights; it applies inside
``jax.set_mesh(mesh)`` (the train loop) and is a no-op without a mesh.
"""

import re
from typing import Any

import jax
from jax.experimental import multihost_utils
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


STRATEGIES = ('fsdp', 'replicate')


def leaf_path(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a `jax.tree_util` key path: dict keys, attribute
  names and sequence indices, e.g. ``params/backbone/conv1/kernel``."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return '/'.join(name(k) for k in path)


def check_rules(rules: Any) -> tuple[tuple[str, str], ...]:
  """``rules`` validated, as a tuple of ``(regex, strategy)`` string pairs.

  Args:
    rules: sequence of ``(regex, strategy)`` pairs (``config.sharding.rules``;
      a config override gives tuples, a JSON config lists).

  Raises:
    ValueError: a rule that is not a (regex, strategy) pair, a regex that
      does not compile, or a strategy not in `STRATEGIES`; the message
      names the rule.
  """
  out = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and
            all(isinstance(r, str) for r in rule)):
      raise ValueError(f'sharding.rules[{i}] = {rule!r} is not a '
                       '(regex, strategy) pair of strings.')
    pattern, strategy = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'sharding.rules[{i}]: bad regex {pattern!r}: {e}'
                       ) from None
    if strategy not in STRATEGIES:
      raise ValueError(f'sharding.rules[{i}]: strategy {strategy!r} not in '
                       f'{STRATEGIES}.')
    out.append((pattern, strategy))
  return tuple(out)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    min_elements: int = 2**14,
                    rules: Any = (('.*', 'fsdp'),)) -> Any:
  """Shardings for every leaf of the (abstract) train state.

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`.
    mesh: the ('data', 'fsdp') mesh.
    min_elements: under 'fsdp', arrays smaller than this are replicated
      (``config.sharding.fsdp_min_param_elements``).
    rules: ``(regex, strategy)`` pairs (``config.sharding.rules``; see the
      module docstring): the first regex that fully matches the leaf's
      `leaf_path` decides; no match: replicated.

  Returns:
    the same pytree of `NamedSharding`.

  Raises:
    ValueError: bad ``rules`` (`check_rules`).
  """
  rules = check_rules(rules)
  fsdp = mesh.shape[FSDP_AXIS]

  def shard(path, a):
    strategy = next((st for pattern, st in rules
                     if re.fullmatch(pattern, leaf_path(path))), 'replicate')
    spec = (fsdp_spec(a.shape, fsdp, min_elements) if strategy == 'fsdp'
            else P())
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(shard, abstract_state)


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


def gather(tree: Any) -> Any:
  """Global numpy values of a pytree of (possibly multi-process) arrays.

  One process: ``np.asarray`` of every leaf. Several: every process gets
  the whole global arrays (`multihost_utils.process_allgather`, tiled), so
  all must call it.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)
