"""PRTR's end-to-end keypoint stage (Li et al., CVPR 2021): the supervised
sequence model on a whole image's memory.

The images are whole frames on the detector's canvas and each example's
keypoints live in a box of its frame: `Memory.from_crop` maps normalised
box (crop) coordinates, the frame of the tokens, to normalised image
coordinates, and the deformable decoder samples the image's memory inside
the box (`deformable_attention.MultiScaleDeformableAttention.attend`). One
backbone pass serves every box of an image; the parameters are those of
`supervised.Model`.
"""

from __future__ import annotations

from typing import Tuple

import jax

from kpseq_jax.models import model as model_lib
from kpseq_jax.models import supervised
from kpseq_jax.runtime import sharding


class Model(supervised.Model):
  """`supervised.Model` reading a whole image per example (module
  docstring); the same fields and parameters."""

  train_fields = supervised.TRAIN_FIELDS + (model_lib.FROM_CROP_FIELD,)
  full_image_memory = True

  @staticmethod
  def inputs(batch: dict) -> dict:
    return dict(supervised.Model.inputs(batch),
                memory_from_crop=batch[model_lib.FROM_CROP_FIELD])

  def __call__(self, images: jax.Array, input_tokens: jax.Array,
               input_coords: jax.Array, train: bool,
               memory_from_crop: jax.Array | None = None
               ) -> Tuple[jax.Array, jax.Array]:
    """`decode` in the memory of whole ``images`` uint8 [B, H, W, 3] (the
    canvas) with ``memory_from_crop`` float [B, 2, 3] per example.

    Raises:
      ValueError: ``memory_from_crop`` missing.
    """
    if memory_from_crop is None:
      raise ValueError('memory_from_crop is missing: an end_to_end model '
                       'reads the box of each example in its image.')
    memory = self.encode(images, train)
    memory = memory.replace(
        features=sharding.constrain_batch(memory.features),
        from_crop=memory_from_crop)
    return self.decode(memory, input_tokens, input_coords, train)
