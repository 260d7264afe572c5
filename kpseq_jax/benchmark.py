"""Speed benchmark: how close the train step, decoding and input get to the limit.

  python -m kpseq_jax.benchmark --config configs/dlc_openfield.py
  python -m kpseq_jax.benchmark --config configs/smoke.py --skip_paper \
      --num_steps=2 --decode_ks=2 --decode_batch=2 --matmul_size=256
  # The paper config's ViT-B/16 step next to its ResNet-50 step:
  python -m kpseq_jax.benchmark --config configs/dlc_openfield.py \
      --variants=f32 --paper_backbones=resnet,mae --paper_variants=f32,bf16 \
      --skip_decode --pipeline_examples=0

Prints one JSON object, everything measured in the same run:

* ``matmul_peak``: float32 [n, n] @ [n, n] FLOP/s (median of ``--matmul_reps``
  timed calls); the machine's practical peak that MFU is measured against.
* ``train_step``: per config ('paper' = configs/default.py, 'paper_mae' /
  'paper_dinov2' = its ViT variants ``configs/default.py:supervised,mae``
  (ViT-B/16, 512 px) / ``...,dinov2`` (ViT-S/14, 504 px), chosen by
  ``--paper_backbones``; 'config' = the ``--config``) and variant ('f32' =
  the config as it is, 'remat' = the backbone's (``model.resnet`` or
  ``model.vit``) and ``model.transformer``'s ``remat``, 'bf16' =
  ``model.dtype='bfloat16'``, 'xla_conv' = the backbone's
  ``conv_impl='xla'`` (the ViT's pyramid and the input projections),
  plain ``lax.conv`` gradients instead of the CPU default 'gemm', see
  kpseq_jax/models/conv.py; 'trainable_backbone' (ResNet only) =
  ``model.resnet.norm='batch'``, ``model.resnet.frozen_stages=-1``: the
  whole ResNet trained with batch statistics, where the paper config, as
  Raster2Seq, freezes BatchNorm, the stem and layer1): median seconds
  per step over ``--num_steps`` (after one untimed step), FLOPs per step from
  XLA's cost analysis of the compiled step (with ``lax.conv`` convolutions,
  see `model_flops`), MFU = FLOPs / seconds / peak,
  and XLA's memory analysis of the compiled step in bytes (``peak_bytes`` =
  arguments + outputs - donated aliases + temporaries).
* ``decoding`` (and ``decoding_cape``: the same model support-conditioned,
  decoding 1-shot episodes; ``--nodecode_cape`` skips it): per K in
  ``--decode_ks`` (sequence of 4 K + 1 tokens; <eos>
  suppressed through the classifier bias so every image decodes all K
  groups), the whole decode function (encoder + loop) for the cached
  decoder and the full-recompute reference: seconds per image at batch 1,
  images/s at ``--decode_batch``, and the cached/reference speed-ups.
* ``pipeline``: Grain training pipeline (augmentation on, ``worker_count``
  of the config) examples/s on the config's data set, and its ratio to what
  the train step consumes (batch_size / seconds per step); skipped with a
  message when the data set is missing.

With ``--json_out FILE`` the report so far is also written to FILE
(atomically) after each section, and, if a later section fails, with
``error`` naming the failure: nothing already measured is lost.

Inputs for the train step and decoding are synthetic (random images, random
keypoint sequences); parameters are a random initialisation.
"""

import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from configs import default as default_config
from kpseq_jax.models import conv as conv_lib
from kpseq_jax.inference import decoding
from kpseq_jax.runtime import host_memory
from kpseq_jax.runtime import xla_flags
from kpseq_jax.data import dataset
from kpseq_jax.data import pipeline
from kpseq_jax.sequence import grammar
from kpseq_jax.runtime import sharding
from kpseq_jax.training import step as step_lib
from kpseq_jax.training import train_state as ts
from kpseq_jax.sequence import vocab as vocab_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'The CPU-sized config, e.g. configs/dlc_openfield.py.',
    lock_config=True)
