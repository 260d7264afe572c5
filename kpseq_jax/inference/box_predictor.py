"""Boxes for batches of whole images from a trained detector (issue 18).

`BoxPredictor` holds a `detector.Model`, its variables and the
compiled forward pass + `detector.top_detections` (sharded like the
keypoint `predictor.Predictor`), and maps the boxes from the canvas of
`kpseq_jax/data/detection.py` back to image pixels (`canvas_to_image`).
`ImageDetector` restores a detector workdir and finds the boxes of one
image (the two-stage path of ``--mode predict``). When the keypoint model
is PRTR's end-to-end variant and its backbone equals the detector's
(`shares_backbone`: trained with ``model_init`` = the
detector's workdir and the whole backbone frozen), the detector keeps its
backbone feature maps of the last images (`ImageDetector.keep_features`)
and the keypoint stage decodes from them: one backbone pass per image for
detection and keypoints (PRTR's end-to-end variant, Li et al. CVPR 2021).
"""

import collections
import dataclasses
import threading

import jax
import ml_collections
import numpy as np
from pycocotools import mask as coco_mask

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
    features: {level: jax.Array [B, H_l, W_l, C_l]} the backbone's
      feature maps of the predictor's ``feature_levels``, left on the
      devices (batch-sharded); None without levels.
  """
  scores: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray
  boxes_px: np.ndarray | None
  features: dict | None = None


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
    config: ``detector.max_detections`` (k), ``detector.image_size_px``.
    model: the `detector.Model`.
    variables: {'params', 'batch_stats'} on ``mesh``.
    mesh: the device mesh; batches are split over it.
    feature_levels: backbone levels (e.g. ('c3', 'c4', 'c5')) that
      `predict` also returns (`Detections.features`); () for none.
  """

  input_fields = ('image',)

  def __init__(self, config: ml_collections.ConfigDict, model, variables,
               mesh: jax.sharding.Mesh, feature_levels: tuple[str, ...] = ()):
    self.config = config
    self.model = model
    self.variables = variables
    self.mesh = mesh
    self.canvas_hw = tuple(config.detector.image_size_px)
    self.feature_levels = tuple(feature_levels)
    k = config.detector.max_detections

    def detect(variables, images):
      logits, boxes, maps = model.apply(
          variables, images, False, method=model.detect_with_features)
      top = detector_lib.top_detections(logits[-1], boxes[-1], k)
      return top, {level: maps[level] for level in self.feature_levels}

    self._detect = jax.jit(
        detect, in_shardings=(jax.tree.map(lambda a: a.sharding, variables),
                              sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh))

  @classmethod
  def from_state(cls, config: ml_collections.ConfigDict, model, state,
                 mesh: jax.sharding.Mesh) -> 'BoxPredictor':
    """A predictor of a `TrainState`'s weights: their moving average if
    the state has one (`TrainState.inference_variables`)."""
    return cls(config, model, state.inference_variables(), mesh)

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
    top, features = self._detect(
        self.variables if variables is None else variables, images)
    scores, labels, boxes = sharding.gather(top)
    px = None
    if 'canvas_from_image' in local_batch:
      meta = sharding.gather(sharding.global_batch(
          {k: local_batch[k] for k in ('canvas_from_image', 'image_size')},
          self.mesh))
      px = canvas_to_image(boxes, self.canvas_hw, meta['canvas_from_image'],
                           meta['image_size'])
    return Detections(scores=np.asarray(scores), labels=np.asarray(labels),
                      boxes=np.asarray(boxes), boxes_px=px,
                      features=features or None)


