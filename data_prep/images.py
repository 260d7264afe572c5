"""Reads an image file and returns 8-bit RGB encoded bytes for the data set.

Rules:
  * EXIF orientation is applied (`ImageOps.exif_transpose`): keypoints and
    boxes are taken to be in the displayed orientation. That is what
    labelling tools show and what the MP-100 code reads (mmpose decodes
    with OpenCV, whose `imdecode` applies EXIF orientation by default), and
    what detectron2's `read_image` does for COCO. One exception, decided
    from the data: for a 90-degree orientation (EXIF 5-8, width and height
    swap) whose image entry declares the *stored* width x height, the
    annotator saw the stored pixels, so the orientation is not applied
    (`EncodedImage.exif_ignored`). A 180-degree or mirror orientation
    (2-4) keeps the sizes and cannot be told apart; it is applied.
  * A plain 8-bit RGB JPEG with no EXIF rotation keeps its original bytes.
  * Everything else (grayscale, palette, RGBA, CMYK, 16-bit, rotated JPEGs,
    ...) is converted to 8-bit RGB and encoded as PNG. 16-bit values are
    scaled to 8 bits (v >> 8), not clipped.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
# Errors Pillow raises for unreadable, truncated or absurd files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageDecodeError(Exception):
  """An image file exists but cannot be decoded (corrupt, truncated, unknown format)."""


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  """An image ready to store.

  Attributes:
    data: encoded JPEG or PNG bytes of an 8-bit RGB image [H, W, 3].
    height: H in pixels (after EXIF orientation).
    width: W in pixels (after EXIF orientation).
    kept_original: True if `data` are the file's own JPEG bytes.
    exif_rotated: True if an EXIF orientation other than 1 was applied.
    source_mode: the file's Pillow mode, e.g. 'RGB', 'L', 'P', 'I;16'.
    exif_ignored: True if an EXIF 90-degree orientation was not applied
      because the declared size is the stored one (see module docstring).
  """

  data: bytes
  height: int
  width: int
  kept_original: bool
  exif_rotated: bool
  source_mode: str
  exif_ignored: bool = False


def load_rgb_image(path: str | Path, declared_size: tuple[int, int] | None = None) -> EncodedImage:
  """Decodes an image file fully and returns it as 8-bit RGB encoded bytes.

  Args:
    path: image file.
    declared_size: (width, height) of the annotation file's image entry, if
      any: decides whether a 90-degree EXIF orientation applies.

  Returns:
    The encoded image (see module docstring for JPEG pass-through vs PNG).

  Raises:
    FileNotFoundError: no such file.
    ImageDecodeError: Pillow cannot identify or fully decode the file.
  """
  raw = Path(path).read_bytes()
  try:
    with Image.open(io.BytesIO(raw)) as img:
      img.load()  # Full decode: catches truncated files.
      orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
      ignored = (orientation in (5, 6, 7, 8) and declared_size is not None and img.width != img.height
                 and tuple(declared_size) == (img.width, img.height))
      if ignored or orientation not in range(2, 9):
        orientation = 1
      if img.format == 'JPEG' and img.mode == 'RGB' and orientation == 1:
        return EncodedImage(raw, img.height, img.width, kept_original=True, exif_rotated=False,
                            source_mode=img.mode, exif_ignored=ignored)
      oriented = ImageOps.exif_transpose(img) if orientation != 1 else img
      rgb = to_rgb8(oriented)
      source_mode = img.mode
  except _DECODE_ERRORS as e:
    raise ImageDecodeError(f'{path}: {type(e).__name__}: {e}') from e
  return EncodedImage(encode_png(rgb), rgb.height, rgb.width, kept_original=False,
                      exif_rotated=orientation != 1, source_mode=source_mode, exif_ignored=ignored)


def load_rgb_array(path: str | Path) -> np.ndarray:
  """An image file as uint8 [H, W, 3] RGB in displayed orientation (prediction).

  Same rules as `load_rgb_image` (EXIF orientation applied, any mode and
  bit depth converted), so a model sees at prediction time what it saw in
  training.

  Raises:
    FileNotFoundError: no such file.
    ImageDecodeError: corrupt, truncated or unknown format.
  """
  enc = load_rgb_image(path)
  try:
    with Image.open(io.BytesIO(enc.data)) as img:
      return np.asarray(img.convert('RGB'), np.uint8)
  except _DECODE_ERRORS as e:
    raise ImageDecodeError(f'{path}: {type(e).__name__}: {e}') from e


def to_rgb8(img: Image.Image) -> Image.Image:
  """Converts any Pillow image to mode 'RGB' (8 bits per channel).

  16-bit integer modes are scaled by >> 8; float mode 'F' is clipped to
  [0, 255]; alpha is dropped; other modes use Pillow's conversion.
  """
  if img.mode == 'RGB':
    return img
  if img.mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(img).astype(np.int64)  # [H, W]
    if img.mode != 'I' or values.max(initial=0) > 255:
      values = np.clip(values, 0, 65535) >> 8
    gray = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return gray.convert('RGB')
  if img.mode == 'F':
    gray = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return gray.convert('RGB')
  return img.convert('RGB')


def encode_png(img: Image.Image) -> bytes:
  """PNG bytes of a Pillow image."""
  buffer = io.BytesIO()
  img.save(buffer, format='PNG')
  return buffer.getvalue()
