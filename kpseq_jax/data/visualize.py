"""Keypoint overlays: skeleton, one colour per keypoint, keypoint names.

Used by ``--mode predict`` (one PNG per input image) and by evaluation (a
few crops to TensorBoard). Drawing order is skeleton, names, then the
keypoint discs, so the pixel at a keypoint carries that keypoint's colour
(`keypoint_colors`) unless a later keypoint's disc covers it.
"""

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep.categories import Category

SKELETON_RGB = (255, 255, 255)
OUTLINE_RGB = (0, 0, 0)


def keypoint_colors(num_keypoints: int) -> list[tuple[int, int, int]]:
  """K saturated RGB colours, evenly spaced in hue (keypoint k -> colour k)."""
  out = []
  for k in range(num_keypoints):
    r, g, b = colorsys.hsv_to_rgb(k / max(num_keypoints, 1), 0.9, 1.0)
    out.append((round(r * 255), round(g * 255), round(b * 255)))
  return out


def marker_radius(width: int, height: int) -> int:
  """Disc radius in pixels for an image of this size (4 px at 640 x 480)."""
  return max(2, round(max(width, height) / 160))


def _colors_of(shape: tuple[int, int], pose_colors) -> list[list[tuple]]:
  """[N][K] RGB colours of `draw_pose`'s keypoints (its ``pose_colors``)."""
  n, k = shape
  if pose_colors is None:
    return [keypoint_colors(k)] * n
  return [[tuple(c)] * k for c in pose_colors]


def _shown_and_hollow(kps: np.ndarray, absent: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """bool [N, K] each: drawn as a disc, drawn as a hollow circle
  (`draw_pose`'s ``absent``)."""
  shown = (kps[..., 2] > 0) & np.all(np.isfinite(kps[..., :2]), axis=-1)
  hollow = np.zeros(shown.shape, bool)
  if absent is not None:
    hollow = np.broadcast_to(np.asarray(absent, bool).reshape(
        shown.shape), shown.shape) & np.all(np.isfinite(kps[..., :2]), -1)
    shown = shown & ~hollow
  return shown, hollow


def draw_pose(image: Image.Image, keypoints: np.ndarray,
              category: Category | None = None,
              radius: int | None = None,
              absent: np.ndarray | None = None,
              pose_colors: list[tuple[int, int, int]] | None = None
              ) -> Image.Image:
  """Draws one or more poses on a copy of ``image``.

  Args:
    image: the picture; converted to RGB.
    keypoints: float [N, K, 3] or [K, 3] (x, y, score) in pixels of
      ``image``; a keypoint with score <= 0 or a non-finite coordinate is
      not drawn (nor its skeleton edges).
    category: skeleton (0-based pairs) and keypoint names; None draws the
      discs only.
    radius: disc radius in pixels; default `marker_radius`.
    absent: bool [N, K] or [K], keypoints predicted not visible: drawn as
      hollow circles in their colour, without name or skeleton edges (their
      coordinate is the model's best guess, not a sighting).
    pose_colors: N RGB colours, pose n's keypoints all in colour n (one
      per identity); default: keypoint k in `keypoint_colors` k.

  Returns:
    a new RGB image of the same size.
  """
  out = image.convert('RGB')  # Always a copy.
  kps = np.asarray(keypoints, np.float64)
  kps = kps[None] if kps.ndim == 2 else kps  # [N, K, 3]
  radius = radius or marker_radius(*out.size)
  per_pose = _colors_of(kps.shape[:2], pose_colors)
  names = category.keypoint_names if category else ()
  skeleton = category.skeleton if category else ()
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default(size=max(10, 3 * radius))
  shown, hollow = _shown_and_hollow(kps, absent)
  for pose, ok, empty, colors in zip(kps, shown, hollow, per_pose):
    for k in np.flatnonzero(empty):
      x, y = pose[k, :2]
      draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                   outline=colors[k], width=max(1, radius // 2))
  for pose, ok in zip(kps, shown):
    for i, j in skeleton:
      if i < len(pose) and j < len(pose) and ok[i] and ok[j]:
        draw.line([tuple(pose[i, :2]), tuple(pose[j, :2])],
                  fill=SKELETON_RGB, width=max(1, radius // 2))
    for k in np.flatnonzero(ok):
      if k < len(names):
        x, y = pose[k, :2]
        draw.text((x + radius + 1, y - radius - 1), names[k], fill=colors[k],
                  font=font, anchor='ls', stroke_width=1,
                  stroke_fill=OUTLINE_RGB)
  for pose, ok, colors in zip(kps, shown, per_pose):
    for k in np.flatnonzero(ok):
      x, y = pose[k, :2]
      draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                   fill=colors[k], outline=OUTLINE_RGB)
  return out
