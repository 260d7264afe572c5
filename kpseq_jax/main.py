"""Command line: train, or evaluate a trained workdir.

  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR
  python -m kpseq_jax.main --config configs/dlc_openfield.py --workdir DIR \
      --mode eval

Any config field can be overridden: ``--config.num_train_steps=100``.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from kpseq_jax import evaluate
from kpseq_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/dlc_openfield.py; fields can '
    'be overridden with --config.FIELD=VALUE.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'predictions; training resumes from it.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (resuming) then evaluate; eval: restore the '
                  'latest checkpoint and evaluate.')
flags.mark_flags_as_required(['config', 'workdir'])


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
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    evaluate.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
