"""ImageNet ResNet import: a torchvision-layout state dict the test writes itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from kpseq_jax.models import pretrained
from kpseq_jax.training import train_state as ts
from kpseq_jax.models.resnet import ResNet
from conftest import smoke_config


def torchvision_resnet_shapes(depth: int) -> dict[str, tuple[int, ...]]:
  """Names and shapes of torchvision's ``resnet{depth}().state_dict()``,
  written out from torchvision/models/resnet.py (not from our model)."""
  shapes = {}

  def bn(name, c):
    shapes.update({f'{name}.weight': (c,), f'{name}.bias': (c,),
                   f'{name}.running_mean': (c,), f'{name}.running_var': (c,),
                   f'{name}.num_batches_tracked': ()})

  shapes['conv1.weight'] = (64, 3, 7, 7)
  bn('bn1', 64)
  bottleneck = depth == 50
  blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
  in_c = 64
  for s, n in enumerate(blocks):
    width = 64 * 2**s
    out_c = width * (4 if bottleneck else 1)
    for b in range(n):
      p = f'layer{s + 1}.{b}'
      if bottleneck:
        convs = [(in_c, width, 1), (width, width, 3), (width, out_c, 1)]
      else:
        convs = [(in_c, width, 3), (width, width, 3)]
      for i, (ci, co, k) in enumerate(convs, 1):
        shapes[f'{p}.conv{i}.weight'] = (co, ci, k, k)
        bn(f'{p}.bn{i}', co)
      if b == 0 and (s > 0 or in_c != out_c):
        shapes[f'{p}.downsample.0.weight'] = (out_c, in_c, 1, 1)
        bn(f'{p}.downsample.1', out_c)
      in_c = out_c
  shapes['fc.weight'] = (1000, in_c)
  shapes['fc.bias'] = (1000,)
  return shapes


def random_state_dict(depth, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in torchvision_resnet_shapes(depth).items():
    if name.endswith('num_batches_tracked'):
      sd[name] = np.array(7, np.int64)
    elif name.endswith('running_var'):
      sd[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[name] = rng.normal(0, 0.1, shape).astype(np.float32)
  return sd


def _conv_nchw(x, w, stride, pad):
  """Plain numpy cross-correlation, torch semantics. x [C, H, W], w OIHW."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
  o, _, kh, kw = w.shape
  h_out = (x.shape[1] - kh) // stride + 1
  w_out = (x.shape[2] - kw) // stride + 1
  out = np.zeros([o, h_out, w_out])
  for i in range(h_out):
    for j in range(w_out):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[:, i, j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2]))
  return out


