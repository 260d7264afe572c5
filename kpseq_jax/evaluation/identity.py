"""Identity metrics of tracked poses against labelled tracks (SLEAP files).

Two scorers on the same instance matching:

* "wrong identity", "identity changes", "misses" (issue 35's figures): in
  each frame, labelled and predicted instances are paired by
  `linear_sum_assignment` on the mean Euclidean distance (pixels) over the
  chosen nodes that are labelled in both (NaN nodes ignored; a pair with no
  such node cannot pair), and a pair counts only if that distance is
  <= ``max_dist_px`` (default 50 px). A paired prediction has the wrong
  identity when its track, mapped to a labelled identity (`identity_map`),
  is not the labelled instance's; an identity change is a labelled animal
  paired in two consecutive scored frames with two different predicted
  tracks; a miss is a labelled instance left unpaired. With nodes
  head,thorax and 50 px, SLEAP's clip.predictions.slp against clip.slp
  gives 24 wrong of 3,000, 7 changes and 266 misses (the figures issue 35
  states; 45 px gives 19/3/330, 55 px 26/10/228).
* motmetrics (py-motmetrics, the MOTChallenge definitions): IDF1, IDP,
  IDR, identity switches, MOTA, misses, false positives, from the same
  distances gated at ``max_dist_px``. Its matching keeps last frame's pairs
  while they stay within the gate (MOTChallenge's rule), so its misses and
  switches can differ from the per-frame pairing's above.

  python -m kpseq_jax.evaluation.identity --labels clip.slp \\
      --predictions clip.predictions.slp --frames 1200:1500 \\
      --nodes head,thorax --out_dir /tmp/identity

writes ``eval_identity_<predictions stem>.json`` and ``.md``.
"""

import argparse
import collections
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import motmetrics
import numpy as np
from scipy import optimize
import sleap_io

# Gate of the instance pairing (pixels): the distance that reproduces issue
# 35's figures for SLEAP's clip predictions (module docstring).
MAX_DIST_PX = 50.0
MOT_METRICS = ('idf1', 'idp', 'idr', 'num_switches', 'mota', 'num_misses',
               'num_false_positives', 'num_matches', 'num_objects')


@dataclasses.dataclass(frozen=True)
class Tracks:
  """Poses with identities, frame by frame.

  Attributes:
    frame_idx: int [F], the video frame of each row, increasing.
    points: float32 [F, N, K, 2] pixels (x, y); NaN for a missing node or an
      empty instance slot (N = most instances in a frame).
    ids: int32 [F, N] index into ``names``; -1 for an empty slot.
    names: the track names.
    nodes: the K node names.
    skipped: reason -> number of instances left out (no track, ...).
  """
  frame_idx: np.ndarray
  points: np.ndarray
  ids: np.ndarray
  names: tuple[str, ...]
  nodes: tuple[str, ...]
  skipped: dict[str, int]


def read_tracks(path: str | Path, nodes: Sequence[str] | None = None,
                user_only: bool = False) -> Tracks:
  """Tracked instances of a SLEAP file (first video).

  Args:
    path: a ``.slp`` file.
    nodes: the nodes to keep, by name (default all of the skeleton's).
    user_only: keep only user (labelled) instances, as for ground truth;
      otherwise every instance (predicted and user).

  Returns:
    `Tracks` of the frames with at least one kept instance; instances with
    no track or none of ``nodes`` labelled are skipped and counted
    (``Tracks.skipped``; `main` reports them in the JSON).

  Raises:
    ValueError: a node is not in the file's skeleton (names the file).
  """
  labels = sleap_io.load_slp(str(path), open_videos=False)
  skeleton = labels.skeletons[0]
  nodes = tuple(nodes or skeleton.node_names)
  missing = [n for n in nodes if n not in skeleton.node_names]
  if missing:
    raise ValueError(f'{path}: nodes {missing} not in the skeleton '
                     f'{skeleton.node_names}')
  node_ids = [skeleton.node_names.index(n) for n in nodes]
  names = tuple(t.name for t in labels.tracks)
  skipped = collections.Counter()
  rows = {}
  for lf in labels.labeled_frames:
    kept = []
    for inst in (lf.user_instances if user_only else lf.instances):
      points = inst.numpy()[node_ids]
      if inst.track is None:
        skipped['no track'] += 1
      elif not np.isfinite(points).all(-1).any():
        skipped['none of the nodes labelled'] += 1
      else:
        kept.append((points, names.index(inst.track.name)))
    if kept:
      rows.setdefault(lf.frame_idx, []).extend(kept)
  return from_rows(rows, names, nodes, dict(skipped))