class ImageDetector:
  """A trained detector workdir applied to whole images, one at a time
  (``--mode predict`` with ``--detector_workdir``; PRTR's two-stage
  variant: its boxes are cropped for the keypoint stage).

  Args:
    config: the detector run's config (``model_name`` in
      `detection.BOX_MODELS`).
    workdir: the detector run's directory (latest checkpoint).
    mesh: the device mesh.

  Raises:
    ValueError: if ``config`` is not a detection config.
    FileNotFoundError: no data set (its category table names the classes)
      or no checkpoint.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mesh: jax.sharding.Mesh):
    if config.model_name not in detection.BOX_MODELS:
      raise ValueError(f'--detector_config has model_name='
                       f'{config.model_name!r}; it must be a detection config '
                       f'(model_name one of {detection.BOX_MODELS}, e.g. '
                       'configs/dlc_openfield_detector.py).')
    info = dataset.load_info(config.input.dataset_dir)
    model, variables, self.step = predictor_lib.restore_variables(
        config, workdir, mesh)
    self.predictor = BoxPredictor(config, model, variables, mesh)
    self.category_ids = sorted(info.categories)
    self.class_index = info.category_index()
    self.threshold = config.detector.score_threshold
    self.nms_iou = config.detector.nms_iou
    self.max_boxes = detection.boxes_per_image(config)
    self.batch_size = jax.device_count()
    self._lock = threading.Lock()
    # id(image) -> (image, features) of the latest images; the image is
    # held so that its id stays its own.
    self._features: collections.OrderedDict = collections.OrderedDict()
    self._kept_images = 0

  def keep_features(self, feature_levels: tuple[str, ...],
                    max_images: int) -> None:
    """From now on `detect` also keeps the backbone feature maps
    ``feature_levels`` of the last ``max_images`` images it saw (on the
    devices, for `features_of`). Recompiles the detector once."""
    p = self.predictor
    self.predictor = BoxPredictor(p.config, p.model, p.variables, p.mesh,
                                  feature_levels)
    self._kept_images = max_images

  def features_of(self, image: np.ndarray) -> dict | None:
    """{level: jax.Array [1, H_l, W_l, C_l]} of ``image`` (the same array
    object `detect` was given) while it is one of the last kept images;
    else None."""
    with self._lock:
      hit = self._features.get(id(image))
    return hit[1] if hit is not None and hit[0] is image else None

  def detect(self, image: np.ndarray) -> list[tuple[int, tuple, float]]:
    """Boxes of one image scoring at least ``detector.score_threshold``,
    without those of a class that overlap a better box of it by more than
    ``detector.nms_iou`` (`non_maximum_suppression`).

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
    if det.features and self._kept_images:
      with self._lock:
        self._features[id(image)] = (
            image, {k: v[:1] for k, v in det.features.items()})
        while len(self._features) > self._kept_images:
          self._features.popitem(last=False)
    out = []
    for s, c, (x0, y0, x1, y1) in zip(det.scores[0], det.labels[0],
                                      det.boxes_px[0]):
      if s >= self.threshold and x1 > x0 and y1 > y0:
        out.append((self.category_ids[int(c)],
                    (float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
                    float(s)))
    return non_maximum_suppression(out, self.nms_iou)


def non_maximum_suppression(detections: list[tuple[int, tuple, float]],
                            max_iou: float) -> list[tuple[int, tuple, float]]:
  """Greedy non-maximum suppression per class (torchvision's ``nms`` rule):
  from the best down, a box is dropped if its IoU (pycocotools'
  ``mask.iou`` on pixel boxes) with a kept box of its class is above
  ``max_iou``. ``max_iou >= 1`` keeps everything (a set-prediction
  detector such as DETR needs no NMS once trained; a young one repeats
  boxes on one animal).

  Args:
    detections: [(category_id, (x, y, w, h) pixels, score)], best first.
    max_iou: the IoU above which the lower-scoring box goes, in [0, 1].

  Returns:
    The kept detections, in their order.
  """
  if max_iou >= 1 or len(detections) < 2:
    return detections
  boxes = np.asarray([d[1] for d in detections], np.float64)
  iou = coco_mask.iou(boxes, boxes, np.zeros(len(boxes), np.uint8))
  kept = []
  for i, (category, _, _) in enumerate(detections):
    if all(iou[i, j] <= max_iou for j in kept
           if detections[j][0] == category):
      kept.append(i)
  return [detections[i] for i in kept]


def _backbone_arrays(variables) -> dict[str, np.ndarray]:
  """{'params/...' or 'batch_stats/...': host array} under 'backbone'."""
  out = {}
  for collection in ('params', 'batch_stats'):
    tree = variables.get(collection, {}).get('backbone', {})
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[collection + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def shares_backbone(detector: ImageDetector, keypoint_predictor,
                    keypoint_config: ml_collections.ConfigDict
                    ) -> tuple[bool, str]:
  """Whether the keypoint stage can decode from the detector's backbone
  feature maps (PRTR's one backbone pass), and why not.

  True when the keypoint model is the end-to-end variant
  (``full_image_memory``, no support set), both put the image on the same
  canvas (``detector.image_size_px``) in the same compute dtype, and their
  backbones hold equal arrays leaf for leaf (``params`` and
  ``batch_stats`` under 'backbone'; 'batch' and 'frozen_batch'
  normalisation compute the same at inference). A keypoint model trained
  with ``model_init`` = the detector's workdir and
  ``model.resnet.frozen_stages=4`` has that backbone.

  Args:
    detector: the detection stage.
    keypoint_predictor: the keypoint `predictor.Predictor`.
    keypoint_config: the keypoint run's config.

  Returns:
    (shared, reason): reason says what differs when not shared.
  """
  model = keypoint_predictor.model
  det = detector.predictor
  if not model.full_image_memory or model.support_conditioning:
    return False, ('the keypoint stage reads crops (model_name='
                   f'{keypoint_config.model_name})')
  canvas = tuple(keypoint_config.detector.image_size_px)
  if canvas != det.canvas_hw:
    return False, (f'canvases differ: keypoint model {canvas}, detector '
                   f'{det.canvas_hw} (detector.image_size_px)')
  if model.dtype != det.model.dtype:
    return False, (f'compute dtypes differ: keypoint model {model.dtype}, '
                   f'detector {det.model.dtype}')
  ours = _backbone_arrays(keypoint_predictor.variables)
  theirs = _backbone_arrays(det.variables)
  if ours.keys() != theirs.keys():
    return False, (f'backbone variables differ in layout ('
                   f'{len(ours)} against {len(theirs)} arrays: depth or '
                   'normalisation)')
  for name, a in ours.items():
    if a.shape != theirs[name].shape or not np.array_equal(a, theirs[name]):
      return False, f'backbone array {name} differs'
  return True, 'equal backbones'
