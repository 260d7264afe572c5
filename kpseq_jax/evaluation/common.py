"""What every evaluator shares: its inputs, the decoded predictions, the writer.

As big_vision's ``evaluators/common.py``: an evaluator is a small object
with a ``report`` name and ``run(inputs)`` yielding ``(key, value)`` pairs;
`run` runs a list of them on one state and one `write_report` per report
name writes what they yielded:

* a float: JSON and the TensorBoard scalar ``eval_<report>/<key>``;
* any other JSON-ready value (int, str, list, dict, None): JSON only;
* `Markdown` / `Csv`: a section of ``eval_<report>.md`` (in yield order) /
  the text of ``eval_<report>.csv``;
* `File`: the file named by the key (process 0 writes it);
* `Images`: uint8 [H, W, 3] TensorBoard images, tags ``key/<name>``.

A ``/`` in a key nests the JSON: ``oks/ap`` is ``{"oks": {"ap": ..}}``;
an evaluator yields a section whole (``oks``, a dict) and then the floats
of it it wants in TensorBoard by their paths (``oks/ap``), which keep
their place in the JSON. ``eval_<report>.json`` holds every JSON pair.
"""

import copy
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Iterator, Protocol

from absl import logging
import jax
import numpy as np
import tqdm

from kpseq_jax.inference import box_range as box_range_lib
from kpseq_jax.inference import likelihood
from kpseq_jax.inference import predictor as predictor_lib
from kpseq_jax.runtime import metric_writer as metric_writer_lib
from kpseq_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class Markdown:
  """One section of ``eval_<report>.md`` (sections joined by a blank line)."""
  text: str


@dataclasses.dataclass(frozen=True)
class Csv:
  """The whole text of ``eval_<report>.csv``."""
  text: str


@dataclasses.dataclass(frozen=True)
class File:
  """A file of the workdir: ``write(path)`` writes it (process 0 only)."""
  write: Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Images:
  """TensorBoard images: name -> uint8 [H, W, 3]."""
  images: dict[str, np.ndarray]


ARTEFACTS = (Markdown, Csv, File, Images)


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One split decoded once per evaluation, shared by the evaluators.

  Rows are the split's valid samples in evaluation order (N of them).

  Attributes:
    batch: the samples' fields but images, concatenated: ``keypoints``
      float [N, Kmax, 3] image pixels (x, y, v), ``bbox`` [N, 4] pixels,
      ``category_id``, ``image_id``, ``num_keypoints`` [N], ...
    pred_px: float64 [N, Kmax, 2] predicted image pixels (NaN: none).
    base_px: float64 [N, Kmax, 2] the protocol's baseline, image pixels.
    size: float64 [N] the PCK normaliser, or None for `metrics.bbox_size`.
    confidence: float32 [N, Kmax] in [0, 1].
    confidence_by_radius: float32 [N, Kmax, R].
    presence: float32 [N, Kmax] or None (no ``<absent>`` token).
    first: the first process-local batch and its prediction
      (``local``, ``keypoints`` normalised crop [B, Kmax, 2], ``absent``
      bool [B, Kmax]), for drawings.
  """
  batch: dict[str, np.ndarray]
  pred_px: np.ndarray
  base_px: np.ndarray
  size: np.ndarray | None
  confidence: np.ndarray
  confidence_by_radius: np.ndarray
  presence: np.ndarray | None
  first: dict[str, Any]

  @property
  def num_samples(self) -> int:
    return 0 if self.pred_px is None else len(self.pred_px)


class Inputs:
  """What an evaluator's ``run`` gets: the state and its decoder.

  Args:
    predictor: the run's compiled decoder (`predictor.Predictor`, or the
      detector's `box_predictor.BoxPredictor`).
    variables: {'params', 'batch_stats'} on the predictor's mesh.
    step: the state's train step (None if unknown).
    calibration: the likelihood map of this state
      (`likelihood.CalibrationMap`), None when it has none: evaluators
      then report and write raw likelihoods.
    box_range: the training boxes' range (`box_range.from_config`): the
      evaluated boxes out of it are counted and their calibrated
      likelihood is 0 (`likelihood.calibrate`); None: not checked.
  """

  def __init__(self, predictor, variables, step: int | None,
               calibration: likelihood.CalibrationMap | None = None,
               box_range: box_range_lib.BoxRange | None = None):
    self.predictor, self.variables = predictor, variables
    self.step = None if step is None else int(step)
    self.calibration = calibration
    self.box_range = box_range
    self._decoded: dict[int, Decoded] = {}

  def decoded(self, protocol) -> Decoded:
    """The protocol's split decoded (once per `Inputs`, then cached)."""
    if id(protocol) not in self._decoded:
      self._decoded[id(protocol)] = decode(protocol, self.predictor,
                                           self.variables)
    return self._decoded[id(protocol)]