def from_rows(rows: dict[int, list], names, nodes, skipped=None) -> Tracks:
  """`Tracks` from {video frame: [(points float [K, 2] px, track id)]}
  (e.g. a tracker's output, to `score` it)."""
  frames = np.array(sorted(rows), np.int64)
  n = max((len(v) for v in rows.values()), default=0)
  points = np.full((len(frames), n, len(nodes), 2), np.nan, np.float32)
  ids = np.full((len(frames), n), -1, np.int32)
  for f, frame in enumerate(frames):
    for i, (p, track) in enumerate(rows[frame]):
      points[f, i], ids[f, i] = p, track
  return Tracks(frames, points, ids, tuple(names), tuple(nodes),
                skipped or {})


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean over nodes labelled in both of the Euclidean distance.

  Args:
    a: float [N, K, 2] pixels, NaN = missing.
    b: float [M, K, 2] pixels, NaN = missing.

  Returns:
    float64 [N, M] pixels; NaN where a pair shares no node.
  """
  d = np.linalg.norm(a[:, None].astype(np.float64) - b[None], axis=-1)
  ok = np.isfinite(d)
  count = ok.sum(-1)
  total = np.where(ok, d, 0.0).sum(-1)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def pair(dist: np.ndarray, max_dist_px: float) -> list[tuple[int, int]]:
  """Minimum-total-distance pairs (rows, columns) with distance <= the gate.

  Args:
    dist: float [N, M] pixels, NaN = cannot pair.
    max_dist_px: the gate, pixels.
  """
  if dist.size == 0:
    return []
  cost = np.where(np.isfinite(dist), dist, 1e12)
  rows, cols = optimize.linear_sum_assignment(cost)
  return [(int(r), int(c)) for r, c in zip(rows, cols)
          if cost[r, c] <= max_dist_px]


def identity_map(labels: Tracks, preds: Tracks,
                 pairs: dict[int, list[tuple[int, int]]]) -> dict[int, int]:
  """Predicted track id -> labelled track id.

  By name when every predicted track name is a labelled one (SLEAP's
  proofread identities); otherwise the one-to-one mapping that pairs the
  most instances (`linear_sum_assignment` on the counts, as IDF1 maps
  identities). Unmapped predicted tracks are absent.
  """
  if set(preds.names) <= set(labels.names):
    return {i: labels.names.index(n) for i, n in enumerate(preds.names)}
  counts = np.zeros((len(preds.names), len(labels.names)))
  for f, frame_pairs in pairs.items():
    g = _row_of(preds, labels.frame_idx[f])
    for i, j in frame_pairs:
      counts[preds.ids[g, j], labels.ids[f, i]] += 1
  rows, cols = optimize.linear_sum_assignment(-counts)
  return {int(r): int(c) for r, c in zip(rows, cols) if counts[r, c] > 0}


def _row_of(tracks: Tracks, frame: int) -> int | None:
  """Row of a video frame in ``tracks``, None if absent."""
  g = int(np.searchsorted(tracks.frame_idx, frame))
  if g < len(tracks.frame_idx) and tracks.frame_idx[g] == frame:
    return g
  return None


def frame_pairs(labels: Tracks, preds: Tracks, max_dist_px: float
                ) -> tuple[dict[int, list], dict[int, np.ndarray]]:
  """Per labelled row: the gated pairs, and the distance matrix (for
  motmetrics), over instances present in both files' frame."""
  pairs, dists = {}, {}
  for f, frame in enumerate(labels.frame_idx):
    g = _row_of(preds, frame)
    lab = labels.points[f][labels.ids[f] >= 0]
    pred = (preds.points[g][preds.ids[g] >= 0] if g is not None
            else np.zeros((0,) + lab.shape[1:], np.float32))
    dists[f] = distances(lab, pred)
    pairs[f] = pair(dists[f], max_dist_px)
  return pairs, dists


