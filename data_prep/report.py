"""What a data-prep run read, wrote and skipped, and why."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import categories as categories_lib


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
  """One skipped annotation.

  Attributes:
    file: the annotation file it came from.
    annotation_id: its id (None if unusable).
    image_id: its image id (None if unusable).
    field: the field at fault, e.g. 'keypoints', 'file_name'.
    reason: snake_case reason, e.g. 'keypoint_count_mismatch'.
    detail: human-readable explanation.
  """

  file: str
  annotation_id: Any
  image_id: Any
  field: str
  reason: str
  detail: str = ''


@dataclasses.dataclass
class SplitReport:
  """Counts for one split (= one annotation file).

  Attributes:
    split: split name.
    source_file: annotation file.
    read: annotations read.
    written: records written (build) or that passed validation (check).
    images_written: images stored (build; each once, however many of its
      instances were written: `image_store`); 0 in check mode.
    skipped: the skipped records, in file order.
    notes: counts of non-fatal events, e.g. 'bbox_clipped',
      'duplicate_image_entries', 'image_reencoded_png' (not a plain RGB JPEG),
      'image_mode_converted' (e.g. grayscale -> RGB), 'exif_rotated',
      'exif_ignored_size_is_stored' (a 90-degree EXIF orientation not applied
      because the image entry gives the stored size; see images.py),
      'image_size_differs_from_entry', 'num_keypoints_field_mismatch',
      'keypoint_outside_image_unlabelled' and 'keypoint_non_finite_unlabelled'
      (keypoints set to unlabelled, record kept; see validate.py),
      'records_with_keypoints_unlabelled' (records with any of those).
    instances_per_category: category id -> records written / passed.
    bbox_long_sides_px: the longer side of each written record's bbox
      (pixels), reported as quantiles (`bbox_long_side_px`): with the
      config's ``bbox_scale`` and ``image_size_px`` it says how many image
      pixels one top-down crop pixel covers (docs/precision.md).
  """

  split: str
  source_file: str
  read: int = 0
  written: int = 0
  images_written: int = 0
  skipped: list[SkippedRecord] = dataclasses.field(default_factory=list)
  notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  instances_per_category: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  bbox_long_sides_px: list[float] = dataclasses.field(default_factory=list)

  def bbox_long_side_px(self) -> dict[str, float] | None:
    """{'min', 'p10', 'median', 'p90', 'max'} of `bbox_long_sides_px`
    (pixels, numpy's linear quantiles); None with no record."""
    if not self.bbox_long_sides_px:
      return None
    q = np.quantile(np.asarray(self.bbox_long_sides_px, np.float64),
                    [0.0, 0.1, 0.5, 0.9, 1.0])
    return {k: round(float(v), 1) for k, v in
            zip(('min', 'p10', 'median', 'p90', 'max'), q)}

  @property
  def skipped_by_reason(self) -> dict[str, int]:
    """reason -> number of skipped records, sorted by reason."""
    return dict(sorted(collections.Counter(s.reason for s in self.skipped).items()))

  def nonzero_notes(self) -> dict[str, int]:
    """Non-zero note counts, sorted by name."""
    return {k: int(v) for k, v in sorted(self.notes.items()) if v}

  def to_json(self) -> dict[str, Any]:
    return {
        'source_file': self.source_file,
        'read': self.read,
        'written': self.written,
        'images_written': self.images_written,
        'skipped': len(self.skipped),
        'skipped_by_reason': self.skipped_by_reason,
        'notes': self.nonzero_notes(),
        'instances_per_category': {str(k): v for k, v in sorted(self.instances_per_category.items())},
        'bbox_long_side_px': self.bbox_long_side_px(),
        'skipped_records': [dataclasses.asdict(s) for s in self.skipped],
    }


@dataclasses.dataclass
class BuildReport:
  """The report of a build (or check) run.

  Attributes:
    splits: split name -> SplitReport, in the order given.
    categories: the merged category table.
    out_dir: the data set written (None in check mode).
    annotation_ids_in_several_splits: annotation ids found in more than one
      input file (expected for MP-100's overlapping benchmark splits; a leak
      for a train/test pair).
    source: what a conversion into COCO data read and repaired before the
      build (e.g. `dlc_project.ImportReport.to_json()`); None for COCO files.
  """

  splits: dict[str, SplitReport]
  categories: dict[int, categories_lib.Category]
  out_dir: str | None = None
  annotation_ids_in_several_splits: int = 0
  source: dict[str, Any] | None = None

  @property
  def num_written(self) -> int:
    return sum(s.written for s in self.splits.values())

  @property
  def num_skipped(self) -> int:
    return sum(len(s.skipped) for s in self.splits.values())

  def inferred_num_keypoints(self) -> dict[str, str]:
    """Categories whose K came from their annotations, not from keypoint names."""
    return {
        str(c.id): (f'{c.name}: no keypoint names; K={c.num_keypoints} from its annotations'
                    if c.num_keypoints_source == categories_lib.K_FROM_ANNOTATIONS
                    else f'{c.name}: no keypoint names and no annotations; K=0')
        for c in self.categories.values() if c.num_keypoints_source != categories_lib.K_FROM_NAMES
    }

  def to_json(self) -> dict[str, Any]:
    out = {
        'out_dir': self.out_dir,
        'splits': {name: s.to_json() for name, s in self.splits.items()},
        'num_categories': len(self.categories),
        'num_keypoints_inferred': self.inferred_num_keypoints(),
        'annotation_ids_in_several_splits': self.annotation_ids_in_several_splits,
    }
    if self.source is not None:
      out['source'] = self.source
    return out

  def write(self, path: str | Path) -> None:
    """Writes the report as indented JSON."""
    Path(path).write_text(json.dumps(self.to_json(), indent=1) + '\n', encoding='utf-8')

  def summary_lines(self) -> list[str]:
    """A few lines for the log: per split read/written/skipped and reasons."""
    lines = []
    kept = 'passed' if self.out_dir is None else 'written'
    for name, s in self.splits.items():
      images = f' (on {s.images_written} images)' if s.images_written else ''
      lines.append(f'split {name!r} ({s.source_file}): read {s.read}, {kept} {s.written}{images}, '
                   f'skipped {len(s.skipped)} {s.skipped_by_reason or ""}'.rstrip())
      if s.nonzero_notes():
        lines.append(f'  notes: {s.nonzero_notes()}')
    for cid, line in self.inferred_num_keypoints().items():
      lines.append(f'  category {cid} {line}')
    if self.annotation_ids_in_several_splits:
      lines.append(f'  note: {self.annotation_ids_in_several_splits} annotation ids appear in more than one split')
    return lines