def decode(protocol, predictor: predictor_lib.Predictor, variables
           ) -> Decoded:
  """Decodes every batch of ``protocol`` (`protocols.py`); see `Decoded`."""
  image_size_px = protocol.config.input.image_size_px
  parts, first = [], {}
  bar = tqdm.tqdm(total=protocol.num_samples, desc=f'eval {protocol.split}',
                  unit='sample', disable=jax.process_index() != 0)
  for local in protocol.batches():
    pred = predictor.predict(local, variables)
    if not first:
      first = dict(local=local, keypoints=pred.keypoints, absent=pred.absent)
    batch = sharding.gather(sharding.global_batch(
        {k: v for k, v in local.items()
         if k not in ('image', 'support_image')}, predictor.mesh))
    keep = batch['valid'] > 0
    batch = {k: v[keep] for k, v in batch.items()}
    size = protocol.normaliser(batch)
    parts.append(dict(
        batch=batch, pred_px=pred.keypoints_px[keep],
        base_px=predictor_lib.crop_to_image(
            protocol.baseline(batch), batch['crop_from_image'],
            image_size_px),
        size=size, confidence=pred.confidence[keep],
        confidence_by_radius=pred.confidence_by_radius[keep],
        presence=None if pred.presence is None else pred.presence[keep]))
    bar.update(int(keep.sum()))
  bar.close()
  cat = lambda key: (None if not parts or parts[0][key] is None else
                     np.concatenate([p[key] for p in parts]))
  return Decoded(
      batch={k: np.concatenate([p['batch'][k] for p in parts])
             for k in (parts[0]['batch'] if parts else {})},
      pred_px=cat('pred_px'), base_px=cat('base_px'), size=cat('size'),
      confidence=cat('confidence'),
      confidence_by_radius=cat('confidence_by_radius'),
      presence=cat('presence'), first=first)


class Evaluator(Protocol):
  """The evaluator interface (module docstring)."""
  report: str

  def run(self, inputs: Inputs) -> Iterator[tuple[str, Any]]:
    ...


def run(evaluators: Iterable[tuple[str, Evaluator]], inputs: Inputs,
        workdir: str, writer: metric_writer_lib.MetricWriter
        ) -> dict[str, dict[str, Any]]:
  """Runs every evaluator on one state and writes each report.

  Returns:
    report name -> its JSON (``eval_<report>.json``), the same on every
    process.
  """
  pairs: dict[str, list[tuple[str, Any]]] = {}
  for name, evaluator in evaluators:
    logging.info('Evaluator %s (report %s)', name, evaluator.report)
    pairs.setdefault(evaluator.report, []).extend(evaluator.run(inputs))
  out = {report: write_report(workdir, report, items, inputs.step, writer)
         for report, items in pairs.items()}
  writer.flush()
  return out


def write_report(workdir: str, report: str, pairs: list[tuple[str, Any]],
                 step: int | None,
                 writer: metric_writer_lib.MetricWriter) -> dict[str, Any]:
  """Writes one report's pairs (module docstring); returns its JSON."""
  values = {k: v for k, v in pairs if not isinstance(v, ARTEFACTS)}
  tree = nest(values)
  log_step = 0 if step is None else step
  writer.write_scalars(log_step, {
      f'eval_{report}/{k}': float(v) for k, v in values.items()
      if isinstance(v, (float, np.floating))})
  for key, v in pairs:
    if isinstance(v, Images):
      writer.write_images(log_step, {f'{key}/{n}': im
                                     for n, im in v.images.items()})
  if jax.process_index() != 0:
    return tree
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, f'eval_{report}.json'), tree, indent=2)
  sections = [v.text.rstrip('\n') for _, v in pairs
              if isinstance(v, Markdown)]
  if sections:
    _write_text(os.path.join(workdir, f'eval_{report}.md'),
                '\n\n'.join(sections) + '\n')
  for _, v in pairs:
    if isinstance(v, Csv):
      _write_text(os.path.join(workdir, f'eval_{report}.csv'), v.text)
  for key, v in pairs:
    if isinstance(v, File):
      v.write(os.path.join(workdir, key))
  return tree


def nest(values: dict[str, Any]) -> dict[str, Any]:
  """``{'a/b': 1, 'c': 2}`` -> ``{'a': {'b': 1}, 'c': 2}`` (order kept).

  Raises:
    ValueError: a key both a value and a prefix of another key.
  """
  out: dict[str, Any] = {}
  for key, value in values.items():
    *parents, leaf = key.split('/')
    d = out
    for p in parents:
      d = d.setdefault(p, {})
      if not isinstance(d, dict):
        raise ValueError(f'Evaluation key {key!r}: {p!r} is already a value.')
    d[leaf] = copy.deepcopy(value)
  return out


def write_json(path: str, value: Any, indent: int | None = None) -> None:
  """``json.dump`` to a temporary file, then renamed over ``path``."""
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=indent)
  os.replace(path + '.tmp', path)


def _write_text(path: str, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)