def select_frames(tracks: Tracks, frames: slice | None) -> Tracks:
  """The rows whose video frame is in ``range(start, stop)`` of ``frames``
  (None: all)."""
  if frames is None:
    return tracks
  stop = frames.stop if frames.stop is not None else np.iinfo(np.int64).max
  keep = (tracks.frame_idx >= (frames.start or 0)) & (tracks.frame_idx < stop)
  return dataclasses.replace(tracks, frame_idx=tracks.frame_idx[keep],
                             points=tracks.points[keep], ids=tracks.ids[keep])


def identity_counts(labels: Tracks, preds: Tracks, pairs: dict,
                    mapping: dict[int, int]) -> dict[str, int]:
  """Issue 35's counts (module docstring) from `frame_pairs`' pairs.

  Slots are compacted (instances with id >= 0 first) as in `frame_pairs`.
  """
  wrong = changes = misses = false_pos = paired = 0
  previous = {}  # labelled id -> predicted id in the previous scored row.
  for f, frame in enumerate(labels.frame_idx):
    lab_ids = labels.ids[f][labels.ids[f] >= 0]
    g = _row_of(preds, frame)
    pred_ids = preds.ids[g][preds.ids[g] >= 0] if g is not None else []
    current = {}
    for i, j in pairs[f]:
      current[int(lab_ids[i])] = int(pred_ids[j])
      wrong += mapping.get(int(pred_ids[j]), -1) != lab_ids[i]
    changes += sum(previous.get(k, v) != v for k, v in current.items())
    paired += len(pairs[f])
    misses += len(lab_ids) - len(pairs[f])
    false_pos += len(pred_ids) - len(pairs[f])
    previous = current
  return {'labelled_instances': int(sum((labels.ids >= 0).sum(1))),
          'paired': paired, 'wrong_identity': int(wrong),
          'identity_changes': int(changes), 'misses': misses,
          'false_positives': false_pos}


def neighbour_jumps(labels: Tracks, preds: Tracks, pairs: dict
                    ) -> dict[str, int]:
  """Keypoints of a paired prediction that sit on another animal.

  A node of a predicted instance paired with labelled animal A jumped when
  it is nearer the same node of another labelled animal of the frame than
  A's own (both labelled): the top-down crop of A posed its neighbour.

  Returns:
    ``jumped_keypoints`` (nodes), ``jumped_instances`` (paired instances
    with at least one jumped node), ``checked_keypoints`` (nodes labelled
    on A and on a neighbour and predicted), over frames with >= 2 animals.
  """
  jumped = instances = checked = 0
  for f, frame in enumerate(labels.frame_idx):
    lab = labels.points[f][labels.ids[f] >= 0]  # [N, K, 2]
    g = _row_of(preds, frame)
    if g is None or len(lab) < 2:
      continue
    pred = preds.points[g][preds.ids[g] >= 0]
    for i, j in pairs[f]:
      own = np.linalg.norm(pred[j] - lab[i], axis=-1)  # [K]
      others = np.delete(lab, i, axis=0)
      near = np.nanmin(np.where(
          np.isfinite(others).all(-1),
          np.linalg.norm(pred[j][None] - others, axis=-1), np.inf), axis=0)
      ok = np.isfinite(own) & np.isfinite(near)
      hit = ok & (near < own)
      jumped += int(hit.sum())
      instances += bool(hit.any())
      checked += int(ok.sum())
  return {'jumped_keypoints': jumped, 'jumped_instances': instances,
          'checked_keypoints': checked}


def mot_summary(labels: Tracks, preds: Tracks, dists: dict,
                max_dist_px: float) -> dict[str, float]:
  """motmetrics' figures (`MOT_METRICS`) from `frame_pairs`' distances."""
  acc = motmetrics.MOTAccumulator(auto_id=False)
  for f, frame in enumerate(labels.frame_idx):
    lab_ids = labels.ids[f][labels.ids[f] >= 0]
    g = _row_of(preds, frame)
    pred_ids = preds.ids[g][preds.ids[g] >= 0] if g is not None else []
    d = np.where(dists[f] <= max_dist_px, dists[f], np.nan)
    # Integer ids: motmetrics 1.4.0 casts object and hypothesis ids to float.
    acc.update(list(lab_ids), list(pred_ids), d, frameid=int(frame))
  summary = motmetrics.metrics.create().compute(acc, metrics=MOT_METRICS)
  return {k: float(summary[k].iloc[0]) for k in MOT_METRICS}


