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
from typing import Any, Iterable, Mapping, Sequence

from data_prep import coco

# Explicit flip pairs by category id (MP-100 ids), consulted before the name
# rule. Each entry lists 0-based (i, j) index pairs; each index may appear at
# most once. Each entry's pairing is also checked on the real MP-100
# annotations (tests/test_mp100_categories.py): the two points of a pair lie
# on opposite sides of the box centre in (nearly) every instance.
#
# MP-100 "face" id 40: 300W's 68 iBUG landmarks (no names in MP-100). Mirror
# pairs of the iBUG 68-point markup (Sagonas et al., 300 Faces in-the-Wild,
# ibug.doc.ic.ac.uk/resources/300-W; the same `swap` table as mmpose
# configs/_base_/datasets/300w.py): jaw 0-16 about 8, brows 17-21 / 26-22,
# nose wings 31-32 / 35-34, eyes 36-41 / 45-42 and 40-41 / 47-46, outer lip
# 48-50 / 54-52 and 55-56 / 59-58, inner lip 60-61 / 64-63 and 65 / 67.
_IBUG_68_PAIRS = ([(i, 16 - i) for i in range(8)]
                  + [(17 + i, 26 - i) for i in range(5)]
                  + [(31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42),
                     (40, 47), (41, 46), (48, 54), (49, 53), (50, 52), (55, 59),
                     (56, 58), (60, 64), (61, 63), (65, 67)])
# MP-100 "face" id 18: AFLW's 19 landmarks (Koestinger et al. 2011; the
# 19-point AFLW-Full protocol, mmpose configs/_base_/datasets/aflw.py `swap`):
# brows 0-2 / 5-3, eyes 6-8 / 11-9, nose 12 / 14, mouth corners 15 / 17;
# 13 (nose tip), 16 (mouth centre) and 18 (chin) are central.
_AFLW_19_PAIRS = [(0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9), (12, 14),
                  (15, 17)]
# MP-100's 30 animal_face categories (names '0'..'8'): AnimalWeb's 9
# landmarks (Khan et al., CVPR 2020): eye corners 0, 1 (image-left eye) and
# 2, 3 (image-right eye), nose tip 4, mouth corners 5 / 6, upper lip 7,
# lower lip 8; mirror pairs (0, 3), (1, 2), (5, 6) (as the `swap` entries
# left_eye_left/right_eye_right, left_eye_right/right_eye_left,
# left_mouth/right_mouth of the animalweb dataset_info in ViTPose-based
# code bases).
_ANIMALWEB_9_PAIRS = [(0, 3), (1, 2), (5, 6)]
ANIMAL_FACE_IDS = (4, 7, 10, 12, 13, 19, 22, 23, 24, 34, 36, 37, 47, 48, 56,
                   57, 61, 63, 65, 69, 74, 77, 79, 81, 82, 89, 93, 94, 96, 99)


