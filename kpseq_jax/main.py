r"""Command line: train, evaluate a trained workdir, predict on images, analyse videos.

  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR
  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR \
      --mode eval [--detector_config configs/dlc_openfield_detector.py \
                   --detector_workdir DETECTOR_DIR]
  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR \
      --mode calibrate
  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR \
      --mode predict --images IMAGES [--boxes BOXES.json] [--category ID] \
      [--detector_config configs/dlc_openfield_detector.py \
       --detector_workdir DETECTOR_DIR] --out OUT
  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR \
      --mode analyze --videos VIDEOS [--boxes track|BOXES.json] \
      [--filter_window 5] --out OUT
  python -m kpseq_jax.main --config configs/sleap_flies.py --workdir DIR \
      --mode analyze --videos VIDEOS --max_animals 2 \
      --detector_config configs/sleap_flies_centroid.py \
      --detector_workdir DETECTOR_DIR --out OUT

A detection config (``model_name='detector'``, Deformable DETR, e.g.
configs/dlc_openfield_detector.py, or ``'centroid'``, CenterNet's centre
heatmaps, e.g. configs/sleap_flies_centroid.py) trains and evaluates (box
AP) the whole-image detector with the same modes; ``--mode predict`` then
takes its boxes with ``--detector_config/--detector_workdir`` (so do ``analyze``,
and ``eval``, which then also scores keypoints from detected boxes).

Installed with ``pip install -e .``, ``kpseq`` is the same command.

Any config field can be overridden: ``--config.optim.num_train_steps=100``.

Several processes (one per host): each runs the same command; JAX is joined
up from ``--coordinator_address/--num_processes/--process_id``, or from the
environment on SLURM and TPU slices (see `distributed.initialize`).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from kpseq_jax.runtime import distributed
from kpseq_jax.evaluation import evaluate
from kpseq_jax.runtime import host_memory
from kpseq_jax.runtime import xla_flags
from kpseq_jax.inference import analyze
from kpseq_jax.inference import box_predictor
from kpseq_jax.inference import predict
from kpseq_jax.runtime import sharding
from kpseq_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/dlc_openfield.py; fields can '
    'be overridden with --config.FIELD=VALUE.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'predictions; training resumes from it.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'eval', 'calibrate', 'predict', 'analyze'],
                  'train: train (resuming), evaluate on the val split, fit '
                  'the likelihood calibration of the checkpoint chosen on '
                  'val, report the test split; eval: evaluate the chosen '
                  'checkpoint on the test split; calibrate: fit its '
                  'likelihood calibration on the val split again (e.g. an '
                  'older workdir); predict: run it on --images, write to '
                  '--out; analyze: run it on every frame of --videos, write '
                  'DeepLabCut-format tables, labelled videos and plots to '
                  '--out.')
flags.DEFINE_string('images', None, 'predict: an image file or a folder '
                    '(searched recursively).')
flags.DEFINE_string('videos', None, 'analyze: a video file (mp4, avi, ...) '
                    'or a folder of them.')
config_flags.DEFINE_config_file(
    'detector_config', None, 'A detection config (model_name=detector or '
    'centroid, e.g. configs/sleap_flies_centroid.py) whose trained '
    '--detector_workdir '
    'finds the boxes. predict, analyze: when --boxes is not given; eval: '
    'also evaluates the keypoints from its boxes next to the ground-truth '
    'boxes (eval_<split>_detected_boxes.json).',
    lock_config=True)
flags.DEFINE_string('detector_workdir', None, 'predict, analyze, eval: the '
                    'trained detector run of --detector_config.')
flags.DEFINE_string('boxes', None, 'predict: COCO detections list or '
                    'annotations file with the boxes; default: each whole '
                    'image is one box. analyze: "track" (around the '
                    'previous batch\'s confident keypoints, else the whole '
                    'frame) or a COCO detections list with image_id = '
                    '0-based frame index; default: the whole frame.')
flags.DEFINE_integer('video_batch_size', None, 'analyze: frames per model '
                     'call; default config.evals.batch_size. With --boxes '
                     'track the box lags by up to one batch.')
flags.DEFINE_integer('filter_window', 0, 'analyze: also write a median-'
                     'filtered table (DeepLabCut\'s filterpredictions) with '
                     'this odd window in frames, and draw from it; 0 = off.')
flags.DEFINE_integer('max_animals', None, 'analyze: several animals per '
                     'frame (SLEAP\'s --tracking.max_tracks, DeepLabCut\'s '
                     'n_tracks): each frame\'s N best boxes of '
                     '--detector_workdir (above its detector.score_threshold, '
                     'without boxes overlapping a better one by more than '
                     'detector.nms_iou) or of a --boxes detections file are '
                     'posed and linked frame to frame into at most '
                     'N identities (track_0, ...); writes per video a SLEAP '
                     '.slp, DeepLabCut\'s multi-animal .h5/.csv and a '
                     'labelled video coloured by identity. Default: one '
                     'animal.', lower_bound=1)
flags.DEFINE_bool('labeled_video', True, 'analyze: write '
                  '<video><scorer>_labeled.mp4.')
flags.DEFINE_integer('category', None, 'predict: category id of whole-image '
                     'boxes, or keep only boxes of this category; default: '
                     'the data set\'s only category.')
flags.DEFINE_string('out', None, 'predict: output folder (predictions.json, '
                    'images.json, captions.txt, overlays/); analyze: output '
                    'folder of the tables, videos and plots.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'jax.distributed.initialize: auto = when the flags below '
                  'are given or the environment is multi-process (SLURM, '
                  'TPU slice, JAX_COORDINATOR_ADDRESS); on = always '
                  '(unset values auto-detected, e.g. on a TPU VM pod).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])
flags.register_multi_flags_validator(
    ['mode', 'images', 'out'],
    lambda f: f['mode'] != 'predict' or (f['images'] and f['out']),
    '--mode predict needs --images and --out.')
flags.register_multi_flags_validator(
    ['detector_config', 'detector_workdir'],
    lambda f: (f['detector_config'] is None) == (f['detector_workdir'] is None),
    '--detector_config and --detector_workdir go together.')
flags.register_multi_flags_validator(
    ['mode', 'videos', 'out'],
    lambda f: f['mode'] != 'analyze' or (f['videos'] and f['out']),
    '--mode analyze needs --videos and --out.')


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO/DEBUG records of Orbax and TFDS (dozens per checkpoint)."""

  _NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/')

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or not any(
        n in record.pathname for n in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before JAX starts its threads and reads XLA_FLAGS (see host_memory.py,
  # xla_flags.py).
  logging.info('Host memory: %s', host_memory.keep_freed_memory())
  logging.info('XLA_FLAGS: %s', xla_flags.set_defaults())
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    evaluate.evaluate(FLAGS.config, FLAGS.workdir,
                      _detector() if FLAGS.detector_workdir else None)
  elif FLAGS.mode == 'calibrate':
    evaluate.calibrate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'analyze':
    analyze.analyze(FLAGS.config, FLAGS.workdir, FLAGS.videos, FLAGS.out,
                    FLAGS.boxes, FLAGS.category, FLAGS.video_batch_size,
                    FLAGS.filter_window, FLAGS.labeled_video,
                    _detector() if FLAGS.detector_workdir and not FLAGS.boxes
                    else None, FLAGS.max_animals)
  else:
    detector = (_detector() if FLAGS.detector_workdir and not FLAGS.boxes
                else None)
    predict.predict(FLAGS.config, FLAGS.workdir, FLAGS.images, FLAGS.out,
                    FLAGS.boxes, FLAGS.category, detector)


def _detector() -> box_predictor.ImageDetector:
  """The trained detector of --detector_config/--detector_workdir."""
  return box_predictor.ImageDetector(
      FLAGS.detector_config, FLAGS.detector_workdir,
      sharding.create_mesh(FLAGS.detector_config.sharding.mesh_shape))


def run():
  """Console entry point ``kpseq`` (see pyproject.toml)."""
  app.run(main)


if __name__ == '__main__':
  run()