flags.DEFINE_bool('skip_paper', False,
                  'Skip the paper config (configs/default.py) train step and '
                  'its 512 px pipeline figure (slow on CPU).')
flags.DEFINE_list('variants', ['f32', 'remat', 'bf16', 'xla_conv'],
                  'Train-step variants of the --config: f32, remat, bf16, '
                  'xla_conv, trainable_backbone (see the module docstring).')
flags.DEFINE_list('paper_variants',
                  ['f32', 'remat', 'bf16', 'xla_conv', 'trainable_backbone'],
                  'Train-step variants of the paper config(s) '
                  '(trainable_backbone is skipped for a ViT).')
flags.DEFINE_list('paper_backbones', ['resnet'],
                  'Paper configs to time: resnet (configs/default.py, '
                  'reported as "paper"), mae (its ViT-B/16 variant, '
                  '"paper_mae"), dinov2 (ViT-S/14, "paper_dinov2").')
flags.DEFINE_integer('num_steps', 5, 'Timed train steps per variant.')
flags.DEFINE_integer('matmul_size', 2048, 'n of the n x n float32 matmul.')
flags.DEFINE_integer('matmul_reps', 10, 'Timed matmuls.')
flags.DEFINE_enum('decode_model', 'config', ['config', 'paper'],
                  'Model for the decoding figures: the --config one or the '
                  'paper one (ResNet-50 512 px, 6 layers; slow on CPU).')
flags.DEFINE_list('decode_ks', ['17', '68'], 'Keypoint counts K to decode.')
flags.DEFINE_integer('decode_batch', 8, 'Batch of the images/s figure.')
flags.DEFINE_integer('decode_reps', 3, 'Timed calls of the cached decoder '
                     '(the reference is timed once: it is slow).')
flags.DEFINE_bool('skip_decode', False, 'Skip the decoding figures.')
flags.DEFINE_bool('decode_cape', True, 'Also time the support-conditioned '
                  '(CAPE, 1-shot) decoder of the same model ("decoding_cape").')
flags.DEFINE_string('json_out', None, 'Also write the report to this JSON file '
                    'after every section (a late failure keeps the figures '
                    'measured before it, with "error").')
flags.DEFINE_integer('pipeline_examples', 2048, 'Pipeline examples to time (0 skips) '
                     '(rounded up to whole batches).')


def _time_calls(fn: Callable[[], Any], reps: int) -> float:
  """Median wall seconds of ``fn()`` (blocked until ready) over ``reps``."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(n: int, reps: int) -> dict:
  """Float32 FLOP/s of an [n, n] @ [n, n] matmul (2 n^3 FLOPs per call)."""
  a = jax.random.normal(jax.random.PRNGKey(0), [n, n], jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), [n, n], jnp.float32)
  f = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(f(a, b))
  seconds = _time_calls(lambda: f(a, b), reps)
  return dict(n=n, seconds=seconds, flops_per_s=2 * n**3 / seconds)


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Random crops and tokenised random keypoints (all labelled, K = Kmax).

  Returns:
    dict of numpy arrays with the fields of `supervised.TRAIN_FIELDS`: image
    uint8 [B, S, S, 3] and the `grammar.build_sequence` fields [B, L, ...].
  """
  rng = np.random.default_rng(seed)
  kmax, s = config.max_num_keypoints, config.input.image_size_px
  vocab = vocab_lib.from_config(config)
  if vocab.num_prefix_tokens:
    raise ValueError('the benchmark has no category tokens: pass '
                     '--config.vocab.category_conditioning=False')
  seqs = []
  for _ in range(batch_size):
    kps = np.concatenate([rng.uniform(0.05, 0.95, [kmax, 2]),
                          np.ones([kmax, 1])], -1).astype(np.float32)
    seqs.append(grammar.build_sequence(kps, kmax, vocab, kmax))
  batch = {k: np.stack([q[k] for q in seqs]) for k in seqs[0]}
  batch['image'] = rng.integers(0, 256, [batch_size, s, s, 3], np.uint8)
  return batch


def _backbone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields of ``config``'s backbone: ``model.resnet`` or ``model.vit``."""
  return config.model[config.model.encoder]


