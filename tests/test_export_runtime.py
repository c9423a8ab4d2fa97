"""The exported model's input fake-quantization and the check that a module fits an artifact;
``random_variables`` and ``mlp_artifact`` for the other export tests (``model.init`` compiles a
random-number program that takes seconds on CPU)."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, load
from jaxcompress.export.runtime import make_apply_fn


def random_variables(model: nn.Module, input_shape, seed: int = 0) -> dict:
  """He-normal kernels, BatchNorm scale/var in [0.5, 1.5], small biases and means (NumPy)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, *input_shape), np.float32))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name == "kernel":
      return (rng.standard_normal(s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(shapes))


class TwoDense(nn.Module):
  out: int = 3

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out, name="fc2")(nn.relu(nn.Dense(4, name="fc1")(x)))


class Renamed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(4, name="fc1")(x)))


def test_only_the_named_layers_get_fake_quantized_inputs():
  model = TwoDense()
  v = random_variables(model, (5,))
  x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
  acts = {"fc1": {"bits": 4, "scale": 0.25, "zero_point": 8, "qmin": 0, "qmax": 15}}
  arrays = {"variables": v, "fold": {}, "acts": {"fc1": (np.float32(0.25), np.int32(8))}}
  got = np.asarray(make_apply_fn(model, acts)(arrays, x))
  xq = (np.clip(np.round(x / 0.25) + 8, 0, 15) - 8) * 0.25  # NumPy oracle of the input grid
  p = v["params"]
  h = np.maximum(xq @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  np.testing.assert_allclose(got, h @ p["fc2"]["kernel"] + p["fc2"]["bias"], rtol=1e-5,
                             atol=1e-5)
  plain = np.asarray(make_apply_fn(model, {})({**arrays, "acts": {}}, x))
  h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  np.testing.assert_allclose(plain, h @ p["fc2"]["kernel"] + p["fc2"]["bias"], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(plain, got)


def test_a_module_that_does_not_fit_the_artifact_is_named_with_both_shapes(tmp_path):
  v = random_variables(TwoDense(), (5,))
  export_model(str(tmp_path), variables=v, input_shape=(5,))
  loaded = load(str(tmp_path), TwoDense())
  assert sorted(loaded.arrays["variables"]["params"]) == ["fc1", "fc2"]
  with pytest.raises(ConfigError) as info:
    load(str(tmp_path), TwoDense(out=2))
  assert str(info.value) == ("model.exported: params/fc2/bias has shape [3] in the artifact, "
                             "TwoDense needs [2] on the artifact's input (5,) float32; it was "
                             "exported from another model, or with another input shape")
  with pytest.raises(ConfigError, match="model.exported: the artifact holds 'params/fc2/bias', "
                                        "which Renamed does not have") as info:
    load(str(tmp_path), Renamed())
  assert "\n" not in str(info.value)


def mlp_artifact(out_dir: str, input_shape=(8, 8, 3), seed: int = 0):
  """Exports an ``mlp`` with 8-bit inputs to fc1 and 4-bit per-channel weights in fc3 (specs
  written by hand, as the quantization package would); returns ``load(out_dir, mlp)``."""
  from jaxcompress.models import get_model
  from jaxcompress.quantization import LayerSpec

  model = get_model("mlp")
  variables = random_variables(model, input_shape, seed)
  w = variables["params"]["fc3"]["kernel"]
  scale = (np.abs(w).max(0, keepdims=True) / 7.5).astype(np.float32)
  specs = {
      "fc1": LayerSpec(path="fc1", kind="Dense", method="minmax", act_bits=8,
                       act_scale=np.float32(0.05), act_zero_point=np.int32(128), act_qmin=0,
                       act_qmax=255, act_range=(-6.4, 6.35)),
      "fc3": LayerSpec(path="fc3", kind="Dense", method="minmax", weight_bits=4, weight_axis=1,
                       weight_scale=scale, weight_zero_point=np.zeros_like(scale, np.int32),
                       weight_qmin=-8, weight_qmax=7)}
  export_model(out_dir, model_name="mlp", variables=variables, specs=specs,
               input_shape=input_shape)
  return load(out_dir, model)
