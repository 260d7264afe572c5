"""Keypoints for batches of top-down crops from a trained model.

The one inference path that evaluation, ``--mode predict`` and the coming
video and CAPE paths share:

* `restore_variables`: the weights of a workdir's latest checkpoint onto a
  mesh (nothing of the optimizer);
* `make_decode_fn`: the compiled greedy decoder (`decoding.py`) with the
  variables' shardings and the batch split over the mesh;
* `Predictor`: holds model, variables and the compiled decoder; turns a
  process-local batch (the `decoding.input_fields` plus
  ``crop_from_image``) into keypoints in crop and image coordinates;
* `crop_to_image`: normalised crop coordinates -> image pixels.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.data import transforms
from kpseq_jax.inference import decoding
from kpseq_jax.runtime import sharding
from kpseq_jax.training import checkpointing
from kpseq_jax.training import train_state as ts


def abstract_variables(config: ml_collections.ConfigDict, model) -> dict:
  """{'params', 'batch_stats'} of `jax.ShapeDtypeStruct`: the model's
  variables as `train_state` initialises them (no optimizer, no memory);
  batch_stats is {} without BatchNorm."""
  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({'params': params_rng, 'dropout': dropout_rng},
                           **ts.dummy_inputs(config), train=False)
    return {'params': variables['params'],
            'batch_stats': variables.get('batch_stats', {})}
  return jax.eval_shape(init, jax.random.PRNGKey(config.seed))


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      mesh: jax.sharding.Mesh):
  """The weights to predict with from ``workdir``'s chosen checkpoint
  (`checkpointing.chosen_step`: the best on the validation split, else the
  latest; the log says which and why): the moving average when the run
  kept one, else params and batch_stats (`TrainState.inference_variables`),
  placed on ``mesh`` as training placed them (``config.sharding.rules``).
  Reads nothing else (no optimizer state, so no train split size).

  Returns:
    (model, {'params', 'batch_stats'} of jax.Array, checkpoint step).

  Raises:
    FileNotFoundError: if ``workdir`` has no restorable checkpoint.
    checkpointing.CheckpointMismatchError: if the checkpoint was written
      with another model config.
  """
  model = ts.create_model(config)
  shardings_of = lambda tree: sharding.state_shardings(
      tree, mesh, config.sharding.fsdp_min_param_elements,
      config.sharding.rules)
  chosen, why = checkpointing.chosen_step(workdir)
  variables, step = checkpointing.restore_variables(
      workdir, abstract_variables(config, model), shardings_of, chosen)
  logging.info('Checkpoint of %s: %s.', workdir,
               why if step == chosen else
               f'step {step} ({why}; step {chosen} could not be read)'
               if chosen is not None else f'step {step} ({why})')
  return model, variables, step


# Fields `Predictor.predict` adds to the decoder's inputs under flip test.
FLIP_FIELDS = ('flip', 'flip_inverse_permutation')


def flip_test_average(decoded: dict, decoded_mirror: dict,
                      inverse_permutation: jax.Array, flip: jax.Array
                      ) -> dict:
  """Averages the predictions of crops and of their horizontal mirrors
  (flip test: MMPose's ``flip_test``, Xiao et al., Simple Baselines,
  ECCV 2018; applied here to decoded coordinates, not heatmaps).

  A model trained with `transforms.RandomFlip` sees a mirrored crop with
  x -> 1 - x (normalised crop coordinates) and keypoint row k holding the
  original row ``perm[k]``; so row j of the original is row
  ``inverse_permutation[j]`` of the mirror's prediction, mirrored back.

  Args:
    decoded, decoded_mirror: `decoding.greedy_decode` outputs of the crops
      and of the same crops mirrored: ``keypoints`` float32 [B, Kmax, 2]
      normalised [0, 1] crop (x, y), ``confidence`` float32 [B, Kmax, R],
      optional ``presence`` float32 [B, Kmax]; NaN past ``num_keypoints``.
    inverse_permutation: int32 [B, Kmax], argsort of each row's category
      flip permutation (identity past its K).
    flip: bool [B], rows to average (categories flipped in training);
      other rows keep ``decoded``.

  Returns:
    ``decoded`` with keypoints, confidence and presence the mean of the
    two where ``flip`` and both are finite; ``num_keypoints`` and
    ``tokens`` stay those of the crops.
  """
  take = lambda a: jnp.take_along_axis(
      a, inverse_permutation.reshape(
          inverse_permutation.shape + (1,) * (a.ndim - 2)), axis=1)
  mirror = take(decoded_mirror['keypoints'])
  mirror = mirror.at[..., 0].set(1.0 - mirror[..., 0])
  out = dict(decoded)
  for name, back in (('keypoints', mirror),
                     ('confidence', take(decoded_mirror['confidence'])),
                     ('presence', take(decoded_mirror['presence'])
                      if 'presence' in decoded else None)):
    if back is None:
      continue
    mine = decoded[name]
    use = flip.reshape((-1,) + (1,) * (mine.ndim - 1)) & jnp.isfinite(back)
    out[name] = jnp.where(use & jnp.isfinite(mine), (mine + back) / 2, mine)
  return out


def make_decode_fn(model, max_num_keypoints: int, variables_sharding,
                   batch_sharding, cached: bool = True,
                   flip_test: bool = False):
  """Jitted ``fn(variables, inputs) -> decode dict`` with shardings.

  Args:
    model: a keypoint `Model` (`kpseq_jax/models/`).
    max_num_keypoints: Kmax.
    variables_sharding: pytree of shardings of {'params', 'batch_stats'}
      (the train state's layout, e.g. fsdp-split).
    batch_sharding: sharding of every input and output array (split on the
      batch dimension).
    cached: True (default): `decoding.cached_greedy_decode`; False: the
      full-recompute reference `decoding.greedy_decode` (same values).
    flip_test: also decode the mirrored crops and average
      (`flip_test_average`); ``inputs`` then holds `FLIP_FIELDS` too.

  Returns:
    ``fn(variables, inputs)`` with ``inputs`` the `decoding.input_fields`
    of a global batch; outputs as `decoding.greedy_decode`.
  """
  decode = (decoding.cached_greedy_decode if cached
            else decoding.greedy_decode)

  def fn(variables, inputs):
    inputs = dict(inputs)
    flip = {k: inputs.pop(k) for k in FLIP_FIELDS if k in inputs}
    out = decode(model, variables, inputs, max_num_keypoints)
    if not flip_test:
      return out
    mirrored = dict(inputs, image=inputs['image'][:, :, ::-1])
    return flip_test_average(
        out, decode(model, variables, mirrored, max_num_keypoints),
        flip['flip_inverse_permutation'], flip['flip'])

  return jax.jit(fn, in_shardings=(variables_sharding, batch_sharding),
                 out_shardings=batch_sharding)


def crop_to_image(keypoints_norm: np.ndarray, crop_from_image: np.ndarray,
                  image_size_px: int) -> np.ndarray:
  """Maps normalised crop keypoints back to image pixels.

  Args:
    keypoints_norm: float [N, K, 2] normalised [0, 1] crop (x, y); NaN
      rows stay NaN.
    crop_from_image: float [N, 2, 3] image -> crop-pixel affines
      (`transforms.crop_matrix`).
    image_size_px: S, the crop side in pixels.

  Returns:
    float64 [N, K, 2] image pixels.
  """
  out = np.empty(keypoints_norm.shape, np.float64)
  for i, m in enumerate(crop_from_image):
    out[i] = transforms.apply_affine(transforms.invert_affine(m),
                                     keypoints_norm[i] * image_size_px)
  return out


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Decoded keypoints of a global batch (numpy, every process has all).

  Attributes:
    keypoints: float32 [B, Kmax, 2] normalised crop (x, y); NaN after
      ``num_keypoints``.
    num_keypoints: int32 [B], keypoint groups generated.
    keypoints_px: float64 [B, Kmax, 2] image pixels (NaN likewise), or None
      when the batch had no ``crop_from_image``.
    confidence: float32 [B, Kmax] in [0, 1], per keypoint: the
      classifier's probability mass within
      ``config.decode.confidence_radius_bins`` bins of the decoded x bin
      times that of y
      (`decoding.coordinate_mass`); NaN after ``num_keypoints``.
    confidence_by_radius: float32 [B, Kmax, R] the same at every radius of
      `decoding.CONFIDENCE_RADII_BINS` (for calibration comparisons).
    presence: float32 [B, Kmax] probability that the keypoint is visible,
      1 - P(``<absent>``); None when the model has no ``<absent>`` token.
      A keypoint is predicted absent when presence < 0.5; it still has its
      best coordinate in ``keypoints``.
  """
  keypoints: np.ndarray
  num_keypoints: np.ndarray
  keypoints_px: np.ndarray | None
  confidence: np.ndarray
  confidence_by_radius: np.ndarray
  presence: np.ndarray | None = None

  @property
  def absent(self) -> np.ndarray:
    """bool [B, Kmax]: predicted not visible (presence < 0.5); all False
    without a presence model."""
    if self.presence is None:
      return np.zeros(self.confidence.shape, bool)
    return self.presence < 0.5


class Predictor:
  """A model's compiled greedy decoder with its variables on a mesh.

  Build one per run (it compiles once per batch shape) and call `predict`
  on process-local batches.

  Args:
    config: ``max_num_keypoints``, ``image_size_px`` and
      ``confidence_radius_bins``.
    model: the keypoint `Model`.
    variables: {'params', 'batch_stats'}, already on ``mesh`` (their
      shardings are kept).
    mesh: the device mesh; batches are split over it.
    cached: use the KV-cached decoder (default) or the reference.
    flip_permutations: category id -> int [K] flip permutation
      (`dataset.DatasetInfo.flip_permutations`) for ``config.decode.flip_test``;
      default: read from ``config.input.dataset_dir``.

  ``config.decode.flip_test`` applies to top-down crop models; a model that
  decodes from the full image or from support images decodes once (with a
  warning in the log).
  """

  def __init__(self, config: ml_collections.ConfigDict, model, variables,
               mesh: jax.sharding.Mesh, cached: bool = True,
               flip_permutations: dict[int, np.ndarray] | None = None):
    self.model = model
    self.variables = variables
    self.mesh = mesh
    self.image_size_px = config.input.image_size_px
    radius = config.decode.confidence_radius_bins
    if radius not in decoding.CONFIDENCE_RADII_BINS:
      raise ValueError(f'confidence_radius_bins={radius} is not one of '
                       f'{decoding.CONFIDENCE_RADII_BINS}.')
    self._radius = decoding.CONFIDENCE_RADII_BINS.index(radius)
    self.input_fields = decoding.input_fields(model)
    self.max_num_keypoints = config.max_num_keypoints
    self.flip_test = bool(config.decode.flip_test)
    if self.flip_test and (model.full_image_memory
                           or model.support_conditioning):
      logging.warning(
          'config.decode.flip_test is not applied: it mirrors top-down crops, '
          'and this model decodes from the full image (model_name='
          'end_to_end) or from support images (CAPE).')
      self.flip_test = False
    if self.flip_test:
      if flip_permutations is None:
        flip_permutations = dataset.load_info(
            config.input.dataset_dir).flip_permutations()
      self._inverse_permutations = {
          int(c): np.argsort(p).astype(np.int32)
          for c, p in flip_permutations.items()}
      # No category is flipped in training (no flip pairs): nothing to
      # average, so no second decode.
      self.flip_test = bool(self._inverse_permutations)
    self._decode = make_decode_fn(
        model, config.max_num_keypoints,
        jax.tree.map(lambda a: a.sharding, variables),
        sharding.batch_sharding(mesh), cached, self.flip_test)

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The fields `predict` reads: `decoding.input_fields`, and
    ``category_id`` under flip test."""
    return self.input_fields + (('category_id',) if self.flip_test else ())

  def _flip_inputs(self, category_ids: np.ndarray) -> dict[str, np.ndarray]:
    """`FLIP_FIELDS` of a local batch: which rows are averaged with their
    mirror (categories with a flip permutation, as `transforms.RandomFlip`
    flips in training) and each row's inverse permutation [b, Kmax]."""
    ids = np.asarray(category_ids).reshape(-1)
    inverse = np.tile(np.arange(self.max_num_keypoints, dtype=np.int32),
                      (len(ids), 1))
    flip = np.zeros(len(ids), bool)
    for i, c in enumerate(ids):
      p = self._inverse_permutations.get(int(c))
      if p is not None:
        inverse[i, :len(p)] = p
        flip[i] = True
    return {'flip': flip, 'flip_inverse_permutation': inverse}

  @classmethod
  def from_state(cls, config: ml_collections.ConfigDict, model, state,
                 mesh: jax.sharding.Mesh) -> 'Predictor':
    """A predictor of a `TrainState`'s weights: their moving average if
    the state has one (`TrainState.inference_variables`)."""
    return cls(config, model, state.inference_variables(), mesh)

  def predict(self, local_batch: dict[str, np.ndarray],
              variables=None) -> Prediction:
    """Decodes a process-local batch; every process gets the global result.

    Args:
      local_batch: this process's [b, ...] numpy arrays: the
        `decoding.input_fields` (``image`` uint8 [b, S, S, 3], ...) and,
        for pixel coordinates, ``crop_from_image`` float [b, 2, 3]. Other
        fields are ignored. A ``full_image_memory`` model may take N boxes
        per image: ``memory_from_crop`` and ``crop_from_image`` [b, N, 2,
        3] (`decoding`); the result then has b x N rows, image-major.
        A ``full_image_memory`` model may take ``backbone_features``
        ({level: jax.Array [b, H_l, W_l, C_l]}, e.g. the detector's, see
        `box_predictor.shares_backbone`) in place of ``image``.
      variables: decode with these instead of the predictor's own (same
        tree and shardings, e.g. a later state of the same run).

    With ``config.decode.flip_test`` the batch also needs ``category_id`` [b]:
    rows of categories with flip pairs are averaged with their mirrored
    crop's prediction (`flip_test_average`; two decodes per batch).

    Returns:
      `Prediction` of the global batch [B = b x processes].

    Raises:
      KeyError: if an input field is missing.
    """
    features = local_batch.get(decoding.BACKBONE_FEATURES_FIELD)
    local = {k: local_batch[k] for k in self.input_fields
             if not (k == 'image' and features is not None)}
    if self.flip_test:
      if 'category_id' not in local_batch:
        raise KeyError('config.decode.flip_test: the batch needs category_id '
                       '(the flip permutation of each row).')
      local.update(self._flip_inputs(local_batch['category_id']))
    inputs = sharding.global_batch(local, self.mesh)
    if features is not None:  # Already device arrays: no host round trip.
      inputs[decoding.BACKBONE_FEATURES_FIELD] = jax.device_put(
          features, sharding.batch_sharding(self.mesh))
    out = sharding.gather(self._decode(
        self.variables if variables is None else variables, inputs))
    px = None
    if 'crop_from_image' in local_batch:
      crops = sharding.gather(sharding.global_batch(
          {'m': local_batch['crop_from_image']}, self.mesh))['m']
      px = crop_to_image(out['keypoints'], crops.reshape(-1, 2, 3),
                         self.image_size_px)
    return Prediction(keypoints=out['keypoints'],
                      num_keypoints=out['num_keypoints'], keypoints_px=px,
                      confidence=out['confidence'][..., self._radius],
                      confidence_by_radius=out['confidence'],
                      presence=out.get('presence'))
