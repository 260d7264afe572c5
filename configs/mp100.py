r"""MP-100 at the paper's recipe: one of the five splits, CAPE or supervised.

Everything else is `default.py` unchanged (ResNet-50 at 512 px, 6 decoder
layers, batch 2, AdamW 1e-4, 300 epochs, x0.1 at epoch 200, flip, random
crop, colour jitter). Fields added here:

  split    1..5, MP-100's category split.
  setting  'cape' (default): category-agnostic pose, the benchmark's task:
           train and test categories disjoint, as MP-100's split files
           define them (train on mp100_split{N}_train.json, select on
           _val, test on _test); the model is support-conditioned and
           evaluated on MP-100's episodes (``--config.num_shots=1|5``, 200
           episodes x 15 queries per test category); the data set is
           ``data/mp100_cape_split{N}``.
           'supervised': one model over every category, split by image
           (`data_prep/mp100_supervised.py`); ``data/mp100_supervised_split{N}``.

``dataset_dir`` follows ``split`` and ``setting`` (``--config.split=3``
changes it) unless overridden. Build the data sets (README, "Training on
MP-100"):

  # cape, split 1: MP-100's own files, one TFDS split per file.
  python -m data_prep.build --image-root data/mp100/images \
    --annotations train=data/mp100/annotations/mp100_split1_train.json \
    --annotations val=data/mp100/annotations/mp100_split1_val.json \
    --annotations test=data/mp100/annotations/mp100_split1_test.json \
    --out data/mp100_cape_split1
  python -m kpseq_jax.main --config configs/mp100.py --config.split=1 \
    --workdir runs/mp100_cape_split1

The test set is evaluated by MP-100's protocol (`kpseq_jax/evaluation/metrics.py`);
the paper figure is the mean over the five splits.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  with c.unlocked():
    c.split = 1
    c.field_choices.split = (1, 2, 3, 4, 5)
  c.setting = 'cape'
  # Lazy: 'data/mp100_cape_split1', 'data/mp100_supervised_split3', ...
  c.dataset_dir = ('data/mp100_' + c.get_ref('setting') + '_split' +
                   c.get_ref('split').to_str())
  c.train_split = 'train'
  c.eval_split = 'test'
  c.max_num_keypoints = 68  # 300W face (id 40).
  return c
