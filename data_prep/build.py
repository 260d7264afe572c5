r"""Builds a TFDS ArrayRecord keypoint data set from COCO keypoint files, or checks them.

Build (one split per file, named by the file stem or NAME=PATH):

  python -m data_prep.build --annotations train.json --annotations test=val.json \
      --image-root DIR --out OUT [--overwrite]

Build from a single-animal DeepLabCut project folder (config.yaml + labeled-data/;
splits train/test by its TrainingFraction; see dlc_project.py):

  python -m data_prep.build --dlc_project PROJECT_DIR --out OUT \
      [--dlc_train_fraction 0.95] [--dlc_split_seed 0] [--overwrite]

Build from SLEAP files (frames decoded from the videos beside them; every
instance of a frame with its track name as identity; see sleap_import.py and
docs/multi_animal.md). A file given as SPLIT=FILE goes whole to SPLIT; the
others are cut by time with --slp_split (fractions of their frames in time
order), then every n-th frame of each split is kept:

  python -m data_prep.build --slp clip.slp --slp test=two_flies.slp \
      --slp_split train=0:0.8,val=0.8:1 --every_nth_frame 4 --out OUT

A multi-animal DeepLabCut project (an ``individuals`` column level) goes
through --dlc_project, with each individual's name as identity.

Check (annotation-level validation only; no images needed; writes nothing):

  python -m data_prep.build --check --annotations F1.json --annotations F2.json

The data set is read with `kpseq_jax.data.dataset.data_source(OUT, split)`: the
TFDS records (`tfds.builder_from_directory(OUT).as_data_source(split)`), one per
valid annotation, joined with their images, which are stored once per image in
OUT/images-<split>.array_record (`image_store`). Record features:

  image          (from the image store) encoded JPEG/PNG bytes of uint8 [H, W, 3] RGB
  bbox           float32 [4], (x, y, w, h) in pixels, inside the image
  keypoints      float32 [K, 3], (x, y, v) in pixels, v in {0, 1, 2}
  category_id    int64
  image_id       int64
  annotation_id  int64
  file_name      text, path relative to the image root; for a video frame
                 (SLEAP) '<video file name>#<frame index>'
  track          text, the instance's identity (SLEAP track, DeepLabCut
                 individual); '' when it has none (and absent from data
                 sets built before version 2.1.0)

A seeded share of the train split's frames (--val_fraction, default 0.1,
--val_seed) becomes a ``val`` split, unless a val split is given or train is
too small (`validation.carve`); checkpoints and the likelihood calibration
are chosen on it, test is only reported.

and `info.metadata` keys: validation (`validation.Carve`: what was held
out, or why nothing), categories (list of dicts sorted by id: id, name,
supercategory, num_keypoints, keypoint_names, skeleton, flip_pairs,
oks_sigmas; indices 0-based), unlabelled_means (what v = 0 means in this
data set, `UNLABELLED_MEANS`), max_num_keypoints, source_files (split -> file), split_sizes (split ->
records), episode_pools (split -> `episodes.EpisodePool.to_json()`, the instances
MP-100's CAPE episodes are drawn from) and episode_pool_errors (split -> why its
file has no pool). OUT/prep_report.json lists what was skipped and why (see
report.py).

The build runs in a temporary directory next to OUT and is moved into place at
the end, so a failed run leaves no OUT and never touches an existing one
(which is only replaced with --overwrite).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from data_prep import categories as categories_lib
from data_prep import coco
from data_prep import dlc_project
from data_prep import episodes
from data_prep import image_store
from data_prep import records
from data_prep import report as report_lib
from data_prep import sleap_import
from data_prep import tfds_builder
from data_prep import validation

AnnotationError = coco.AnnotationError

# What a keypoint with v = 0 means, a property of the data set recorded here
# (never guessed later): 'unknown' = not labelled, position unknown (COCO,
# MP-100: the default); 'absent' = not visible in the image (DeepLabCut,
# where an empty cell means the body part is out of sight). Training with
# config.vocab.presence_token learns <absent> from the second kind only.
UNLABELLED_MEANS = ('unknown', 'absent')

REPORT_FILE_NAME = 'prep_report.json'


def load_files(annotation_paths: Mapping[str, str | Path]) -> dict[str, coco.CocoKeypointFile]:
  """Parses every annotation file: split name -> file. Raises AnnotationError."""
  return {split: coco.load_annotation_file(path) for split, path in annotation_paths.items()}


def new_report(files: Mapping[str, coco.CocoKeypointFile], categories, out_dir=None) -> report_lib.BuildReport:
  """An empty report for these files, with the cross-split duplicate-id count filled in."""
  owners: dict[Any, int] = {}
  for f in files.values():
    for ann_id in {coco.annotation_ids(a)[0] for a in f.annotations} - {None}:
      owners[ann_id] = owners.get(ann_id, 0) + 1
  return report_lib.BuildReport(
      splits={s: report_lib.SplitReport(split=s, source_file=str(f.path)) for s, f in files.items()},
      categories=categories,
      out_dir=None if out_dir is None else str(out_dir),
      annotation_ids_in_several_splits=sum(n > 1 for n in owners.values()),
  )


def build_dataset(
    annotation_paths: Mapping[str, str | Path],
    image_root: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    unlabelled_means: str = 'unknown',
    oks_sigmas: Mapping[str, Any] | None = None,
    oks_sigmas_source: str = 'oks_sigmas',
    val_fraction: float = validation.DEFAULT_FRACTION,
    val_seed: int = 0,
) -> report_lib.BuildReport:
  """Builds the ArrayRecord data set at `out_dir` and writes `out_dir/prep_report.json`.

  Args:
    annotation_paths: split name -> COCO keypoint JSON file (one split each).
    image_root: directory that `file_name` entries are relative to.
    out_dir: the data set directory to create (TFDS version dir: pass it to
      `tfds.builder_from_directory`).
    overwrite: replace an existing `out_dir`.
    unlabelled_means: what v = 0 means (`UNLABELLED_MEANS`), stored in
      the metadata.
    oks_sigmas: category id or name -> K OKS sigmas
      (`categories.with_oks_sigmas`); others use evaluation's default.
    oks_sigmas_source: where ``oks_sigmas`` came from, for messages.
    val_fraction, val_seed: a ``val`` split of that share of ``train``'s
      frames (`validation.carve`; none when a ``val`` file is given or
      ``train`` is too small). The record is the metadata's ``validation``.

  Returns:
    The report (also written to out_dir/prep_report.json).

  Raises:
    FileExistsError: out_dir exists and overwrite is False.
    AnnotationError: a file is unreadable or schema-breaking, categories
      conflict across files, or a split ends up with no valid record.
    ValueError: a split name is not a valid TFDS split name,
      ``unlabelled_means`` is unknown, or ``oks_sigmas`` does not fit the
      categories (message names the category and field).
    Nothing is written to out_dir when anything raises.
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass --overwrite to replace it')
  for split in annotation_paths:
    coco.parse_split_argument(f'{split}=x')  # Validates the split name.
  if (val_fraction > 0 and validation.SOURCE_SPLIT in annotation_paths
      and validation.SPLIT not in annotation_paths):
    # Carved from the parsed files: the COCO-data path builds the splits.
    data = {s: (coco.read_json(Path(p)), p) for s, p in annotation_paths.items()}
    return build_from_coco_data(data, image_root, out_dir, overwrite, unlabelled_means,
                                oks_sigmas=oks_sigmas, oks_sigmas_source=oks_sigmas_source,
                                val_fraction=val_fraction, val_seed=val_seed)
  files = load_files(annotation_paths)
  carved = validation.carve({s: {'images': [{'id': i} for i in f.images]} for s, f in files.items()},
                            val_fraction, val_seed)[1]
  logging.info('%s', carved.message)
  pools, pool_errors = episodes.split_pools(annotation_paths)
  return build_from_files(files, image_root, out_dir, overwrite, pools, pool_errors,
                          unlabelled_means=unlabelled_means, oks_sigmas=oks_sigmas,
                          oks_sigmas_source=oks_sigmas_source,
                          extra_metadata={'validation': carved.to_json()})


