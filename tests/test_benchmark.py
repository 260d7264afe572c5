"""The benchmark runs in a tiny mode and reports positive figures."""

import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FROZEN_BACKBONE

REPO = Path(__file__).resolve().parents[1]


def _positive(x):
  return isinstance(x, numbers.Real) and x > 0


def test_benchmark_tiny_mode_json(tmp_path):
  """The smoke model with the paper's backbone setting: its f32 train step
  is test_frozen_backbone.py's, compiled once per run (conftest.py)."""
  out_file = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'kpseq_jax.benchmark',
         f'--json_out={out_file}',
         '--config', 'configs/smoke.py', '--skip_paper', '--num_steps=1',
         *(f'--config.{k}={v}' for k, v in FROZEN_BACKBONE.items()),
         '--variants=f32,xla_conv', '--decode_ks=2', '--decode_batch=1',
         '--decode_reps=1', '--nodecode_cape', '--matmul_size=128',
         '--matmul_reps=2', '--pipeline_examples=8']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       timeout=900, check=True).stdout
  report = json.loads(out)
  assert json.loads(out_file.read_text()) == report
  assert _positive(report['matmul_peak']['flops_per_s'])
  step = report['train_step']['config']['f32']
  for key in ('seconds_per_step', 'flops_per_step', 'mfu'):
    assert _positive(step[key]), (key, step)
  assert _positive(step['memory']['peak_bytes'])
  # MFU counts the same model FLOPs for the matmul conv (CPU default, which
  # XLA counts with its zero-padding taps) as for lax.conv.
  xla_conv = report['train_step']['config']['xla_conv']
  assert step['flops_per_step'] == xla_conv['flops_per_step']
  assert step['compiled_flops_per_step'] >= step['flops_per_step']
  assert step['mfu'] == pytest.approx(
      step['flops_per_step'] / step['seconds_per_step']
      / report['matmul_peak']['flops_per_s'])
  assert _positive(report['train_step']['config']['gemm_conv_speedup'])
  assert report['host_memory'].startswith(('glibc:', 'skipped:'))
  assert _positive(report['peak_rss_bytes'])  # Whole process, bytes.
  assert 'paper' not in report['train_step']
  # --decode_batch=1: batch 1 is timed once and named for both figures.
  # (The CAPE decoders, skipped here to save two compilations, go through
  # the same `decoding_figures`; tests/test_cape.py checks them.)
  assert 'decoding_cape' not in report
  k2 = report['decoding']['K2']
  for key in ('speedup_batch1', 'cached_seconds_per_image_batch1',
              'cached_images_per_s_batch1', 'reference_images_per_s_batch1'):
    assert _positive(k2[key]), (key, k2)
  assert k2['cached_images_per_s_batch1'] == pytest.approx(
      1 / k2['cached_seconds_per_image_batch1'])
  pipe = report['pipeline']['config']
  assert 'skipped' in pipe or _positive(pipe['ratio_to_train_step'])


def test_a_late_failure_keeps_the_figures_measured_before_it(tmp_path):
  """The train-step section fails (unknown variant) after the matmul peak
  was measured: --json_out holds the peak and the error, and the run fails."""
  out_file = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'kpseq_jax.benchmark',
         f'--json_out={out_file}',
         '--config', 'configs/smoke.py', '--skip_paper', '--variants=bogus',
         '--matmul_size=64', '--matmul_reps=1']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  report = json.loads(out_file.read_text())
  assert _positive(report['matmul_peak']['flops_per_s'])
  assert report['error'] == "ValueError: unknown variant 'bogus'"
  assert 'host_memory' in report
