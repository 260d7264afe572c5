"""Seconds per image of the keypoint stage: two-stage crops vs end-to-end.

  python tools/keypoint_stage_cost.py --config configs/dlc_openfield.py \\
      --two_stage_workdir RUN_A --end_to_end_workdir RUN_B \\
      --config.detector.image_size_px='(192, 256)' --boxes_per_image 1,2,4

Restores both trained workdirs (same ``--config`` apart from
``model_name``), takes ``--num_frames`` real frames of the data set's
test annotations and, per frame, N boxes: the annotated box and N - 1
copies shifted by 12% of its side (as if several animals were detected).
For each N it times the whole keypoint stage of both variants on the same
boxes: `batchers.CropBatcher` (PRTR two-stage: N crops, N encoder passes)
and `batchers.CanvasBatcher` (end-to-end: the frame on the canvas, one
encoder pass, N box decodes), from the frame in memory to keypoints in
pixels, in ``evals.batch_size`` boxes per call. After one untimed pass per
(variant, N) (compilation), the variants alternate ``--rounds`` times
(two-stage, end-to-end, two-stage, ...) and the script prints the median
seconds per frame of each and their ratio. Without a detector, the
detector is not included: both variants run the same one.

With ``--detector_config`` and ``--detector_workdir`` every variant first
runs the detector on the frame (its boxes are not used: the timed boxes
stay the annotated ones, so every variant decodes the same N boxes), and a
third variant, ``end_to_end_shared``, decodes from the detector's backbone
feature maps (PRTR's one backbone pass, `box_predictor.shares_backbone`;
the end-to-end run must have the detector's backbone, e.g. trained with
``--config.model_init=DETECTOR_WORKDIR --config.model.resnet.norm=frozen_batch
--config.model.resnet.frozen_stages=4``).

  python tools/keypoint_stage_cost.py --config configs/dlc_openfield.py \\
      --config.detector.image_size_px='(192, 256)' \\
      --two_stage_workdir RUN_A --end_to_end_workdir RUN_B \\
      --detector_config configs/dlc_openfield_detector.py \\
      --detector_workdir DETECTOR_RUN --boxes_per_image 1,2

Not part of the package: a measuring tool for docs/detection.md.
"""
import json
import os
from pathlib import Path
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from data_prep import images as image_io
from kpseq_jax.data import dataset
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import batchers
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import sharding
from kpseq_jax.runtime import xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Keypoint config (both runs).',
                                lock_config=True)
flags.DEFINE_string('two_stage_workdir', None, 'Run with model_name='
                    'supervised (two-stage).', required=True)
flags.DEFINE_string('end_to_end_workdir', None, 'Run with model_name='
                    'end_to_end.', required=True)
flags.DEFINE_string('annotations', '../shared/data/dlc_openfield/annotations/'
                    'test.json', 'COCO annotations of the frames (boxes).')
flags.DEFINE_string('images', '../shared/data/dlc_openfield/images',
                    'Image root of --annotations.')
flags.DEFINE_integer('num_frames', 16, 'Frames timed per round.')
flags.DEFINE_list('boxes_per_image', ['1', '2', '4'], 'Values of N.')
flags.DEFINE_integer('rounds', 3, 'Alternating timed rounds per variant.')
flags.DEFINE_string('out', None, 'Also write the figures to this JSON file.')
config_flags.DEFINE_config_file('detector_config', None, 'Detector config '
                                '(optional; with --detector_workdir).',
                                lock_config=True)
flags.DEFINE_string('detector_workdir', None, 'Trained detector: time '
                    'detection + keypoints, and the shared backbone pass.')


def _frames():
  """[(uint8 [H, W, 3], category_id, bbox)] of the first --num_frames."""
  ann = json.loads(Path(FLAGS.annotations).read_text())
  box = {a['image_id']: (a['category_id'], a['bbox'])
         for a in ann['annotations']}
  out = []
  for im in ann['images']:
    if im['id'] in box and len(out) < FLAGS.num_frames:
      out.append((image_io.load_rgb_array(Path(FLAGS.images, im['file_name'])),
                  *box[im['id']]))
  return out


