r"""A DeepLabCut project (single- or multi-animal) -> the same data set as from COCO files.

  python -m data_prep.build --dlc_project PROJECT_DIR --out OUT \
      [--dlc_train_fraction F] [--dlc_split_seed 0] [--overwrite]

Reads the project as DeepLabCut itself does (deeplabcut/utils/
auxiliaryfunctions.py and generate_training_dataset/
trainingsetmanipulation.py), with pandas, and turns it into one COCO
keypoint dict per split; `build.build_from_coco_data` then validates and
writes it exactly as it does COCO files (there is one builder).

* ``config.yaml``: ``bodyparts`` (the keypoints, in order), ``skeleton``
  (pairs of body-part names), ``scorer``, ``Task``, ``TrainingFraction``
  (the first entry is used, as DeepLabCut's default ``trainingsetindex=0``),
  ``multianimalproject`` and, when it is true, ``multianimalbodyparts``
  (the keypoints instead of ``bodyparts``), ``individuals`` and
  ``uniquebodyparts``.
* ``labeled-data/<video>/CollectedData_<scorer>.h5`` (the table
  DeepLabCut writes with ``DataFrame.to_hdf(key='df_with_missing')``), or
  the ``.csv`` beside it when there is no ``.h5``. Columns: MultiIndex
  ``scorer / bodyparts / coords`` (x, y); rows: the frame's path,
  ``labeled-data/<video>/<img>.png``, as one string (DeepLabCut < 2.2,
  either slash) or a 3-level row MultiIndex (2.2 and later). An empty cell
  (NaN) means the body part was not labelled in that frame.

Multi-animal projects (``multianimalproject: true``; DeepLabCut 2.2+):
the keypoints are ``multianimalbodyparts``, the labels tables have an
``individuals`` column level (``scorer / individuals / bodyparts /
coords``) and each individual of ``individuals`` labelled in a frame
becomes one instance, its name the record's ``track`` (the identity), all
of a frame's instances on its one stored image (`multi_animal.to_coco`,
the conversion the SLEAP import uses). An individual with no label in a
frame is not in it (counted, not an error). ``uniquebodyparts`` (the
``single`` individual's points, e.g. a landmark of the arena) belong to no
animal: left out and named in the report. An ``individuals`` level in a
project whose config is not multi-animal is refused.

Conversion (one category, id 1, named after ``Task``):

* keypoints (x, y, 2) where labelled, (0, 0, 0) where the cell is empty.
  In DeepLabCut a missing label means the body part is not visible in that
  frame (DeepLabCut's own training drops those joints); the data set's
  metadata says so: ``unlabelled_means: 'absent'`` (`build.UNLABELLED_MEANS`,
  which presence training learns ``<absent>`` from);
* the box: DeepLabCut has none. The extent of the labelled points, padded
  on each side by 25% of its width (height) + 16 px, clipped to the image:
  the rule of the shared ``dlc_openfield``/``dlc_reaching`` COCO files
  (``tests/test_dlc_project.py`` checks it against them);
* train/test split by DeepLabCut's ``SplitTrials``: the frames of all
  labels files (in folder order, then table order) permuted by
  ``numpy.random.RandomState(seed).permutation``, the first
  ``int(n * round(TrainingFraction, 2))`` train, the rest test (both
  sorted). The permutation differs from DeepLabCut's own shuffle files,
  which come from its global random state.

Problems that cost no good label are repaired and counted in
``prep_report.json`` under ``source`` (`ImportReport`): a body part of the
config missing from a labels file (unlabelled there), a body part in a
file but not in the config (ignored), frames with no label at all (kept
out by the builder's ``no_labelled_keypoints`` check and listed), frames
whose image is missing or unreadable, repeated frames, video folders with
no labels file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
import yaml

from data_prep import multi_animal

# Box rule of the shared dlc_openfield / dlc_reaching COCO files (pad each
# side by a fraction of the labelled extent plus some pixels), shared with
# the SLEAP import: `multi_animal.labelled_box`.
BOX_PAD_FRACTION = multi_animal.BOX_PAD_FRACTION
BOX_PAD_PX = multi_animal.BOX_PAD_PX
CATEGORY_ID = multi_animal.CATEGORY_ID
labelled_box = multi_animal.labelled_box
LABELED_DATA = 'labeled-data'
# `build.UNLABELLED_MEANS` of an imported project: an empty cell means the
# body part is not visible in the frame.
UNLABELLED_MEANS = 'absent'


class DlcProjectError(ValueError):
  """A DeepLabCut project that cannot be imported; the message says why."""


@dataclasses.dataclass(frozen=True)
class DlcConfig:
  """What the import uses of a project's ``config.yaml``.

  Attributes:
    project_dir: the project folder.
    task: ``Task``.
    scorer: ``scorer`` (names the labels files).
    bodyparts: the K keypoint names, in order.
    skeleton: limbs as 0-based keypoint index pairs.
    training_fraction: ``TrainingFraction[0]``, in (0, 1].
    pcutoff: ``pcutoff`` (DeepLabCut's likelihood threshold for plots).
    skeleton_dropped: config skeleton entries that are not a pair of known
      body parts (left out of ``skeleton``).
    individuals: a multi-animal project's ``individuals`` (() = single
      animal); ``bodyparts`` are then its ``multianimalbodyparts``.
    unique_bodyparts: a multi-animal project's ``uniquebodyparts`` (not
      imported).
  """

  project_dir: Path
  task: str
  scorer: str
  bodyparts: tuple[str, ...]
  skeleton: tuple[tuple[int, int], ...]
  training_fraction: float
  pcutoff: float = 0.6
  skeleton_dropped: tuple[tuple[str, ...], ...] = ()
  individuals: tuple[str, ...] = ()
  unique_bodyparts: tuple[str, ...] = ()


@dataclasses.dataclass
class ImportReport:
  """What the import read and repaired (``prep_report.json`` "source").

  Attributes:
    project_dir: the project.
    labels_files: the tables read, in order.
    frames: rows read over all tables.
    train_frames / test_frames: frames per split.
    train_fraction / split_seed: the split's parameters.
    missing_labels: empty (x, y) cells of the config's body parts, which
      became unlabelled keypoints.
    frames_without_labels: frames (relative to labeled-data) with no label
      at all; the builder skips them as ``no_labelled_keypoints``.
    bodyparts_missing_from_file: labels file -> config body parts it has no
      column for (unlabelled in all its frames).
    bodyparts_not_in_config: labels file -> body parts it has that the
      config does not list (ignored).
    frames_without_image: frame -> why its image could not be read (not
      imported).
    duplicate_frames: rows repeating an earlier frame (first kept).
    folders_without_labels: labeled-data folders with no
      ``CollectedData_<scorer>`` table.
    skeleton_limbs_dropped: config skeleton pairs naming an unknown body part.
    individuals: a multi-animal project's individuals ([] = single animal).
    instances: instances imported (multi-animal: labelled individuals).
    individuals_not_labelled: (frame, individual) pairs with no label (the
      individual is not in that frame; multi-animal only).
    unique_bodyparts_ignored: ``uniquebodyparts`` left out.
  """

  project_dir: str
  train_fraction: float
  split_seed: int
  labels_files: list[str] = dataclasses.field(default_factory=list)
  frames: int = 0
  train_frames: int = 0
  test_frames: int = 0
  missing_labels: int = 0
  frames_without_labels: list[str] = dataclasses.field(default_factory=list)
  bodyparts_missing_from_file: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  bodyparts_not_in_config: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  frames_without_image: dict[str, str] = dataclasses.field(default_factory=dict)
  duplicate_frames: list[str] = dataclasses.field(default_factory=list)
  folders_without_labels: list[str] = dataclasses.field(default_factory=list)
  skeleton_limbs_dropped: list[list[str]] = dataclasses.field(default_factory=list)
  individuals: list[str] = dataclasses.field(default_factory=list)
  instances: int = 0
  individuals_not_labelled: int = 0
  unique_bodyparts_ignored: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return dict(format='deeplabcut', **dataclasses.asdict(self))

  def warnings(self) -> list[str]:
    """One line per kind of problem found (empty when there is none)."""
    out = []
    for f, names in self.bodyparts_missing_from_file.items():
      out.append(f'{f}: no column for body part(s) {names} of config.yaml; '
                 'unlabelled in all its frames')
    for f, names in self.bodyparts_not_in_config.items():
      out.append(f'{f}: body part(s) {names} are not in config.yaml; ignored')
    if self.frames_without_labels:
      out.append(f'{len(self.frames_without_labels)} frame(s) have no label at all (skipped), e.g. '
                 f'{self.frames_without_labels[:3]}')
    for frame, why in self.frames_without_image.items():
      out.append(f'{frame}: image not imported ({why})')
    if self.duplicate_frames:
      out.append(f'{len(self.duplicate_frames)} frame(s) listed twice (first kept): {self.duplicate_frames[:3]}')
    if self.folders_without_labels:
      out.append(f'labeled-data folder(s) without a labels table: {self.folders_without_labels}')
    if self.skeleton_limbs_dropped:
      out.append(f'skeleton limb(s) naming unknown body parts dropped: {self.skeleton_limbs_dropped}')
    if self.unique_bodyparts_ignored:
      out.append(f'uniquebodyparts {self.unique_bodyparts_ignored} belong to no individual; not imported')
    return out


def read_config(project_dir: str | Path) -> DlcConfig:
  """Reads ``config.yaml`` (DeepLabCut's keys, see the module docstring).

  Raises:
    DlcProjectError: no config.yaml, no body parts (a multi-animal
      project: no ``multianimalbodyparts`` or ``individuals``), or a
      TrainingFraction outside (0, 1].
  """
  project_dir = Path(project_dir)
  path = project_dir / 'config.yaml'
  if not path.is_file():
    raise DlcProjectError(f'{project_dir}: no config.yaml; is this a DeepLabCut project folder?')
  try:
    cfg = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
  except yaml.YAMLError as e:
    raise DlcProjectError(f'{path}: not valid YAML: {e}') from e
  multi = bool(cfg.get('multianimalproject'))
  key = 'multianimalbodyparts' if multi else 'bodyparts'
  bodyparts = _names(cfg, key, path)
  individuals = tuple(_names(cfg, 'individuals', path)) if multi else ()
  fractions = cfg.get('TrainingFraction') or [0.95]
  fraction = float(fractions[0] if isinstance(fractions, list) else fractions)
  if not 0 < fraction <= 1:
    raise DlcProjectError(f'{path}: TrainingFraction {fraction} is not in (0, 1]')
  index = {b: i for i, b in enumerate(bodyparts)}
  skeleton, dropped = [], []
  for limb in cfg.get('skeleton') or []:
    if isinstance(limb, list) and len(limb) == 2 and all(b in index for b in limb):
      skeleton.append((index[limb[0]], index[limb[1]]))
    else:
      dropped.append(tuple(map(str, limb if isinstance(limb, list) else [limb])))
  return DlcConfig(project_dir=project_dir, task=str(cfg.get('Task') or project_dir.name),
                   scorer=str(cfg.get('scorer')), bodyparts=tuple(bodyparts), skeleton=tuple(skeleton),
                   training_fraction=fraction, pcutoff=float(cfg.get('pcutoff', 0.6)),
                   skeleton_dropped=tuple(dropped), individuals=individuals,
                   unique_bodyparts=tuple(map(str, (cfg.get('uniquebodyparts') or []) if multi else [])))


def _names(cfg: dict[str, Any], key: str, path: Path) -> list[str]:
  """``cfg[key]`` as a non-empty list of distinct names.

  Raises:
    DlcProjectError: otherwise (the message names the file and key).
  """
  names = cfg.get(key)
  if not (isinstance(names, list) and names and all(isinstance(b, str) for b in names)):
    raise DlcProjectError(f'{path}: {key} must be a non-empty list of names, got {names!r}')
  if len(set(names)) != len(names):
    raise DlcProjectError(f'{path}: {key} lists a name twice: {names}')
  return names


def read_labels(path: str | Path, multi_animal_project: bool = False) -> pd.DataFrame:
  """Reads one ``CollectedData_<scorer>`` table (.h5 or .csv) with pandas.

  Returns:
    The table: columns MultiIndex (scorer, bodyparts, coords), or (scorer,
    individuals, bodyparts, coords) in a multi-animal project; one row per
    frame, index as stored (string path or a row MultiIndex).

  Raises:
    DlcProjectError: unreadable; an ``individuals`` column level in a
      single-animal project or none in a multi-animal one; without the
      ``bodyparts``/``coords`` column levels.
  """
  path = Path(path)
  try:
    if path.suffix == '.h5':
      df = pd.read_hdf(path)
    else:
      # The first column holds the level names (scorer, [individuals,]
      # bodyparts, coords); the header has as many rows.
      names = pd.read_csv(path, header=None, nrows=5, usecols=[0])[0].tolist()
      levels = names.index('coords') + 1 if 'coords' in names else 3
      df = pd.read_csv(path, header=list(range(levels)))
      n_index = next(i for i, c in enumerate(df.columns) if c[-1] in ('x', 'y', 'likelihood'))
      df = df.set_index(list(df.columns[:n_index]))
      df.index.names = [None] * n_index
      df.columns = df.columns.set_names(names[:levels])
  except (OSError, ValueError, KeyError, StopIteration, ImportError) as e:
    raise DlcProjectError(f'{path}: cannot read the labels table: {e!r}') from e
  if not isinstance(df.columns, pd.MultiIndex):
    raise DlcProjectError(f'{path}: columns are not DeepLabCut\'s scorer/bodyparts/coords MultiIndex')
  names = list(df.columns.names)
  if ('individuals' in names) != multi_animal_project:
    raise DlcProjectError(
        f'{path}: has an "individuals" column level (a multi-animal table) but config.yaml has no '
        '"multianimalproject: true"' if 'individuals' in names else
        f'{path}: config.yaml says multianimalproject but the table has no "individuals" column level '
        f'(levels {names})')
  if len(names) == 3 and names[1:] != ['bodyparts', 'coords']:
    df.columns = df.columns.set_names(['scorer', 'bodyparts', 'coords'])
  if 'bodyparts' not in df.columns.names or 'coords' not in df.columns.names:
    raise DlcProjectError(f'{path}: column levels {names} lack "bodyparts" and "coords"')
  if df.columns.get_level_values('scorer').nunique() > 1:
    raise DlcProjectError(f'{path}: more than one scorer in one table')
  return df


def frame_name(index_entry: Any) -> str:
  """A row's frame relative to ``labeled-data``: ``'<video>/<img>.png'``.

  ``index_entry`` is ``'labeled-data/m4s1/img0000.png'`` (either slash) or
  ``('labeled-data', 'm4s1', 'img0000.png')``.
  """
  parts = ([str(p) for p in index_entry] if isinstance(index_entry, tuple)
           else str(index_entry).replace('\\', '/').split('/'))
  parts = [p for p in parts if p]
  if LABELED_DATA in parts:
    parts = parts[parts.index(LABELED_DATA) + 1:]
  return '/'.join(parts[-2:])


def split_frames(num_frames: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
  """DeepLabCut's ``SplitTrials``: (sorted train indices, sorted test indices).

  Raises:
    DlcProjectError: a split would be empty.
  """
  train_size = int(num_frames * round(train_fraction, 2))
  order = np.random.RandomState(seed).permutation(num_frames)
  train, test = sorted(order[:train_size].tolist()), sorted(order[train_size:].tolist())
  if not train or not test:
    raise DlcProjectError(
        f'TrainingFraction {train_fraction} of {num_frames} labelled frames leaves '
        f'{len(train)} train and {len(test)} test frames; both must be non-empty '
        '(pass e.g. --dlc_train_fraction 0.9).')
  return train, test


def labels_files(config: DlcConfig, report: ImportReport) -> list[Path]:
  """Each labeled-data folder's ``CollectedData_<scorer>.h5`` (else .csv).

  Raises:
    DlcProjectError: no labeled-data folder or no labels table at all.
  """
  root = config.project_dir / LABELED_DATA
  if not root.is_dir():
    raise DlcProjectError(f'{config.project_dir}: no {LABELED_DATA}/ folder')
  out = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    stem = folder / f'CollectedData_{config.scorer}'
    found = [p for p in (stem.with_suffix('.h5'), stem.with_suffix('.csv')) if p.is_file()]
    if found:
      out.append(found[0])
    else:
      report.folders_without_labels.append(folder.name)
  if not out:
    others = sorted(p.name for p in root.glob('*/CollectedData_*'))
    raise DlcProjectError(
        f'{root}: no CollectedData_{config.scorer}.h5 or .csv in any video folder'
        + (f' (found {others[:4]}: is config.yaml\'s scorer right?)' if others else ''))
  return out


def project_keypoints(config: DlcConfig, report: ImportReport) -> tuple[list[str], np.ndarray]:
  """Every labelled frame of the project and its keypoints.

  Returns:
    (frame names relative to labeled-data, float64 [N, I, K, 2] pixels with
    NaN where not labelled; I = the project's individuals, 1 for a
    single-animal project), frames in folder order then table order;
    repeated frames dropped.
  """
  frames, coords, seen = [], [], set()
  individuals = config.individuals or (None,)
  for path in labels_files(config, report):
    rel = path.relative_to(config.project_dir).as_posix()
    report.labels_files.append(rel)
    df = read_labels(path, bool(config.individuals))
    present = list(dict.fromkeys(df.columns.get_level_values('bodyparts')))
    missing = [b for b in config.bodyparts if b not in present]
    extra = [b for b in present if b not in config.bodyparts]
    if missing:
      report.bodyparts_missing_from_file[rel] = missing
    if extra:
      report.bodyparts_not_in_config[rel] = extra
    table = np.full([len(df), len(individuals), len(config.bodyparts), 2], np.nan)
    for i, ind in enumerate(individuals):
      for k, b in enumerate(config.bodyparts):
        for c, coord in enumerate('xy'):
          key = (b, coord) if ind is None else (ind, b, coord)
          col = [col for col in df.columns if col[-len(key):] == key]
          if col:
            table[:, i, k, c] = pd.to_numeric(df[col[0]], errors='coerce').to_numpy(np.float64)
    report.frames += len(df)
    for entry, xy in zip(df.index, table):
      name = frame_name(entry)
      if name in seen:
        report.duplicate_frames.append(name)
        continue
      seen.add(name)
      frames.append(name)
      coords.append(xy)
      present_k = [config.bodyparts.index(b) for b in config.bodyparts if b in present]
      report.missing_labels += int(np.sum(~np.isfinite(xy[:, present_k]).all(axis=-1)))
  return frames, np.asarray(coords, np.float64).reshape([-1, len(individuals), len(config.bodyparts), 2])


def to_coco(project_dir: str | Path, train_fraction: float | None = None, seed: int = 0
            ) -> tuple[dict[str, dict[str, Any]], ImportReport, DlcConfig]:
  """Converts a project into one COCO keypoint dict per split.

  Args:
    project_dir: the DeepLabCut project folder.
    train_fraction: overrides config.yaml's ``TrainingFraction[0]``.
    seed: the split's seed.

  Returns:
    ({'train': coco, 'test': coco}, the import report, the config). Image
    ``file_name`` is relative to ``<project>/labeled-data``; image and
    annotation ids are 1.. in frame order over the whole project (the
    same in both splits' numbering); in a multi-animal project (see
    `multi_animal_coco`) 1.. over train then test, each annotation with
    its ``track``.

  Raises:
    DlcProjectError: see `read_config`, `read_labels`, `labels_files`,
      `split_frames`.
  """
  config = read_config(project_dir)
  fraction = config.training_fraction if train_fraction is None else float(train_fraction)
  report = ImportReport(project_dir=str(config.project_dir), train_fraction=fraction, split_seed=seed)
  report.skeleton_limbs_dropped = [list(limb) for limb in config.skeleton_dropped]
  frames, coords = project_keypoints(config, report)
  if config.individuals:
    return multi_animal_coco(config, report, frames, coords, fraction, seed), report, config
  coords = coords[:, 0]
  category = dict(id=CATEGORY_ID, name=config.task, supercategory='animal',
                  keypoints=list(config.bodyparts),
                  skeleton=[[i + 1, j + 1] for i, j in config.skeleton])  # COCO: 1-based.
  images, annotations = [], []
  root = config.project_dir / LABELED_DATA
  for i, (name, xy) in enumerate(zip(frames, coords)):
    try:
      with Image.open(root / name) as im:
        width, height = im.size
    except (OSError, ValueError) as e:
      report.frames_without_image[name] = f'{type(e).__name__}: {e}'
      continue
    labelled = np.all(np.isfinite(xy), axis=1)
    if not labelled.any():
      report.frames_without_labels.append(name)
    kps = np.zeros([len(xy), 3])
    kps[labelled, :2], kps[labelled, 2] = xy[labelled], 2
    box = labelled_box(xy, width, height)
    images.append(dict(id=i + 1, file_name=name, width=width, height=height))
    annotations.append(dict(id=i + 1, image_id=i + 1, category_id=CATEGORY_ID,
                            keypoints=kps.ravel().tolist(), num_keypoints=int(labelled.sum()),
                            bbox=box, area=box[2] * box[3], iscrowd=0))
  train, test = split_frames(len(images), fraction, seed)
  out = {}
  for split, idx in (('train', train), ('test', test)):
    out[split] = dict(images=[images[i] for i in idx], annotations=[annotations[i] for i in idx],
                      categories=[category])
  report.train_frames, report.test_frames = len(train), len(test)
  return out, report, config


def _image_size(config: DlcConfig, name: str, report: ImportReport) -> tuple[int, int] | None:
  """(width, height) of a labelled frame's image, or None (recorded in
  ``report.frames_without_image``) when it cannot be read."""
  try:
    with Image.open(config.project_dir / LABELED_DATA / name) as im:
      return im.size
  except (OSError, ValueError) as e:
    report.frames_without_image[name] = f'{type(e).__name__}: {e}'
    return None


def multi_animal_coco(config: DlcConfig, report: ImportReport, frames: list[str], coords: np.ndarray,
                      fraction: float, seed: int) -> dict[str, dict[str, Any]]:
  """A multi-animal project's frames -> {'train', 'test'} COCO dicts.

  Args:
    frames: N frame names (relative to labeled-data).
    coords: float64 [N, I, K, 2] pixels (NaN = not labelled), I =
      ``config.individuals``.

  Each individual with a label in a frame is one instance (its name the
  ``track``); frames with none are listed in ``frames_without_labels`` and
  left out before the split (DeepLabCut's ``SplitTrials`` over the rest).
  """
  kept = []
  for name, xy in zip(frames, coords):
    size = _image_size(config, name, report)
    if size is None:
      continue
    animals = []
    for individual, points in zip(config.individuals, xy):
      if np.all(np.isfinite(points), axis=1).any():
        animals.append(multi_animal.AnimalInstance(xy=points, track=individual))
      else:
        report.individuals_not_labelled += 1
    if not animals:
      report.frames_without_labels.append(name)
      continue
    kept.append(multi_animal.Frame(name, size[0], size[1], tuple(animals), source=name))
  report.instances = sum(len(f.instances) for f in kept)
  report.individuals = list(config.individuals)
  report.unique_bodyparts_ignored = list(config.unique_bodyparts)
  train, test = split_frames(len(kept), fraction, seed)
  report.train_frames, report.test_frames = len(train), len(test)
  category = multi_animal.category(config.task, config.bodyparts, config.skeleton)
  out = {'train': multi_animal.to_coco([kept[i] for i in train], category)}
  out['test'] = multi_animal.to_coco([kept[i] for i in test], category, len(train) + 1,
                                     len(out['train']['annotations']) + 1)
  return out


def dataset_metadata(config: DlcConfig, report: ImportReport) -> dict[str, Any]:
  """The data set's extra ``info.metadata`` for an imported project:
  ``source`` (format, project, scorer, task, body parts, pcutoff, split
  parameters, labels files)."""
  return dict(source=dict(format='deeplabcut', project=str(config.project_dir), scorer=config.scorer,
                          task=config.task, bodyparts=list(config.bodyparts), pcutoff=config.pcutoff,
                          train_fraction=report.train_fraction, split_seed=report.split_seed,
                          labels_files=report.labels_files, individuals=list(config.individuals)))
