"""Side by side: our pose tracker against norfair's, on perturbed real tracks.

The labelled fly tracks of a SLEAP file (clip.slp: 2 flies, 1,500 frames,
13 nodes) made harder: identities removed, instance order shuffled in each
frame, Gaussian noise on every keypoint (sigma pixels), instances dropped
at random (probability p). Each tracker links the perturbed poses; the
result is scored against the labelled identities with
`kpseq_jax.evaluation.identity` (pairing by head/thorax within 50 px;
predicted tracks mapped to labelled identities one-to-one by most paired
instances, as IDF1 does).

  python tools/tracker_compare.py \\
      --labels ../shared/data/sleap_flies/clip.slp --out /tmp/tracking.json

With ``--detections clip.predictions.slp``, the trackers instead re-track
SLEAP's own predicted poses (head, thorax; real detection errors, misses
and contacts) with SLEAP's identities removed and the order shuffled, and
the table puts SLEAP's own tracks beside them, scored the same way on all
frames and on ``--frames``.

Trackers:
  ours_max2: `kpseq_jax.inference.tracking`, max_animals=2;
  ours: the same without max_animals (new track when the gate fails);
  norfair: norfair.Tracker (Kalman filter per keypoint, greedy matching)
    with the same scale-free pose distance and gate (norfair is not a
    dependency of the project: install it apart, e.g.
    ``pip install --no-deps --target DIR norfair filterpy`` and set
    PYTHONPATH=DIR; norfair 2.3 declares numpy<2 but runs here).
"""
import argparse
import json
import sys
import time

import numpy as np

from kpseq_jax.evaluation import identity
from kpseq_jax.inference import tracking

# name: (noise sigma px, drop probability per instance, frame step,
# occlusion: probability per instance and frame that a run of 5-30 missing
# frames starts).
CONDITIONS = {
    'clean': (0.0, 0.0, 1, 0.0),
    'mild': (2.0, 0.02, 1, 0.0),
    'medium': (5.0, 0.1, 1, 0.0),
    'hard': (10.0, 0.2, 1, 0.0),
    'occlusions': (5.0, 0.05, 1, 0.01),
    '5 fps': (5.0, 0.1, 5, 0.0),
    '5 fps, hard, occlusions': (10.0, 0.2, 5, 0.01),
    '2 fps, 20 px, occlusions': (20.0, 0.2, 12, 0.01),
}


def perturb(labels: identity.Tracks, sigma: float, drop: float, step: int,
            occlusion: float, seed: int):
  """Every ``step``-th frame: (frame rows, per row float32 [N_t, K, 2]
  poses: shuffled, noisy, some dropped)."""
  rng = np.random.default_rng(seed)
  rows = np.arange(0, len(labels.frame_idx), step)
  hidden_until = {}  # labelled id -> first row visible again.
  out = []
  for f in rows:
    keep = labels.ids[f] >= 0
    for i in np.flatnonzero(keep):
      track = labels.ids[f, i]
      if rng.random() < occlusion and hidden_until.get(track, 0) <= f:
        hidden_until[track] = f + rng.integers(5, 31)
      keep[i] &= hidden_until.get(track, 0) <= f and rng.random() >= drop
    poses = labels.points[f][keep]
    poses = poses + rng.normal(0, sigma, poses.shape).astype(np.float32)
    out.append(poses[rng.permutation(len(poses))])
  return rows, out


def run_norfair(poses, max_cost: float):
  import norfair  # pylint: disable=import-outside-toplevel

  def distance(det, obj):
    ok = (det.scores > 0) & obj.detected_at_least_once_points
    if not ok.any():
      return 1e6
    d = np.linalg.norm(det.points[ok] - obj.estimate[ok], axis=-1).mean()
    return d / tracking.size_of(obj.estimate)

  tracker = norfair.Tracker(distance_function=distance,
                            distance_threshold=max_cost,
                            hit_counter_max=tracking.MAX_LOST_FRAMES,
                            initialization_delay=0)
  ids = []
  for p in poses:
    dets = []
    for i, pose in enumerate(p):
      seen = np.isfinite(pose).all(-1)
      filled = np.where(seen[:, None], pose, pose[seen].mean(0))
      dets.append(norfair.Detection(points=filled, scores=seen * 1.0, data=i))
    tracker.update(detections=dets)
    frame_ids = np.full(len(p), -1, np.int32)
    for obj in tracker.tracked_objects:
      det = obj.last_detection
      if obj.id is not None and any(det is d for d in dets):
        frame_ids[det.data] = obj.id
    ids.append(frame_ids)
  return ids


def as_tracks(labels: identity.Tracks, frame_rows, poses, ids
              ) -> identity.Tracks:
  rows = {int(labels.frame_idx[f]): [(p, int(i)) for p, i in zip(poses[r], ids[r])
                                     if i >= 0]
          for r, f in enumerate(frame_rows)}
  rows = {k: v for k, v in rows.items() if v}
  n = max(int(max(i.max(initial=-1) for i in ids)) + 1, 1)
  return identity.from_rows(rows, tuple(f'track_{i}' for i in range(n)),
                            labels.nodes)


def run(name, poses, frames, max_cost):
  """Track ids per frame from tracker ``name`` (module docstring)."""
  if name == 'norfair':
    return run_norfair(poses, max_cost)
  return tracking.track_poses(
      poses, frames=frames, max_animals=2 if name == 'ours_max2' else None,
      max_cost=max_cost)