def _variant(config: ml_collections.ConfigDict,
             name: str) -> ml_collections.ConfigDict:
  """``config`` with the named variant's fields set.

  Raises:
    ValueError: an unknown variant, or 'trainable_backbone' with a ViT
      (nothing of it is frozen).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  if name == 'remat':
    _backbone(c).remat = c.model.transformer.remat = True
  elif name == 'bf16':
    c.model.dtype = 'bfloat16'
  elif name == 'xla_conv':
    _backbone(c).conv_impl = 'xla'
  elif name == 'trainable_backbone':
    if c.model.encoder != 'resnet':
      raise ValueError('variant trainable_backbone is for the ResNet; the '
                       'ViT trains whole already')
    c.model.resnet.norm = 'batch'
    c.model.resnet.frozen_stages = -1
  elif name != 'f32':
    raise ValueError(f'unknown variant {name!r}')
  return c


def paper_configs(backbones: list[str], dataset_dir: str
                  ) -> dict[str, ml_collections.ConfigDict]:
  """The paper configs to time, by report name: 'paper' for 'resnet'
  (configs/default.py), 'paper_<b>' for a ViT backbone b
  (``configs/default.py:supervised,<b>``, `default.VIT_BACKBONES`); the
  pipeline reads ``dataset_dir`` at their crop size.

  Raises:
    ValueError: an unknown backbone (`default.parse_arg`).
  """
  out = {}
  for b in backbones:
    c = default_config.get_config(f'supervised,{b}')
    c.input.dataset_dir = dataset_dir
    out['paper' if b == 'resnet' else f'paper_{b}'] = c
  return out


def _cost(compiled) -> float:
  """FLOPs of a compiled computation from XLA's cost analysis."""
  return float(compiled.cost_analysis().get('flops', float('nan')))