def build_from_coco_data(
    coco_data: Mapping[str, tuple[dict[str, Any], str | Path]],
    image_root: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    unlabelled_means: str = 'unknown',
    extra_metadata: Mapping[str, Any] | None = None,
    source_report: Mapping[str, Any] | None = None,
    oks_sigmas: Mapping[str, Any] | None = None,
    oks_sigmas_source: str = 'oks_sigmas',
    image_loader: Callable[[], records.ImageLoader] | None = None,
    val_fraction: float = validation.DEFAULT_FRACTION,
    val_seed: int = 0,
) -> report_lib.BuildReport:
  """`build_dataset` from COCO keypoint data in memory (same checks, same records).

  The path for conversions such as `dlc_project.py`: the source becomes
  COCO dicts once and everything after that is the COCO path.

  Args:
    coco_data: split name -> (COCO dict with images/annotations/categories,
      the file it stands for, named in the report).
    image_root, out_dir, overwrite, unlabelled_means, oks_sigmas,
      oks_sigmas_source: as `build_dataset`.
    extra_metadata: more `info.metadata` keys (JSON-serialisable), e.g.
      where the data came from.
    source_report: what the conversion read and repaired, stored in
      prep_report.json under "source".
    image_loader: makes the loader of a split's images (image entry ->
      (`images.EncodedImage`, None) or (None, `validate.Problem`)); None
      reads files under ``image_root`` (`records.FileImageLoader`).
    val_fraction, val_seed: as `build_dataset` (`validation.carve`).

  Returns / Raises:
    As `build_dataset`.
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass --overwrite to replace it')
  for split in coco_data:
    coco.parse_split_argument(f'{split}=x')  # Validates the split name.
  carved_data, carved = validation.carve({s: d for s, (d, _) in coco_data.items()},
                                         val_fraction, val_seed)
  logging.info('%s', carved.message)
  if carved.status == 'carved':
    source = coco_data[validation.SOURCE_SPLIT][1]
    coco_data = {s: (d, coco_data[s][1] if s in coco_data else
                     f'{source} (held out: {carved.num_frames} frames, seed {val_seed})')
                 for s, d in carved_data.items()}
  extra_metadata = dict(extra_metadata or {}, validation=carved.to_json())
  files = {split: coco.parse_annotation_data(data, path) for split, (data, path) in coco_data.items()}
  pools, pool_errors = {}, {}
  for split, (data, path) in coco_data.items():
    try:
      pools[split] = episodes.episode_pool(data, str(path)).to_json()
    except ValueError as e:
      pool_errors[split] = str(e)
      logging.warning('split %r has no episode pool: %s', split, e)
  return build_from_files(files, image_root, out_dir, overwrite, pools, pool_errors,
                          unlabelled_means, extra_metadata, source_report, oks_sigmas,
                          oks_sigmas_source, image_loader)


def build_from_dlc_project(project_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                           train_fraction: float | None = None, seed: int = 0,
                           oks_sigmas: Mapping[str, Any] | None = None,
                           oks_sigmas_source: str = 'oks_sigmas',
                           val_fraction: float = validation.DEFAULT_FRACTION,
                           val_seed: int = 0) -> report_lib.BuildReport:
  """Imports a single-animal DeepLabCut project (`dlc_project.to_coco`) and builds it.

  Splits 'train' and 'test' by the project's TrainingFraction (or
  ``train_fraction``) and ``seed``; images are read from
  ``<project>/labeled-data``. A ``val`` split of ``val_fraction`` of the
  train frames is then held out (`validation.carve`; the test frames stay
  DeepLabCut's). In DeepLabCut an empty cell means the body part
  is not visible: the data set's ``unlabelled_means`` is 'absent'. The
  metadata also gets `dlc_project.dataset_metadata` (``source``);
  prep_report.json gets the `dlc_project.ImportReport` under ``source``.

  Raises:
    dlc_project.DlcProjectError: see `dlc_project.to_coco`.
    FileExistsError, AnnotationError: as `build_dataset`.
  """
  data, report, config = dlc_project.to_coco(project_dir, train_fraction, seed)
  for line in report.warnings():
    logging.warning('DeepLabCut import: %s', line)
  config_file = config.project_dir / 'config.yaml'
  return build_from_coco_data(
      {split: (coco_dict, f'{config_file} ({split})') for split, coco_dict in data.items()},
      config.project_dir / dlc_project.LABELED_DATA, out_dir, overwrite,
      unlabelled_means=dlc_project.UNLABELLED_MEANS,
      extra_metadata=dlc_project.dataset_metadata(config, report), source_report=report.to_json(),
      oks_sigmas=oks_sigmas, oks_sigmas_source=oks_sigmas_source, val_fraction=val_fraction,
      val_seed=val_seed)


def build_from_slp(slp_files: Sequence[tuple[str | None, str | Path]], out_dir: str | Path,
                   overwrite: bool = False, time_split: Mapping[str, tuple[float, float]] | None = None,
                   every_nth_frame: Mapping[str, int] | int = 1, user_instances_only: bool = False,
                   oks_sigmas: Mapping[str, Any] | None = None,
                   oks_sigmas_source: str = 'oks_sigmas',
                   val_fraction: float = validation.DEFAULT_FRACTION,
                   val_seed: int = 0) -> report_lib.BuildReport:
  """Imports SLEAP files (`sleap_import.to_coco`) and builds them.

  Frames are decoded from the videos beside the files while the data set is
  written; the records gain each instance's ``track``. The data set's
  ``unlabelled_means`` is 'absent' (SLEAP: a node not visible); the metadata
  gets `sleap_import.dataset_metadata` (``source``), prep_report.json the
  `sleap_import.ImportReport` under ``source``.

  Args:
    slp_files: (split, or None = cut by ``time_split``; .slp path).
    time_split, every_nth_frame, user_instances_only: see
      `sleap_import.to_coco`.
    val_fraction, val_seed: as `build_dataset`; a ``val`` split from
      ``time_split`` is kept as it is.

  Raises:
    sleap_import.SleapImportError: see `sleap_import.to_coco`.
    FileExistsError, AnnotationError: as `build_dataset`.
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass --overwrite to replace it')
  data, report, loader = sleap_import.to_coco(slp_files, time_split, every_nth_frame, user_instances_only)
  return build_from_coco_data(
      {split: (coco_dict, _slp_source(split, slp_files)) for split, coco_dict in data.items()},
      '.', out_dir, overwrite, unlabelled_means=sleap_import.UNLABELLED_MEANS,
      extra_metadata=sleap_import.dataset_metadata(report), source_report=report.to_json(),
      oks_sigmas=oks_sigmas, oks_sigmas_source=oks_sigmas_source, image_loader=lambda: loader,
      val_fraction=val_fraction, val_seed=val_seed)


def _slp_source(split: str, slp_files: Sequence[tuple[str | None, str | Path]]) -> str:
  """The files a split came from, for the report (``a.slp + b.slp (split)``)."""
  named = [str(p) for s, p in slp_files if s == split]
  return ' + '.join(named or [str(p) for s, p in slp_files if s is None]) + f' ({split})'


def build_from_files(
    files: Mapping[str, coco.CocoKeypointFile],
    image_root: str | Path,
    out_dir: Path,
    overwrite: bool,
    pools: Mapping[str, dict],
    pool_errors: Mapping[str, str],
    unlabelled_means: str = 'unknown',
    extra_metadata: Mapping[str, Any] | None = None,
    source_report: Mapping[str, Any] | None = None,
    oks_sigmas: Mapping[str, Any] | None = None,
    oks_sigmas_source: str = 'oks_sigmas',
    image_loader: Callable[[], records.ImageLoader] | None = None,
) -> report_lib.BuildReport:
  """The one builder behind `build_dataset` and `build_from_coco_data`: parsed files -> data set.

  Raises:
    As `build_dataset`.
  """
  if unlabelled_means not in UNLABELLED_MEANS:
    raise ValueError(f'unlabelled_means={unlabelled_means!r} is not one of {UNLABELLED_MEANS}.')
  categories = categories_lib.build_category_table(list(files.values()))
  if oks_sigmas:
    categories = categories_lib.with_oks_sigmas(categories, oks_sigmas, oks_sigmas_source)
  report = new_report(files, categories, out_dir)
  report.source = None if source_report is None else dict(source_report)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = out_dir.parent / f'.{out_dir.name}.incomplete-{uuid.uuid4().hex[:8]}'
  plan = tfds_builder.BuildPlan(files=dict(files), categories=categories, image_root=Path(image_root), report=report,
                                image_store_dir=tmp_dir / 'image_stores',
                                episode_pools=dict(pools), episode_pool_errors=dict(pool_errors),
                                unlabelled_means=unlabelled_means, extra_metadata=dict(extra_metadata or {}),
                                image_loader=image_loader)
  try:
    builder = tfds_builder.KeypointDatasetBuilder(plan=plan, data_dir=str(tmp_dir / 'tfds'))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    version_dir = Path(builder.data_dir)
    for split in files:
      for path in image_store.store_paths(plan.image_store_dir, split):
        shutil.move(str(path), str(version_dir / path.name))
    report.write(version_dir / REPORT_FILE_NAME)
    install_directory(version_dir, out_dir, overwrite)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  for line in report.summary_lines():
    logging.info('%s', line)
  return report


def install_directory(src: Path, dst: Path, overwrite: bool) -> None:
  """Moves a finished directory to `dst` by rename (same filesystem).

  An existing `dst` is replaced only when `overwrite`; it is restored if the
  final rename fails.

  Raises:
    FileExistsError: dst exists and overwrite is False.
  """
  if not dst.exists():
    os.rename(src, dst)
    return
  if not overwrite:
    raise FileExistsError(f'{dst} exists; pass --overwrite to replace it')
  old = dst.with_name(f'.{dst.name}.old-{uuid.uuid4().hex[:8]}')
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except OSError:
    os.rename(old, dst)
    raise
  shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """Check-mode result.

  Attributes:
    report: per-file read/valid/skipped counts (validated against declared
      image sizes; no image is opened).
    annotations_per_category: category id -> distinct annotation ids over all files.
    valid_per_category: category id -> distinct annotation ids that passed in
      at least one file.
    num_images: distinct image ids over all files.
    num_annotations: distinct annotation ids over all files.
  """

  report: report_lib.BuildReport
  annotations_per_category: dict[int, int]
  valid_per_category: dict[int, int]
  num_images: int
  num_annotations: int


def check_annotation_files(annotation_paths: Mapping[str, str | Path], unlabelled_means: str = 'unknown',
                           oks_sigmas: Mapping[str, Any] | None = None,
                           oks_sigmas_source: str = 'oks_sigmas') -> CheckResult:
  """Parses and validates annotation files without images; writes nothing.

  ``unlabelled_means`` and ``oks_sigmas`` are checked as `build_dataset`
  checks them.

  Raises:
    AnnotationError: as for `build_dataset`.
    ValueError: a bad ``unlabelled_means`` or ``oks_sigmas``.
  """
  files = load_files(annotation_paths)
  if unlabelled_means not in UNLABELLED_MEANS:
    raise ValueError(f'unlabelled_means={unlabelled_means!r} is not one of {UNLABELLED_MEANS}.')
  categories = categories_lib.build_category_table(list(files.values()))
  if oks_sigmas:
    categories = categories_lib.with_oks_sigmas(categories, oks_sigmas, oks_sigmas_source)
  report = new_report(files, categories)
  all_ids: dict[int, set] = {cid: set() for cid in categories}
  valid_ids: dict[int, set] = {cid: set() for cid in categories}
  image_ids: set = set()
  for split, f in files.items():
    image_ids.update(f.images)
    for ann in f.annotations:
      ann_id, _, cid = coco.annotation_ids(ann)
      if cid in all_ids:
        all_ids[cid].add(ann_id)
    for instance, _, _ in records.iter_valid_instances(f, categories, report.splits[split], records.declared_image):
      report.splits[split].written += 1
      valid_ids[instance.category_id].add(instance.annotation_id)
  return CheckResult(
      report=report,
      annotations_per_category={c: len(v) for c, v in all_ids.items()},
      valid_per_category={c: len(v) for c, v in valid_ids.items()},
      num_images=len(image_ids),
      num_annotations=len(set().union(*all_ids.values())),
  )


def format_check(result: CheckResult) -> str:
  """The check-mode table: one line per category, then per-file lines and totals."""
  lines = [f'{"id":>4}  {"name":<24} {"supercategory":<16} {"K":>4} {"flip":>4} {"instances":>9} {"valid":>6}']
  for c in result.report.categories.values():
    k = f'{c.num_keypoints}{"*" if c.num_keypoints_source != categories_lib.K_FROM_NAMES else ""}'
    lines.append(f'{c.id:>4}  {c.name:<24} {c.supercategory:<16} {k:>4} {len(c.flip_pairs):>4} '
                 f'{result.annotations_per_category[c.id]:>9} {result.valid_per_category[c.id]:>6}')
  lines.append('(K* = no keypoint names; K is the most common keypoint count of its annotations)')
  lines.extend(result.report.summary_lines())
  skipped_reasons: dict[str, int] = {}
  for s in result.report.splits.values():
    for reason, n in s.skipped_by_reason.items():
      skipped_reasons[reason] = skipped_reasons.get(reason, 0) + n
  lines.append(
      f'TOTAL: {len(result.report.splits)} files, {len(result.report.categories)} categories, '
      f'{result.num_images} distinct images, {result.num_annotations} distinct annotations; '
      f'over files: read {sum(s.read for s in result.report.splits.values())}, '
      f'valid {result.report.num_written}, skipped {result.report.num_skipped} {dict(sorted(skipped_reasons.items()))}')
  return '\n'.join(lines)


_ANNOTATIONS = flags.DEFINE_multi_string(
    'annotations', [], 'COCO keypoint JSON file, one split each: PATH (split = file stem) or NAME=PATH. Repeat.')
_IMAGE_ROOT = flags.DEFINE_string('image-root', None, 'Directory the images\' file_name entries are relative to.')
flags.DEFINE_alias('image_root', 'image-root')
_OUT = flags.DEFINE_string('out', None, 'Output data set directory (read with tfds.builder_from_directory).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')
_UNLABELLED_MEANS = flags.DEFINE_enum(
    'unlabelled_means', 'unknown', UNLABELLED_MEANS,
    'What a keypoint with v = 0 means in these files: unknown = not labelled (COCO, MP-100); absent = not '
    'visible (DeepLabCut: an empty cell). Stored in the data set; presence training needs "absent".')
_OKS_SIGMAS = flags.DEFINE_string(
    'oks_sigmas', None, 'JSON file {category id or name: [K sigmas]} for OKS AP; categories not in it use '
    'COCO\'s 17 sigmas (COCO person layout) or '
    '--config.evals.oks_default_sigma at evaluation.')
_CHECK = flags.DEFINE_bool('check', False, 'Only parse and validate the annotation files; print the category table.')
_DLC_PROJECT = flags.DEFINE_string(
    'dlc_project', None, 'A DeepLabCut project folder (config.yaml, labeled-data/*/'
    'CollectedData_<scorer>.h5 or .csv), single- or multi-animal, to build from instead of --annotations; '
    'splits train/test by its TrainingFraction. Missing labels become unlabelled keypoints with '
    '--unlabelled_means=absent (in DeepLabCut an empty cell means not visible); a multi-animal project '
    'gives one record per labelled individual, its name as the record\'s track.')
_SLP = flags.DEFINE_multi_string(
    'slp', [], 'A SLEAP labels file (.slp; its video is found beside it) to build from instead of '
    '--annotations: FILE (cut into splits by --slp_split) or SPLIT=FILE (the whole file, e.g. '
    'test=two_flies.slp). Repeat for several files; they must share the first file\'s skeleton.')
_SLP_SPLIT = flags.DEFINE_string(
    'slp_split', 'train=0:1', 'With --slp: how the files given without SPLIT= are cut by time, '
    'NAME=START:END,... in fractions of each file\'s labelled frames in time order (frame i of n goes to '
    'NAME when START <= i/n < END), e.g. train=0:0.8,val=0.8:1. Ranges may leave gaps, not overlap.')
_EVERY_NTH_FRAME = flags.DEFINE_string(
    'every_nth_frame', '1', 'With --slp: keep every n-th frame of each split in time order (from its '
    'first): N for all splits, or SPLIT=N,... (others 1), e.g. train=4,val=4,test=1.')
_SLP_USER_ONLY = flags.DEFINE_bool(
    'slp_user_instances_only', False, 'With --slp: import user instances only. By default a frame\'s '
    'predictions that no user instance replaced (SLEAP\'s unused_predictions) are imported too.')
_DLC_TRAIN_FRACTION = flags.DEFINE_float(
    'dlc_train_fraction', None, 'With --dlc_project: fraction of labelled frames for train '
    '(default: config.yaml TrainingFraction[0]); the rest is the test split.')
_VAL_FRACTION = flags.DEFINE_float(
    'val_fraction', validation.DEFAULT_FRACTION, 'Share of the train split\'s frames held out as a val '
    'split (at least 5 frames; none when train has fewer than 20 frames or a val split is given, e.g. by '
    '--slp_split or --annotations val=FILE). Checkpoints and the likelihood calibration are chosen on it; '
    'test is only reported. 0 = no val split.')
_VAL_SEED = flags.DEFINE_integer('val_seed', 0, 'Seed of the val split\'s frames (data_prep/validation.py).')
_DLC_SPLIT_SEED = flags.DEFINE_integer(
    'dlc_split_seed', 0, 'With --dlc_project: seed of the train/test shuffle (DeepLabCut\'s SplitTrials rule).')


def _read_sigma_file(path: str) -> dict[str, Any]:
  """The {category: [sigmas]} object of an --oks_sigmas file; ValueError names the file."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'--oks_sigmas {path}: cannot read it as JSON: {e}') from e
  if not isinstance(data, dict):
    raise ValueError(f'--oks_sigmas {path}: expected an object {{category id or name: [sigmas]}}, '
                     f'got {type(data).__name__}.')
  return data


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _DLC_PROJECT.value:
    _main_dlc_project()
    return
  if _SLP.value:
    _main_slp()
    return
  if not _ANNOTATIONS.value:
    raise app.UsageError('give at least one --annotations file')
  try:
    paths = coco.parse_split_arguments(_ANNOTATIONS.value)
    if _CHECK.value:
      print(format_check(check_annotation_files(paths)))
      return
    if not _IMAGE_ROOT.value or not _OUT.value:
      raise app.UsageError('build mode needs --image-root and --out (or pass --check)')
    sigmas = None
    if _OKS_SIGMAS.value:
      sigmas = _read_sigma_file(_OKS_SIGMAS.value)
    report = build_dataset(paths, _IMAGE_ROOT.value, _OUT.value, overwrite=_OVERWRITE.value,
                           unlabelled_means=_UNLABELLED_MEANS.value, oks_sigmas=sigmas,
                           oks_sigmas_source=_OKS_SIGMAS.value or 'oks_sigmas',
                           val_fraction=_VAL_FRACTION.value, val_seed=_VAL_SEED.value)
  except (ValueError, FileExistsError) as e:  # AnnotationError is a ValueError.
    sys.exit(f'data_prep.build: error: {e}')
  print(f'wrote {report.num_written} records ({report.num_skipped} skipped) to {report.out_dir}; '
        f'report: {Path(report.out_dir) / REPORT_FILE_NAME}')


def _main_dlc_project() -> None:
  if _ANNOTATIONS.value or _CHECK.value or _IMAGE_ROOT.value or _SLP.value:
    raise app.UsageError('--dlc_project replaces --annotations, --image-root and --check (and is not '
                         'combined with --slp)')
  if _UNLABELLED_MEANS.present:
    raise app.UsageError('--dlc_project sets --unlabelled_means=absent (DeepLabCut\'s empty cell = not visible)')
  if not _OUT.value:
    raise app.UsageError('--dlc_project needs --out')
  try:
    sigmas = _read_sigma_file(_OKS_SIGMAS.value) if _OKS_SIGMAS.value else None
    report = build_from_dlc_project(_DLC_PROJECT.value, _OUT.value, _OVERWRITE.value,
                                    _DLC_TRAIN_FRACTION.value, _DLC_SPLIT_SEED.value, sigmas,
                                    _OKS_SIGMAS.value or 'oks_sigmas', _VAL_FRACTION.value, _VAL_SEED.value)
  except (ValueError, FileExistsError) as e:  # DlcProjectError is a ValueError.
    sys.exit(f'data_prep.build: error: {e}')
  source = report.source or {}
  print(f'wrote {report.num_written} records ({report.num_skipped} skipped) from '
        f'{len(source.get("labels_files", []))} DeepLabCut labels file(s) to {report.out_dir}; '
        f'report: {Path(report.out_dir) / REPORT_FILE_NAME}')


def _main_slp() -> None:
  if _ANNOTATIONS.value or _CHECK.value or _IMAGE_ROOT.value:
    raise app.UsageError('--slp replaces --annotations, --image-root and --check')
  if _UNLABELLED_MEANS.present:
    raise app.UsageError('--slp sets --unlabelled_means=absent (a SLEAP node not visible)')
  if not _OUT.value:
    raise app.UsageError('--slp needs --out')
  try:
    files = [sleap_import.parse_slp_argument(a) for a in _SLP.value]
    sigmas = _read_sigma_file(_OKS_SIGMAS.value) if _OKS_SIGMAS.value else None
    report = build_from_slp(files, _OUT.value, _OVERWRITE.value, sleap_import.parse_time_split(_SLP_SPLIT.value),
                            sleap_import.parse_every_nth(_EVERY_NTH_FRAME.value), _SLP_USER_ONLY.value, sigmas,
                            _OKS_SIGMAS.value or 'oks_sigmas', _VAL_FRACTION.value, _VAL_SEED.value)
  except (ValueError, FileExistsError) as e:  # SleapImportError is a ValueError.
    sys.exit(f'data_prep.build: error: {e}')
  source = report.source or {}
  print(f'wrote {report.num_written} records on {sum(s.images_written for s in report.splits.values())} frames '
        f'({report.num_skipped} skipped while writing, {len(source.get("skipped", []))} skipped on import '
        f'{source.get("skipped_by_reason", {})}) to {report.out_dir}; splits '
        f'{ {k: v.written for k, v in report.splits.items()} }; report: {Path(report.out_dir) / REPORT_FILE_NAME}')


if __name__ == '__main__':
  app.run(main)
