"""Skipping pruned output channels (jaxcompress.export.slim) on Linen and NNX models, against the
full-width model's own forward and a NumPy oracle; the compiled program multiplies by the kept
channels only."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, load, load_serving, save_serving
from jaxcompress.export.slim import kept_outputs, places_by_product, segments, slim, slim_arrays
from test_export_runtime import random_variables


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(
        nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, name="conv2")(x))
    x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=2, padding="VALID", name="conv3")(x))
    x = nn.relu(nn.Dense(5, name="fc1")(x.mean((1, 2))))
    return nn.Dense(3, name="head")(x)


def zero_channels(variables, removed: dict[str, list[int]]):
  """``variables`` with whole output channels of the named kernels set to 0 (NumPy)."""
  params = jax.tree.map(np.array, variables["params"])
  for path, channels in removed.items():
    params[path]["kernel"][..., channels] = 0
  return {**variables, "params": params}


def test_slim_skips_zero_channels_of_a_linen_cnn_and_keeps_its_outputs(tmp_path):
  model = SmallCNN()
  v = zero_channels(random_variables(model, (8, 8, 3)),
                    {"conv1": [0, 5, 6], "conv2": [1], "conv3": [0, 1, 3], "fc1": [2]})
  export_model(str(tmp_path), variables=v, input_shape=(8, 8, 3))
  loaded = load(str(tmp_path), model)
  out = slim(loaded, multiple=1, max_kept=1)
  assert out.channels == {"conv1": (5, 8), "conv2": (5, 6), "conv3": (1, 4), "fc1": (4, 5)}
  assert out.full_width == {}
  x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(out.loaded.logits(x), loaded.logits(x), rtol=1e-5, atol=1e-5)
  # Each conv of the compiled program has as many output channels as the layer keeps.
  hlo = jax.jit(out.loaded.apply_fn).lower(out.loaded.arrays, x).as_text()
  convs = re.findall(r"stablehlo.convolution.*->\s*tensor<4x\d+x\d+x(\d+)xf32>", hlo)
  assert sorted(int(c) for c in convs) == [1, 5, 5]


def test_a_removed_channel_outputs_its_bias_numpy_oracle(tmp_path):
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(nn.Dense(4, name="hidden")(x))

  v = zero_channels(random_variables(Mlp(), (3,)), {"hidden": [1, 3]})
  export_model(str(tmp_path), variables=v, input_shape=(3,))
  out = slim(load(str(tmp_path), Mlp()), multiple=1, max_kept=1)
  p = v["params"]
  x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  hidden = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
  np.testing.assert_allclose(hidden[:, [1, 3]], np.broadcast_to(p["hidden"]["bias"][[1, 3]],
                                                                (5, 2)))
  want = hidden @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(out.loaded.logits(x), want, rtol=1e-5, atol=1e-5)
  assert out.loaded.arrays["slim"]["hidden"]["kernel"].shape == (3, 2)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), strides=2, rngs=rngs)
    self.fc = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.conv(x)).mean((1, 2)))


def test_slim_works_on_an_nnx_model(tmp_path):
  model = NnxNet(nnx.Rngs(0))
  kernel = np.array(model.conv.kernel[...])
  kernel[..., [0, 2, 3]] = 0
  model.conv.kernel[...] = kernel
  from jaxcompress.models.functional import variables_of
  export_model(str(tmp_path), variables=variables_of(model), input_shape=(6, 6, 3))
  out = slim(load(str(tmp_path), model), multiple=1)
  assert out.channels == {"conv": (3, 6)}
  x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(out.loaded.logits(x), model(x), rtol=1e-5, atol=1e-5)


def test_layers_slim_cannot_handle_run_at_full_width_and_are_named(tmp_path):
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
      x = nn.Conv(4, (3, 3), padding="CIRCULAR", name="circular")(x)
      return nn.Dense(2, name="head")(x.mean((1, 2)))

  v = zero_channels(random_variables(Odd(), (5, 5, 2)), {"grouped": [1], "circular": [2]})
  export_model(str(tmp_path), variables=v, input_shape=(5, 5, 2))
  loaded = load(str(tmp_path), Odd())
  out = slim(loaded, multiple=1)
  assert out.channels == {}
  assert out.full_width == {"grouped": "a grouped convolution", "circular": "padding 'CIRCULAR'"}
  x = np.random.default_rng(2).standard_normal((3, 5, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(out.loaded.logits(x), loaded.logits(x), rtol=1e-6)


def test_kernels_stacked_by_a_scan_run_at_full_width(tmp_path):
  class Step(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return h + nn.Dense(6, name="b")(nn.relu(nn.Conv(8, (3,), name="a")(h))), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 5, 6]: two steps with a [2, 3, 6, 8] conv and a [2, 8, 6] dense
      steps = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      h = steps(name="blocks")(nn.Dense(6, name="inp")(x), None)[0]
      return nn.Dense(3, name="head")(h.mean(1))

  v = jax.device_get(random_variables(Scanned(), (5, 6)))
  for name in ("a", "b"):  # half the output channels of both steps removed
    v["params"]["blocks"][name]["kernel"][..., :4 if name == "a" else 3] = 0
  export_model(str(tmp_path), variables=v, input_shape=(5, 6))
  loaded = load(str(tmp_path), Scanned())
  out = slim(loaded, multiple=1)
  stacked = "its kernel is stacked by a lifted transform (nn.scan, nn.vmap)"
  assert out.full_width == {"blocks/a": stacked, "blocks/b": stacked}
  x = np.random.default_rng(4).standard_normal((3, 5, 6)).astype(np.float32)
  np.testing.assert_array_equal(out.loaded.logits(x), loaded.logits(x))


def test_an_attention_projection_with_removed_dims_runs_at_full_width(tmp_path):
  """A query kernel [in, heads, dim] whose channel pruning removed dims of every head (int8-npu
  plans do), with its [heads, dim] bias: named, run as it is, the outputs unchanged."""
  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x)
      return nn.Dense(2, name="head")(h.mean(1))

  v = jax.device_get(random_variables(Attn(), (5, 6)))
  query = v["params"]["attn"]["query"]
  query["kernel"][..., :6] = 0  # 6 of the 8 dims of both heads removed
  export_model(str(tmp_path), variables=v, input_shape=(5, 6))
  loaded = load(str(tmp_path), Attn())
  out = slim(loaded, multiple=1)
  assert out.full_width["attn/query"] == "DenseGeneral is not a Conv or Dense layer"
  x = np.random.default_rng(3).standard_normal((3, 5, 6)).astype(np.float32)
  np.testing.assert_array_equal(out.loaded.logits(x), loaded.logits(x))
  arrays = slim_arrays({"q": query}, multiple=1)["q"]
  np.testing.assert_array_equal(arrays["bias"], query["bias"][..., 6:])  # [heads, kept dims]
  np.testing.assert_array_equal(arrays["const"], query["bias"][..., :6])


def test_a_layer_whose_call_is_not_a_plain_dense_is_refused(tmp_path):
  class Doubled(nn.Dense):
    def __call__(self, x):
      return 2 * super().__call__(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="head")(Doubled(3, name="hidden")(x))

  v = zero_channels(random_variables(Net(), (4,)), {"hidden": [0]})
  export_model(str(tmp_path), variables=v, input_shape=(4,))
  with pytest.raises(ConfigError, match=r"^slim: the channel-skipping model's outputs differ"):
    slim(load(str(tmp_path), Net()), multiple=1)


def test_the_serving_function_of_a_slimmed_artifact(tmp_path):
  model = SmallCNN()
  v = zero_channels(random_variables(model, (8, 8, 3)), {"conv2": [0, 1, 2]})
  export_model(str(tmp_path / "export"), variables=v, input_shape=(8, 8, 3))
  loaded = load(str(tmp_path / "export"), model)
  save_serving(str(tmp_path / "serving"), slim(loaded, multiple=2).loaded)
  x = np.random.default_rng(4).standard_normal((3, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(load_serving(str(tmp_path / "serving"))(x), loaded.logits(x),
                             rtol=1e-5, atol=1e-5)
  # The slim result, the module or the artifact's folder where the LoadedModel belongs: one line
  # each (an AttributeError on .spec or .arrays before), and nothing written.
  slimmed = slim(loaded, multiple=2)
  for wrong, fix in ((slimmed, "pass its .loaded"), (model, "load the artifact first"),
                     (str(tmp_path / "export"), "load the artifact first")):
    with pytest.raises(ConfigError, match=f"^save_serving: loaded must be the LoadedModel that "
                                          f"export.load returns, got a .*; {fix}"):
      save_serving(str(tmp_path / "wrong"), wrong)
    with pytest.raises(ConfigError, match=f"^slim: loaded must be .*; {fix}"):
      slim(wrong)
  assert not (tmp_path / "wrong").exists()


def test_slim_arrays_order_and_constants():
  kernel = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
  kernel[:, [0, 2]] = 0
  bias = np.array([5, 6, 7, 8], np.float32)
  got = slim_arrays({"d": {"kernel": kernel, "bias": bias}, "e": {"kernel": np.ones((2, 2))}},
                    multiple=1)
  assert list(got) == ["d"] and kept_outputs(kernel).tolist() == [1, 3]
  d = got["d"]
  np.testing.assert_array_equal(d["kernel"], kernel[:, [1, 3]])
  np.testing.assert_array_equal(d["bias"], [6, 8])
  np.testing.assert_array_equal(d["const"], [5, 7])
  # concat([kept, const]) = [6, 8, 5, 7] taken at index gives the channels back in order.
  np.testing.assert_array_equal(np.take([6, 8, 5, 7], d["index"]), bias)


def test_computed_channels_are_rounded_up_and_slimming_must_pay():
  kernel = np.ones((3, 24), np.float32)
  kernel[:, [2, 5, 7, 9, 11, 13, 17, 19, 20, 21, 22, 23]] = 0  # 12 of 24 kept
  bias = np.arange(24, dtype=np.float32)
  (got,) = slim_arrays({"d": {"kernel": kernel, "bias": bias}}, multiple=8).values()
  # 12 kept -> 16 computed: the first 4 removed channels (2, 5, 7, 9) are computed too.
  computed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18]
  np.testing.assert_array_equal(got["kernel"], kernel[:, computed])
  np.testing.assert_array_equal(got["const"], [11, 13, 17, 19, 20, 21, 22, 23])
  np.testing.assert_array_equal(np.take(np.concatenate([bias[computed], got["const"]]),
                                        got["index"]), bias)
  assert slim_arrays({"d": {"kernel": kernel}}, multiple=8, max_kept=0.6) == {}  # 16/24 > 0.6
  assert list(slim_arrays({"d": {"kernel": kernel}}, multiple=8, max_kept=0.7)) == ["d"]


@pytest.mark.parametrize("kwargs", [dict(multiple=0), dict(multiple=-8), dict(multiple=2.5),
                                    dict(multiple=True), dict(max_kept=float("nan")),
                                    dict(max_kept=-0.5)])
def test_a_wrong_rounding_or_threshold_is_one_line(kwargs):
  kernel = np.ones((3, 24), np.float32)
  kernel[:, 12:] = 0
  # multiple=0 divided by zero; a fractional multiple cut a float number of channels.
  name = "multiple" if "multiple" in kwargs else "max_kept"
  with pytest.raises(ConfigError, match=f"^slim {name} must be"):
    slim_arrays({"d": {"kernel": kernel}}, **kwargs)


def test_outputs_are_placed_by_slices_or_a_one_hot_product():
  assert segments(np.array([0, 1, 4, 2, 3, 5])) == [(0, 2), (4, 5), (2, 4), (5, 6)]
  assert places_by_product((3, 3, 16, 16)) and places_by_product((1, 1, 64, 16))
  assert not places_by_product((64, 64)) and not places_by_product((1, 1, 32, 16))
  kernel = np.ones((3, 3, 4, 6), np.float32)
  kernel[..., [1, 4]] = 0
  got = slim_arrays({"c": {"kernel": kernel}}, multiple=1)["c"]
  # place[j, c] = 1 where computed output j is channel c: channels 0, 2, 3, 5.
  np.testing.assert_array_equal(np.argwhere(got["place"]), [[0, 0], [1, 2], [2, 3], [3, 5]])
