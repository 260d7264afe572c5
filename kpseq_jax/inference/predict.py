"""Keypoints on new images with a trained workdir (``--mode predict``).

  python -m kpseq_jax.main --mode predict --config configs/dlc_openfield.py \
      --workdir DIR --images IMAGES [--boxes BOXES.json] [--category ID] \
      --out OUT

``IMAGES`` is an image file or a folder (searched recursively). Boxes:

  * none: each whole image is one box of the category ``--category`` (the
    data set's only category by default);
  * ``--boxes`` a COCO detections list ``[{image_id, category_id, bbox,
    score}]``: an entry names its image by ``file_name`` if it has one, else
    by ``image_id`` equal to the number in the file's name (COCO's
    ``000000123456.jpg``);
  * ``--boxes`` a COCO annotations file (``images``, ``annotations``): images
    are matched by ``file_name`` relative to ``IMAGES`` (or by base name if
    that is unique).

  * ``--detector_config`` and ``--detector_workdir`` (no ``--boxes``): a
    trained detector's boxes (`box_predictor.ImageDetector`, PRTR's
    two-stage variant), those scoring at least its
    ``detection_score_threshold``; an image with none is read, counted and
    left without prediction.

With ``--category``, only boxes of that category are used. Each box is
cropped and warped exactly as in evaluation (`transforms.CropAffine`,
`transforms.WarpToCrop`), decoded greedily and mapped back to image pixels
by `predictor.Predictor`; a ``keypoint_stage='end_to_end'`` model reads
each whole image once on its canvas and every box as its crop frame on it
instead (`CanvasBatcher`). Images are read as `data_prep` reads them
(`data_prep.images.load_rgb_array`: EXIF orientation applied, 8-bit RGB).

Writes to ``OUT``:
  ``predictions.json``: COCO keypoint results (``image_id``, ``category_id``,
    ``keypoints`` [x, y, 1] * K in pixels, (0, 0, 0) where not generated,
    ``score`` = the box score), one entry per box;
  ``images.json``: COCO ``images`` table (id, file_name, width, height) of
    the images read; ids are the boxes file's, else 1, 2, ... in file order;
  ``captions.txt``: each pose as text, one line per box: the file name, a
    tab, the caption (`captions.caption`: ``snout (312.4, 188.0); ...``),
    in the order of ``predictions.json``;
  ``overlays/<file name>.png``: each image with its poses drawn (one colour
    per keypoint, names and skeleton from the category table, see
    `visualize.py`), same size as the image;
  ``predict_report.json``: counts, checkpoint step, and the files that could
    not be read, boxes without an image, and boxes that were skipped.
Unreadable images are reported and skipped; the rest are processed.
"""

import collections
import dataclasses
import json
import os
from pathlib import Path
import re
import threading

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from data_prep import images as image_io
from kpseq_jax.data import dataset
from kpseq_jax.data import transforms
from kpseq_jax.data import visualize
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import captions as captions_lib
from kpseq_jax.inference import decoding
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.inference import results as results_lib
from kpseq_jax.inference import video
from kpseq_jax.runtime import sharding

IMAGE_SUFFIXES = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff',
                  '.webp')


@dataclasses.dataclass(frozen=True)
class Box:
  """One box to predict: (x, y, w, h) pixels; bbox None = the whole image."""

  category_id: int
  bbox: tuple[float, float, float, float] | None
  score: float = 1.0


@dataclasses.dataclass
class ImageEntry:
  """An input image, its COCO id and its boxes."""

  rel_path: str  # Relative to the --images root, '/'-separated.
  path: Path
  image_id: int
  boxes: list[Box]


@dataclasses.dataclass
class Summary:
  """What `predict` did (also written to ``predict_report.json``)."""

  out_dir: str
  checkpoint_step: int
  num_images: int = 0  # Images read and drawn.
  num_boxes: int = 0  # Predictions written.
  unreadable: list[dict] = dataclasses.field(default_factory=list)
  boxes_without_image: list[str] = dataclasses.field(default_factory=list)
  skipped_boxes: list[dict] = dataclasses.field(default_factory=list)
  # With a detector: images on which nothing scored above the threshold
  # (read, no prediction, no overlay).
  images_without_detection: list[str] = dataclasses.field(
      default_factory=list)


