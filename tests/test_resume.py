"""Exact resume after SIGKILL and a clean stop on SIGTERM (preemption).

Real `python -m kpseq_jax.main` processes on the smoke config with keypoint
presence, the model of the `trained` fixture (conftest.py), whose train step,
initialisation and decoder are then in the persistent compilation cache:
the processes read them back instead of compiling them (three processes,
about 40 s each on a busy 2-core machine). One uninterrupted run, and one
run that is SIGKILLed after its step-3 checkpoint, then resumed and
SIGTERMed after its step-6 checkpoint. Every step's loss
(``metrics.jsonl``) must match the uninterrupted run bitwise, and the
checkpoint the SIGTERM left must restore.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpseq_jax.training import checkpointing
from kpseq_jax.runtime import scalar_log

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 12
CKPT_EVERY = 3


def _start(dataset_dir, workdir) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'kpseq_jax.main', '--config', 'configs/smoke.py',
         f'--config.input.dataset_dir={dataset_dir}',
         '--config.vocab.presence_token=True',
         f'--config.optim.num_train_steps={NUM_STEPS}',
         f'--config.checkpoint_every_steps={CKPT_EVERY}',
         '--config.log_every_steps=1', '--config.max_checkpoints_to_keep=10',
         # No such split: one final evaluation (test), not three.
         '--config.evals.split=none',
         f'--workdir={workdir}']
  log = open(Path(workdir).with_suffix('.log'), 'ab')
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _finished(proc, timeout=300) -> int:
  return proc.wait(timeout=timeout)


def _signal_after_checkpoint(proc, workdir, step, sig, timeout=300) -> None:
  """Sends ``sig`` once checkpoint ``step`` is complete (renamed in place)."""
  done = Path(workdir) / 'checkpoints' / str(step)
  t0 = time.time()
  while not done.is_dir():
    assert proc.poll() is None, f'run ended (rc {proc.returncode}) early'
    assert time.time() - t0 < timeout, f'no checkpoint {step} in {timeout}s'
    time.sleep(0.05)
  proc.send_signal(sig)


def _steps(workdir):
  return scalar_log.read_steps(str(workdir))


@pytest.fixture(scope='module')
def runs(trained, tmp_path_factory):
  # The `trained` model's compiled functions are in the cache once it is
  # built (its own run, or read back from the worker that built it).
  config, _, _ = trained
  assert config.vocab.presence_token  # The model `_start` asks for.
  dlc_dataset = config.input.dataset_dir
  root = tmp_path_factory.mktemp('resume')
  straight, interrupted = root / 'straight', root / 'interrupted'
  assert _finished(_start(dlc_dataset, straight)) == 0

  first = _start(dlc_dataset, interrupted)
  _signal_after_checkpoint(first, interrupted, 3, signal.SIGKILL)
  killed_rc = _finished(first)
  killed_steps = set(_steps(interrupted))

  second = _start(dlc_dataset, interrupted)
  _signal_after_checkpoint(second, interrupted, 6, signal.SIGTERM)
  term_rc = _finished(second)
  term_steps = set(_steps(interrupted))
  term_latest = checkpointing.Checkpointer(str(interrupted)).latest_step()
  term_files = sorted(os.listdir(interrupted))
  term_ckpts = sorted(os.listdir(interrupted / 'checkpoints'))
  return dict(dataset_dir=dlc_dataset, straight=straight, interrupted=interrupted,
              killed_rc=killed_rc, killed_steps=killed_steps,
              term_rc=term_rc, term_steps=term_steps,
              term_latest=term_latest, term_files=term_files,
              term_ckpts=term_ckpts)


def test_sigkill_then_resume_gives_the_same_loss_at_every_step(runs):
  assert runs['killed_rc'] == -signal.SIGKILL
  assert max(runs['killed_steps']) < NUM_STEPS  # Killed mid-run.
  straight, resumed = _steps(runs['straight']), _steps(runs['interrupted'])
  assert sorted(straight) == list(range(1, NUM_STEPS + 1))
  stopped = max(runs['term_steps'])
  assert sorted(resumed) == list(range(1, stopped + 1))
  for step in resumed:
    for key in ('loss', 'ce', 'l1', 'grad_norm'):
      assert resumed[step][key] == straight[step][key], (step, key)
  # Every line ever written (also the steps the killed run did after its
  # checkpoint, later redone) equals the uninterrupted value.
  with open(runs['interrupted'] / scalar_log.FILE_NAME) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  assert len(lines) >= stopped
  assert all(l['loss'] == straight[l['step']]['loss'] for l in lines)


def test_sigterm_saves_a_complete_checkpoint_and_exits_0(runs):
  assert runs['term_rc'] == 0
  stopped = max(runs['term_steps'])
  assert 6 <= stopped < NUM_STEPS  # Stopped early, after the current step.
  assert runs['term_latest'] == stopped  # Saved the step it stopped at.
  assert str(stopped) in runs['term_ckpts']
  assert not any('tmp' in d for d in runs['term_ckpts'])  # Save completed.
  assert 'eval_test.json' not in runs['term_files']  # No eval when preempted.
  # A restart resumes from it (what `train_and_evaluate` restores).
  from configs import smoke
  from kpseq_jax.runtime import sharding
  from kpseq_jax.training import checkpointing
  from kpseq_jax.training import train_state as ts
  config = smoke.get_config()
  config.input.dataset_dir = str(runs['dataset_dir'])
  config.vocab.presence_token = True
  tx = ts.create_optimizer(config)
  ckpt = checkpointing.Checkpointer(str(runs['interrupted']))
  state, step = ckpt.restore(ts.abstract_train_state(
      config, ts.create_model(config), tx, sharding.create_mesh((-1, 1))))
  ckpt.close()
  assert step == int(state.step) == stopped
