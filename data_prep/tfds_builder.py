"""The TFDS builder: one ArrayRecord record per valid annotation, one split per file.

Records carry ``image_id``, not the image: each split's images are written
once each to its `image_store` (``images-<split>.array_record``) as the
annotations are walked.

Lives in its own module (not `build.py`) because TFDS looks builders up by
their package, which fails for a class defined in `__main__`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from data_prep import categories as categories_lib
from data_prep import coco
from data_prep import image_store
from data_prep import records
from data_prep import report as report_lib
from data_prep import validate

DATASET_NAME = 'kpseq_keypoints'


def make_example(instance: validate.Instance, entry: coco.ImageEntry) -> dict[str, Any]:
  """The TFDS example dict of one validated instance (feature names as in `features`); its image
  goes to the split's `image_store`."""
  return {
      'bbox': instance.bbox,
      'keypoints': instance.keypoints,
      'category_id': instance.category_id,
      'image_id': instance.image_id,
      'annotation_id': instance.annotation_id,
      'file_name': entry.file_name,
      'track': instance.track,
  }


def features() -> tfds.features.FeaturesDict:
  """The record features (names and dtypes are a contract with the training pipeline)."""
  return tfds.features.FeaturesDict({
      'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
      'keypoints': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
      'category_id': tfds.features.Scalar(dtype=np.int64),
      'image_id': tfds.features.Scalar(dtype=np.int64),
      'annotation_id': tfds.features.Scalar(dtype=np.int64),
      'file_name': tfds.features.Text(),
      # Identity (SLEAP track, DeepLabCut individual; '' = none). Since
      # 2.1.0: read it with `kpseq_jax.data.dataset.instance_track`.
      'track': tfds.features.Text(),
  })


@dataclasses.dataclass(frozen=True)
class BuildPlan:
  """Everything the TFDS builder needs: parsed files, categories, image root, report, and where
  the image stores go (`image_store.store_paths`; moved next to the records by `build`)."""

  files: dict[str, coco.CocoKeypointFile]
  categories: dict[int, categories_lib.Category]
  image_root: Path
  report: report_lib.BuildReport
  image_store_dir: Path
  # Split -> `episodes.EpisodePool.to_json()` of its file / why it has none.
  episode_pools: dict[str, dict] = dataclasses.field(default_factory=dict)
  episode_pool_errors: dict[str, str] = dataclasses.field(default_factory=dict)
  unlabelled_means: str = 'unknown'  # build.UNLABELLED_MEANS.
  # More `info.metadata` keys, e.g. a DeepLabCut project's source (see
  # `dlc_project.py`).
  extra_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Makes the `records.ImageLoader` of a split; None = image files under
  # `image_root` (`records.FileImageLoader`). The SLEAP import decodes video
  # frames (`sleap_import.VideoFrameLoader`).
  image_loader: Callable[[], records.ImageLoader] | None = None


class KeypointDatasetBuilder(tfds.core.GeneratorBasedBuilder):
  """One record per valid annotation; splits = the input files. Use `build_dataset`."""

  name = DATASET_NAME
  VERSION = tfds.core.Version('2.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '2.0.0': 'Images stored once per image (image_store), not in every record.',
                   '2.1.0': 'Per-instance identity: the track feature.'}
  # Nothing is downloaded. The default looks for a checksums file next to the
  # code, which needs the `importlib_resources` backport (not installed).
  url_infos = None

  def __init__(self, *, plan: BuildPlan, **kwargs):
    self._plan = plan
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    categories = [c.to_metadata() for c in self._plan.categories.values()]
    return self.dataset_info_from_configs(
        description='Keypoint instances from COCO-style files, built by data_prep.build.',
        features=features(),
        metadata=tfds.core.MetadataDict(
            categories=categories,
            max_num_keypoints=max((c['num_keypoints'] for c in categories), default=0),
            source_files={split: str(f.path) for split, f in self._plan.files.items()},
            split_sizes={},
            episode_pools=self._plan.episode_pools,
            episode_pool_errors=self._plan.episode_pool_errors,
            unlabelled_means=self._plan.unlabelled_means,
            **self._plan.extra_metadata,
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._plan.files}

  def _generate_examples(self, split: str):
    plan = self._plan
    split_report = plan.report.splits[split]
    load_image = plan.image_loader() if plan.image_loader else records.FileImageLoader(plan.image_root)
    with image_store.ImageStoreWriter(plan.image_store_dir, split) as images:
      for instance, entry, image in records.iter_valid_instances(plan.files[split], plan.categories, split_report,
                                                                  load_image):
        images.add(entry.id, image.data)
        split_report.written += 1
        yield instance.annotation_id, make_example(instance, entry)
      split_report.images_written = images.num_images
    if split_report.written == 0:
      raise coco.AnnotationError(f'{plan.files[split].path}: split {split!r} has no valid records '
                            f'(skipped: {split_report.skipped_by_reason})')

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config=download_config)
    self.info.metadata['split_sizes'] = {name: info.num_examples for name, info in self.info.splits.items()}
