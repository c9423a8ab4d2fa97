"""BatchNorm folding against NumPy and Flax's own BatchNorm; finalize's bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import finalize, fold_bn, folded_scale
from jaxcompress.export.fold import bn_path
from jaxcompress.export.runtime import layer_variables
from jaxcompress.models import CifarResNet
from jaxcompress.quantization import Codebook, LayerSpec
from test_export_runtime import random_variables

RNG = np.random.default_rng(0)
EPS = 1e-5


def _bn(c):
  return ({"scale": RNG.uniform(0.5, 2, c), "bias": RNG.standard_normal(c)},
          {"mean": RNG.standard_normal(c), "var": RNG.uniform(0.1, 3, c)})


def test_fold_bn_equals_numpy_batchnorm_after_a_dense_layer():
  x, w, b = RNG.standard_normal((5, 6)), RNG.standard_normal((6, 4)), RNG.standard_normal(4)
  bn, stats = _bn(4)
  y = x @ w + b
  expected = (y - stats["mean"]) / np.sqrt(stats["var"] + EPS) * bn["scale"] + bn["bias"]
  wf, bf = fold_bn(w, b, bn, stats)
  np.testing.assert_allclose(x @ wf + bf, expected, rtol=1e-5, atol=1e-5)
  wf0, bf0 = fold_bn(w, None, bn, stats)  # bias-free conv
  np.testing.assert_allclose(x @ wf0 + bf0, expected - b / np.sqrt(stats["var"] + EPS)
                             * bn["scale"], rtol=1e-5, atol=1e-5)


def test_quantized_kernel_folds_into_a_per_channel_scale_on_unchanged_integers():
  q = RNG.integers(-8, 8, (6, 4))
  zp, s = np.array([0, 1, -2, 3]), RNG.uniform(0.01, 0.1, 4)
  x = RNG.standard_normal((5, 6))
  bn, stats = _bn(4)
  g = bn["scale"] / np.sqrt(stats["var"] + EPS)
  expected = (x @ ((q - zp) * s) - stats["mean"]) * g + bn["bias"]
  scale = folded_scale(s.reshape(1, 4), g, 4)
  got = (x @ (q - zp)) * scale + (bn["bias"] - stats["mean"] * g)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(folded_scale(0.5, None, 3), [0.5, 0.5, 0.5])


def test_bn_names_follow_convs():
  assert bn_path("conv1") == "bn1" and bn_path("layer2_1/conv2") == "layer2_1/bn2"
  assert bn_path("conv") == "bn" and bn_path("linear") is None


def _resnet8():
  """A depth-8 CIFAR ResNet with non-trivial BatchNorm statistics and parameters."""
  model = CifarResNet(depth=8)
  x = jnp.asarray(RNG.standard_normal((3, 8, 8, 3)), jnp.float32)
  return model, random_variables(model, (8, 8, 3)), x


def test_folded_resnet_equals_the_batchnorm_resnet():
  model, v, x = _resnet8()
  layers = finalize(v)
  assert all(t.kind == "float" and t.bias is not None for t in layers.values())
  folded = CifarResNet(depth=8, folded=True)
  np.testing.assert_allclose(jax.jit(folded.apply)(layer_variables(layers), x),
                             jax.jit(model.apply)(v, x),
                             rtol=1e-4, atol=1e-4)


def test_finalize_rejects_inputs_that_do_not_fit():
  _, v, _ = _resnet8()
  spec = LayerSpec(path="layer9_9/conv1", kind="Conv", method="minmax")
  with pytest.raises(ConfigError, match="export specs: 'layer9_9/conv1' is not a Conv/Dense "
                                        "layer of the model"):
    finalize(v, specs={spec.path: spec})
  both = LayerSpec(path="linear", kind="Dense", method="minmax", weight_bits=8, weight_axis=1,
                   weight_scale=np.ones((1, 10), np.float32),
                   weight_zero_point=np.zeros((1, 10), np.int32), weight_qmin=-128, weight_qmax=127)
  book = Codebook(np.linspace(-1, 1, 4, dtype=np.float32), np.zeros((64, 10), np.int32))
  with pytest.raises(ConfigError, match="'linear' has both a quantization spec"):
    finalize(v, specs={"linear": both}, codebooks={"linear/kernel": book})
  with pytest.raises(ConfigError, match="has no bn1/mean and bn1/var to fold"):
    finalize({"params": v["params"]})
  with pytest.raises(ConfigError, match="masks must have the structure"):
    finalize(v, masks={"conv1": {"kernel": 1}})