def _deepfashion2_top_pairs(k: int) -> list[tuple[int, int]]:
  """DeepFashion2 tops and dresses (names '1'..'K'): landmarks 1-6 on the
  collar/neckline (2/6, 3/5 mirror, 1 and 4 central), 7..K the
  garment contour, symmetric about its middle point (7/K, 8/K-1, ...). This
  is the `swap` table of mmpose configs/_base_/datasets/deepfashion2.py for
  short_sleeved_shirt (sss_kpt2/6, 3/5, 7/25 ... 15/17) and
  long_sleeved_shirt (lss 7/33 ... 19/21) (DeepFashion2: Ge et al., CVPR
  2019, github.com/switchablenorms/DeepFashion2), the same layout for the
  other tops and dresses."""
  return [(1, 5), (2, 4)] + [(6 + i, k - 1 - i) for i in range((k - 6) // 2)]


# DeepFashion2 categories of MP-100 with that layout: id -> K. Skirt (id 1,
# K 8): waist 1/3 (2 centre), hem contour 4/8, 5/7 (6 centre). Not listed:
# the outwear (open front: a different neckline and contour), shorts and
# trousers (whose inner-leg landmarks do not mirror about the box centre in
# the annotations), CarFusion vehicles and Keypoint-5 furniture (numbered
# names whose left/right definition is not established here): never
# flipped. The hand (id 80, 21 points: wrist and four joints per finger) has
# no left/right pairs at all.
DEEPFASHION2_TOPS = {8: 19, 11: 19, 17: 15, 25: 25, 60: 29, 62: 15, 64: 37,
                     97: 33}
EXPLICIT_FLIP_PAIRS: dict[int, list[tuple[int, int]]] = {
    1: [(0, 2), (3, 7), (4, 6)],
    18: _AFLW_19_PAIRS,
    40: _IBUG_68_PAIRS,
    **{cid: _ANIMALWEB_9_PAIRS for cid in ANIMAL_FACE_IDS},
    **{cid: _deepfashion2_top_pairs(k) for cid, k in DEEPFASHION2_TOPS.items()},
}
# The K each entry above was written for. Another data set reusing one of
# these ids with a different K is not MP-100's category: its names decide.
EXPLICIT_FLIP_PAIRS_NUM_KEYPOINTS: dict[int, int] = {
    1: 8, 18: 19, 40: 68, **{cid: 9 for cid in ANIMAL_FACE_IDS},
    **DEEPFASHION2_TOPS}

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
    oks_sigmas: K per-keypoint OKS sigmas given at data_prep time
      (`data_prep.build --oks_sigmas`), or () = evaluation's default
      (`kpseq_jax.evaluation.oks`).
  """

  id: int
  name: str
  supercategory: str
  num_keypoints: int
  keypoint_names: tuple[str, ...]
  skeleton: tuple[tuple[int, int], ...]
  flip_pairs: tuple[tuple[int, int], ...]
  num_keypoints_source: str
  oks_sigmas: tuple[float, ...] = ()

  def to_metadata(self) -> dict[str, Any]:
    """JSON-ready dict with keys id, name, supercategory, num_keypoints,
    keypoint_names, skeleton ([[i, j]], 0-based), flip_pairs ([[i, j]]) and
    oks_sigmas ([] = none given)."""
    return {
        'id': self.id,
        'name': self.name,
        'supercategory': self.supercategory,
        'num_keypoints': self.num_keypoints,
        'keypoint_names': list(self.keypoint_names),
        'skeleton': [list(limb) for limb in self.skeleton],
        'flip_pairs': [list(pair) for pair in self.flip_pairs],
        'oks_sigmas': list(self.oks_sigmas),
    }

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any]) -> 'Category':
    """Inverse of `to_metadata` (a data set's stored category table)."""
    return cls(
        id=int(meta['id']), name=str(meta['name']),
        supercategory=str(meta.get('supercategory', '')),
        num_keypoints=int(meta['num_keypoints']),
        keypoint_names=tuple(meta.get('keypoint_names') or ()),
        skeleton=tuple(tuple(p) for p in meta.get('skeleton') or ()),
        flip_pairs=tuple(tuple(p) for p in meta.get('flip_pairs') or ()),
        num_keypoints_source='metadata',
        oks_sigmas=tuple(float(x) for x in meta.get('oks_sigmas') or ()))


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

  An explicit entry applies only when K equals the K it was written for
  (`EXPLICIT_FLIP_PAIRS_NUM_KEYPOINTS`, when recorded).

  Raises:
    ValueError: an explicit table entry has an index outside [0, K) or uses
      an index twice.
  """
  expected_k = EXPLICIT_FLIP_PAIRS_NUM_KEYPOINTS.get(category_id, num_keypoints)
  if category_id not in EXPLICIT_FLIP_PAIRS or expected_k != num_keypoints:
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


def with_oks_sigmas(categories: Mapping[int, Category], sigmas: Mapping[str, Any],
                    source: str) -> dict[int, Category]:
  """The category table with per-keypoint OKS sigmas attached.

  Args:
    categories: category id -> `Category`.
    sigmas: JSON-style mapping, key = a category id (as text or int) or a
      category name that is unique in the table, value = K positive floats.
      Categories not named keep ``oks_sigmas = ()``.
    source: where ``sigmas`` came from (a file path), for messages.

  Returns:
    a new id -> `Category` dict.

  Raises:
    ValueError: naming ``source``, the category and the field, if a key
      matches no category (or an ambiguous name), or a value is not a list
      of K finite positive numbers.
  """
  by_name = collections.defaultdict(list)
  for c in categories.values():
    by_name[c.name].append(c.id)
  out = dict(categories)
  for key, values in sigmas.items():
    text = str(key)
    if text.lstrip('-').isdigit() and int(text) in categories:
      cid = int(text)
    elif len(by_name.get(text, ())) == 1:
      cid = by_name[text][0]
    elif text in by_name:
      raise ValueError(f'{source}: category name {text!r} is not unique '
                       f'(ids {by_name[text]}); key oks_sigmas by id.')
    else:
      raise ValueError(f'{source}: oks_sigmas key {text!r} is no category id '
                       f'or name of the data set (ids {sorted(categories)}).')
    cat = categories[cid]
    ok = isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok or len(values) != cat.num_keypoints or not all(
        0 < float(v) < float('inf') for v in values):
      n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
      raise ValueError(f'{source}: category {cid}:{cat.name} field oks_sigmas '
                       f'must be {cat.num_keypoints} positive numbers (one per '
                       f'keypoint), got {n}.')
    out[cid] = dataclasses.replace(cat, oks_sigmas=tuple(float(v) for v in values))
  return out
