"""Frames with several animals, each with an identity -> COCO keypoint data.

The one conversion behind the SLEAP import (`sleap_import.py`) and the
multi-animal DeepLabCut import (`dlc_project.py`): each reader turns its
file into `Frame`s (every instance of a frame, its keypoints and its track
name) and `to_coco` makes the COCO dicts `build.build_from_coco_data`
validates and writes, one record per instance, each frame's image stored
once (`image_store`).

COCO fields written (beside the usual ones): ``track`` on each annotation,
the instance's identity (SLEAP's track name, DeepLabCut's individual; ''
when it has none), stored in the record's ``track`` feature
(`tfds_builder.features`).

Box rule (SLEAP and DeepLabCut label no boxes): the extent of the labelled
points padded on each side by `BOX_PAD_FRACTION` of its width (height) plus
`BOX_PAD_PX`, clipped to the image: the rule of the shared
``dlc_openfield``/``dlc_reaching`` COCO files, which
``tests/test_dlc_project.py`` checks the DeepLabCut import against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

BOX_PAD_FRACTION = 0.25
BOX_PAD_PX = 16.0
CATEGORY_ID = 1


@dataclasses.dataclass(frozen=True)
class AnimalInstance:
  """One animal in one frame.

  Attributes:
    xy: float64 [K, 2] pixels; NaN rows = not labelled.
    track: identity name ('' = none).
    predicted: True for a model's prediction (SLEAP ``PredictedInstance``)
      kept because no user instance replaced it.
  """

  xy: np.ndarray
  track: str = ''
  predicted: bool = False


@dataclasses.dataclass(frozen=True)
class Frame:
  """One labelled image and its animals.

  Attributes:
    file_name: the image's name in the data set: a path relative to the
      image root (DeepLabCut), or ``'<video file>#<frame index>'`` (SLEAP).
    width, height: image size in pixels.
    instances: the animals to write, in file order.
    source: the labels file, for messages.
  """

  file_name: str
  width: int
  height: int
  instances: tuple[AnimalInstance, ...]
  source: str = ''


def labelled_box(xy: np.ndarray, width: int, height: int) -> list[float]:
  """The box of one instance's labels (rule in the module docstring).

  Args:
    xy: float [K, 2] pixels; NaN rows = not labelled.
    width, height: image size in pixels.

  Returns:
    [x, y, w, h] pixels inside the image; the whole image when nothing is
    labelled.
  """
  ok = np.all(np.isfinite(xy), axis=1)
  if not ok.any():
    return [0.0, 0.0, float(width), float(height)]
  lo, hi = xy[ok].min(axis=0), xy[ok].max(axis=0)
  pad = BOX_PAD_FRACTION * (hi - lo) + BOX_PAD_PX
  x0, y0 = np.maximum(lo - pad, 0.0)
  x1, y1 = np.minimum(hi + pad, [width, height])
  return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def category(name: str, keypoint_names: Sequence[str], skeleton: Iterable[tuple[int, int]]) -> dict[str, Any]:
  """The COCO category dict (id `CATEGORY_ID`); ``skeleton`` 0-based pairs
  (written 1-based, as COCO). Flip pairs come from the names
  (`categories.flip_pairs_from_names`)."""
  return dict(id=CATEGORY_ID, name=name, supercategory='animal', keypoints=list(keypoint_names),
              skeleton=[[int(i) + 1, int(j) + 1] for i, j in skeleton])


def to_coco(frames: Sequence[Frame], category_dict: dict[str, Any], first_image_id: int = 1,
            first_annotation_id: int = 1) -> dict[str, Any]:
  """COCO keypoint data of ``frames``: one image per frame, one annotation
  per instance with keypoints (x, y, 2) where labelled, (0, 0, 0) where not,
  the `labelled_box` and its ``track``.

  Image ids run from ``first_image_id`` in frame order, annotation ids from
  ``first_annotation_id`` (pass the next free ids to keep them unique over
  splits).
  """
  images, annotations = [], []
  ann_id = first_annotation_id
  for i, frame in enumerate(frames):
    image_id = first_image_id + i
    images.append(dict(id=image_id, file_name=frame.file_name, width=frame.width, height=frame.height))
    for inst in frame.instances:
      labelled = np.all(np.isfinite(inst.xy), axis=1)
      kps = np.zeros([len(inst.xy), 3])
      kps[labelled, :2], kps[labelled, 2] = inst.xy[labelled], 2
      box = labelled_box(inst.xy, frame.width, frame.height)
      annotations.append(dict(id=ann_id, image_id=image_id, category_id=category_dict['id'],
                              keypoints=kps.ravel().tolist(), num_keypoints=int(labelled.sum()),
                              bbox=box, area=box[2] * box[3], iscrowd=0, track=inst.track))
      ann_id += 1
  return dict(images=images, annotations=annotations, categories=[category_dict])
