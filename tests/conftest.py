"""Shared fixtures: the real data in ../shared/data and data sets built from it.

JAX's persistent compilation cache is on for the whole session (and the
subprocesses tests start, through the environment): many tests compile the
same smoke-config train step or decoder, and reading it back takes seconds
where compiling takes tens of seconds. The cache lives in
``.pytest_cache/jax_compilation`` (git-ignored; its keys include the JAX
version, the computation and the backend, so a stale entry is never used).
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      str(REPO / '.pytest_cache' / 'jax_compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


@pytest.fixture(scope='session')
def shared_data() -> Path:
  if not (SHARED_DATA / 'README.md').exists():
    pytest.skip(f'real data not found at {SHARED_DATA}')
  return SHARED_DATA


@pytest.fixture(scope='session')
def dlc_dataset(shared_data, tmp_path_factory) -> Path:
  """The dlc_openfield train/test data set built by data_prep (once)."""
  from data_prep import build
  ann = shared_data / 'dlc_openfield' / 'annotations'
  out = tmp_path_factory.mktemp('data') / 'dlc_openfield'
  build.build_dataset({'train': ann / 'train.json', 'test': ann / 'test.json'},
                      shared_data / 'dlc_openfield' / 'images', out)
  return out


@pytest.fixture(scope='session')
def mp100_sample_dataset(shared_data, tmp_path_factory) -> Path:
  """The real MP-100 sample images as a data set, its one annotation file
  as both the train and the test split (once)."""
  from data_prep import build
  root = shared_data / 'mp100_sample'
  ann = root / 'annotations' / 'mp100_sample.json'
  out = tmp_path_factory.mktemp('data') / 'mp100_sample'
  build.build_dataset({'train': ann, 'test': ann}, root / 'images', out)
  return out


def smoke_config(dataset_dir, **overrides):
  """configs/smoke.py on ``dataset_dir`` with fields overridden."""
  from configs import smoke
  c = smoke.get_config()
  c.dataset_dir = str(dataset_dir)
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope='session')
def trained(dlc_dataset, tmp_path_factory):
  """(config, workdir, eval report) of the smoke config trained 2 steps on
  dlc_openfield, evaluated after step 1 (periodic) and step 2 (final) (once
  per session; tests must not modify the workdir)."""
  from kpseq_jax import train
  workdir = tmp_path_factory.mktemp('smoke_run')
  config = smoke_config(dlc_dataset, eval_every_steps=1)
  report = train.train_and_evaluate(config, str(workdir))
  return config, workdir, report


@pytest.fixture(scope='session')
def mesh_run(dlc_dataset, tmp_path_factory):
  """`sharding_worker.run_meshes` on 8 simulated CPU devices (a subprocess,
  once per session): 3 steps of its tiny config on each mesh of
  ``sharding_worker.MESHES``; mesh (4, 2) saved before step 3 and restored
  onto (8, 1) and onto 1 device to run step 3 there."""
  import sharding_worker
  args = dict(mode='meshes', dataset_dir=str(dlc_dataset), steps=3,
              meshes=sharding_worker.MESHES, save_mesh=[4, 2],
              ckpt_dir=str(tmp_path_factory.mktemp('mesh_ckpt')),
              restore_meshes=[[8, 1], [1, 1]])
  return sharding_worker.result_of(sharding_worker.launch(args, 8))