def retrack(args, labels):
  """Rows re-tracking ``args.detections`` (module docstring)."""
  sleap = identity.read_tracks(args.detections)
  nodes = [labels.nodes.index(n) for n in sleap.nodes]
  labels = identity.dataclasses.replace(
      labels, points=labels.points[:, :, nodes], nodes=sleap.nodes)
  rng = np.random.default_rng(0)
  poses = [rng.permutation(p[i >= 0]) for p, i in zip(sleap.points, sleap.ids)]
  rows = []
  for name in ['sleap'] + args.trackers.split(','):
    if name == 'sleap':
      ids = [i[i >= 0] for i in sleap.ids]
      poses_ = [p[i >= 0] for p, i in zip(sleap.points, sleap.ids)]
    else:
      ids, poses_ = run(name, poses, sleap.frame_idx, args.max_cost), poses
    rows_idx = np.searchsorted(labels.frame_idx, sleap.frame_idx)
    for frames in ('all', args.frames):
      rows.append(dict(
          condition=f'SLEAP detections, frames {frames}', tracker=name,
          **evaluate(labels, rows_idx, poses_, ids,
                     identity.parse_frames(frames), [0, 1])))
  return rows


def evaluate(labels, frame_rows, poses, ids, frames, nodes):
  """Scores the frames tracked in ``frames`` by head/thorax (``nodes``
  indices)."""
  tracks = as_tracks(labels, frame_rows, poses, ids)
  labels = identity.dataclasses.replace(
      labels, frame_idx=labels.frame_idx[frame_rows],
      points=labels.points[frame_rows], ids=labels.ids[frame_rows])
  pick = lambda t: identity.dataclasses.replace(
      t, points=t.points[:, :, nodes], nodes=tuple(t.nodes[i] for i in nodes))
  r = identity.score(pick(labels), pick(tracks), frames)
  return {'wrong_identity': r['wrong_identity'],
          'identity_changes': r['identity_changes'],
          'idsw': int(r['motmetrics']['num_switches']),
          'idf1': round(r['motmetrics']['idf1'], 4),
          'tracks': len(np.unique(np.concatenate(ids + [[-1]]))) - 1,
          'labelled_instances': r['labelled_instances'], 'misses': r['misses']}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--labels', required=True)
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--max_cost', type=float, default=tracking.MAX_COST)
  p.add_argument('--frames', default='all', help='START:STOP scored')
  p.add_argument('--trackers', default='ours_max2,ours,norfair')
  p.add_argument('--out', default=None, help='JSON of all rows')
  p.add_argument('--detections', default=None,
                 help='re-track this tracked .slp instead (docstring)')
  args = p.parse_args()
  labels = identity.read_tracks(args.labels, user_only=True)
  if args.detections:
    rows = retrack(args, labels)
    print(table(rows, detections=True))
    return
  nodes = [labels.nodes.index('head'), labels.nodes.index('thorax')]
  frames = identity.parse_frames(args.frames)
  rows = []
  for cond, (sigma, drop, step, occlusion) in CONDITIONS.items():
    for seed in range(args.seeds):
      frame_rows, poses = perturb(labels, sigma, drop, step, occlusion, seed)
      for name in args.trackers.split(','):
        t0 = time.perf_counter()
        ids = run(name, poses, labels.frame_idx[frame_rows], args.max_cost)
        seconds = time.perf_counter() - t0
        row = dict(condition=cond, sigma_px=sigma, drop=drop, step=step,
                   occlusion=occlusion, seed=seed, tracker=name,
                   seconds=round(seconds, 2),
                   **evaluate(labels, frame_rows, poses, ids, frames, nodes))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  print(table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=1)


def table(rows, detections=False) -> str:
  """Markdown: per condition and tracker, sums over seeds."""
  if detections:
    lines = ['| frames | tracker | wrong identity | identity changes | misses'
             ' | ID switches (motmetrics) | IDF1 | tracks |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["condition"]} | {r["tracker"]} | {r["wrong_identity"]} '
              f'/ {r["labelled_instances"]} | {r["identity_changes"]} | '
              f'{r["misses"]} | {r["idsw"]} | {r["idf1"]:.4f} | '
              f'{r["tracks"]} |' for r in rows]
    return '\n'.join(lines)
  lines = ['| condition (noise, drop, step, occlusion) | tracker | wrong identity | identity '
           'changes | ID switches (motmetrics) | IDF1 (mean) | tracks '
           '(mean) | seconds (mean) |', '|---|---|---|---|---|---|---|---|']
  keys = dict.fromkeys((r['condition'], r['tracker']) for r in rows)
  for cond, name in keys:
    rs = [r for r in rows if r['condition'] == cond and r['tracker'] == name]
    s = lambda k: sum(r[k] for r in rs)
    lines.append(
        f'| {cond} ({rs[0]["sigma_px"]:g} px, {rs[0]["drop"]:g}, '
        f'{rs[0]["step"]}, {rs[0]["occlusion"]:g}) | {name} | '
        f'{s("wrong_identity")} / {s("labelled_instances")} | '
        f'{s("identity_changes")} | {s("idsw")} | '
        f'{np.mean([r["idf1"] for r in rs]):.4f} | '
        f'{np.mean([r["tracks"] for r in rs]):.1f} | '
        f'{np.mean([r["seconds"] for r in rs]):.2f} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
