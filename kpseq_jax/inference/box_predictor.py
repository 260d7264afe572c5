"""Boxes for batches of whole images from a trained detector (issue 18).

`BoxPredictor` holds a `detector.BoxDetector`, its variables and the
compiled forward pass + `detector.top_detections` (sharded like the
keypoint `predictor.Predictor`), and maps the boxes from the canvas of
`kpseq_jax/data/detection.py` back to image pixels (`canvas_to_image`).
`ImageDetector` restores a detector workdir and finds the boxes of one
image (the two-stage path of ``--mode predict``).
"""

import dataclasses

import jax
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import detection
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.models import detector as detector_lib
from kpseq_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class Detections:
  """The top ``max_detections`` boxes of each image of a global batch.

  Attributes:
    scores: float32 [B, k] in [0, 1], decreasing along k (the class
      probability, sigmoid of the focal-loss logit).
    labels: int32 [B, k] class index (`DatasetInfo.category_index` order).
    boxes: float32 [B, k, 4] normalised canvas (x0, y0, x1, y1).
    boxes_px: float64 [B, k, 4] image pixels (x0, y0, x1, y1), clipped to
      the image; None when the batch had no ``canvas_from_image``.
  """
  scores: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray
  boxes_px: np.ndarray | None


def canvas_to_image(boxes: np.ndarray, canvas_hw: tuple[int, int],
                    canvas_from_image: np.ndarray,
                    image_size: np.ndarray) -> np.ndarray:
  """Normalised canvas boxes -> image pixels.

  Args:
    boxes: float [B, k, 4] normalised canvas (x0, y0, x1, y1).
    canvas_hw: (H, W) canvas pixels.
    canvas_from_image: float [B, 3] (scale, dx, dy): canvas px = scale *
      image px + (dx, dy) (an unflipped canvas).
    image_size: float [B, 2] (width, height) pixels, to clip to.

  Returns:
    float64 [B, k, 4] image pixels (x0, y0, x1, y1).
  """
  h, w = canvas_hw
  px = np.asarray(boxes, np.float64) * np.array([w, h, w, h])
  m = np.asarray(canvas_from_image, np.float64)[:, None, :]
  scale, offset = m[..., :1], np.concatenate([m[..., 1:], m[..., 1:]], -1)
  out = (px - offset) / scale
  size = np.asarray(image_size, np.float64)[:, None, :]
  limit = np.concatenate([size, size], -1)
  return np.clip(out, 0.0, limit)


class BoxPredictor:
  """A detector's compiled forward pass with its variables on a mesh.

  Args:
    config: ``max_detections`` (k), ``detector_image_size_px``.
    model: the `detector.BoxDetector`.
    variables: {'params', 'batch_stats'} on ``mesh``.
    mesh: the device mesh; batches are split over it.
  """

  input_fields = ('image',)

  def __init__(self, config: ml_collections.ConfigDict, model, variables,
               mesh: jax.sharding.Mesh):
    self.model = model
    self.variables = variables
    self.mesh = mesh
    self.canvas_hw = tuple(config.detector_image_size_px)
    k = config.max_detections

    def detect(variables, images):
      logits, boxes = model.apply(variables, images, train=False)
      return detector_lib.top_detections(logits[-1], boxes[-1], k)

    self._detect = jax.jit(
        detect, in_shardings=(jax.tree.map(lambda a: a.sharding, variables),
                              sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh))

  @classmethod
  def from_state(cls, config: ml_collections.ConfigDict, model, state,
                 mesh: jax.sharding.Mesh) -> 'BoxPredictor':
    """A predictor of a `TrainState`'s params and batch statistics."""
    return cls(config, model, {'params': state.params,
                               'batch_stats': state.batch_stats}, mesh)

  def predict(self, local_batch: dict[str, np.ndarray],
              variables=None) -> Detections:
    """Detects on a process-local batch; every process gets the global
    result.

    Args:
      local_batch: ``image`` uint8 [b, H, W, 3] canvases and, for pixel
        boxes, ``canvas_from_image`` [b, 3] and ``image_size`` [b, 2].
      variables: use these instead of the predictor's own (same tree and
        shardings).

    Raises:
      KeyError: if ``image`` is missing.
    """
    images = sharding.global_batch({'image': local_batch['image']},
                                   self.mesh)['image']
    scores, labels, boxes = sharding.gather(self._detect(
        self.variables if variables is None else variables, images))
    px = None
    if 'canvas_from_image' in local_batch:
      meta = sharding.gather(sharding.global_batch(
          {k: local_batch[k] for k in ('canvas_from_image', 'image_size')},
          self.mesh))
      px = canvas_to_image(boxes, self.canvas_hw, meta['canvas_from_image'],
                           meta['image_size'])
    return Detections(scores=np.asarray(scores), labels=np.asarray(labels),
                      boxes=np.asarray(boxes), boxes_px=px)


class ImageDetector:
  """A trained detector workdir applied to whole images, one at a time
  (``--mode predict`` with ``--detector_workdir``; PRTR's two-stage
  variant: its boxes are cropped for the keypoint stage).

  Args:
    config: the detector run's config (``task='detection'``).
    workdir: the detector run's directory (latest checkpoint).
    mesh: the device mesh.

  Raises:
    ValueError: if ``config`` is not a detection config.
    FileNotFoundError: no data set (its category table names the classes)
      or no checkpoint.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mesh: jax.sharding.Mesh):
    if config.task != 'detection':
      raise ValueError(f'--detector_config has task={config.task!r}; it '
                       'must be a detection config (task=detection, e.g. '
                       'configs/dlc_openfield_detector.py).')
    info = dataset.load_info(config.dataset_dir)
    model, state, self.step = predictor_lib.restore_state(
        config, workdir, mesh, detection.num_images(config,
                                                    config.train_split))
    self.predictor = BoxPredictor.from_state(config, model, state, mesh)
    self.category_ids = sorted(info.categories)
    self.class_index = info.category_index()
    self.threshold = config.detection_score_threshold
    self.max_boxes = config.detector_num_queries
    self.batch_size = jax.device_count()

  def detect(self, image: np.ndarray) -> list[tuple[int, tuple, float]]:
    """Boxes of one image scoring at least ``detection_score_threshold``.

    Args:
      image: uint8 [H, W, 3] RGB.

    Returns:
      [(category_id, (x, y, w, h) pixels, score)], best first; empty when
      nothing scores above the threshold.
    """
    h, w = image.shape[:2]
    ex = detection.to_canvas(
        dict(image=image, bboxes=np.zeros([0, 4], np.float32),
             category_ids=np.zeros([0], np.int64), image_id=0),
        self.predictor.canvas_hw,
        detection.fit_scale((w, h), self.predictor.canvas_hw), (0.0, 0.0),
        False, self.class_index, self.max_boxes)
    batch = {k: np.stack([ex[k]] * self.batch_size)
             for k in ('image', 'canvas_from_image', 'image_size')}
    det = self.predictor.predict(batch)
    out = []
    for s, c, (x0, y0, x1, y1) in zip(det.scores[0], det.labels[0],
                                      det.boxes_px[0]):
      if s >= self.threshold and x1 > x0 and y1 > y0:
        out.append((self.category_ids[int(c)],
                    (float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
                    float(s)))
    return out
