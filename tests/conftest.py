"""Shared fixtures: the real data in ../shared/data and data sets built from it.

The costly session fixtures (`dlc_dataset`, `trained`, `mesh_run`, ...) run
once per test run even with several pytest-xdist workers: `once_per_run`
computes the value in the first worker that asks, under a file lock in the
run's shared temporary directory, and the others read it back (pytest-xdist's
recipe, "Making session-scoped fixtures execute only once").

JAX's persistent compilation cache is on for the whole session (and the
subprocesses tests start, through the environment): many tests compile the
same smoke-config train step or decoder, and reading it back takes seconds
where compiling takes tens of seconds. The cache lives in
``.pytest_cache/jax_compilation`` (git-ignored; its keys include the JAX
version, the computation and the backend, so a stale entry is never used).
"""

import os
from pathlib import Path
import pickle

import filelock
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      str(REPO / '.pytest_cache' / 'jax_compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# The XLA flags `python -m kpseq_jax.main` sets (before JAX starts), and
# LLVM's -O0 for XLA:CPU's generated code unless XLA_FLAGS names the level:
# the suite is compile-bound, and -O0 compiles the same HLO faster (the
# whole suite takes about a quarter less CPU time, docs/benchmark.md), and
# XLA:CPU's older loop emitters for fusions, which compile the same fusions
# in less time than its MLIR fusion emitters (docs/benchmark.md). Matmuls
# and convolutions are precompiled library kernels (YNNPACK, Eigen) either
# way; only the fused elementwise loops are compiled differently. Tests
# compare computations run with the same flags.
from kpseq_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
_TEST_XLA_FLAGS = os.environ.get('XLA_FLAGS', '')
if 'xla_backend_optimization_level' not in _TEST_XLA_FLAGS:
  _TEST_XLA_FLAGS += ' --xla_backend_optimization_level=0'
if 'xla_cpu_use_fusion_emitters' not in _TEST_XLA_FLAGS:
  _TEST_XLA_FLAGS += ' --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = xla_flags.with_defaults(_TEST_XLA_FLAGS)


# The longest files (minutes each: training subprocesses), run first so
# that `-n 2 --dist loadfile` ends with short files on both workers rather
# than one worker idle while the other runs test_resume.py (collection is
# alphabetical; the two workers were 3 minutes apart at the end).
LONG_FILES = ('test_resume.py', 'test_multiprocess.py', 'test_cape.py',
              'test_full_image_memory.py', 'test_two_stage.py',
              'test_centroid.py',
              'test_sleap_import.py', 'test_benchmark.py',
              'test_video_analysis.py', 'test_refinement.py',
              'test_sharding.py', 'test_end_to_end.py')


def pytest_collection_modifyitems(items):
  """Long files first (`LONG_FILES` order), the others as collected."""
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def once_per_run(tmp_path_factory, name: str, make):
  """``make(directory)`` once per test run, its (picklable) value for all.

  Without xdist, a plain call in a fresh temporary directory. With xdist,
  the directory and the pickled value live in the run's base temporary
  directory shared by its workers; a failed ``make`` leaves no value, so
  the next worker that asks tries again (and fails the same way).
  """
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return make(tmp_path_factory.mktemp(name))
  root = tmp_path_factory.getbasetemp().parent  # Shared by the workers.
  directory, done = root / name, root / f'{name}.pickle'
  with filelock.FileLock(str(root / f'{name}.lock')):
    if done.exists():
      return pickle.loads(done.read_bytes())
    directory.mkdir(exist_ok=True)
    value = make(directory)
    done.write_bytes(pickle.dumps(value))
    return value


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

  def make(directory):
    out = directory / 'dlc_openfield'
    build.build_dataset(
        {'train': ann / 'train.json', 'test': ann / 'test.json'},
        shared_data / 'dlc_openfield' / 'images', out,
        unlabelled_means='absent')
    return out
  return once_per_run(tmp_path_factory, 'dlc_dataset', make)


@pytest.fixture(scope='session')
def mp100_sample_dataset(shared_data, tmp_path_factory) -> Path:
  """The real MP-100 sample images as a data set, its one annotation file
  as both the train and the test split (once)."""
  from data_prep import build
  root = shared_data / 'mp100_sample'
  ann = root / 'annotations' / 'mp100_sample.json'

  def make(directory):
    out = directory / 'mp100_sample'
    build.build_dataset({'train': ann, 'test': ann}, root / 'images', out)
    return out
  return once_per_run(tmp_path_factory, 'mp100_sample_dataset', make)


# The paper's backbone setting (frozen BatchNorm, stem and layer1 frozen) on
# the smoke model. tests/test_frozen_backbone.py compiles its train step and
# tests/test_benchmark.py's f32 variant is the same computation, so the
# persistent compilation cache compiles it once per run.
FROZEN_BACKBONE = {'model.resnet.norm': 'frozen_batch',
                   'model.resnet.frozen_stages': 1}


def smoke_config(dataset_dir, model_name='supervised', **overrides):
  """configs/smoke.py (its ``model_name`` variant) on ``dataset_dir`` with
  fields overridden by dotted path: ``smoke_config(d, **{'model.aux_loss':
  True})``."""
  from configs import smoke
  c = smoke.get_config(model_name)
  c.input.dataset_dir = str(dataset_dir)
  for path, v in overrides.items():
    *groups, name = path.split('.')
    node = c
    for g in groups:
      node = node[g]
    node[name] = v
  return c


# Defaults of the test models' sub-dicts (the models' own defaults before
# the configs were grouped: Deformable DETR's sizes, batch statistics; the
# ResNet a quarter as wide, as configs/smoke.py's, to keep the suite fast).
RESNET = dict(depth=50, norm='batch', frozen_stages=-1, conv_impl='auto',
              remat=False, width=16)
TRANSFORMER = dict(num_layers=6, num_heads=8, ffn_dim=1024, dropout=0.1,
                   num_points=4)
SEQUENCE_DECODER = dict(remat=False, refine_points=False, reference_noise=0.0)


def tiny_model(model_name='supervised', resnet=None, transformer=None,
               **fields):
  """``kpseq_jax/models/<model_name>.py``'s ``Model`` with ``resnet`` and
  ``transformer`` entries over `RESNET` / `TRANSFORMER` (and, for the
  keypoint models, `SEQUENCE_DECODER`), and the other fields as given."""
  import importlib
  import flax
  module = importlib.import_module(f'kpseq_jax.models.{model_name}')
  t = dict(TRANSFORMER)
  if model_name != 'detector':
    t.update(SEQUENCE_DECODER)
  t.update(transformer or {})
  return module.Model(resnet=flax.core.freeze({**RESNET, **(resnet or {})}),
                      transformer=flax.core.freeze(t), **fields)


def rectangle_problem(rects_px, size=64):
  """Dark ``size`` x ``size`` images, one bright rectangle each, as a box
  training batch (tests/test_detector.py, tests/test_centroid.py).

  Args:
    rects_px: float [B, 4] pixels (x0, y0, x1, y1), one per image.

  Returns:
    {'images': uint8 [B, size, size, 3], 'gt_xyxy': float32 [B, 4]
    normalised, 'gt_boxes': [B, 1, 4] normalised (cx, cy, w, h),
    'labels': int32 [B, 1] zeros, 'valid': bool [B, 1] true}.
  """
  import numpy as np
  from kpseq_jax.models import box_ops
  rects_px = np.asarray(rects_px, np.float32)
  images = np.full((len(rects_px), size, size, 3), 20, np.uint8)
  for image, (x0, y0, x1, y1) in zip(images, rects_px.astype(int)):
    image[y0:y1, x0:x1] = 230
  gt_xyxy = rects_px / size
  return dict(images=images, gt_xyxy=gt_xyxy,
              gt_boxes=np.asarray(box_ops.xyxy_to_cxcywh(gt_xyxy))[:, None],
              labels=np.zeros((len(rects_px), 1), np.int32),
              valid=np.ones((len(rects_px), 1), bool))


def box_iou(a, b) -> float:
  """IoU of two (x0, y0, x1, y1) boxes in the same units."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.maximum(hi - lo, 0))
  return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])
                        - inter))


@pytest.fixture(scope='session')
def trained(dlc_dataset, tmp_path_factory):
  """(config, workdir, eval report) of the smoke config with keypoint
  presence (``<absent>``) trained 2 steps on dlc_openfield, evaluated after
  step 1 (periodic) and step 2 (final) (once per session; tests must not
  modify the workdir)."""
  from kpseq_jax import train
  from kpseq_jax.evaluation import report as report_lib

  def make(workdir):
    config = smoke_config(dlc_dataset, **{'evals.every_steps': 1},
                          **{'vocab.presence_token': True})
    reports = train.train_and_evaluate(config, str(workdir))
    return config, workdir, report_lib.EvalReport.from_dict(reports['test'])
  return once_per_run(tmp_path_factory, 'smoke_run', make)


@pytest.fixture(scope='session')
def tiny_detector(dlc_dataset, tmp_path_factory):
  """(config, workdir, box report): a tiny detector trained 2 steps on the
  real open-field frames by `train.train_and_evaluate`
  (``model_name='detector'``), evaluated after step 2 (once per run;
  tests/test_two_stage.py and tests/test_multi_animal_analysis.py; tests
  must not modify the workdir)."""
  from configs import dlc_openfield_detector
  from kpseq_jax import train
  from kpseq_jax.evaluation import box_ap

  def make(workdir):
    c = dlc_openfield_detector.get_config()
    c.input.dataset_dir = str(dlc_dataset)
    c.detector.image_size_px = (96, 128)
    c.model.feature_levels = ('c4', 'c5')
    c.model.resnet.width = 16  # configs/smoke.py's.
    c.model.d_model = 32
    c.model.transformer.update(num_heads=2, num_layers=2, ffn_dim=64)
    c.model.num_queries, c.detector.max_detections = 4, 3
    c.input.batch_size, c.optim.num_train_steps, c.log_every_steps = 4, 2, 1
    c.checkpoint_every_steps, c.evals.every_steps, c.evals.batch_size = 2, 0, 8
    reports = train.train_and_evaluate(c, str(workdir))
    return c, workdir, box_ap.BoxReport(**reports['test_boxes'])
  return once_per_run(tmp_path_factory, 'tiny_detector', make)


@pytest.fixture(scope='session')
def mesh_run(dlc_dataset, tmp_path_factory):
  """`sharding_worker.run_meshes` on 8 simulated CPU devices (a subprocess,
  once per session): 3 steps of its tiny config on each mesh of
  ``sharding_worker.MESHES``; mesh (4, 2) saved before step 3 and restored
  onto 1 device (parameters and Adam moments unsplit from fsdp 2) to run
  step 3 there."""
  import sharding_worker

  def make(directory):
    args = dict(mode='meshes', dataset_dir=str(dlc_dataset), steps=3,
                meshes=sharding_worker.MESHES, save_mesh=[4, 2],
                ckpt_dir=str(directory), restore_meshes=[[1, 1]])
    return sharding_worker.result_of(sharding_worker.launch(args, 8))
  return once_per_run(tmp_path_factory, 'mesh_run', make)