def _memory(compiled) -> dict:
  """XLA memory analysis of a compiled computation, bytes."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument_bytes=m.argument_size_in_bytes,
             output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes,
             temp_bytes=m.temp_size_in_bytes)
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes']
                       - out['alias_bytes'] + out['temp_bytes'])
  return out


def _compile_step(config: ml_collections.ConfigDict):
  """The train step (`step.make_train_step`) for ``config``, compiled.

  Returns:
    (compiled step, seconds to compile, train state, global batch).
  """
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  state = ts.create_train_state(config, model, tx, mesh)
  local = synthetic_batch(config, config.input.batch_size)
  batch = sharding.global_batch(
      {k: local[k] for k in step_lib.train_fields(model)}, mesh)
  step = step_lib.make_train_step(
      config, model, tx, ts.learning_rate_schedule(config),
      jax.tree.map(lambda a: a.sharding, state), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0, state, batch


def model_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs per train step of ``config`` with ``lax.conv`` convolutions.

  XLA counts a convolution's taps into its zero padding out, but counts the
  im2col matmul of the backbone's ``conv_impl='gemm'`` in full (0.5% more at the
  paper config, 10% at 64 px). MFU divides this count, the same for every
  conv implementation, so a faster implementation cannot gain by counting
  more.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  _backbone(c).conv_impl = 'xla'
  key = c.to_json_best_effort(sort_keys=True)
  if key not in _MODEL_FLOPS:  # The xla_conv variant compiles the same step.
    _MODEL_FLOPS[key] = _cost(_compile_step(c)[0])
  return _MODEL_FLOPS[key]


_MODEL_FLOPS: dict[str, float] = {}  # Config JSON -> `model_flops`.


def train_step_figures(config: ml_collections.ConfigDict, num_steps: int,
                       peak_flops: float) -> dict:
  """Compiles the train step for ``config`` and times it.

  Returns:
    dict: seconds_per_step (median), flops_per_step (`model_flops`),
    compiled_flops_per_step (XLA's count for this variant), mfu =
    flops_per_step / seconds_per_step / peak_flops, compile_seconds, memory
    (see `_memory`), batch_size, examples_per_s, process_peak_rss_bytes
    (the process's peak resident memory after these steps: everything run
    before them counts too).
  """
  compiled, compile_seconds, state, batch = _compile_step(config)
  host_memory.release_free_memory()  # As train.py does before its steps.
  compiled_flops = _cost(compiled)
  state, metrics = compiled(state, batch)  # Untimed first step.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(num_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'benchmark step loss {metrics["loss"]}')
  memory = _memory(compiled)
  rss = peak_rss_bytes()
  del compiled, state, batch, metrics
  if conv_lib.resolve_impl(_backbone(config).conv_impl) == 'xla':
    flops = _MODEL_FLOPS.setdefault(
        ml_collections.ConfigDict(config.to_dict()).to_json_best_effort(
            sort_keys=True), compiled_flops)
  else:
    flops = model_flops(config)
  return dict(seconds_per_step=seconds, flops_per_step=flops,
              compiled_flops_per_step=compiled_flops,
              mfu=flops / seconds / peak_flops,
              compile_seconds=compile_seconds, memory=memory,
              batch_size=config.input.batch_size,
              examples_per_s=config.input.batch_size / seconds,
              process_peak_rss_bytes=rss)


def _decoding_problem(config: ml_collections.ConfigDict, kmax: int,
                      batch_size: int, setting: str):
  """(model, variables with <eos> suppressed, random numpy inputs of
  ``batch_size`` crops, and 1-shot supports for 'cape') for
  `decoding_figures`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.max_num_keypoints = kmax
  c.model_name = setting
  c.cape.num_shots = 1
  if setting == 'cape':  # The CAPE model's own field (configs/default.py).
    c.model.proposals = default_config.model_config('cape').proposals
  model = ts.create_model(c)
  rng = np.random.default_rng(1)
  s = c.input.image_size_px
  inputs = dict(image=synthetic_batch(c, batch_size)['image'])
  if setting == 'cape':
    inputs.update(
        support_image=rng.integers(0, 256, [batch_size, 1, s, s, 3],
                                   np.uint8),
        support_keypoints=rng.uniform(0.05, 0.95, [batch_size, 1, kmax, 2]
                                      ).astype(np.float32),
        support_visible=np.ones([batch_size, 1, kmax], np.float32))
  variables = jax.jit(lambda r: model.init(r, **ts.dummy_inputs(c),
                                           train=False))(jax.random.PRNGKey(0))
  # Suppress <eos> so that every image decodes all K groups.
  head = dict(variables['params']['class_head'])
  head['bias'] = head['bias'].at[model.vocab.eos].add(-1e4)
  variables = dict(variables,
                   params=dict(variables['params'], class_head=head))
  return model, variables, inputs


def decoding_figures(config: ml_collections.ConfigDict, ks: list[int],
                     batch_size: int, reps: int,
                     setting: str = 'supervised') -> dict:
  """Cached vs full-recompute greedy decoding of ``config``'s model.

  With ``setting='cape'`` the model is support-conditioned and decodes 1-shot
  episodes (random support crops and keypoints, K from the support): the
  support prefix is part of every reference step and written to the cache
  once by the cached decoder.

  Returns:
    dict per K: cached/reference seconds per image at batch 1, images/s at
    ``batch_size``, and the speed-ups (reference time / cached time).
  """
  model, variables, inputs = _decoding_problem(config, max(ks), batch_size,
                                               setting)
  out = {}
  for k in ks:
    fig = dict(num_tokens=grammar.seq_len(k))
    for b in sorted({1, batch_size}):  # Batch 1 once if batch_size is 1.
      ims = {f: jnp.asarray(v[:b]) for f, v in inputs.items()}
      if setting == 'cape':
        ims['num_keypoints'] = jnp.full([b], k, jnp.int32)
      for name, fn in (('cached', decoding.cached_greedy_decode),
                       ('reference', decoding.greedy_decode)):
        compiled = jax.jit(
            lambda v, im, fn=fn, k=k: fn(model, v, im, k)).lower(
                variables, ims).compile()
        result = jax.block_until_ready(compiled(variables, ims))
        if int(np.min(result['num_keypoints'])) != k:
          raise AssertionError(f'decoding stopped early: '
                               f'{result["num_keypoints"]} != {k}')
        seconds = _time_calls(lambda: compiled(variables, ims),
                              reps if name == 'cached' else 1)
        if b == 1:
          fig[f'{name}_seconds_per_image_batch1'] = seconds
        fig[f'{name}_images_per_s_batch{b}'] = b / seconds
    fig['speedup_batch1'] = (fig['reference_seconds_per_image_batch1'] /
                             fig['cached_seconds_per_image_batch1'])
    fig[f'speedup_batch{batch_size}'] = (
        fig[f'cached_images_per_s_batch{batch_size}'] /
        fig[f'reference_images_per_s_batch{batch_size}'])
    out[f'K{k}'] = fig
  return out


def pipeline_figures(config: ml_collections.ConfigDict, num_examples: int,
                     step_examples_per_s: float | None) -> dict:
  """Examples/s of the Grain training pipeline (augmentation on).

  Timed from creating the iterator to the last of ``num_examples`` examples,
  so start-up and work left in Grain's prefetch buffer count against it: a
  lower bound of the steady rate.

  Returns:
    dict: examples_per_s, image_size_px, batch_size, and
    ratio_to_train_step (pipeline examples/s / step examples/s) when
    ``step_examples_per_s`` is given; or {'skipped': reason}.
  """
  if num_examples <= 0:
    return dict(skipped='--pipeline_examples=0')
  if not os.path.isdir(config.input.dataset_dir):
    return dict(skipped=f'no data set at {config.input.dataset_dir!r}; build '
                'it with `python -m data_prep.build` (see README).')
  info = dataset.load_info(config.input.dataset_dir)
  num_batches = -(-num_examples // config.input.batch_size)
  t0 = time.perf_counter()
  it = iter(pipeline.create_train_dataset(config, info))
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - t0
  eps = num_batches * config.input.batch_size / seconds
  out = dict(examples_per_s=eps, image_size_px=config.input.image_size_px,
             batch_size=config.input.batch_size,
             worker_count=config.input.worker_count)
  if step_examples_per_s:
    out['ratio_to_train_step'] = eps / step_examples_per_s
  return out


def _describe(config: ml_collections.ConfigDict) -> dict:
  if config.model.encoder == 'vit':
    v = config.model.vit
    backbone = dict(backbone='vit', vit_variant=v.variant,
                    vit_patch_size=v.patch_size, vit_depth=v.depth,
                    vit_width=v.width)  # 0: the variant's.
  else:
    backbone = dict(backbone_depth=config.model.resnet.depth,
                    backbone_norm=config.model.resnet.norm,
                    backbone_frozen_stages=config.model.resnet.frozen_stages)
  return dict(**backbone,
              image_size_px=config.input.image_size_px,
              feature_levels=list(config.model.feature_levels),
              num_layers=config.model.transformer.num_layers,
              d_model=config.model.d_model,
              batch_size=config.input.batch_size,
              max_num_keypoints=config.max_num_keypoints)


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far, in bytes (Linux
  ``ru_maxrss`` is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_report(report: dict, path: str) -> None:
  """Writes ``report`` as JSON to ``path`` atomically (a temporary file in
  the same folder, then ``os.replace``), so a reader never sees half a
  file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def _decoding_sections(report: dict, dc: ml_collections.ConfigDict,
                       on_section: Callable[[dict], None]) -> None:
  """``report['decoding']`` (and ``'decoding_cape'`` with --decode_cape)
  of the config ``dc``."""
  ks = [int(k) for k in FLAGS.decode_ks]
  report['decoding'] = dict(
      model=FLAGS.decode_model, model_config=_describe(dc),
      includes='encoder + greedy loop; <eos> suppressed (all K groups)',
      **decoding_figures(dc, ks, FLAGS.decode_batch, FLAGS.decode_reps))
  on_section(report)
  if FLAGS.decode_cape:
    report['decoding_cape'] = dict(
        model=FLAGS.decode_model, model_config=_describe(dc),
        includes='encoder of query and 1 support crop + support prefix + '
        'greedy loop; K groups forced by the support',
        **decoding_figures(dc, ks, FLAGS.decode_batch, FLAGS.decode_reps,
                           'cape'))


def run(config: ml_collections.ConfigDict,
        on_section: Callable[[dict], None] = lambda report: None) -> dict:
  """All figures for ``config`` (and the paper config unless skipped).

  ``on_section(report)`` is called with the report so far after each
  section (matmul peak, each config's train steps, pipeline, decoding).
  Every section also updates ``peak_rss_bytes``, the process's peak resident
  memory so far (``getrusage``; everything the process ran, so run one
  model per process when comparing memory with another system).
  """
  on_section_ = on_section

  def on_section(report):
    report['peak_rss_bytes'] = peak_rss_bytes()
    on_section_(report)

  report: dict[str, Any] = dict(
      jax_version=jax.__version__, backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
      load_average_at_start=list(os.getloadavg()))
  peak = matmul_peak(FLAGS.matmul_size, FLAGS.matmul_reps)
  report['matmul_peak'] = peak
  on_section(report)
  configs = {'config': config}
  if not FLAGS.skip_paper:  # The pipeline reads the --config's data set.
    configs.update(paper_configs(FLAGS.paper_backbones,
                                 config.input.dataset_dir))
  report['configs'] = {n: _describe(c) for n, c in configs.items()}
  steps, pipes = {}, {}
  report['train_step'] = steps
  report['pipeline'] = pipes
  for name, c in configs.items():
    variants = FLAGS.variants if name == 'config' else [
        v for v in FLAGS.paper_variants
        if not (v == 'trainable_backbone' and c.model.encoder == 'vit')]
    steps[name] = {v: None for v in variants}  # Report in the asked order.
    # xla_conv first: its compiled step's FLOPs are every variant's
    # `model_flops`, which then needs no compilation of its own.
    for v in sorted(variants, key=lambda v: v != 'xla_conv'):
      steps[name][v] = train_step_figures(_variant(c, v), FLAGS.num_steps,
                                          peak['flops_per_s'])
      on_section(report)
    base = steps[name].get('f32') or next(iter(steps[name].values()), None)
    pipes[name] = pipeline_figures(
        c, FLAGS.pipeline_examples, base and base['examples_per_s'])
    on_section(report)
  for figures in steps.values():  # Speed-up of the conv implementation.
    if 'f32' in figures and 'xla_conv' in figures:
      figures['gemm_conv_speedup'] = (figures['xla_conv']['seconds_per_step'] /
                                      figures['f32']['seconds_per_step'])
  on_section(report)
  if not FLAGS.skip_decode:
    dc = config
    if FLAGS.decode_model == 'paper':
      dc = (configs['paper'] if 'paper' in configs
            else default_config.get_config())
    _decoding_sections(report, dc, on_section)
  report['load_average_at_end'] = list(os.getloadavg())
  report['peak_rss_bytes'] = peak_rss_bytes()
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required.')
  memory_setting = host_memory.keep_freed_memory()  # Before JAX threads.
  flags_setting = xla_flags.set_defaults()  # Before JAX reads XLA_FLAGS.
  partial = {'host_memory': memory_setting, 'xla_flags': flags_setting}

  def on_section(report):
    partial.update(report)
    if FLAGS.json_out:
      write_report(partial, FLAGS.json_out)

  try:
    report = run(FLAGS.config, on_section)
  except BaseException as e:  # Keep what was measured, then fail.
    if FLAGS.json_out:
      partial['error'] = f'{type(e).__name__}: {e}'
      write_report(partial, FLAGS.json_out)
      logging.error('benchmark failed; figures so far are in %s',
                    FLAGS.json_out)
    raise
  report['host_memory'] = memory_setting
  report['xla_flags'] = flags_setting
  if FLAGS.json_out:
    write_report(report, FLAGS.json_out)
  json.dump(report, sys.stdout, indent=1)
  sys.stdout.write('\n')


if __name__ == '__main__':
  app.run(main)
