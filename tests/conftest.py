"""Shared fixtures: the real data in ../shared/data and data sets built from it."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


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
