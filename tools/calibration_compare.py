"""Each likelihood calibration method, fitted on val, scored on test.

Decodes the ``val`` and ``test`` splits of a trained workdir once (its
chosen checkpoint, as ``--mode calibrate`` and ``--mode eval`` do), fits
every ``calibration.method`` (`kpseq_jax.evaluation.calibration_fit`) on
the validation keypoints, and prints, as JSON, the ECE and AUROC of the
raw and of each calibrated likelihood on the test keypoints, and which
method ``auto`` chose. It writes no ``calibration.json``. The choice
stays ``auto``'s, made on val; the other rows show what the rule gave up.

  python tools/calibration_compare.py --config configs/dlc_reaching.py \\
      --workdir runs/reaching_val [--dataset_dir data/dlc_reaching]

Used for docs/uncertainty.md (Platt or centred isotonic, chosen on val).
"""
import argparse
import importlib.util
import json
import sys


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', required=True, help='the run\'s config file')
  p.add_argument('--workdir', required=True, help='the trained workdir')
  p.add_argument('--dataset_dir', help='default: the config\'s')
  p.add_argument('--out', help='also write the JSON here')
  args = p.parse_args(argv)
  from kpseq_jax.data import dataset
  from kpseq_jax.evaluation import calibration, calibration_fit
  from kpseq_jax.evaluation import common, protocols
  from kpseq_jax.inference import predictor as predictor_lib
  from kpseq_jax.runtime import sharding
  spec = importlib.util.spec_from_file_location('config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.dataset_dir:
    config.input.dataset_dir = args.dataset_dir
  info = dataset.load_info(config.input.dataset_dir)
  mesh = sharding.create_mesh(config.sharding.mesh_shape)
  model, variables, step = predictor_lib.restore_variables(
      config, args.workdir, mesh)
  predictor = predictor_lib.Predictor(config, model, variables, mesh)
  alpha = config.calibration.hit_alpha
  keypoints = {}
  for split in ('val', 'test'):
    decoded = common.decode(protocols.create(config, info, split), predictor,
                            predictor.variables)
    hit, known = calibration_fit.hits(decoded.batch, decoded.pred_px,
                                      decoded.size, alpha)
    keypoints[split] = (calibration_fit.raw_of(decoded)[known], hit[known])
  presence = decoded.presence is not None  # The model's, either split.
  (val_raw, val_hit), (test_raw, test_hit) = keypoints['val'], keypoints['test']

  def score(likelihood):
    c = calibration.calibration(likelihood, test_hit)
    return dict(ece=c.ece, auroc=c.auroc)

  out = dict(checkpoint_step=step, hit_alpha=alpha,
             val_keypoints=int(val_raw.size), val_hits=int(val_hit.sum()),
             test_keypoints=int(test_raw.size), test_hits=int(test_hit.sum()),
             raw=score(test_raw))
  for method in calibration_fit.METHODS:
    cmap = calibration_fit.fit(val_raw, val_hit, alpha, step, 'val',
                               presence, method)
    out[method] = dict(score(cmap(test_raw)), fitted=cmap.method)
  out['val_brier_5fold'] = {m: calibration_fit.cross_validated_brier(
      val_raw, val_hit, m) for m in ('isotonic', 'platt')}
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
