"""Save -> load round trips against the fake-quant model, bytes on disk, and bad artifacts."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, inner_channel_masks, load
from jaxcompress.models import get_model
from jaxcompress.models.batchnorm import fold_collection
from jaxcompress.quantization import cluster_params, decode_params, default_rules, quantize
from test_export_runtime import random_variables

RNG = np.random.default_rng(0)
X8 = RNG.standard_normal((32, 8, 8, 3)).astype(np.float32)


def magnitude_masks_np(params, sparsity, skip=("conv1", "linear")):
  """NumPy oracle of layer-wise magnitude pruning: the round(s * n) smallest |w| of each kernel."""

  def mask(path, w):
    w = np.asarray(w)
    if path[-1].key != "kernel" or path[0].key in skip:
      return np.ones_like(w)
    m = np.ones(w.size, np.float32)
    m[np.argsort(np.abs(w).ravel(), kind="stable")[:round(sparsity * w.size)]] = 0
    return m.reshape(w.shape)

  return jax.tree_util.tree_map_with_path(mask, params)


def masked(variables, masks):
  return {**variables, "params": jax.tree.map(lambda p, m: np.where(m != 0, p, 0).astype(
      np.float32), variables["params"], masks)}


def agreement(a, b):
  return float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
  """ResNet-20 (8x8 inputs), 80 % magnitude-pruned, 4-bit weights / 8-bit inputs, exported."""
  model = get_model("resnet20")
  variables = random_variables(model, (8, 8, 3))
  masks = magnitude_masks_np(variables["params"], 0.8)
  vm = masked(variables, masks)
  qz = quantize(model, default_rules(4, 8))
  qstate = qz.init(vm, X8[:16])
  out = str(tmp_path_factory.mktemp("run") / "export")
  report = export_model(out, model_name="resnet20", variables=variables, masks=masks,
                        specs=qz.specs(vm, qstate), input_shape=(8, 8, 3), shrink=False)
  # The quantization state is an input of the compiled function, as in a train/eval step.
  fq_jit = jax.jit(lambda v, q, x: qz.apply(v, q, x)[0])
  fq = lambda v, x: fq_jit(v, qstate, x)  # noqa: E731
  return dict(model=model, variables=variables, vm=vm, qz=qz, qstate=qstate, out=out,
              report=report, fq=fq)


def test_loaded_artifact_predicts_what_the_fake_quant_model_predicts(resnet):
  loaded = load(resnet["out"], expect_model="resnet20")
  want = np.asarray(resnet["fq"](resnet["vm"], X8))
  got = np.asarray(loaded.logits(X8))
  assert agreement(got, want) == 1.0
  assert np.median(np.abs(got - want)) < 1e-3 * np.abs(want).max()
  model, variables, apply_fn = loaded  # the tuple form
  np.testing.assert_allclose(jax.jit(apply_fn)(variables, X8), got, rtol=1e-6)
  assert model.folded and model.inner_widths is None


def test_with_folded_batchnorm_the_artifact_reproduces_the_fake_quant_logits_exactly(resnet):
  # 64 32x32 images: enough activations that, without the fold collection, some sit on an 8-bit
  # boundary and the BatchNorm's rounding flips them (the logits then differ by ~0.04).
  x = np.random.default_rng(1).standard_normal((64, 32, 32, 3)).astype(np.float32)
  vm = resnet["vm"]
  got = np.asarray(load(resnet["out"], expect_model="resnet20").logits(x))
  assert not np.array_equal(got, np.asarray(resnet["fq"](vm, x)))
  fold = fold_collection(vm["params"], vm["batch_stats"])
  np.testing.assert_array_equal(got, np.asarray(resnet["fq"]({**vm, "fold": fold}, x)))


def test_stored_integers_are_the_fake_quant_grid(resnet):
  """NumPy oracle of symmetric per-channel min-max 4/8-bit codes of the masked kernels."""
  layers = load(resnet["out"]).layers
  for path, bits in (("conv1", 8), ("layer2_1/conv2", 4), ("linear", 8)):
    node = resnet["vm"]["params"]
    for name in path.split("/"):
      node = node[name]
    w = node["kernel"]
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / (qmax + 0.5)
    q = np.clip(np.round(w / scale), -qmax - 1, qmax)
    t = layers[path]
    assert t.kind == "int" and t.bits == bits and t.zero_point is None  # symmetric: none stored
    # Exact, but at -max|w| (-(qmax + 0.5) steps, a rounding tie) float noise picks either code.
    tie = np.abs(np.abs(w / scale) - (qmax + 0.5)) < 1e-3
    np.testing.assert_array_equal(t.codes[~tie], q[~tie])
    assert np.all(np.isin(t.codes[tie], [-qmax - 1, -qmax, qmax]))
    assert np.all(t.codes[w == 0] == 0)


def test_bytes_on_disk_are_counted_and_reach_16x(resnet):
  out, report = resnet["out"], resnet["report"]
  files = sorted(os.listdir(out))
  assert files == ["arrays.bin", "spec.json"]
  on_disk = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  assert report["total_bytes"] == on_disk
  assert report["spec_bytes"] == os.path.getsize(os.path.join(out, "spec.json"))
  assert report["float32_bytes"] == 1_078_888  # ResNet-20's 269,722 parameters in float32
  assert report["ratio"] == round(1_078_888 / on_disk, 3) and report["ratio"] >= 16
  by_path = {l["path"]: l for l in report["layers"]}
  assert by_path["conv1"]["float32_bytes"] == 4 * (3 * 3 * 3 * 16 + 2 * 16)
  assert by_path["layer3_2/conv1"]["encoding"].startswith(("gaps", "bitmap"))
  assert by_path["linear"]["encoding"] == "dense" and by_path["linear"]["bits"] == 8
  assert sum(l["bytes"] for l in report["layers"]) == report["arrays_raw_bytes"]


def test_channel_pruned_export_is_physically_smaller_and_still_faithful(resnet, tmp_path):
  masks = inner_channel_masks(resnet["variables"]["params"], 0.5)
  vm = masked(resnet["variables"], masks)
  qz, qstate = resnet["qz"], resnet["qstate"]
  export_model(str(tmp_path), model_name="resnet20", variables=resnet["variables"], masks=masks,
               specs=qz.specs(vm, qstate), input_shape=(8, 8, 3))
  loaded = load(str(tmp_path))
  assert tuple(loaded.model.inner_widths) == (8, 8, 8, 16, 16, 16, 32, 32, 32)
  assert loaded.spec["model_kwargs"]["inner_widths"] == [8, 8, 8, 16, 16, 16, 32, 32, 32]
  assert agreement(loaded.logits(X8), resnet["fq"](vm, X8)) == 1.0


def test_kmeans_float_and_asymmetric_layers_of_a_model_without_batchnorm(tmp_path):
  model = get_model("cnn_cifar")
  x = RNG.standard_normal((16, 8, 8, 3)).astype(np.float32)
  variables = random_variables(model, (8, 8, 3))
  masks = magnitude_masks_np(variables["params"], 0.5, skip=("fc",))
  books = cluster_params(masked(variables, masks)["params"], [("conv1/kernel", 3), (".*", None)],
                         masks=masks)
  shared = {"params": decode_params(masked(variables, masks)["params"], books)}
  rules = [("conv1", dict(weight_bits=None, act_bits=8)), ("conv2", None),
           ("fc", dict(weight_bits=5, act_bits=6, per_channel=False, symmetric=False))]
  qz = quantize(model, rules)
  qstate = qz.init(shared, x)
  report = export_model(str(tmp_path), model_name="cnn_cifar", variables=shared, masks=masks,
                        specs=qz.specs(shared, qstate), codebooks=books, input_shape=(8, 8, 3))
  kinds = {l["path"]: (l["kind"], l["bits"]) for l in report["layers"]}
  assert kinds == {"conv1": ("kmeans", 3), "conv2": ("float", 32), "fc": ("int", 5)}
  loaded = load(str(tmp_path), expect_model="cnn_cifar")
  assert loaded.layers["fc"].zero_point is not None and np.any(loaded.layers["fc"].zero_point)
  np.testing.assert_array_equal(loaded.variables["params"]["conv2"]["kernel"] == 0,
                                np.asarray(masks["conv2"]["kernel"]) == 0)
  want = qz.apply(shared, qstate, x)[0]
  assert agreement(loaded.logits(x), want) == 1.0
  np.testing.assert_allclose(loaded.logits(x), want, rtol=1e-4, atol=1e-4)


def _one_line_error(path, match, **kwargs):
  with pytest.raises(ConfigError, match=match) as info:
    load(path, **kwargs)
  assert "\n" not in str(info.value)


def test_tampered_truncated_mismatched_or_foreign_artifacts_raise_one_line(resnet, tmp_path):
  src = resnet["out"]
  spec = json.load(open(os.path.join(src, "spec.json")))
  data = open(os.path.join(src, "arrays.bin"), "rb").read()

  def write(name, arrays=data, spec_obj=spec):
    d = tmp_path / name
    d.mkdir()
    (d / "arrays.bin").write_bytes(arrays)
    (d / "spec.json").write_text(json.dumps(spec_obj))
    return str(d)

  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0x40
  _one_line_error(write("tampered", bytes(flipped)), "does not match the SHA-256 in its spec")
  _one_line_error(write("truncated", data[:-100]),
                  f"has {len(data) - 100} bytes, the spec says {len(data)}; the file is truncated")
  bad_shape = json.loads(json.dumps(spec))
  index = [l["path"] for l in spec["layers"]].index("layer2_1/conv2")
  bad_shape["layers"][index]["shape"] = [3, 3, 32, 48]  # it is [3, 3, 32, 32]
  _one_line_error(write("shape", spec_obj=bad_shape),
                  r"artifact layer 'layer2_1/conv2': segment 'scale' has 128 bytes, a layer of "
                  r"shape \[3, 3, 32, 48\] needs 4 or 192; the spec does not match the arrays")
  bad_shape["layers"][index]["shape"] = [3, 3, 64, 16]  # same size, wrong shape
  _one_line_error(write("shape2", spec_obj=bad_shape), "layer2_1/conv2")
  moved = json.loads(json.dumps(spec))
  moved["layers"][index]["segments"]["bias"] += 4
  moved["layers"][index + 1]["segments"]["bias"] -= 4
  _one_line_error(write("moved", spec_obj=moved), "segment 'bias' has 132 bytes, a layer of shape "
                                                  r"\[3, 3, 32, 32\] needs 128")
  grown = json.loads(json.dumps(spec))
  grown["layers"][index]["segments"]["bias"] += 4
  _one_line_error(write("grown", spec_obj=grown), f"the spec's segments add up to "
                                                  f"{spec['arrays']['raw_bytes'] + 4} bytes")
  widths = json.loads(json.dumps(spec))
  widths["model_kwargs"]["inner_widths"] = [8] * 9
  _one_line_error(write("widths", spec_obj=widths), r"has shape \[3, 3, 3, 16\]|needs")
  _one_line_error(src, "the artifact in .* is a resnet20, but 'resnet56' was asked for",
                  expect_model="resnet56")
  _one_line_error(src, "has 10 classes, the dataset has 100", expect_num_classes=100)
  _one_line_error(str(tmp_path / "absent"), "model.exported: no spec.json in")
  broken = write("json", spec_obj={})
  (tmp_path / "json" / "spec.json").write_text("{not json")
  _one_line_error(broken, "is not valid JSON")
  no_layers = json.loads(json.dumps(spec))
  del no_layers["layers"][3]["segments"]
  _one_line_error(write("malformed", spec_obj=no_layers), "has a malformed spec")
