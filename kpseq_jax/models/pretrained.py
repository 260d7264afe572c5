"""ImageNet-pretrained ResNet weights from a torchvision/timm state dict.

Nothing is downloaded: the user gives a file (``config.model_init``),
e.g. torchvision's ``resnet50-0676ba61.pth`` or timm's ``model.safetensors``.

* ``.safetensors`` is read with the ``safetensors`` package's numpy API (no
  torch needed).
* ``.pth`` / ``.pt`` / ``.bin`` need torch, which is not a dependency of this
  project: without it the loader raises an ImportError saying how to convert
  the file once (``safetensors.torch.save_file``) on a machine that has it.

Names: `resnet.ResNet` mirrors torchvision's layout, so the mapping is
mechanical (torchvision and timm ResNets share these names):

    conv1.weight [O, I, kh, kw]          -> params conv1/kernel [kh, kw, I, O]
    bn1.weight / bn1.bias                -> params bn1/scale / bn1/bias
    bn1.running_mean / running_var       -> batch_stats bn1/mean / bn1/var
    layer2.0.downsample.0.weight         -> params layer2_0/downsample_0/kernel
    layer2.0.downsample.1.running_mean   -> batch_stats layer2_0/downsample_1/mean

``fc.*`` (the ImageNet classifier) and ``num_batches_tracked`` are ignored;
prefixes ``module.``, ``backbone.`` and DETR's ``backbone.0.body.`` are
stripped. With ``backbone_norm='group'`` there are no running statistics to
load and the file's BatchNorm affine parameters do not apply: an error.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

_PREFIXES = ('module.', 'backbone.0.body.', 'backbone.', 'model.')
_IGNORED_SUFFIXES = ('num_batches_tracked',)
_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'),
              'running_var': ('batch_stats', 'var')}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict as name -> numpy array.

  Args:
    path: ``.safetensors`` (numpy, no torch) or ``.pth``/``.pt``/``.bin``
      (torch needed); a checkpoint dict with a ``state_dict`` or ``model``
      entry is unwrapped.

  Raises:
    FileNotFoundError: no such file.
    ImportError: a torch file and torch is not installed.
    ValueError: an unknown extension.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'pretrained backbone file {path!r} not found')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  if ext in ('.pth', '.pt', '.bin'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'{path} is a torch file and torch is not installed (it is not a '
          'dependency of kpseq_jax). Convert it once where torch is '
          'available: `from safetensors.torch import save_file; '
          f'save_file(torch.load({path!r}, map_location="cpu"), '
          '"resnet.safetensors")`, then pass the .safetensors file.') from e
    sd = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
      if isinstance(sd, dict) and isinstance(sd.get(key), dict):
        sd = sd[key]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()
            if hasattr(v, 'detach')}
  raise ValueError(f'{path}: expected .safetensors, .pth, .pt or .bin')


def _strip(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      return name[len(p):]
  return name


def convert_resnet(state_dict: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """torchvision/timm ResNet state dict -> (params, batch_stats) of `ResNet`.

  Returns:
    Nested dicts in the Flax layout (module names as in `resnet.py`), float32.

  Raises:
    ValueError: a name that is not a ResNet conv/BatchNorm entry.
  """
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for raw_name, value in state_dict.items():
    name = _strip(raw_name)
    if name.startswith('fc.') or name.endswith(_IGNORED_SUFFIXES):
      continue
    parts = name.split('.')
    if parts[0].startswith('layer'):  # layer2.0.x -> layer2_0/x
      parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
    if len(parts) >= 3 and parts[-3] == 'downsample':  # downsample.1.w
      parts = parts[:-3] + [f'downsample_{parts[-2]}', parts[-1]]
    *path, leaf = parts
    value = np.asarray(value, np.float32)
    if leaf == 'weight' and value.ndim == 4:  # conv: OIHW -> HWIO.
      collection, flax_leaf = 'params', 'kernel'
      value = np.transpose(value, (2, 3, 1, 0))
    elif leaf in _BN_LEAVES and value.ndim == 1:
      collection, flax_leaf = _BN_LEAVES[leaf]
    else:
      raise ValueError(f'{raw_name!r} {value.shape}: not a ResNet conv or '
                       'BatchNorm entry')
    node = params if collection == 'params' else stats
    for p in path:
      node = node.setdefault(p, {})
    node[flax_leaf] = value
  return params, stats


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in flat.items():
    *path, leaf = k.split('/')
    node = out
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def match_backbone(target: Mapping[str, Any], converted: Mapping[str, Any],
                   what: str) -> dict[str, np.ndarray]:
  """Checks converted arrays cover ``target`` exactly, shape for shape.

  Args:
    target: the model's backbone collection (arrays or ShapeDtypeStructs).
    converted: from `convert_resnet`.
    what: 'params' or 'batch_stats', for the message.

  Returns:
    ``converted`` restricted to ``target``'s leaves, nested like it.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped entries.
  """
  t, c = _flatten(target), _flatten(converted)
  missing = sorted(set(t) - set(c))
  unexpected = sorted(set(c) - set(t))
  bad = sorted(f'{k}: file {c[k].shape} vs model {tuple(t[k].shape)}'
               for k in set(t) & set(c) if c[k].shape != tuple(t[k].shape))
  if missing or unexpected or bad:
    raise ValueError(
        f'pretrained backbone {what} do not match the model (wrong depth?): '
        f'missing {missing[:8]}{"..." if len(missing) > 8 else ""} '
        f'({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), '
        f'shape mismatches {bad[:8]} ({len(bad)})')
  return _unflatten({k: c[k] for k in t})


def load_backbone(path: str, params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any], backbone_key: str = 'backbone'
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Replaces ``params[backbone_key]`` (and its batch_stats) with a file's.

  Args:
    path: state dict file (see `load_state_dict`).
    params: the model's params (only their structure and shapes are used
      under ``backbone_key``; other entries are returned unchanged).
    batch_stats: the model's batch_stats ({} for GroupNorm).
    backbone_key: the backbone's module name in the model.

  Returns:
    (params, batch_stats) with the backbone's numpy arrays from the file.

  Raises:
    ValueError: the file does not cover the model's backbone exactly, or the
      model has no BatchNorm statistics to receive (``backbone_norm='group'``).
  """
  new_params, new_stats = convert_resnet(load_state_dict(path))
  return place_backbone(new_params, new_stats, params, batch_stats, path,
                        backbone_key)


def place_backbone(new_params: Mapping[str, Any], new_stats: Mapping[str, Any],
                   params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                   source: str, backbone_key: str = 'backbone'
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``params`` / ``batch_stats`` with their ``backbone_key`` entries
  replaced by ``new_params`` / ``new_stats`` (Flax layout of `ResNet`, from
  `convert_resnet` or another workdir's checkpoint), checked leaf for leaf.

  Args:
    source: the file or workdir they came from, for error messages.

  Raises:
    ValueError: as `load_backbone`.
  """
  if backbone_key not in batch_stats and new_stats:
    raise ValueError(f'{source} holds BatchNorm statistics but the model has '
                     'none (backbone_norm="group"?): use "batch" or '
                     '"frozen_batch" with these weights')
  params = dict(params)
  params[backbone_key] = match_backbone(params[backbone_key], new_params,
                                        'params')
  batch_stats = dict(batch_stats)
  if backbone_key in batch_stats:
    batch_stats[backbone_key] = match_backbone(batch_stats[backbone_key],
                                               new_stats, 'batch_stats')
  return params, batch_stats
