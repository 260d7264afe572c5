"""Checkpoint listing and restore when a save was interrupted or damaged."""

import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpseq_jax.training import checkpointing


def _state(v):
  return {'w': jnp.full([4], v, jnp.float32), 'step': jnp.int32(v)}


def _abstract():
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      _state(0))


@pytest.fixture
def three_steps(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.wait()
  ckpt.close()
  return tmp_path, tmp_path / 'checkpoints'


def test_interrupted_save_is_not_listed(three_steps):
  workdir, d = three_steps
  # What a save killed before its rename leaves behind.
  shutil.copytree(d / '3', d / '4.orbax-checkpoint-tmp-1234')
  ckpt = checkpointing.Checkpointer(str(workdir))
  assert ckpt.latest_step() == 3
  state, step = ckpt.restore(_abstract())
  assert step == 3 and int(state['step']) == 3


@pytest.mark.parametrize('damage', ['delete_item', 'truncate_files'])
def test_damaged_latest_step_falls_back_with_a_warning(three_steps, damage,
                                                       caplog):
  workdir, d = three_steps
  if damage == 'delete_item':
    shutil.rmtree(d / '3' / 'state')
  else:
    for root, _, files in os.walk(d / '3' / 'state'):
      for f in files:
        open(os.path.join(root, f), 'wb').close()
  ckpt = checkpointing.Checkpointer(str(workdir))
  assert ckpt.latest_step() == 3  # Orbax still lists it...
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore(_abstract())
  # ...but the previous complete step is restored.
  assert step == 2 and int(state['step']) == 2
  np.testing.assert_array_equal(state['w'], np.full([4], 2, np.float32))
  assert 'step 3' in caplog.text and 'falling back to step 2' in caplog.text
  # The damaged step is kept aside and no longer listed: step 3 can be
  # saved again by the resumed run.
  assert (d / ('3' + checkpointing.UNRESTORABLE_SUFFIX)).is_dir()
  assert ckpt.latest_step() == 2
  ckpt.save(3, _state(33))
  ckpt.wait()
  assert int(ckpt.restore(_abstract())[0]['step']) == 33
  ckpt.close()


def test_no_restorable_checkpoint_raises(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    ckpt.restore(_abstract())


@pytest.mark.parametrize('change', ['shape', 'extra_array'])
def test_checkpoint_of_another_config_raises_and_is_kept(three_steps, change):
  workdir, d = three_steps
  wanted = _abstract()
  if change == 'shape':
    wanted['w'] = jax.ShapeDtypeStruct([5], jnp.float32,
                                       sharding=wanted['w'].sharding)
  else:
    wanted['b'] = wanted['w']
  ckpt = checkpointing.Checkpointer(str(workdir))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='another config') as e:
    ckpt.restore(wanted)
  assert ('(4,) in the checkpoint, (5,) in this config' in str(e.value)
          if change == 'shape' else 'not in the checkpoint: b' in str(e.value))
  # Not mistaken for damage: every step is still listed and restorable.
  assert sorted(os.listdir(d)) == ['1', '2', '3']
  assert ckpt.restore(_abstract())[1] == 3


@flax.struct.dataclass
class _StateBefore:
  step: jax.Array
  params: dict


@flax.struct.dataclass
class _StateAfter:
  """`_StateBefore` with a field added later, empty when unused (as
  `TrainState.ema` without ``ema_decay``)."""
  step: jax.Array
  params: dict
  ema: dict = flax.struct.field(default_factory=dict)


def test_checkpoint_from_before_an_empty_field_existed_restores(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(7, _StateBefore(step=jnp.int32(7),
                            params={'w': jnp.arange(4, dtype=jnp.float32)}))
  ckpt.wait()
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      _StateAfter(step=jnp.int32(0), params={'w': jnp.zeros([4])}))
  state, step = ckpt.restore(target)
  assert step == 7 and isinstance(state, _StateAfter) and state.ema == {}
  np.testing.assert_array_equal(state.params['w'], np.arange(4))
  assert int(state.step) == 7
  # Nothing was set aside as unrestorable.
  assert ckpt.all_steps() == [7]
  ckpt.close()