def score(labels: Tracks, preds: Tracks, frames: slice | None = None,
          max_dist_px: float = MAX_DIST_PX) -> dict:
  """Both scorers (module docstring) on the labelled frames in ``frames``.

  Args:
    labels: ground truth (`read_tracks` with ``user_only=True``).
    preds: tracked predictions, same nodes in the same order.
    frames: video frames ``range(start, stop)``; None = all.
    max_dist_px: the pairing gate, pixels.

  Returns:
    A JSON-able dict: the counts, ``motmetrics`` figures, ``frames`` scored,
    ``identity_mapping`` (predicted name -> labelled name).

  Raises:
    ValueError: the two files' nodes differ.
  """
  if labels.nodes != preds.nodes:
    raise ValueError(f'nodes differ: labels {labels.nodes}, predictions '
                     f'{preds.nodes}')
  labels = select_frames(labels, frames)
  pairs, dists = frame_pairs(labels, preds, max_dist_px)
  mapping = identity_map(labels, preds, pairs)
  out = identity_counts(labels, preds, pairs, mapping)
  out['motmetrics'] = mot_summary(labels, preds, dists, max_dist_px)
  out['neighbour_jumps'] = neighbour_jumps(labels, preds, pairs)
  out['frames'] = len(labels.frame_idx)
  out['identity_mapping'] = {preds.names[k]: labels.names[v]
                             for k, v in mapping.items()}
  out['max_dist_px'] = max_dist_px
  out['nodes'] = list(labels.nodes)
  return out


def markdown(result: dict, title: str) -> str:
  """A Markdown table of `score`'s result."""
  m, jumps = result['motmetrics'], result['neighbour_jumps']
  return '\n'.join([
      f'# Identity: {title}', '',
      f'{result["frames"]} labelled frames, nodes {", ".join(result["nodes"])},'
      f' pairing gate {result["max_dist_px"]:g} px; identities '
      f'{result["identity_mapping"]}.', '',
      '| labelled instances | wrong identity | identity changes | misses |'
      ' false positives | IDF1 | ID switches (motmetrics) | MOTA |',
      '|---|---|---|---|---|---|---|---|',
      f'| {result["labelled_instances"]} | {result["wrong_identity"]} | '
      f'{result["identity_changes"]} | {result["misses"]} | '
      f'{result["false_positives"]} | {m["idf1"]:.4f} | '
      f'{int(m["num_switches"])} | {m["mota"]:.4f} |', '',
      f'Keypoints on the neighbouring animal: {jumps["jumped_keypoints"]} '
      f'of {jumps["checked_keypoints"]} (in {jumps["jumped_instances"]} '
      'instances).', ''])


def parse_frames(text: str | None) -> slice | None:
  """``"1200:1500"`` -> slice(1200, 1500); ``""``/None/``"all"`` -> None."""
  if not text or text == 'all':
    return None
  start, _, stop = text.partition(':')
  return slice(int(start) if start else None, int(stop) if stop else None)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--labels', required=True, help='labelled .slp (user '
                 'instances with tracks)')
  p.add_argument('--predictions', required=True, help='tracked .slp')
  p.add_argument('--frames', default='all', help='START:STOP video frames')
  p.add_argument('--nodes', default='head,thorax', help='comma-separated')
  p.add_argument('--max_dist_px', type=float, default=MAX_DIST_PX)
  p.add_argument('--out_dir', default='.')
  args = p.parse_args(argv)
  nodes = args.nodes.split(',')
  labels = read_tracks(args.labels, nodes, user_only=True)
  preds = read_tracks(args.predictions, nodes)
  result = score(labels, preds, parse_frames(args.frames), args.max_dist_px)
  result.update(labels=str(args.labels), predictions=str(args.predictions),
                frame_range=args.frames,
                skipped={'labels': labels.skipped,
                         'predictions': preds.skipped})
  stem = Path(args.predictions).name.removesuffix('.slp')
  out = Path(args.out_dir) / f'eval_identity_{stem}'
  out.parent.mkdir(parents=True, exist_ok=True)
  Path(f'{out}.json').write_text(json.dumps(result, indent=1))
  Path(f'{out}.md').write_text(
      markdown(result, f'{args.predictions} against {args.labels}, frames '
               f'{args.frames}'))
  print(markdown(result, f'{stem}, frames {args.frames}'))
  return result


if __name__ == '__main__':
  main()
