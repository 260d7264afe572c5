"""Bound how far the training loop's host thread runs ahead of the device.

JAX dispatches a jitted step asynchronously: the call returns futures at
once and the Python loop goes on to fetch, shard and dispatch the next
batch. Unbounded, the loop runs as far ahead as the next thing that reads a
value (the metrics log flushes every ``log_every_steps``), so a SIGTERM's
save, an ETA or a progress line waits for tens of queued steps: on
2026-11-30 a dlc_openfield run SIGTERMed at host step ~201 saved 2 min 41 s
later, about 30 steps after the signal (docs/design.md).

`InFlight` keeps at most ``max_in_flight`` dispatched steps not known to be
done: after dispatching step n it waits for step n - 1 (the default of 2).
The device always has the next step queued while the host waits, so the
throughput is that of the unbounded loop; only the look-ahead is cut. The
same pattern keeps a bounded prefetch queue in flax's ImageNet example and
big_vision (``jax.block_until_ready`` on an earlier step's output).
"""

import collections
from typing import Any, Callable

import jax


class InFlight:
  """A window of dispatched, maybe unfinished, step outputs.

  Args:
    max_in_flight: how many steps may be dispatched and unfinished after
      `push` returns, counting the one just pushed (>= 1; 1 waits for each
      step before the next is dispatched, i.e. no overlap).
    wait: blocks until its argument (a pytree of arrays) is computed;
      `jax.block_until_ready` (tests pass a recorder).

  Raises:
    ValueError: if ``max_in_flight < 1``.
  """

  def __init__(self, max_in_flight: int = 2,
               wait: Callable[[Any], Any] = jax.block_until_ready):
    if max_in_flight < 1:
      raise ValueError(f'max_in_flight must be >= 1, got {max_in_flight}')
    self.max_in_flight = max_in_flight
    self._wait = wait
    self._pending = collections.deque()

  def push(self, output: Any) -> None:
    """Adds a just-dispatched step's ``output`` (any pytree of arrays, e.g.
    its loss) and waits for the oldest outputs until at most
    ``max_in_flight - 1`` earlier ones are pending."""
    self._pending.append(output)
    while len(self._pending) > self.max_in_flight - 1:
      self._wait(self._pending.popleft())

  def __len__(self) -> int:
    """How many pushed outputs have not been waited for."""
    return len(self._pending)
