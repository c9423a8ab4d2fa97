"""The artifact's input signature: one array, or a dict or tuple of arrays.

Oracles: signatures written out by hand, zeros and dtypes checked with NumPy, and a model of two
inputs whose artifact logits equal its plain forward's (nothing compressed, so the two are the
same function, the serving one compiled for a symbolic batch size, so up to float rounding).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import export
from jaxcompress.errors import ConfigError
from jaxcompress.export import inputs as io
from jaxcompress.models.functional import functional

IMAGE = {"shape": [4, 4, 3], "dtype": "float32"}
META = {"shape": [2], "dtype": "int32"}


class TwoInputs(nn.Module):
  @nn.compact
  def __call__(self, inputs):
    image = inputs["image"].reshape(inputs["image"].shape[0], -1)
    return nn.Dense(3)(jnp.concatenate([nn.Dense(8)(image), inputs["meta"] * 1.0], -1))


def _batch(n=2):
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
          "meta": rng.integers(0, 5, (n, 2)).astype(np.int32)}


def test_signatures_of_arrays_and_containers():
  x = _batch()
  assert io.of_example(x["image"]) == IMAGE
  assert io.of_example(x) == {"dict": {"image": IMAGE, "meta": META}}
  assert io.of_example((x["image"], [x["meta"]])) == {
      "tuple": [IMAGE, {"tuple": [META]}]}
  assert io.of_shapes({"a": jax.ShapeDtypeStruct((4, 4, 3), jnp.float32)}) == {
      "dict": {"a": IMAGE}}
  assert io.of_shape((4, 4, 3), "float32") == IMAGE
  sig = {"dict": {"image": IMAGE, "meta": META}}
  assert io.single(IMAGE) == ((4, 4, 3), np.dtype(np.float32))
  assert io.single(sig) is None
  zeros = io.zeros(sig, 5)
  assert zeros["image"].shape == (5, 4, 4, 3) and zeros["image"].dtype == np.float32
  assert zeros["meta"].shape == (5, 2) and zeros["meta"].dtype == np.int32
  assert not zeros["image"].any()
  assert io.describe(sig) == "{'image': (4, 4, 3) float32, 'meta': (2,) int32}"
  assert io.with_batch({"tuple": [META]}) == {
      "tuple": [{"shape": ["batch", 2], "dtype": "int32"}]}
  # NumPy's default float64 and int64 are what JAX runs them as (x64 off): float32 and int32
  assert io.of_example({"image": x["image"].astype(np.float64),
                        "meta": x["meta"].astype(np.int64)}) == {
      "dict": {"image": IMAGE, "meta": META}}


@pytest.mark.parametrize("signature,wrong", [
    ([4, 4, 3], "is not an object"),
    ({"shape": [4, 0], "dtype": "float32"}, r"input shape \[4, 0\] is not a list of positive"),
    ({"shape": [4, True], "dtype": "float32"}, "is not a list of positive"),
    ({"shape": [4], "dtype": "float33"}, "input dtype 'float33' is not a dtype"),
    ({"shape": [4]}, "is not a shape and dtype, a dict or a tuple of them"),
    ({"dict": {}}, "is not a shape and dtype"),
    ({"tuple": [IMAGE, {"shape": "4", "dtype": "int32"}]}, "input shape '4' is not a list"),
])
def test_malformed_signatures_are_named(signature, wrong):
  assert re.search(wrong, io.check(signature))


def test_well_formed_signatures_pass():
  assert io.check(IMAGE) is None
  assert io.check({"tuple": [IMAGE, {"dict": {"m": META}}]}) is None


@pytest.mark.parametrize("call,match", [
    (lambda: io.of_shape((4, -1), "float32"), r"input_shape must be one example's shape, a "
     r"sequence of positive integers \(e.g. \(32, 32, 3\)\), got \(4, -1\)"),
    (lambda: io.of_shape(4, "float32"), "input_shape must be one example's shape"),
    (lambda: io.of_shape((4,), "bogus"), r"input_dtype must be a NumPy dtype name \(float32, "
     r"int32, uint8, ...\), got 'bogus'"),
    (lambda: io.of_example({1: np.zeros((2, 3))}), "a dict input must have string keys"),
    (lambda: io.of_example(np.float32(1.0)), "inputs must have a leading batch axis"),
    (lambda: io.of_example(["x"]), r"inputs\[0\] must be an array"),
])
def test_bad_signatures_are_one_line_errors(call, match):
  with pytest.raises(ConfigError, match=match):
    call()


def test_a_model_of_two_inputs_exports_loads_and_serves(tmp_path):
  x = _batch()
  model = TwoInputs()
  variables = functional(model).init(jax.random.key(0), x)
  out = str(tmp_path / "export")
  with pytest.raises(ConfigError, match="give input_shape .* or inputs .*, exactly one of them"):
    export.export_model(out, variables=variables)
  with pytest.raises(ConfigError, match="exactly one of them"):
    export.export_model(out, variables=variables, input_shape=(4, 4, 3),
                        inputs=jax.tree.map(lambda a: a[0], x))
  assert not (tmp_path / "export").exists()
  export.export_model(out, variables=variables, inputs=jax.tree.map(lambda a: a[0], x))
  assert export.read_spec(out)["input"] == {"dict": {"image": IMAGE, "meta": META}}
  loaded = export.load(out, model)
  plain = jax.jit(lambda v, x: functional(model).apply(v, x)[0])
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), np.asarray(plain(variables, x)))
  with pytest.raises(ConfigError, match=r"exported model: its forward fails on inputs "
                     r"\(\(2, 4, 4, 3\), 'float32'\) \(.*\); it was exported for a batch of "
                     r"\{'image': \(4, 4, 3\) float32, 'meta': \(2,\) int32\}"):
    loaded.logits(x["image"])
  with pytest.raises(ConfigError, match=r"forward fails on inputs \{'image': \(\(2, 5, 4, 3\)"):
    loaded.logits({**x, "image": np.zeros((2, 5, 4, 3), np.float32)})
  with pytest.raises(ConfigError, match=r"save_serving: mean and std normalise one image input; "
                     r"this model takes \{'image': \(4, 4, 3\) float32, 'meta': \(2,\) int32\}"):
    export.save_serving(str(tmp_path / "serving"), loaded, mean=(0.5,) * 3, std=(0.2,) * 3)
  signature = export.save_serving(str(tmp_path / "serving"), loaded)
  assert signature["input"] == {"dict": {"image": {"shape": ["batch", 4, 4, 3],
                                                   "dtype": "float32"},
                                         "meta": {"shape": ["batch", 2], "dtype": "int32"}},
                                "normalised_inside": False}
  served = export.load_serving(str(tmp_path / "serving"))(_batch(5))
  # compiled for a symbolic batch size: the same function up to float rounding
  np.testing.assert_allclose(np.asarray(served), np.asarray(plain(variables, _batch(5))),
                             rtol=1e-6, atol=1e-6)


def test_loading_with_a_module_that_cannot_take_the_input_names_the_input(tmp_path):
  x = _batch()
  model = TwoInputs()
  export.export_model(str(tmp_path), variables=functional(model).init(jax.random.key(0), x),
                      inputs=jax.tree.map(lambda a: a[0], x))

  class ImageOnly(nn.Module):
    @nn.compact
    def __call__(self, image):
      return nn.Dense(3)(image.reshape(image.shape[0], -1))

  with pytest.raises(ConfigError, match=r"model.exported: ImageOnly's forward fails on the "
                     r"artifact's input \{'image': \(4, 4, 3\) float32, 'meta': \(2,\) int32\} "
                     r"\(.*\); load it with the module it was exported from"):
    export.load(str(tmp_path), ImageOnly())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_dataset_takes_an_image_of_any_float_dtype(dtype):
  assert io.image_shape({"shape": [4, 4, 3], "dtype": dtype}, (4, 4, 3)) == (4, 4, 3)


def test_a_dataset_refuses_an_image_of_integers():
  with pytest.raises(ConfigError, match=r"^m input must be one float image of shape \(4, 4, 3\) "
                                        r"for d, got '\(4, 4, 3\) uint8'; its images are fed "):
    io.image_shape({"shape": [4, 4, 3], "dtype": "uint8"}, (4, 4, 3), dataset="d", field="m")
  assert io.image_shape({"shape": [4, 4, 3], "dtype": "uint8"}) == (4, 4, 3)  # no dataset
