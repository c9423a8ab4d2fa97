"""BatchNorm folding against NumPy and Flax's own BatchNorm; finalize's bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import bn_multiplier, finalize, fold_bn
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


def test_quantized_layer_keeps_its_kernel_and_gets_a_gain_and_bias():
  """finalize's int layer: kernel (q - zp) * s untouched, y * gain + bias equals BN (NumPy)."""
  w = RNG.standard_normal((6, 4)).astype(np.float32)
  s = (np.abs(w).max(0, keepdims=True) / 7.5).astype(np.float32)
  bn, stats = _bn(4)
  spec = LayerSpec(path="conv", kind="Dense", method="minmax", weight_bits=4, weight_axis=1,
                   weight_scale=s, weight_zero_point=np.zeros((1, 4), np.int32), weight_qmin=-8,
                   weight_qmax=7)
  variables = {"params": {"conv": {"kernel": w}, "bn": bn}, "batch_stats": {"bn": stats}}
  t = finalize(variables, specs={"conv": spec})["conv"]
  q = np.clip(np.round(w / s), -8, 7)
  np.testing.assert_array_equal(t.codes, q)
  np.testing.assert_array_equal(t.kernel(), (q * s).astype(np.float32))
  g = bn["scale"] / np.sqrt(stats["var"] + EPS)
  np.testing.assert_allclose(t.gain, g, rtol=1e-6)
  np.testing.assert_allclose(bn_multiplier(bn["scale"], stats["var"]), g, rtol=1e-6)
  x = RNG.standard_normal((5, 6))
  expected = (x @ (q * s) - stats["mean"]) * g + bn["bias"]
  np.testing.assert_allclose((x @ t.kernel()) * t.gain + t.bias, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x @ t.folded_kernel() + t.bias, expected, rtol=1e-5, atol=1e-5)


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