def list_images(images: str) -> tuple[Path, list[str]]:
  """(root, sorted relative paths) of an image file or a folder's images.

  Raises:
    FileNotFoundError: if ``images`` does not exist or holds no image.
    ValueError: if ``images`` is a video file.
  """
  p = Path(images)
  if p.is_file() and p.suffix.lower() in video.VIDEO_SUFFIXES:
    raise ValueError(f'--images {images}: a video; analyse videos with '
                     '--mode analyze --videos (DeepLabCut-format output).')
  if p.is_file():
    return p.parent, [p.name]
  if not p.is_dir():
    raise FileNotFoundError(f'--images {images!r}: no such file or folder.')
  rels = sorted(f.relative_to(p).as_posix() for f in p.rglob('*')
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
  if not rels:
    raise FileNotFoundError(f'--images {images!r}: no image files '
                            f'({", ".join(IMAGE_SUFFIXES)}) in the folder.')
  return p, rels


def _matcher(rels: list[str]):
  """file_name -> relative path: exact, else by a unique base name."""
  exact = set(rels)
  by_base: dict[str, list[str]] = {}
  for r in rels:
    by_base.setdefault(r.rsplit('/', 1)[-1], []).append(r)

  def match(file_name: str) -> str | None:
    name = file_name.replace(os.sep, '/')
    if name in exact:
      return name
    same = by_base.get(name.rsplit('/', 1)[-1], [])
    return same[0] if len(same) == 1 else None
  return match


def read_boxes(boxes_file: str, rels: list[str]
               ) -> tuple[dict[str, int], dict[str, list[Box]], list[str]]:
  """Parses a COCO detections list or annotations file.

  Returns:
    (relative path -> image id, relative path -> boxes, descriptions of
    boxes whose image is not under --images).

  Raises:
    ValueError: unknown layout, an entry without a usable box, or a
      detections list whose entries name no file.
  """
  with open(boxes_file) as f:
    data = json.load(f)
  match = _matcher(rels)
  if isinstance(data, dict) and 'annotations' in data:
    files = {int(im['id']): im['file_name'] for im in data.get('images', [])}
    entries = [a for a in data['annotations'] if not a.get('iscrowd', 0)]
  elif isinstance(data, list):
    files, entries = {}, data
    numbered = {}
    for r in rels:  # COCO file names are the zero-padded image id.
      m = re.fullmatch(r'0*(\d+)', Path(r).stem)
      if m:
        numbered.setdefault(int(m.group(1)), r)
  else:
    raise ValueError(f'--boxes {boxes_file}: expected a COCO detections list '
                     'or an annotations file with "images" and '
                     '"annotations".')
  ids, boxes, missing = {}, {}, []
  for i, e in enumerate(entries):
    try:
      image_id, cid = int(e['image_id']), int(e['category_id'])
      x, y, w, h = (float(v) for v in e['bbox'])
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f'--boxes {boxes_file}: entry {i} needs image_id, '
                       f'category_id and bbox [x, y, w, h] ({err!r}).') from err
    if 'file_name' in e:
      rel = match(str(e['file_name']))
    elif isinstance(data, dict):
      rel = match(files[image_id]) if image_id in files else None
    else:
      rel = numbered.get(image_id)
      if not numbered:
        raise ValueError(
            f'--boxes {boxes_file}: detections name images by image_id only, '
            'but no file under --images is named by a number; add '
            '"file_name" to the entries or pass an annotations file with an '
            '"images" table.')
    if rel is None:
      missing.append(f'image {image_id} '
                     f'({e.get("file_name", files.get(image_id, "?"))})')
      continue
    ids[rel] = image_id
    boxes.setdefault(rel, []).append(
        Box(cid, (x, y, w, h), float(e.get('score', 1.0))))
  return ids, boxes, missing


def choose_category(info: dataset.DatasetInfo,
                    category_id: int | None) -> int:
  """The category of whole-image boxes.

  Raises:
    ValueError: unknown id, or several categories and none chosen.
  """
  table = ', '.join(f'{c.id} ({c.name})' for c in info.categories.values())
  if category_id is not None:
    if category_id not in info.categories:
      raise ValueError(f'--category {category_id} is not in the data set\'s '
                       f'category table: {table}.')
    return category_id
  if len(info.categories) != 1:
    raise ValueError(f'The model knows several categories ({table}); pass '
                     '--category ID or a --boxes file with category_id.')
  return next(iter(info.categories))


