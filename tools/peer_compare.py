"""Side-by-side speed and memory against the official PyTorch Raster2Seq.

Runs, in one go and alternating: the reference benchmark
(``../shared/tools/peer_bench/bench_peer.py``, the official model in its own
virtual environment), this project's benchmark on the paper config with the
same number of decoder positions, and the reference again; then prints the
ratios against the mean of the two reference figures (this machine's speed
drifts by 30% between days, so only ratios from one run are comparable).

  python tools/peer_compare.py --peer_python /work/peer_venv/bin/python \\
      --peer_src /work/raster2seq_src --out /tmp/peer_compare.json

What is compared (the reference's settings: ResNet-50 C5 only, frozen
BatchNorm/stem/layer1, 6-layer deformable decoder, 512 px, batch 2,
2 threads, K = 17 keypoints = 69 decoder positions):

* train step: median seconds per step (ours: ``train_step.config.f32``);
* greedy prediction: seconds per image at batch 1 with the KV cache (ours:
  ``decoding.K17.cached_seconds_per_image_batch1``; ours also reports
  images/s at ``--decode_batch``);
* peak RSS of the process after the train steps (the reference's
  ``peak_rss_mb_after_train``; ours ``process_peak_rss_bytes`` of the step)
  and after the whole run (both processes build one model, train it and
  decode with it; ours also compiles and runs the full-recompute decoder
  that the benchmark times next to the cached one, at batch 1 and
  ``--decode_batch``).

Not part of the package: PyTorch is never a dependency of the project.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_BENCH = os.path.join(REPO, '..', 'shared', 'tools', 'peer_bench',
                          'bench_peer.py')


def run_peer(args) -> dict:
  """One reference run; returns its JSON line as a dict."""
  cmd = [args.peer_python, args.peer_bench, '--src', args.peer_src,
         '--size', '512', '--enc-layers', '0', '--num-feature-levels', '1',
         '--keypoints', str(args.keypoints), '--threads', str(args.threads)]
  print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
  out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_ours(args, json_out: str) -> dict:
  """One run of ``kpseq_jax.benchmark`` on the paper config (one model)."""
  cmd = [sys.executable, '-m', 'kpseq_jax.benchmark',
         '--config', os.path.join(REPO, 'configs', 'default.py'),
         f'--config.max_num_keypoints={args.keypoints}',
         '--skip_paper', '--variants=f32', f'--num_steps={args.num_steps}',
         f'--decode_ks={args.keypoints}',
         f'--decode_batch={args.decode_batch}', '--nodecode_cape',
         '--pipeline_examples=0', '--json_out', json_out]
  print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  with open(json_out) as f:
    return json.load(f)


def ratios(peers: list[dict], ours: dict, keypoints: int,
           decode_batch: int) -> dict:
  """Our figures over the mean of the reference runs' (lower is better)."""
  step = ours['train_step']['config']['f32']['seconds_per_step']
  dec = ours['decoding'][f'K{keypoints}']
  ref_step = statistics.mean(p['train_step_s_median'] for p in peers)
  ref_infer = statistics.mean(p['infer_s_per_image_median'] for p in peers)
  f32 = ours['train_step']['config']['f32']
  ref_train_rss = statistics.mean(p['peak_rss_mb_after_train'] for p in peers)
  ref_rss = statistics.mean(p['peak_rss_mb'] for p in peers)
  ours_train_rss = f32['process_peak_rss_bytes'] / 2**20
  ours_rss = ours['peak_rss_bytes'] / 2**20
  ours_infer = dec['cached_seconds_per_image_batch1']
  return dict(
      train_step_s=dict(reference=[p['train_step_s_median'] for p in peers],
                        ours=step, ratio=step / ref_step),
      greedy_s_per_image_batch1=dict(
          reference=[p['infer_s_per_image_median'] for p in peers],
          ours=ours_infer, ratio=ours_infer / ref_infer),
      peak_rss_mb_training=dict(
          reference=[p['peak_rss_mb_after_train'] for p in peers],
          ours=ours_train_rss, ratio=ours_train_rss / ref_train_rss),
      peak_rss_mb_whole_run=dict(
          reference=[p['peak_rss_mb'] for p in peers], ours=ours_rss,
          ratio=ours_rss / ref_rss),
      ours_images_per_s=dec[f'cached_images_per_s_batch{decode_batch}'],
      ours_xla_peak_mb=f32['memory']['peak_bytes'] / 2**20)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--peer_python', required=True,
                 help='python of the virtual environment with PyTorch')
  p.add_argument('--peer_src', required=True,
                 help='the extracted official source (peer_bench README)')
  p.add_argument('--peer_bench', default=PEER_BENCH)
  p.add_argument('--keypoints', type=int, default=17)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--num_steps', type=int, default=5)
  p.add_argument('--decode_batch', type=int, default=8)
  p.add_argument('--out', default='peer_compare.json')
  args = p.parse_args()
  t0 = time.time()
  ours_json = args.out + '.ours.json'
  peers = [run_peer(args)]
  ours = run_ours(args, ours_json)
  peers.append(run_peer(args))
  result = dict(command=' '.join(sys.argv), date=time.strftime('%Y-%m-%d'),
                load_average_at_end=list(os.getloadavg()),
                wall_s=time.time() - t0, peers=peers, ours=ours,
                ratios=ratios(peers, ours, args.keypoints, args.decode_batch))
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  r = result['ratios']
  for name in ('train_step_s', 'greedy_s_per_image_batch1',
               'peak_rss_mb_training', 'peak_rss_mb_whole_run'):
    ref = ', '.join(f'{v:.3f}' for v in r[name]['reference'])
    print(f'{name}: reference {ref}; ours {r[name]["ours"]:.3f}; '
          f'ratio {r[name]["ratio"]:.3f}')
  print(f'ours images/s at batch {args.decode_batch}: '
        f'{r["ours_images_per_s"]:.2f}')


if __name__ == '__main__':
  main()
