"""Sharded training on 8 simulated CPU devices, and checkpoints across meshes.

JAX fixes its device count when it starts, so the 8-device runs happen in
one subprocess (`sharding_worker.py`, XLA_FLAGS set before JAX starts; the
`mesh_run` fixture of conftest.py) and the rest of the suite keeps 1
device.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from kpseq_jax.runtime import sharding
from sharding_worker import MESHES

# `mesh_run` (conftest.py): the 8-device subprocess, once per session.


def _specs(rules, min_elements=1):
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = {'params': {'coord_embed': f32(512, 256),
                     'decoder': {'ffn': {'kernel': f32(256, 1024)}}},
          'opt_state': ({'mu': {'coord_embed': f32(512, 256),
                                'decoder': {'ffn': {'kernel': f32(256, 1024)}}}},),
          'step': jax.ShapeDtypeStruct((), jnp.int32)}
  shardings = sharding.state_shardings(
      tree, AbstractMesh((1, 2), sharding.MESH_AXES), min_elements, rules)
  return {sharding.leaf_path(p): s.spec for p, s in
          jax.tree_util.tree_leaves_with_path(
              shardings, is_leaf=lambda x: hasattr(x, 'spec'))}


def test_sharding_rules_first_full_match_wins_and_unmatched_replicate():
  default = _specs((('.*', 'fsdp'),))
  assert default['params/coord_embed'] == P('fsdp', None)
  assert default['opt_state/0/mu/decoder/ffn/kernel'] == P(None, 'fsdp')
  assert default['step'] == P()  # Scalar: nothing divisible.
  # A '.*' pattern catches the parameter and its Adam moment.
  specs = _specs((('.*coord_embed', 'replicate'), ('.*', 'fsdp')))
  assert specs['params/coord_embed'] == specs['opt_state/0/mu/coord_embed'] == P()
  assert specs['params/decoder/ffn/kernel'] == P(None, 'fsdp')
  # Full match, not search: 'params/decoder.*' leaves the moments alone,
  # and what no rule matches is replicated.
  specs = _specs((('params/decoder.*', 'fsdp'),))
  assert specs['params/decoder/ffn/kernel'] == P(None, 'fsdp')
  assert specs['opt_state/0/mu/decoder/ffn/kernel'] == P()
  assert specs['params/coord_embed'] == P()
  # The size floor still applies under 'fsdp'.
  assert _specs((('.*', 'fsdp'),), 10**6)['params/coord_embed'] == P()


@pytest.mark.parametrize('rules, message', [
    ((('.*', 'shard'),), "strategy 'shard'"),
    ((('(', 'fsdp'),), 'bad regex'),
    ((('.*',),), 'not a \\(regex, strategy\\) pair'),
])
def test_bad_sharding_rules_name_the_rule(rules, message):
  with pytest.raises(ValueError, match=r'sharding.rules\[0\]'):
    sharding.check_rules(rules)
  with pytest.raises(ValueError, match=message):
    sharding.check_rules(rules)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((3, 3, 64, 128), 2, 1) == P(None, None, None,
                                                        'fsdp')
  assert sharding.fsdp_spec((128, 64), 2, 1) == P('fsdp', None)
  assert sharding.fsdp_spec((64, 64), 2, 1) == P(None, 'fsdp')  # Tie: later.
  assert sharding.fsdp_spec((6, 5), 4, 1) == P()  # Nothing divisible.
  assert sharding.fsdp_spec((128, 64), 2, 10**6) == P()  # Too small.
  assert sharding.fsdp_spec((128, 64), 1, 1) == P()  # No fsdp axis.
  assert sharding.fsdp_spec((), 2, 0) == P()  # Scalars (step).


def test_every_mesh_gives_the_single_device_losses(mesh_run):
  ref = np.asarray(mesh_run['losses']['1x1'])
  assert ref.shape == (3,) and np.all(np.isfinite(ref))
  for shape in MESHES[1:]:
    got = np.asarray(mesh_run['losses'][f'{shape[0]}x{shape[1]}'])
    # The first loss exactly as one device; after two Adam steps, float32
    # sums in another order drift by ~1e-5 (a sharding bug moves it ~1e-1).
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=str(shape))
  assert ref[2] < ref[0]  # The steps do train.


def test_parameters_are_sharded_only_with_an_fsdp_axis(mesh_run):
  sharded = mesh_run['fsdp_sharded']
  params = mesh_run['fsdp_sharded_params']
  assert sharded['1x1'] == 0  # One device: nothing to split.
  for key in ('4x2',):
    assert params[key] >= 25  # Every conv and dense kernel of the model.
    # Each split parameter has its two Adam moments split the same way.
    assert sharded[key] == 3 * params[key]
    assert sharded[key] < mesh_run['num_arrays']  # Small ones replicated.


def test_checkpoint_restores_onto_another_mesh_and_continues(mesh_run):
  # Saved on (4, 2) (fsdp over 2 devices) after step 2; step 3 after
  # restoring on 1 device (every split array gathered whole) gives the
  # uninterrupted step 3.
  want = mesh_run['losses']['4x2'][2]
  assert mesh_run['fsdp_sharded']['4x2'] > 0
  assert mesh_run['fsdp_sharded']['restored_1x1'] == 0
  for key in ('1x1',):
    np.testing.assert_allclose(mesh_run['restored_losses'][key], want,
                               rtol=1e-5, err_msg=key)