def overlay_path(out_dir: str, rel_path: str) -> Path:
  """``OUT/overlays/<rel_path with suffix .png>``."""
  return Path(out_dir, 'overlays', rel_path).with_suffix('.png')


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
    self.batch_size = batch_size or config.eval_batch_size
    self.crop_affine = transforms.CropAffine(config.image_size_px,
                                             config.bbox_scale)
    self.warp = transforms.WarpToCrop(config.image_size_px)
    self.pending: list[tuple[object, dict]] = []

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
  """`CropBatcher` for PRTR's end-to-end variant (``config.keypoint_stage
  = 'end_to_end'``): each image is put on the ``detector_image_size_px``
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
    self.canvas_hw = tuple(config.detector_image_size_px)
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


def make_batcher(config: ml_collections.ConfigDict,
                 predictor: predictor_lib.Predictor,
                 category_index: dict[int, int],
                 batch_size: int | None = None,
                 detector: box_predictor.ImageDetector | None = None
                 ) -> CropBatcher:
  """The batcher of ``config.keypoint_stage``: `CropBatcher` (two_stage,
  top-down crops) or `CanvasBatcher` (end_to_end, whole images).

  With the ``detector`` that finds the boxes, an end-to-end batcher decodes
  from the detector's backbone feature maps when the two backbones are
  equal (`box_predictor.shares_backbone`; one backbone pass per image),
  and says which it does in the log.
  """
  cls = (CanvasBatcher if config.keypoint_stage == 'end_to_end'
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


def predict(config: ml_collections.ConfigDict, workdir: str, images: str,
            out_dir: str, boxes_file: str | None = None,
            category_id: int | None = None,
            detector: box_predictor.ImageDetector | None = None) -> Summary:
  """Predicts keypoints for every box of every image; see module docstring.

  With ``detector`` (and no ``boxes_file``) the boxes of each image are
  the detector's above its score threshold (PRTR's two-stage variant); an
  image with none is counted in ``images_without_detection``.

  Raises:
    FileNotFoundError: no checkpoint, data set, or images.
    ValueError: bad --boxes file or category choice; a boxes file none of
      whose boxes is under --images.
    NotImplementedError: on more than one process.
  """
  if jax.process_count() > 1:
    raise NotImplementedError('--mode predict runs on one process; start it '
                              'on a single host.')
  info = dataset.load_info(config.dataset_dir)
  root, rels = list_images(images)
  if category_id is not None:
    choose_category(info, category_id)  # Raises if not in the table.
  summary_skipped = []
  if boxes_file:
    ids, boxes, missing = read_boxes(boxes_file, rels)
    if not boxes:
      raise ValueError(f'--boxes {boxes_file}: none of its boxes is for an '
                       f'image under --images {images} ({len(missing)} '
                       'boxes, e.g. ' + '; '.join(missing[:3]) + ').')
    entries = []
    for rel in rels:
      if rel not in boxes:
        continue
      keep = []
      for b in boxes[rel]:
        why = None
        if category_id is not None and b.category_id != category_id:
          why = f'category {b.category_id} is not --category {category_id}'
        elif b.category_id not in info.categories:
          why = f'category {b.category_id} is not in the model\'s table'
        elif not (np.all(np.isfinite(b.bbox)) and b.bbox[2] > 0
                  and b.bbox[3] > 0):
          why = f'bbox {list(b.bbox)} has no area'
        if why:
          summary_skipped.append(dict(file=rel, bbox=list(b.bbox), reason=why))
        else:
          keep.append(b)
      if keep:
        entries.append(ImageEntry(rel, root / rel, ids[rel], keep))
    logging.info('%d boxes on %d of %d images under %s; %d boxes skipped.',
                 sum(len(e.boxes) for e in entries), len(entries), len(rels),
                 images, len(summary_skipped))
  elif detector is not None:  # Boxes filled in once each image is read.
    missing = []
    entries = [ImageEntry(rel, root / rel, i + 1, [])
               for i, rel in enumerate(rels)]
  else:
    missing = []
    cid = choose_category(info, category_id)
    entries = [ImageEntry(rel, root / rel, i + 1, [Box(cid, None)])
               for i, rel in enumerate(rels)]

  mesh = sharding.create_mesh(config.mesh_shape)
  model, variables, step = predictor_lib.restore_variables(config, workdir,
                                                          mesh)
  batcher = make_batcher(
      config, predictor_lib.Predictor(config, model, variables, mesh),
      info.category_index(), detector=None if boxes_file else detector)
  summary = Summary(out_dir=out_dir, checkpoint_step=int(step),
                    boxes_without_image=missing, skipped_boxes=summary_skipped)
  os.makedirs(out_dir, exist_ok=True)
  results, image_table, caption_lines = [], [], []
  open_images: dict[int, dict] = {}  # Entry index -> image and predictions.
  bar = tqdm.tqdm(total=len(entries), desc='predict', unit='img')

  def finish(done: list[tuple[int, dict]]) -> None:
    for idx, ex in done:
      o = open_images[idx]
      o['poses'][ex['box_index']] = ex
      if len(o['poses']) < len(o['entry'].boxes):
        continue
      del open_images[idx]
      _write_image(o['entry'], o['image'], o['poses'], info, out_dir,
                   results, caption_lines)
      summary.num_images += 1
      bar.update(1)

  for idx, entry in enumerate(entries):
    try:
      image = image_io.load_rgb_array(entry.path)
    except (OSError, image_io.ImageDecodeError) as e:
      summary.unreadable.append(dict(file=entry.rel_path, error=str(e)))
      logging.warning('Cannot read %s: %s', entry.path, e)
      bar.update(1)
      continue
    h, w = image.shape[:2]
    image_table.append(dict(id=entry.image_id, file_name=entry.rel_path,
                            width=w, height=h))
    if detector is not None and not boxes_file:
      entry.boxes = _detected_boxes(detector, image, info, category_id,
                                    entry.rel_path, summary)
      if not entry.boxes:
        summary.images_without_detection.append(entry.rel_path)
        bar.update(1)
        continue
    open_images[idx] = dict(entry=entry, image=image, poses={})
    for j, box in enumerate(entry.boxes):
      bbox = box.bbox if box.bbox is not None else (0.0, 0.0, w, h)
      done = batcher.add((idx, j), image, bbox, box.category_id)
      finish([(k[0], dict(ex, box_index=k[1])) for k, ex in done])
  done = batcher.run()
  finish([(k[0], dict(ex, box_index=k[1])) for k, ex in done])
  bar.close()

  summary.num_boxes = len(results)
  with open(os.path.join(out_dir, 'predictions.json'), 'w') as f:
    json.dump(results, f)
  with open(os.path.join(out_dir, 'images.json'), 'w') as f:
    json.dump({'images': image_table}, f, indent=1)
  with open(os.path.join(out_dir, 'captions.txt'), 'w') as f:
    f.writelines(line + '\n' for line in caption_lines)
  with open(os.path.join(out_dir, 'predict_report.json'), 'w') as f:
    json.dump(dataclasses.asdict(summary), f, indent=2)
  logging.info('Predicted %d boxes on %d images (checkpoint step %d) -> %s',
               summary.num_boxes, summary.num_images, step, out_dir)
  for what, items in [('unreadable image', summary.unreadable),
                      ('image without detection',
                       summary.images_without_detection),
                      ('box without image', summary.boxes_without_image),
                      ('skipped box', summary.skipped_boxes)]:
    if items:
      logging.warning('%d %s(s):\n  %s', len(items), what,
                      '\n  '.join(str(i) for i in items))
  return summary


def _detected_boxes(detector: box_predictor.ImageDetector,
                    image: np.ndarray, info: dataset.DatasetInfo,
                    category_id: int | None, rel_path: str,
                    summary: Summary) -> list[Box]:
  """The detector's boxes of one image that the keypoint model can take
  (its category table; ``--category`` if given); the others are recorded
  in ``summary.skipped_boxes``."""
  keep = []
  for cid, bbox, score in detector.detect(image):
    why = None
    if category_id is not None and cid != category_id:
      why = f'category {cid} is not --category {category_id}'
    elif cid not in info.categories:
      why = f'category {cid} is not in the keypoint model\'s table'
    if why:
      summary.skipped_boxes.append(dict(file=rel_path, bbox=list(bbox),
                                        reason=why))
    else:
      keep.append(Box(cid, bbox, score))
  return keep


def _write_image(entry: ImageEntry, image: np.ndarray, poses: dict[int, dict],
                 info: dataset.DatasetInfo, out_dir: str,
                 results: list[dict], captions: list[str]) -> None:
  """Appends the image's COCO results and caption lines, saves its overlay
  PNG."""
  order = sorted(poses)
  boxes = [entry.boxes[j] for j in order]
  pred = np.stack([poses[j]['pred_px'] for j in order])  # [N, Kmax, 2]
  confidence = np.stack([poses[j]['confidence'] for j in order])  # [N, Kmax]
  presence = None
  if poses[order[0]]['presence'] is not None:
    presence = np.stack([poses[j]['presence'] for j in order])  # [N, Kmax]
  entries = results_lib.coco_results(
      pred, [info.categories[b.category_id].num_keypoints for b in boxes],
      [entry.image_id] * len(boxes), [b.category_id for b in boxes],
      [b.score for b in boxes], keypoint_scores=confidence,
      presence=presence)
  results.extend(entries)
  for b, p in zip(boxes, pred):
    cat = info.categories[b.category_id]
    captions.append(f'{entry.rel_path}\t'
                    + captions_lib.caption(p[:cat.num_keypoints],
                                           cat.keypoint_names))
  canvas = Image.fromarray(image)
  for i, (b, r) in enumerate(zip(boxes, entries)):
    kps = np.reshape(r['keypoints'], [-1, 3])
    absent = None
    if presence is not None:
      absent = presence[i, :len(kps)] < 0.5
      kps[:, 2] = np.isfinite(pred[i, :len(kps), 0])  # Absent: hollow.
    canvas = visualize.draw_pose(canvas, kps, info.categories[b.category_id],
                                 absent=absent)
  path = overlay_path(out_dir, entry.rel_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