def _stage(config, stage, workdir, mesh, info, detector=None):
  with config.unlocked():
    config.model_name = 'end_to_end' if stage == 'end_to_end' else 'supervised'
  model, variables, _ = predictor_lib.restore_variables(config, workdir, mesh)
  batcher = batchers.make_batcher(
      config, predictor_lib.Predictor(config, model, variables, mesh),
      info.category_index(), detector=detector)
  if detector is not None and batcher.features_of is None:
    raise SystemExit(f'{workdir}: its backbone is not the detector\'s '
                     '(see the log); no shared backbone pass to time.')
  return batcher


def _run(batcher, frames, n, detector=None):
  """(Detection and) keypoint stage of every frame's N boxes; seconds."""
  t = time.perf_counter()
  exs = []
  for image, cid, (x, y, w, h) in frames:
    if detector is not None:
      detector.detect(image)
    side = max(w, h)
    exs += [batcher.crop(image, (x + 0.12 * j * side, y, w, h), cid)
            for j in range(n)]
  for i in range(0, len(exs), batcher.batch_size):
    pred = batcher.predict_crops(exs[i:i + batcher.batch_size])
    np.asarray(pred.keypoints_px)
  return time.perf_counter() - t


def main(argv):
  del argv
  xla_flags.set_defaults()
  config = FLAGS.config
  info = dataset.load_info(config.input.dataset_dir)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  frames = _frames()
  stages = {'two_stage': _stage(config, 'two_stage', FLAGS.two_stage_workdir,
                                mesh, info),
            'end_to_end': _stage(config, 'end_to_end',
                                 FLAGS.end_to_end_workdir, mesh, info)}
  detectors = {k: None for k in stages}
  if FLAGS.detector_workdir:
    for k in stages:  # Each variant its own detector (same weights).
      detectors[k] = box_predictor.ImageDetector(
          FLAGS.detector_config, FLAGS.detector_workdir, mesh)
    detectors['end_to_end_shared'] = box_predictor.ImageDetector(
        FLAGS.detector_config, FLAGS.detector_workdir, mesh)
    stages['end_to_end_shared'] = _stage(
        config, 'end_to_end', FLAGS.end_to_end_workdir, mesh, info,
        detectors['end_to_end_shared'])
  figures = dict(jax=jax.__version__, num_frames=len(frames),
                 eval_batch_size=config.evals.batch_size,
                 canvas_hw=list(config.detector.image_size_px),
                 crop_px=config.input.image_size_px, per_n={})
  for n in map(int, FLAGS.boxes_per_image):
    times = {k: [] for k in stages}
    for k, b in stages.items():
      _run(b, frames, n, detectors[k])  # Compile this shape.
    for _ in range(FLAGS.rounds):
      for k, b in stages.items():
        times[k].append(_run(b, frames, n, detectors[k]) / len(frames))
    med = {k: float(np.median(v)) for k, v in times.items()}
    figures['per_n'][n] = dict(
        seconds_per_frame=med, all_seconds_per_frame=times,
        includes_detection=bool(FLAGS.detector_workdir),
        **{f'{k}_over_two_stage': med[k] / med['two_stage']
           for k in med if k != 'two_stage'})
    print(f'N={n}: ' + ', '.join(
        f'{k} {v:.3f} s/frame ({v / med["two_stage"]:.2f}x)'
        for k, v in med.items()), flush=True)
    if 'end_to_end_shared' in stages:
      b = stages['end_to_end_shared']
      print(f'  end_to_end_shared: {b.images_from_detector} images decoded '
            f'from the detector\'s maps, {b.images_encoded} encoded again',
            flush=True)
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(figures, indent=1))


if __name__ == '__main__':
  app.run(main)
