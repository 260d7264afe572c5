r"""MP-100 at the paper's recipe: one of the five splits, CAPE or supervised.

`default.py` unchanged (ResNet-50 at 512 px, 6 decoder layers, batch 2,
AdamW 1e-4, 300 epochs stated in steps with x0.1 at epoch 200: set
``optim.num_train_steps`` / ``optim.decay_steps`` from the train split's
size, docs/mp100.md). The argument chooses the system:

  cape        (default) category-agnostic pose, the benchmark's task: train
              and test categories disjoint, as MP-100's split files define
              them; a support-conditioned model evaluated on MP-100's
              episodes (``--config.cape.num_shots=1|5``, 200 episodes x 15
              queries per test category); data set ``data/mp100_cape_split{N}``.
  supervised  one model over every category, split by image
              (`data_prep/mp100_supervised.py`); data set
              ``data/mp100_supervised_split{N}``.

A second token swaps the ResNet-50 for a ViT with its fine-tuning recipe
(`default.vit_recipe`): ``cape,dinov2`` a DINOv2 ViT-S/14 at 504 px (the
backbone of EdgeCape's code), ``cape,mae`` ViTPose-B's ViT-B/16; pass the
weights with ``--config.model_init=dinov2_vits14.safetensors``
(docs/mp100.md, docs/vit.md).

``split`` (1..5, MP-100's category split) sets ``input.dataset_dir`` unless
that is overridden:

  python -m kpseq_jax.main --config configs/mp100.py --config.split=1 \
    --workdir runs/mp100_cape_split1
  python -m kpseq_jax.main --config configs/mp100.py:supervised \
    --config.split=3 --workdir runs/mp100_supervised_split3
  python -m kpseq_jax.main --config configs/mp100.py:cape,dinov2 \
    --config.cape.num_shots=5 --config.model_init=dinov2_vits14.safetensors \
    --workdir runs/mp100_cape_dinov2_split1_5shot

Building the data sets: docs/mp100.md. The test set is evaluated by MP-100's
protocol (`kpseq_jax/evaluation/metrics.py`); the paper figure is the mean
over the five splits.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: 'cape' (default) or 'supervised', optionally ',dinov2' or
  ',mae' (`default.parse_arg`).

  Raises:
    ValueError: another system, or an argument `default.parse_arg` refuses.
  """
  usage = (f'configs/mp100.py:{arg}: the argument must be cape or '
           'supervised (optionally with ,dinov2 or ,mae)')
  try:
    model_name, backbone = default.parse_arg(arg, default_model='cape')
  except ValueError as e:
    raise ValueError(f'{usage}: {e}') from None
  if model_name not in ('cape', 'supervised'):
    raise ValueError(usage)
  c = default.get_config(f'{model_name},{backbone}')
  with c.unlocked():
    c.split = 1
    c.field_choices.split = (1, 2, 3, 4, 5)
  # Lazy: 'data/mp100_cape_split1', 'data/mp100_supervised_split3', ...
  c.input.dataset_dir = ('data/mp100_' + c.get_ref('model_name') + '_split' +
                         c.get_ref('split').to_str())
  c.max_num_keypoints = 68  # 300W face (id 40).
  return c
