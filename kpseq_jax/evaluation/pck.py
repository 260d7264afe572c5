"""PCK evaluators: MP-100 PCK@0.2 with its curve and baseline, pixel accuracy.

`PCKEvaluator` yields the keys of ``eval_<name>.json`` up to ``notes``
(`report.EvalReport`), the per-category table (Markdown and CSV) and
``pck_curve_<name>.png``; `PixelAccuracyEvaluator` yields
``pixel_accuracy``. Both score the predictions `common.Decoded` holds.
"""

from typing import Any, Iterator

from absl import logging
import numpy as np

from kpseq_jax.data import dataset
from kpseq_jax.evaluation import common
from kpseq_jax.evaluation import metrics
from kpseq_jax.evaluation import report as report_lib

# CAPE papers' mPCK: the mean of PCK at these thresholds.
MPCK_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25)


def category_name(info: dataset.DatasetInfo, cid: int) -> str:
  """``"<id>:<name>"`` of a category (the id alone if unknown; ``/`` in a
  name, which would nest the JSON (`common.nest`), becomes ``_``)."""
  c = info.categories.get(cid)
  return f'{cid}:{c.name}'.replace('/', '_') if c else str(cid)


class PCKEvaluator:
  """PCK against the threshold and mean pixel error, model and baseline.

  Args:
    protocol: what is evaluated (`protocols.Instances` / `Episodes`).
    info: the data set's categories.
    name: the report (``eval_<name>.json``): the split, or
      ``<split>_permuted`` for CAPE episodes in a random keypoint order.
  """

  def __init__(self, protocol, info: dataset.DatasetInfo, name: str):
    self.protocol, self.info, self.report = protocol, info, name

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    """Yields the PCK keys of `report.EvalReport`, then the artefacts."""
    d = inputs.decoded(self.protocol)
    curve, base_curve = [], []
    for alpha in report_lib.ALPHAS:
      for out, px in ((curve, d.pred_px), (base_curve, d.base_px)):
        acc = metrics.PCKAccumulator(alpha=alpha)
        if d.num_samples:
          acc.update(d.batch['category_id'], px, d.batch['keypoints'],
                     d.batch['bbox'], size=d.size)
        out.append(acc.result())
    values = self._values(inputs.step, d.num_samples, curve, base_curve)
    logging.info(
        'Eval %s (step %s, %d samples): PCK@0.2 %.4f, mean error %.2f px '
        '| %s: PCK@0.2 %.4f, mean error %.2f px', self.protocol.split,
        inputs.step, values['num_instances'], values['pck'],
        values['mean_error_px'], values['baseline'], values['baseline_pck'],
        values['baseline_error_px'])
    yield from values.items()
    # Each category's PCK a TensorBoard scalar too (`common.nest`).
    yield from ((f'per_category_pck/{c}', p)
                for c, p in values['per_category_pck'].items())
    rows = report_lib.category_rows(values)
    yield 'table', common.Markdown(report_lib.to_markdown(rows))
    yield 'table', common.Csv(report_lib.to_csv(rows))
    yield f'pck_curve_{self.report}.png', common.File(
        lambda path: report_lib.plot_pck_curve(values, path))

  def _values(self, step: int | None, num_samples: int,
              curve: list[metrics.PCKResult],
              base_curve: list[metrics.PCKResult]) -> dict[str, Any]:
    """The `report.EvalReport` fields up to ``notes``, in its order."""
    protocol = self.protocol
    named = lambda r: {category_name(self.info, c): v for c, v in r.items()}
    figure = ((lambda r: r.pck_instance_mean) if protocol.mean_over_samples
              else (lambda r: r.pck))
    at = lambda alpha: report_lib.ALPHAS.index(alpha)
    res, base = curve[at(0.2)], base_curve[at(0.2)]
    return dict(
        name=self.report, split=protocol.split, checkpoint_step=step,
        num_instances=num_samples, pck=figure(res),
        pck_protocol=protocol.description,
        pck_instance_mean=res.pck_instance_mean,
        pck_keypoint_pooled=res.pck_keypoint_pooled,
        num_excluded_instances=res.num_excluded,
        mean_error_px=res.mean_error_px,
        num_labelled_keypoints=res.num_keypoints,
        per_category_pck=named(res.per_category),
        per_category_instances=named(res.per_category_instances),
        per_category_labelled_keypoints=named(res.per_category_keypoints),
        per_category_error_px=named(res.per_category_error_px),
        baseline=protocol.baseline_name, baseline_pck=figure(base),
        baseline_error_px=base.mean_error_px,
        baseline_per_category_pck=named(base.per_category),
        baseline_per_category_error_px=named(base.per_category_error_px),
        pck_curve=dict(
            alphas=list(report_lib.ALPHAS), pck=[figure(r) for r in curve],
            baseline_pck=[figure(r) for r in base_curve],
            per_category_pck={
                category_name(self.info, c):
                    [r.per_category.get(c) for r in curve]
                for c in res.per_category}),
        mpck=float(np.mean([figure(curve[at(a)]) for a in MPCK_ALPHAS])),
        num_samples_without_keypoints=res.num_without_keypoints,
        notes=list(protocol.notes))


class PixelAccuracyEvaluator:
  """Accuracy within 1, 5, 25 px and mean absolute error, overall and per
  keypoint (`metrics.PixelAccuracyAccumulator`; the captioning papers'
  figures). Args as `PCKEvaluator`."""

  def __init__(self, protocol, info: dataset.DatasetInfo, name: str):
    self.protocol, self.info, self.report = protocol, info, name

  def run(self, inputs: common.Inputs) -> Iterator[tuple[str, Any]]:
    d = inputs.decoded(self.protocol)
    acc = metrics.PixelAccuracyAccumulator()
    if d.num_samples:
      acc.update(d.batch['category_id'], d.pred_px, d.batch['keypoints'],
                 ordered='keypoint_order' not in d.batch)
    yield 'pixel_accuracy', acc.result(
        {c.id: list(c.keypoint_names) for c in self.info.categories.values()})
