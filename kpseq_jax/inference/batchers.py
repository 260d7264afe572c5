"""Box crops -> fixed-shape batches for a `predictor.Predictor`.

`CropBatcher` cuts each box as evaluation does (PRTR's two-stage path);
`CanvasBatcher` puts each image once on the detector's canvas and decodes
its boxes as crop frames on it (``model_name='end_to_end'``).
`make_batcher` picks the one of ``config.model_name``. Used by
``--mode predict``, ``--mode analyze`` and evaluation from detected boxes.
"""

import collections
import dataclasses
import threading

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kpseq_jax.data import transforms
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import box_range as box_range_lib
from kpseq_jax.inference import decoding
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import sharding


class CropBatcher:
  """Crops boxes into fixed-size batches for a `predictor.Predictor`.

  `crop` is pure (thread-safe: video analysis crops in a background
  thread); `predict_crops` runs the model; `add`/`run` queue crops and
  decode a batch when it is full.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               predictor: predictor_lib.Predictor,
               category_index: dict[int, int],
               batch_size: int | None = None):
    self.predictor = predictor
    self.vocab = predictor.model.vocab
    self.category_index = category_index  # Category conditioning only.
    self.batch_size = batch_size or config.evals.batch_size
    self.crop_affine = transforms.CropAffine(config.input.image_size_px,
                                             config.input.bbox_scale)
    self.warp = transforms.WarpToCrop(config.input.image_size_px)
    self.pending: list[tuple[object, dict]] = []
    # Re-cuts of each box from its pose in analyze and detected-box
    # evaluation (`pose_boxes`).
    self.pose_box_passes = int(config.decode.pose_box_passes)
    # The restored checkpoint's likelihood map (`restore_batcher`), if any,
    # and the training boxes' range it holds for (`box_range`).
    self.calibration: likelihood.CalibrationMap | None = None
    self.box_range: box_range_lib.BoxRange | None = None

  def crop(self, image: np.ndarray, bbox, category_id: int) -> dict:
    """One top-down crop example as in evaluation.

    Args:
      image: uint8 [H, W, 3] RGB.
      bbox: (x, y, w, h) pixels.
      category_id: feeds a category-conditioned model.

    Returns:
      dict with ``image`` uint8 [S, S, 3], ``crop_from_image`` float32
      [2, 3] and (conditioned models) ``category_token``.
    """
    ex = dict(image=image, bbox=np.asarray(bbox, np.float32),
              keypoints=np.zeros([0, 3], np.float32))
    ex = self.warp.map(self.crop_affine.map(ex))
    ex['category_id'] = np.int64(category_id)
    if self.vocab.num_prefix_tokens:
      ex['category_token'] = np.int32(
          self.vocab.category(self.category_index[int(category_id)]))
    return ex

  def predict_crops(self, exs: list[dict]) -> predictor_lib.Prediction:
    """Decodes at most ``batch_size`` crops (padded to the static batch
    shape); the returned `Prediction` has ``len(exs)`` rows."""
    n = len(exs)
    exs = exs + [exs[-1]] * (self.batch_size - n)  # Static batch shape.
    fields = self.predictor.batch_fields + ('crop_from_image',)
    pred = self.predictor.predict(
        {k: np.stack([ex[k] for ex in exs]) for k in fields})
    return dataclasses.replace(pred, **{
        f.name: (None if getattr(pred, f.name) is None
                 else getattr(pred, f.name)[:n])
        for f in dataclasses.fields(pred)})

  def add(self, key, image: np.ndarray, bbox,
          category_id: int) -> list[tuple[object, dict]]:
    """Queues one crop; returns [(key, crop example with 'pred_px')] of a
    batch when one is full. ``category_id`` feeds a category-conditioned
    model."""
    self.pending.append((key, self.crop(image, bbox, category_id)))
    return self.run() if len(self.pending) == self.batch_size else []

  def run(self) -> list[tuple[object, dict]]:
    """Decodes the queued crops (padded to the batch size)."""
    if not self.pending:
      return []
    items, self.pending = self.pending, []
    pred = self.predict_crops([ex for _, ex in items])
    presence = (pred.presence if pred.presence is not None else
                [None] * len(items))
    return [(key, dict(ex, pred_px=p, confidence=c, presence=v))
            for (key, ex), p, c, v in zip(items, pred.keypoints_px,
                                          pred.confidence, presence)]


class CanvasBatcher(CropBatcher):
  """`CropBatcher` for PRTR's end-to-end variant (``config.model_name
  = 'end_to_end'``): each image is put on the ``detector.image_size_px``
  canvas once (`transforms.to_canvas`) and encoded once for all its boxes;
  a box is its crop frame on the canvas (``memory_from_crop``,
  `transforms.memory_from_crop`), the crop the two-stage path would cut
  (same `transforms.CropAffine`), so keypoints come back in the same crop
  coordinates and image pixels.

  `predict_crops` groups the boxes by image: rows of N boxes of one image
  (N the next power of two of the most boxes an image has in the call, at
  most ``batch_size``), M = ``batch_size // N`` images per decoder call
  (rounded up to the mesh's batch split), so a call decodes about
  ``batch_size`` boxes with M encoder passes (`decoding` takes
  ``memory_from_crop`` [M, N, 2, 3]). Unused slots repeat a real box and
  are dropped.

  With ``features_of`` set (`make_batcher` with a detector whose backbone
  equals the keypoint model's, `box_predictor.shares_backbone`), an image
  the detector has just seen is not encoded again: the call decodes from
  the detector's feature maps (``backbone_features``). ``images_encoded``
  and ``images_from_detector`` count the image rows of each kind.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               predictor: predictor_lib.Predictor,
               category_index: dict[int, int],
               batch_size: int | None = None):
    super().__init__(config, predictor, category_index, batch_size)
    self.canvas_hw = tuple(config.detector.image_size_px)
    mesh = predictor.mesh
    self._split = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    self._lock = threading.Lock()
    # id(image) -> (image, canvas, canvas_from_image, key) of the latest
    # images (the image is held so that its id stays its own).
    self._canvases = collections.OrderedDict()
    self._next_key = 0
    # image -> {level: [1, H_l, W_l, C_l]} device arrays or None.
    self.features_of = None
    self.images_encoded = 0
    self.images_from_detector = 0

  # Images whose canvas (and, with a sharing detector, feature maps) stay
  # cached: frames of one video arrive in order, so a few suffice.
  CACHED_IMAGES = 16

  def _canvas(self, image: np.ndarray):
    """(canvas, canvas_from_image, key) of ``image``: warped once while it
    is one of the last `CACHED_IMAGES` images seen."""
    with self._lock:
      hit = self._canvases.get(id(image))
      if hit is not None and hit[0] is image:
        return hit[1:]
      key, self._next_key = self._next_key, self._next_key + 1
    canvas, canvas_from_image = transforms.to_canvas(image, self.canvas_hw)
    with self._lock:
      self._canvases[id(image)] = (image, canvas, canvas_from_image, key)
      while len(self._canvases) > self.CACHED_IMAGES:
        self._canvases.popitem(last=False)
    return canvas, canvas_from_image, key

  def crop(self, image: np.ndarray, bbox, category_id: int) -> dict:
    """One box on its image's canvas.

    Returns:
      dict with ``image`` uint8 [H, W, 3] (the canvas, shared by the
      image's boxes), ``memory_from_crop`` float32 [2, 3],
      ``crop_from_image`` float32 [2, 3], ``canvas_key`` (int, equal for
      boxes of one image) and (conditioned models) ``category_token``.
    """
    ex = dict(image=image, bbox=np.asarray(bbox, np.float32),
              keypoints=np.zeros([0, 3], np.float32))
    m = self.crop_affine.map(ex)['crop_from_image']
    canvas, canvas_from_image, key = self._canvas(image)
    ex = dict(image=canvas, crop_from_image=m.astype(np.float32),
              memory_from_crop=transforms.memory_from_crop(
                  m, canvas_from_image, self.crop_affine.image_size_px),
              canvas_key=key)
    features = self.features_of(image) if self.features_of else None
    if features is not None:
      ex[decoding.BACKBONE_FEATURES_FIELD] = features
    if self.vocab.num_prefix_tokens:
      ex['category_token'] = np.int32(
          self.vocab.category(self.category_index[int(category_id)]))
    return ex

  def predict_crops(self, exs: list[dict]) -> predictor_lib.Prediction:
    """Decodes boxes grouped by image (see class docstring); the returned
    `Prediction` has ``len(exs)`` rows in the order of ``exs``."""
    groups: dict[int, list[int]] = {}
    for i, ex in enumerate(exs):
      groups.setdefault(ex['canvas_key'], []).append(i)
    n = min(self.batch_size, 1 << (max(map(len, groups.values())) - 1
                                   ).bit_length())
    m = -(-max(1, self.batch_size // n) // self._split) * self._split
    rows = [g[j:j + n] for g in groups.values() for j in range(0, len(g), n)]
    per_box = {}  # Index in exs -> (call, row in the call's output).
    preds = []
    for start in range(0, len(rows), m):
      call = rows[start:start + m]
      call += [call[-1]] * (m - len(call))  # Static shapes: M rows ...
      slots = [r + [r[0]] * (n - len(r)) for r in call]  # ... of N boxes.
      firsts = [exs[r[0]] for r in call]
      shared = decoding.BACKBONE_FEATURES_FIELD
      if all(shared in ex for ex in firsts):  # The detector's maps.
        batch = {shared: jax.tree.map(lambda *a: jnp.concatenate(a),
                                      *[ex[shared] for ex in firsts])}
        self.images_from_detector += len(call)
      else:
        batch = {'image': np.stack([ex['image'] for ex in firsts])}
        self.images_encoded += len(call)
      for k in self.predictor.input_fields + ('crop_from_image',):
        if k != 'image':
          batch[k] = np.stack([[exs[i][k] for i in r] for r in slots])
      preds.append(self.predictor.predict(batch))
      for r_index, r in enumerate(rows[start:start + m]):
        for j, i in enumerate(r):
          per_box[i] = (len(preds) - 1, r_index * n + j)
    order = [per_box[i] for i in range(len(exs))]
    return dataclasses.replace(preds[0], **{
        f.name: (None if getattr(preds[0], f.name) is None else np.stack(
            [getattr(preds[c], f.name)[j] for c, j in order]))
        for f in dataclasses.fields(preds[0])})


def predict_all(batcher: CropBatcher, exs: list[dict]
                ) -> predictor_lib.Prediction:
  """``batcher.predict_crops`` of any number of crops (calls of at most
  ``batcher.batch_size``); rows in the order of ``exs``."""
  parts = [batcher.predict_crops(exs[i:i + batcher.batch_size])
           for i in range(0, len(exs), batcher.batch_size)]
  if len(parts) == 1:
    return parts[0]
  return dataclasses.replace(parts[0], **{
      f.name: (None if getattr(parts[0], f.name) is None else
               np.concatenate([getattr(p, f.name) for p in parts]))
      for f in dataclasses.fields(parts[0])})


def make_batcher(config: ml_collections.ConfigDict,
                 predictor: predictor_lib.Predictor,
                 category_index: dict[int, int],
                 batch_size: int | None = None,
                 detector: box_predictor.ImageDetector | None = None
                 ) -> CropBatcher:
  """The batcher of ``config.model_name``: `CropBatcher` (two_stage,
  top-down crops) or `CanvasBatcher` (end_to_end, whole images).

  With the ``detector`` that finds the boxes, an end-to-end batcher decodes
  from the detector's backbone feature maps when the two backbones are
  equal (`box_predictor.shares_backbone`; one backbone pass per image),
  and says which it does in the log.
  """
  cls = (CanvasBatcher if config.model_name == 'end_to_end'
         else CropBatcher)
  batcher = cls(config, predictor, category_index, batch_size)
  if (isinstance(detector, box_predictor.ImageDetector)
      and isinstance(batcher, CanvasBatcher)):
    shared, why = box_predictor.shares_backbone(detector, predictor, config)
    if shared:
      detector.keep_features(predictor.model.feature_levels,
                             max(batcher.CACHED_IMAGES, batcher.batch_size))
      batcher.features_of = detector.features_of
      logging.info('One backbone pass per image: the keypoint model decodes '
                   'from the detector\'s feature maps (%s).', why)
    else:
      logging.info('Two backbone passes per image (detector, then keypoint '
                   'model): %s.', why)
  return batcher


def restore_batcher(config: ml_collections.ConfigDict, workdir: str,
                    category_index: dict[int, int],
                    batch_size: int | None = None,
                    detector: box_predictor.ImageDetector | None = None
                    ) -> tuple[CropBatcher, int]:
  """(`make_batcher` over ``workdir``'s chosen weights, checkpoint step);
  the batcher's ``calibration`` is the workdir's likelihood map of that
  step (`likelihood.load`; None, logged, when there is none) and its
  ``box_range`` the training boxes' (`box_range.from_config`).

  Raises:
    FileNotFoundError / checkpointing.CheckpointMismatchError: as
    `predictor.restore_variables`.
    ValueError: a damaged ``calibration.json``.
  """
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, step = predictor_lib.restore_variables(config, workdir,
                                                          mesh)
  batcher = make_batcher(
      config, predictor_lib.Predictor(config, model, variables, mesh),
      category_index, batch_size, detector=detector)
  batcher.calibration = likelihood.load(workdir, step)
  batcher.box_range = box_range_lib.from_config(config)
  return batcher, step

