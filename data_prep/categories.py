"""Category tables: merge over files, keypoint counts K, left/right flip pairs.

Categories are keyed by id everywhere (MP-100 has two different categories
named "face", ids 18 and 40).

Flip pairs (used by horizontal-flip augmentation to swap left/right keypoint
ids; pix2seq had to turn flip off because it forgot this) come from, in order:
  1. `EXPLICIT_FLIP_PAIRS[category_id]` if present (for categories whose
     keypoints have no usable names, e.g. MP-100's nameless "face" categories);
  2. `flip_pairs_from_names(keypoint_names)`, the rule documented there.
A category with no valid pair gets an empty list and is never flipped.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Sequence

from data_prep import coco

# Explicit flip pairs by category id, consulted before the name rule. Each
# entry lists 0-based (i, j) index pairs; each index may appear at most once.
# Empty by default; a later issue fills it for nameless categories.
EXPLICIT_FLIP_PAIRS: dict[int, list[tuple[int, int]]] = {}

# Tokens: acronym before a capitalised word, capitalised/lower word, upper run,
# digit run. 'forelegL1' -> foreleg L 1; 'LWrist' -> L Wrist; 'left_eye' -> left eye.
_TOKEN_RE = re.compile(r'[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+')
_SIDE_TOKENS = {'left': 'L', 'l': 'L', 'right': 'R', 'r': 'R'}
_SIDE_PREFIXES = (('left', 'L'), ('right', 'R'))
_SIDE_PLACEHOLDER = '<side>'

K_FROM_NAMES = 'keypoint_names'
K_FROM_ANNOTATIONS = 'annotations'
K_UNKNOWN = 'none'


@dataclasses.dataclass(frozen=True)
class Category:
  """A category merged over all input files.

  Attributes:
    id: category id.
    name: category name (not unique: key by id).
    supercategory: supercategory name.
    num_keypoints: K, keypoints per instance.
    keypoint_names: K names, or () when the files give none.
    skeleton: limbs as 0-based (i, j) keypoint index pairs.
    flip_pairs: 0-based (i, j) left/right pairs, i < j, sorted; () = never flip.
    num_keypoints_source: where K came from: 'keypoint_names', 'annotations'
      (most common keypoint count among its annotations, used when the name
      list is empty) or 'none' (no names and no annotations: K = 0).
  """

  id: int
  name: str
  supercategory: str
  num_keypoints: int
  keypoint_names: tuple[str, ...]
  skeleton: tuple[tuple[int, int], ...]
  flip_pairs: tuple[tuple[int, int], ...]
  num_keypoints_source: str

  def to_metadata(self) -> dict[str, Any]:
    """JSON-ready dict with keys id, name, supercategory, num_keypoints,
    keypoint_names, skeleton ([[i, j]], 0-based) and flip_pairs ([[i, j]])."""
    return {
        'id': self.id,
        'name': self.name,
        'supercategory': self.supercategory,
        'num_keypoints': self.num_keypoints,
        'keypoint_names': list(self.keypoint_names),
        'skeleton': [list(limb) for limb in self.skeleton],
        'flip_pairs': [list(pair) for pair in self.flip_pairs],
    }


def side_and_stem(name: str) -> tuple[str, tuple[str, ...]] | None:
  """Splits a keypoint name into its side marker and the rest.

  The name is cut into tokens at non-alphanumerics, lower->upper case changes
  and letter/digit changes. A side marker is a token equal to left/right/l/r,
  or a token starting with 'left'/'right' (so 'leftear' = left + ear), case
  insensitive. Names with no marker or more than one are unsided.

  Args:
    name: a keypoint name, e.g. 'left_eye', 'eyeL', 'forelegR1', 'rightear'.

  Returns:
    ('L' or 'R', stem) where stem is the lower-cased tokens with the marker
    replaced by a placeholder (so position matters), or None when unsided.
  """
  side, stem = None, []
  for token in _TOKEN_RE.findall(name):
    lower = token.lower()
    token_side, rest = _token_side(lower)
    if token_side is None:
      stem.append(lower)
      continue
    if side is not None:
      return None  # two markers: ambiguous.
    side = token_side
    stem.append(_SIDE_PLACEHOLDER)
    if rest:
      stem.append(rest)
  return None if side is None else (side, tuple(stem))


def _token_side(lower: str) -> tuple[str | None, str]:
  if lower in _SIDE_TOKENS:
    return _SIDE_TOKENS[lower], ''
  for prefix, side in _SIDE_PREFIXES:
    if lower.startswith(prefix):
      return side, lower[len(prefix):]
  return None, ''


def flip_pairs_from_names(names: Sequence[str]) -> list[tuple[int, int]]:
  """Left/right keypoint pairs derived from keypoint names.

  Rule: two names pair when one carries a left marker and the other a right
  marker (see `side_and_stem`: 'left_', 'right_', 'l_', 'r_', 'left'/'right' as
  a word or prefix such as 'leftear', 'L'/'R' tokens such as 'eyeL',
  'forelegR1', case-insensitive) and everything else matches exactly. A name
  with no counterpart, or whose (side, rest) is shared by several names, stays
  unpaired, so each index appears at most once.

  Args:
    names: the K keypoint names of one category.

  Returns:
    0-based (i, j) pairs with i < j, sorted by i; [] when nothing pairs.
    E.g. ['snout', 'leftear', 'rightear', 'tailbase'] -> [(1, 2)].
  """
  by_stem: dict[tuple[str, ...], dict[str, list[int]]] = collections.defaultdict(
      lambda: {'L': [], 'R': []})
  for index, name in enumerate(names):
    parsed = side_and_stem(name)
    if parsed is not None:
      side, stem = parsed
      by_stem[stem][side].append(index)
  pairs = [
      tuple(sorted((sides['L'][0], sides['R'][0])))
      for sides in by_stem.values()
      if len(sides['L']) == 1 and len(sides['R']) == 1
  ]
  return sorted(pairs)


def category_flip_pairs(category_id: int, names: Sequence[str], num_keypoints: int) -> list[tuple[int, int]]:
  """Flip pairs of one category: `EXPLICIT_FLIP_PAIRS` first, else from names.

  Raises:
    ValueError: an explicit table entry has an index outside [0, K) or uses
      an index twice.
  """
  if category_id not in EXPLICIT_FLIP_PAIRS:
    return flip_pairs_from_names(names)
  pairs = sorted(tuple(sorted((int(i), int(j)))) for i, j in EXPLICIT_FLIP_PAIRS[category_id])
  flat = [i for pair in pairs for i in pair]
  if len(set(flat)) != len(flat) or any(not 0 <= i < num_keypoints for i in flat):
    raise ValueError(f'EXPLICIT_FLIP_PAIRS[{category_id}] = {pairs}: indices must be distinct '
                     f'and in [0, {num_keypoints})')
  return pairs


def merge_category_specs(files: Iterable[coco.CocoKeypointFile]) -> dict[int, coco.CategorySpec]:
  """Merges the category lists of several files, keyed by category id.

  Raises:
    coco.AnnotationError: two files define the same id differently.
  """
  merged: dict[int, coco.CategorySpec] = {}
  origin: dict[int, Any] = {}
  for f in files:
    for spec in f.categories:
      if spec.id in merged and merged[spec.id] != spec:
        raise coco.AnnotationError(
            f'{f.path}: field "categories": id {spec.id} ({spec.name!r}) differs from its '
            f'definition in {origin[spec.id]}')
      merged.setdefault(spec.id, spec)
      origin.setdefault(spec.id, f.path)
  return merged


def keypoint_count_histogram(files: Iterable[coco.CocoKeypointFile]) -> dict[int, collections.Counter]:
  """category id -> Counter of keypoint counts (len(keypoints) / 3) over annotations.

  Annotations whose keypoints are not a list of length divisible by 3 are ignored.
  """
  counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for f in files:
    for ann in f.annotations:
      if not isinstance(ann, dict):
        continue
      kps, cid = ann.get('keypoints'), ann.get('category_id')
      if isinstance(kps, list) and len(kps) % 3 == 0 and coco.is_int(cid):
        counts[int(cid)][len(kps) // 3] += 1
  return counts


def build_category_table(files: Sequence[coco.CocoKeypointFile]) -> dict[int, Category]:
  """The merged category table of several files, sorted by id.

  K is the length of the keypoint-name list; where that list is empty, K is
  the most common keypoint count among the category's annotations in `files`
  (ties: the smaller K), recorded as num_keypoints_source='annotations'.

  Args:
    files: parsed annotation files.

  Returns:
    category id -> Category, in increasing id order.

  Raises:
    coco.AnnotationError: conflicting definitions of one id across files, or a
      skeleton index outside [0, K).
  """
  specs = merge_category_specs(files)
  histogram = keypoint_count_histogram(files)
  table = {}
  for cid in sorted(specs):
    spec = specs[cid]
    k, source = _num_keypoints(spec, histogram.get(cid, collections.Counter()))
    for limb in spec.skeleton:
      if not all(0 <= i < k for i in limb):
        raise coco.AnnotationError(
            f'field "categories": category {cid} ({spec.name!r}) skeleton limb {list(limb)} '
            f'is outside [0, {k}) (0-based)')
    table[cid] = Category(
        id=cid,
        name=spec.name,
        supercategory=spec.supercategory,
        num_keypoints=k,
        keypoint_names=spec.keypoint_names,
        skeleton=spec.skeleton,
        flip_pairs=tuple(category_flip_pairs(cid, spec.keypoint_names, k)),
        num_keypoints_source=source,
    )
  return table


def _num_keypoints(spec: coco.CategorySpec, counts: collections.Counter) -> tuple[int, str]:
  if spec.keypoint_names:
    return len(spec.keypoint_names), K_FROM_NAMES
  if not counts:
    return 0, K_UNKNOWN
  k = min(counts, key=lambda n: (-counts[n], n))
  return k, K_FROM_ANNOTATIONS