def test_resnet18_conv1_bn1_match_numpy(tmp_path):
  sd = random_state_dict(18)
  path = tmp_path / 'resnet18.safetensors'
  save_file(sd, str(path))
  model = ResNet(depth=18)
  x = np.random.default_rng(1).normal(size=(1, 16, 16, 3)).astype(np.float32)
  shapes = jax.eval_shape(
      lambda a: model.init(jax.random.PRNGKey(0), a, train=False), x)
  params, stats = pretrained.load_backbone(
      str(path), {'backbone': shapes['params']},
      {'backbone': shapes['batch_stats']})
  variables = {'params': params['backbone'],
               'batch_stats': stats['backbone']}
  _, inter = model.apply(variables, jnp.asarray(x), train=False,
                         capture_intermediates=True)
  got = np.asarray(inter['intermediates']['bn1']['__call__'][0])[0]
  conv = _conv_nchw(x[0].transpose(2, 0, 1), sd['conv1.weight'], 2, 3)
  bn = ((conv - sd['bn1.running_mean'][:, None, None])
        / np.sqrt(sd['bn1.running_var'][:, None, None] + 1e-5)
        * sd['bn1.weight'][:, None, None] + sd['bn1.bias'][:, None, None])
  np.testing.assert_allclose(got, bn.transpose(1, 2, 0), rtol=1e-4, atol=1e-4)
  # A block's downsample and a layer's kernel land transposed OIHW -> HWIO.
  np.testing.assert_array_equal(
      params['backbone']['layer2_0']['downsample_0']['kernel'],
      sd['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      stats['backbone']['layer4_1']['bn2']['var'],
      sd['layer4.1.bn2.running_var'])


@pytest.mark.parametrize('depth', [18, 50])
def test_every_backbone_variable_is_covered_with_its_shape(depth):
  # Zero-stride arrays: no memory for the 25M ResNet-50 weights.
  sd = {k: np.broadcast_to(np.float32(0), s)
        for k, s in torchvision_resnet_shapes(depth).items()}
  params, stats = pretrained.convert_resnet(sd)
  shapes = jax.eval_shape(
      lambda a: ResNet(depth=depth).init(jax.random.PRNGKey(0), a,
                                         train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  # match_backbone raises on any missing, unexpected or mis-shaped leaf.
  pretrained.match_backbone(shapes['params'], params, 'params')
  pretrained.match_backbone(shapes['batch_stats'], stats, 'batch_stats')
  flat = jax.tree_util.tree_leaves(params)
  assert sum(a.size for a in flat) == sum(
      int(np.prod(s)) for k, s in torchvision_resnet_shapes(depth).items()
      if not k.startswith('fc.') and ('conv' in k or 'downsample.0' in k
                                      or k.endswith(('.weight', '.bias'))))


def test_wrong_depth_and_torch_files_fail_clearly(tmp_path):
  path = tmp_path / 'r18.safetensors'
  save_file(random_state_dict(18), str(path))
  shapes = jax.eval_shape(
      lambda a: ResNet(depth=50).init(jax.random.PRNGKey(0), a, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match='wrong depth'):
    pretrained.load_backbone(str(path), {'backbone': shapes['params']},
                             {'backbone': shapes['batch_stats']})
  pth = tmp_path / 'r.pth'
  pth.write_bytes(b'not really')
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    with pytest.raises(ImportError, match='torch is not installed'):
      pretrained.load_state_dict(str(pth))
  with pytest.raises(FileNotFoundError):
    pretrained.load_state_dict(str(tmp_path / 'missing.safetensors'))


def test_create_train_state_loads_the_file_and_frozen_norm_is_fixed(tmp_path):
  sd = random_state_dict(18)
  path = tmp_path / 'r18.safetensors'
  save_file(sd, str(path))
  config = smoke_config('unused', **{'model_init': str(path)},
                        **{'model.resnet.norm': 'frozen_batch',
                           'model.resnet.width': 64})  # torchvision's.
  model = ts.create_model(config)
  tx = ts.create_optimizer(config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))
  state = ts.create_train_state(config, model, tx, mesh)
  bb = state.params['backbone']
  np.testing.assert_array_equal(
      bb['conv1']['kernel'], sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats['backbone']['bn1']['mean'],
                                sd['bn1.running_mean'])
  # One optimizer step with non-zero gradients: BN scale/bias unchanged,
  # convs and the decoder updated.
  updates, _ = jax.jit(lambda s: tx.update(
      jax.tree.map(jnp.ones_like, s.params), s.opt_state, s.params))(state)
  assert not np.any(np.asarray(updates['backbone']['bn1']['scale']))
  assert not np.any(np.asarray(updates['backbone']['layer1_0']['bn2']['bias']))
  assert np.all(np.asarray(updates['backbone']['conv1']['kernel']) != 0)


def _single_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))


def test_a_trained_workdir_is_a_backbone_source(tmp_path):
  """``pretrained_backbone_path`` naming a workdir: the latest checkpoint's
  backbone (params and BatchNorm statistics) initialises the model, its
  other arrays are ignored (there a detector's heads would be) and the rest
  of the new model keeps its own initialisation."""
  from kpseq_jax.training import checkpointing
  mesh = _single_device_mesh()
  frozen = {'model.resnet.norm': 'frozen_batch',
            'model.resnet.frozen_stages': 4}
  # One compiled initialisation for the three states (the seed and the
  # path are not part of it).
  source_config = smoke_config('unused', seed=3, **frozen)
  model = ts.create_model(source_config)
  tx = ts.create_optimizer(source_config)
  source = ts.create_train_state(source_config, model, tx, mesh)
  stats = jax.tree.map(lambda a: a + 0.25, source.batch_stats)  # Not init.
  saved = {'params': dict(source.params, class_heads_0={'w': jnp.ones(3)}),
           'batch_stats': stats}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'source'))
  ckpt.save(7, saved)
  ckpt.wait()
  ckpt.close()

  config = smoke_config('unused', seed=0, **frozen,
                        **{'model_init': str(tmp_path / 'source')})
  state = ts.create_train_state(config, ts.create_model(config),
                                ts.create_optimizer(config), mesh)
  jax.tree.map(np.testing.assert_array_equal, state.params['backbone'],
               source.params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats['backbone'],
               stats['backbone'])
  fresh = ts.create_train_state(
      smoke_config('unused', seed=0, **frozen),
      ts.create_model(config), ts.create_optimizer(config), mesh)
  for name in set(state.params) - {'backbone'}:
    jax.tree.map(np.testing.assert_array_equal, state.params[name],
                 fresh.params[name])

  with pytest.raises(FileNotFoundError, match='no checkpoint to take a '
                     'backbone from'):
    checkpointing.read_backbone(str(tmp_path / 'empty'))
  headless = checkpointing.Checkpointer(str(tmp_path / 'no_backbone'))
  headless.save(1, {'params': {'decoder': {'w': jnp.ones(3)}}})
  headless.wait()
  headless.close()
  with pytest.raises(ValueError, match=r"no params\['backbone'\]"):
    checkpointing.read_backbone(str(tmp_path / 'no_backbone'))


def test_frozen_norm_gives_a_batch_norm_backbones_inference_features():
  """A keypoint model with ``backbone_norm='frozen_batch'`` on the variables
  of a detector trained with ``'batch'`` computes the detector's features
  (inference mode): the two can share one backbone pass."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  trained = ResNet(depth=18, norm='batch')
  shapes = jax.eval_shape(
      lambda a: trained.init(jax.random.PRNGKey(0), a, train=False), x)
  variables = jax.tree.map(  # Statistics and affines away from their init.
      lambda a: rng.uniform(0.1, 0.5, a.shape).astype(np.float32), shapes)
  features = lambda norm: jax.jit(functools.partial(
      ResNet(depth=18, norm=norm).apply, train=False))(variables, x)
  want, got = features('batch'), features('frozen_batch')
  assert set(got) == set(want)
  for level in want:
    np.testing.assert_allclose(got[level], want[level], rtol=2e-5,
                               atol=2e-5 * float(np.abs(want[level]).max()))
