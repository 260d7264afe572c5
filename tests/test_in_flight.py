"""The train loop's bound on dispatched, unfinished steps (runtime/in_flight.py)."""

import jax
import jax.numpy as jnp
import pytest

from kpseq_jax.runtime import in_flight as in_flight_lib


@pytest.mark.parametrize('max_in_flight, waited', [
    (1, [1, 2, 3, 4, 5]),  # No overlap: each step waited for at once.
    (2, [1, 2, 3, 4]),     # The train loop's: step n - 1 after n's dispatch.
    (3, [1, 2, 3]),
])
def test_push_waits_for_the_oldest_steps_in_order(max_in_flight, waited):
  seen = []
  window = in_flight_lib.InFlight(max_in_flight, wait=seen.append)
  for step in range(1, 6):
    window.push(step)
    assert len(window) == min(step, max_in_flight - 1)  # Never more.
  assert seen == waited


def test_previous_step_is_computed_when_push_returns():
  """With real arrays and `jax.block_until_ready`: after pushing step n's
  output, step n - 1's output is ready (no unbounded look-ahead)."""
  step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() + x.sum())
  window = in_flight_lib.InFlight(max_in_flight=2)
  x = jnp.ones([256, 256])
  previous = None
  for _ in range(4):
    out = step(x)
    window.push(out)
    if previous is not None:
      assert previous.is_ready()
    previous = out


def test_zero_in_flight_is_refused():
  with pytest.raises(ValueError, match='max_in_flight must be >= 1'):
    in_flight_lib.InFlight(0)
