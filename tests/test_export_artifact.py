"""Save -> load round trips against the fake-quant model, bytes on disk, finalize's fold and bad
input, and bad artifacts."""

from __future__ import annotations

import gzip
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import compose
from jaxcompress.errors import ConfigError
from jaxcompress.export import (export_model, finalize, format_report, load, read_spec,
                                recode)
from jaxcompress.models import get_model
from jaxcompress.quantization import Codebook, LayerSpec, cluster_params, decode_params, quantize
from test_export_runtime import random_variables

RNG = np.random.default_rng(0)
X8 = RNG.standard_normal((64, 8, 8, 3)).astype(np.float32)
EPS = 1e-5


class ConvBN(nn.Module):
  """Two bias-free convs and a Dense classifier, each followed by a BatchNorm whose name is not
  derived from the layer's (folding is found by tracing the forward). The last BatchNorm's output
  is the logits, so a BatchNorm that rounds differently changes them (hidden ones are mostly
  absorbed by the next layer's 8-bit input grid)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="norm_a")(x))
    x = nn.Conv(16, (3, 3), use_bias=False, name="body")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="norm_b")(x))
    x = nn.Dense(10, name="head")(x.mean((1, 2)))
    return nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="norm_c")(x)


def magnitude_mask_np(w, sparsity):
  """NumPy oracle of magnitude pruning: the round(s * n) smallest |w| of a kernel are 0."""
  w = np.asarray(w)
  m = np.ones(w.size, np.float32)
  m[np.argsort(np.abs(w).ravel(), kind="stable")[:round(sparsity * w.size)]] = 0
  return m.reshape(w.shape)


def agreement(a, b):
  return float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))


@pytest.fixture(scope="module")
def convbn(tmp_path_factory):
  """ConvBN, ``body`` 60 % magnitude-pruned, 4-bit inner / 8-bit first-last weights, 8-bit
  inputs, BatchNorms folded; exported as the main job does (experiments/pipeline.py)."""
  model = ConvBN()
  variables = random_variables(model, (8, 8, 3))
  masks = jax.tree.map(np.ones_like, variables["params"])
  masks["body"]["kernel"] = magnitude_mask_np(variables["params"]["body"]["kernel"], 0.6)
  variables["params"]["body"]["kernel"] = np.where(
      masks["body"]["kernel"] != 0, variables["params"]["body"]["kernel"], np.float32(0))
  comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  assert comp.fold_norms == {"norm_a": EPS, "norm_b": EPS, "norm_c": EPS}
  state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
  qstate = state.model_state["quant"].replace(steps=state.params.get("qsteps", {}))
  vs = {"params": jax.device_get(state.params["model"]),
        "batch_stats": jax.device_get(state.model_state["batch_stats"])}
  specs = comp.quantizer.specs(vs, qstate)
  # The bias-free convs' per-channel scales take their BatchNorm's gain; the biased head's not.
  assert comp.gain_layers(state.model_state) == {"stem": "norm_a", "body": "norm_b"}
  out = str(tmp_path_factory.mktemp("run") / "export")
  report = export_model(out, variables=vs, input_shape=(8, 8, 3), masks=masks, specs=specs,
                        fold=comp.fold_norms, model_name="convbn",
                        gains_into={"norm_a": "stem/kernel", "norm_b": "body/kernel"})
  return dict(model=model, comp=comp, state=state, variables=vs, masks=masks, specs=specs,
              out=out, report=report, loaded=load(out, model))


def test_the_artifact_reproduces_the_folded_fake_quant_logits_exactly(convbn):
  comp, state, loaded = convbn["comp"], convbn["state"], convbn["loaded"]
  logits = jax.jit(comp.logits_fn)
  want = np.asarray(logits(comp.eval_variables(state), X8))
  got = np.asarray(loaded.logits(X8))
  np.testing.assert_array_equal(got, want)
  # The unfolded BatchNorm rounds differently: the fold is what makes the logits identical.
  unfolded = np.asarray(logits({"params": state.params, "model_state": state.model_state}, X8))
  assert not np.array_equal(got, unfolded)
  assert agreement(got, unfolded) >= 0.9
  model, arrays, apply_fn = loaded  # the tuple form
  assert model is convbn["model"]
  np.testing.assert_array_equal(jax.jit(apply_fn)(arrays, X8), got)
  assert loaded.spec["folded"] == {"norm_a": EPS, "norm_b": EPS, "norm_c": EPS}
  assert loaded.spec["model"] == "convbn"


def _gain_and_bias(v, norm):
  """NumPy oracle of a folded BatchNorm: ``scale / sqrt(var + eps)`` and ``beta - mean * gain``."""
  bn, st = v["params"][norm], v["batch_stats"][norm]
  gain = bn["scale"] / np.sqrt(st["var"].astype(np.float64) + EPS)
  return gain, bn["bias"] - st["mean"] * gain


def test_folded_batchnorm_is_stored_as_numpy_gain_and_bias(convbn):
  v, loaded = convbn["variables"], convbn["loaded"]
  tensors = loaded.finalized.tensors
  assert "params/norm_c/scale" not in tensors and "batch_stats/norm_c/mean" not in tensors
  gain, bias = _gain_and_bias(v, "norm_c")
  stored_gain, stored_bias = tensors["fold/norm_c"].kernel()  # one [2, C] tensor
  np.testing.assert_allclose(stored_gain, gain, rtol=1e-6)
  np.testing.assert_allclose(stored_bias, bias, rtol=1e-5, atol=1e-6)
  # A plain module.apply on loaded.variables runs the BatchNorm as x * gain + bias.
  lv = loaded.variables
  np.testing.assert_array_equal(lv["batch_stats"]["norm_c"]["mean"], 0)
  np.testing.assert_allclose(lv["batch_stats"]["norm_c"]["var"], 1 - EPS)
  y = RNG.standard_normal((5, 10)).astype(np.float32)
  bn_layer = nn.BatchNorm(use_running_average=True, epsilon=EPS)
  out = bn_layer.apply({"params": lv["params"]["norm_c"], "batch_stats":
                        lv["batch_stats"]["norm_c"]}, y)
  bn, st = v["params"]["norm_c"], v["batch_stats"]["norm_c"]
  np.testing.assert_allclose(out, (y - st["mean"]) / np.sqrt(st["var"] + EPS) * bn["scale"]
                             + bn["bias"], rtol=1e-5, atol=1e-5)


def test_batchnorm_gain_goes_into_the_weight_scales_before_it(convbn):
  """``gains_into``: the body's scales times norm_b's gain, norm_b a bias alone (4 bytes a
  channel less), the codes unchanged; a plain module.apply still runs the unfolded model."""
  v, loaded, report = convbn["variables"], convbn["loaded"], convbn["report"]
  tensors = loaded.finalized.tensors
  gain, bias = _gain_and_bias(v, "norm_b")
  fold = tensors["fold/norm_b"]
  assert fold.codes.shape == (1, 16)
  np.testing.assert_allclose(fold.kernel()[0], bias, rtol=1e-5, atol=1e-6)
  w = np.asarray(v["params"]["body"]["kernel"])
  minmax = np.abs(w).reshape(-1, 16).max(0) / 7.5  # symmetric 4-bit min-max scale
  body = tensors["params/body/kernel"]
  np.testing.assert_allclose(body.scale, minmax * gain, rtol=1e-5)
  sizes = {l["path"]: l["bytes"] for l in report["layers"]}
  assert (sizes["fold/norm_a"], sizes["fold/norm_b"], sizes["fold/norm_c"]) == (
      4 * 8, 4 * 16, 2 * 4 * 10)
  lv = loaded.variables
  np.testing.assert_array_equal(lv["params"]["norm_b"]["scale"], 1)
  x = X8[:4]
  model = convbn["model"]
  vs = {"params": v["params"], "batch_stats": v["batch_stats"]}
  masked = jax.tree.map(lambda p, m: p * m, vs["params"], convbn["masks"])
  float_out = model.apply({**vs, "params": masked}, x)
  assert agreement(model.apply(lv, x), float_out) >= 0.75  # 4-bit body, same model


class ConvBNLogits(nn.Module):
  """A bias-free conv whose BatchNorm output, averaged, is the logits: a gain carried by the
  weight scales changes the logits' rounding if the evaluation and the export disagree."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="norm_a")(x))
    x = nn.Conv(10, (3, 3), use_bias=False, name="body")(x)
    return nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="norm_b")(x).mean((1, 2))


class SharedOutputs(nn.Module):
  """Three bias-free convs with BatchNorms: ``a``'s output also skips its BatchNorm, ``b`` is
  called again without it, ``c`` reaches the logits through its BatchNorm alone."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, epsilon=EPS, name=name)
    y = nn.Conv(8, (3, 3), use_bias=False, name="a")(x)
    x = nn.relu(bn("norm_a")(y)) + y
    conv_b = nn.Conv(8, (3, 3), use_bias=False, name="b")
    x = nn.relu(bn("norm_b")(conv_b(x))) + conv_b(x[:, ::-1])
    return bn("norm_c")(nn.Conv(10, (3, 3), use_bias=False, name="c")(x)).mean((1, 2))


def test_gains_move_only_into_layers_whose_outputs_all_pass_their_batchnorm(tmp_path):
  model = SharedOutputs()
  variables = random_variables(model, (8, 8, 3))
  comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=8, act_bits=8))
  assert set(comp.fold_norms) == {"norm_a", "norm_b", "norm_c"}
  assert comp.gain_norms == {"c": "norm_c"}
  state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
  comp.export(str(tmp_path), state, input_shape=(8, 8, 3))
  loaded = load(str(tmp_path), model)
  shapes = {k: t.codes.shape[0] for k, t in loaded.finalized.tensors.items()
            if k.startswith("fold/")}
  assert shapes == {"fold/norm_a": 2, "fold/norm_b": 2, "fold/norm_c": 1}
  got = np.asarray(loaded.logits(X8))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(comp.logits_fn)(
      comp.eval_variables(state), X8)))
  # 8-bit weights and inputs: close to the float model, which moving a gain wrongly would break.
  want = np.asarray(model.apply(variables, X8))
  np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_compression_export_carries_gains_in_the_weight_scales_exactly(tmp_path):
  model = ConvBNLogits()
  variables = random_variables(model, (8, 8, 3))
  comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
  comp.export(str(tmp_path), state, input_shape=(8, 8, 3))
  loaded = load(str(tmp_path), model)
  assert {k: t.codes.shape for k, t in loaded.finalized.tensors.items()
          if k.startswith("fold/")} == {"fold/norm_a": (1, 16), "fold/norm_b": (1, 10)}
  logits = jax.jit(comp.logits_fn)
  merged = comp.eval_variables(state)
  got = np.asarray(loaded.logits(X8))
  np.testing.assert_array_equal(got, np.asarray(logits(merged, X8)))
  # The same fold with the gains at the BatchNorms rounds differently: the test can fail.
  apart = {**merged["model_state"], "fold": {
      n: (merged["model_state"]["gains"][l], b[1]) for l, n, b in
      (("stem", "norm_a", merged["model_state"]["fold"]["norm_a"]),
       ("body", "norm_b", merged["model_state"]["fold"]["norm_b"]))}}
  del apart["gains"]
  other = np.asarray(logits({"params": merged["params"], "model_state": apart}, X8))
  assert not np.array_equal(got, other)
  np.testing.assert_allclose(got, other, rtol=1e-4, atol=1e-4)
  # Per-tensor weight scales cannot take a per-channel gain: the BatchNorms keep theirs.
  per_tensor = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                             quant=compose.QuantSpec(weight_bits=4, act_bits=8, per_channel=False))
  state = per_tensor.init_state(variables, X8[:8])
  assert per_tensor.gain_layers(state.model_state) == {}
  assert "gains" not in per_tensor.eval_variables(state)["model_state"]


class PartialBN(nn.Module):
  """A conv and a Dense each followed by a BatchNorm without a scale or without a bias."""
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, epsilon=EPS, name=name,
                                     use_scale=self.use_scale, use_bias=self.use_bias)
    x = nn.relu(norm("norm_a")(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    return norm("norm_b")(nn.Dense(10, name="head")(x.mean((1, 2))))


@pytest.mark.parametrize("use_scale, use_bias", [(False, True), (True, False), (False, False)])
def test_batchnorms_without_scale_or_bias_fold_and_reload(tmp_path, use_scale, use_bias):
  model = PartialBN(use_scale, use_bias)
  variables = random_variables(model, (8, 8, 3))
  comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=8, act_bits=8))
  assert comp.fold_norms == {"norm_a": EPS, "norm_b": EPS}
  state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
  comp.export(str(tmp_path), state, input_shape=(8, 8, 3))
  loaded = load(str(tmp_path), model)
  got = np.asarray(loaded.logits(X8))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(comp.logits_fn)(
      comp.eval_variables(state), X8)))
  # The head's BatchNorm keeps its gain: NumPy's fold with the missing scale 1 or bias 0.
  p, st = variables["params"].get("norm_b", {}), variables["batch_stats"]["norm_b"]
  gain = p.get("scale", 1.0) / np.sqrt(st["var"].astype(np.float64) + EPS)
  bias = p.get("bias", 0.0) - st["mean"] * gain
  np.testing.assert_allclose(loaded.finalized.tensors["fold/norm_b"].kernel(),
                             np.stack([gain, bias]), rtol=1e-6, atol=1e-7)
  # A plain apply on loaded.variables runs that BatchNorm as y * gain + bias, whatever it lacks.
  lv = loaded.variables
  y = RNG.standard_normal((5, 10)).astype(np.float32)
  out = nn.BatchNorm(use_running_average=True, epsilon=EPS, use_scale=use_scale,
                     use_bias=use_bias).apply({"params": lv["params"].get("norm_b", {}),
                                               "batch_stats": lv["batch_stats"]["norm_b"]}, y)
  np.testing.assert_allclose(out, y * gain + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.apply(lv, X8), got, atol=0.05 * np.abs(got).max())
  want = np.asarray(model.apply(variables, X8))
  np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_kernel_pruned_training_exports_whole_kernels_as_blocks(tmp_path):
  from jaxcompress.data import Batch
  model = ConvBN()
  variables = random_variables(model, (8, 8, 3))
  prune = compose.PruneSpec(structure="kernel", sparsity=0.75, schedule="one_shot", norm="l2",
                            rules=(("body/kernel", True), (".*", False)))
  comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.01), total_steps=4,
                       prune=prune, quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
  step = comp.make_train_step()
  labels = RNG.integers(0, 10, 64).astype(np.int32)
  for i in range(4):
    batch = Batch(X8[16 * i:16 * i + 16], labels[16 * i:16 * i + 16], np.ones(16, np.float32))
    state, _ = step(state, batch)
  kernel = np.asarray(state.params["model"]["body"]["kernel"])  # [3, 3, 8, 16]
  kept = np.any(kernel != 0, axis=(0, 1))
  assert kept.sum() == 128 - 96  # round(0.75 * 128) kernels pruned whole
  np.testing.assert_array_equal(kernel != 0, np.broadcast_to(kept, kernel.shape))
  comp.export(str(tmp_path), state, input_shape=(8, 8, 3))
  meta = {m["path"]: m for m in read_spec(str(tmp_path))["layers"]}["params/body/kernel"]
  assert (meta["encoding"], meta["nnz"]) == ("blocks", 32 * 9)
  assert (meta["segments"]["positions"], meta["segments"]["values"]) == (16, 144)  # 128 kernel
  #                                                              bits, 288 4-bit codes
  got = np.asarray(load(str(tmp_path), model).logits(X8))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(comp.logits_fn)(
      comp.eval_variables(state), X8)))


def test_stored_integers_are_the_fake_quant_grid(convbn):
  """NumPy oracle of symmetric per-channel min-max codes of the (masked) kernels."""
  v, loaded = convbn["variables"], convbn["loaded"]
  for path, bits in (("stem", 8), ("body", 4), ("head", 8)):
    w = np.asarray(v["params"][path]["kernel"])
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / (qmax + 0.5)
    q = np.clip(np.round(w / scale), -qmax - 1, qmax)
    t = loaded.finalized.tensors[f"params/{path}/kernel"]
    assert t.kind == "int" and t.bits == bits and t.zero_point is None  # symmetric: none stored
    # Exact, but at -max|w| (-(qmax + 0.5) steps, a rounding tie) float noise picks either code.
    tie = np.abs(np.abs(w / scale) - (qmax + 0.5)) < 1e-3
    np.testing.assert_array_equal(t.codes[~tie], q[~tie])
    assert np.all(np.isin(t.codes[tie], [-qmax - 1, -qmax, qmax]))
    assert np.all(t.codes[w == 0] == 0)
    # The loaded kernel is codes * scale in float32: the fake-quant kernel.
    np.testing.assert_array_equal(loaded.variables["params"][path]["kernel"],
                                  t.codes.astype(np.float32) * t.scale)
  body = loaded.variables["params"]["body"]["kernel"]
  np.testing.assert_array_equal(body == 0, convbn["masks"]["body"]["kernel"] == 0)


def test_bytes_on_disk_are_counted(convbn):
  out, report, v = convbn["out"], convbn["report"], convbn["variables"]
  files = sorted(os.listdir(out))
  assert files == ["arrays.bin", "spec.json.gz"]
  on_disk = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  assert report["total_bytes"] == on_disk
  assert report["spec_bytes"] == os.path.getsize(os.path.join(out, "spec.json.gz"))
  # The gzipped spec is the plain one's text, and smaller.
  text = gzip.decompress(open(os.path.join(out, "spec.json.gz"), "rb").read())
  assert json.loads(text) == read_spec(out) and len(text) > 2 * report["spec_bytes"]
  assert report["arrays_bytes"] == os.path.getsize(os.path.join(out, "arrays.bin"))
  n_params = sum(np.size(a) for a in jax.tree.leaves(v["params"]))
  assert n_params == 3 * 3 * 3 * 8 + 2 * 8 + 3 * 3 * 8 * 16 + 2 * 16 + 16 * 10 + 10 + 2 * 10
  assert report["float32_bytes"] == 4 * n_params
  assert report["ratio"] == round(4 * n_params / on_disk, 3)
  by_path = {l["path"]: l for l in report["layers"]}
  assert by_path["params/stem/kernel"]["float32_bytes"] == 4 * 3 * 3 * 3 * 8
  assert by_path["params/body/kernel"]["density"] == pytest.approx(0.4, abs=0.01)
  assert by_path["params/head/kernel"]["bits"] == 8 and by_path["params/head/bias"]["bits"] == 32
  assert sum(l["bytes"] for l in report["layers"]) == report["arrays_raw_bytes"]
  # 4-bit codes of a 40 %-dense kernel take well under a byte an entry.
  assert by_path["params/body/kernel"]["bytes"] < 0.5 * 3 * 3 * 8 * 16


def test_size_table_has_a_row_per_tensor_then_the_totals(convbn):
  report = convbn["report"]
  cells = [[c.strip() for c in line.strip("|").split("|")]
           for line in format_report(report).splitlines()]
  assert cells[0] == ["layer", "kind", "bits", "encoding", "density", "bytes", "float32 bytes"]
  assert [row[0] for row in cells[2:-3]] == [l["path"] for l in report["layers"]]
  body = next(row for row in cells if row[0] == "params/body/kernel")
  layer = next(l for l in report["layers"] if l["path"] == "params/body/kernel")
  assert layer["huffman"] == ["values"]  # its 4-bit codes are Huffman-coded
  assert body[2:] == [str(layer["bits"]), layer["encoding"] + " + Huffman",
                      f"{layer['density']:.3f}", f"{layer['bytes']:,}",
                      f"{layer['float32_bytes']:,}"]
  assert cells[-1][0] == "**total on disk**" and cells[-1][5] == f"**{report['total_bytes']:,}**"
  # The rows' float32 bytes (the folded BatchNorms' scale and bias included) add up to the total.
  assert sum(l["float32_bytes"] for l in report["layers"]) == report["float32_bytes"]


def test_kmeans_float_and_asymmetric_layers_of_a_model_without_batchnorm(tmp_path):
  model = get_model("cnn_cifar")
  x = RNG.standard_normal((16, 8, 8, 3)).astype(np.float32)
  variables = random_variables(model, (8, 8, 3))
  w2 = variables["params"]["conv2"]["kernel"]
  masks = jax.tree.map(np.ones_like, variables["params"])
  masks["conv1"]["kernel"] = magnitude_mask_np(variables["params"]["conv1"]["kernel"], 0.5)
  masks["conv2"]["kernel"] = magnitude_mask_np(w2, 0.5)
  masked = jax.tree.map(lambda p, m: np.where(m != 0, p, np.float32(0)), variables["params"],
                        masks)
  books = cluster_params(masked, [("conv1/kernel", 3), (".*", None)], masks=masks)
  shared = {"params": jax.device_get(decode_params(masked, books))}
  rules = [("conv1", dict(weight_bits=None, act_bits=8)), ("conv2", None),
           ("fc", dict(weight_bits=5, act_bits=6, per_channel=False, symmetric=False))]
  qz = quantize(model, rules)
  qstate = qz.init(shared, x)
  report = export_model(str(tmp_path), variables=shared, masks=masks, specs=qz.specs(shared, qstate),
                        codebooks=books, input_shape=(8, 8, 3))
  kinds = {l["path"]: (l["kind"], l["bits"]) for l in report["layers"]}
  assert kinds == {"params/conv1/kernel": ("kmeans", 3), "params/conv1/bias": ("float", 32),
                   "params/conv2/kernel": ("float", 32), "params/conv2/bias": ("float", 32),
                   "params/fc/kernel": ("int", 5), "params/fc/bias": ("float", 32)}
  loaded = load(str(tmp_path), model)
  fc = loaded.finalized.tensors["params/fc/kernel"]
  assert fc.zero_point is not None and np.any(fc.zero_point)
  conv1 = loaded.finalized.tensors["params/conv1/kernel"]
  book = np.asarray(books["conv1/kernel"].codebook)
  np.testing.assert_array_equal(conv1.codebook, book)
  kept = masks["conv1"]["kernel"] != 0
  np.testing.assert_array_equal(conv1.codes[kept], np.asarray(books["conv1/kernel"].indices)[kept])
  lv = loaded.variables["params"]
  np.testing.assert_array_equal(lv["conv1"]["kernel"], np.where(kept, book[conv1.codes % 8], 0))
  np.testing.assert_array_equal(lv["conv2"]["kernel"], masked["conv2"]["kernel"])
  want = np.asarray(jax.jit(lambda v, q, x: qz.apply(v, q, x)[0])(shared, qstate, x))
  assert agreement(loaded.logits(x), want) == 1.0
  np.testing.assert_allclose(loaded.logits(x), want, rtol=1e-4, atol=1e-4)


def test_finalize_rejects_inputs_that_do_not_fit(convbn):
  v = convbn["variables"]
  for wrong in (v["params"], None):  # the params alone (a bare KeyError 'params' before)
    with pytest.raises(ConfigError, match=r"^export variables must be the model's variables, a "
                                          r"dict with a 'params' entry .*params alone$"):
      export_model("unused", variables=wrong, input_shape=(8, 8, 3))
  spec = LayerSpec(path="nowhere", kind="Conv", method="minmax", weight_bits=4)
  with pytest.raises(ConfigError, match="export specs: 'nowhere' names no weight of the model"):
    finalize(v, specs={"nowhere": spec})
  both = convbn["specs"]["head"]
  book = Codebook(np.linspace(-1, 1, 4, dtype=np.float32), np.zeros((16, 10), np.int32))
  with pytest.raises(ConfigError, match="'head/kernel' has both a quantization spec"):
    finalize(v, specs={"head": both}, codebooks={"head/kernel": book})
  with pytest.raises(ConfigError, match="BatchNorm 'norm_a' has no running statistics"):
    finalize({"params": v["params"]}, fold={"norm_a": EPS})
  with pytest.raises(ConfigError, match="masks must have the structure"):
    finalize(v, masks={"stem": {"kernel": 1}})
  masks = jax.tree.map(lambda p: np.ones(np.shape(p)[:-1] + (1,), np.float32), v["params"])
  with pytest.raises(ConfigError, match=r"masks\['\w+'\]\['\w+'\] has shape \(.*, 1\), its "
                                        "weight"):
    finalize(v, masks=masks)  # broadcast, these would zero nothing or everything unseen
  specs, fold = convbn["specs"], convbn["comp"].fold_norms
  with pytest.raises(ConfigError, match="gains_into: 'norm_x' is not a folded BatchNorm"):
    finalize(v, specs=specs, fold=fold, gains_into={"norm_x": "body/kernel"})
  with pytest.raises(ConfigError, match="'body/kernel' \\(for 'norm_a'\\) must be an integer "
                     "weight with one scale per output channel, 8 of them"):
    finalize(v, specs=specs, fold=fold, gains_into={"norm_a": "body/kernel"})
  per_tensor = {**specs, "body": specs["body"]._replace(weight_axis=None)}
  with pytest.raises(ConfigError, match="'body/kernel' \\(for 'norm_b'\\) must be"):
    finalize(v, specs=per_tensor, fold=fold, gains_into={"norm_b": "body/kernel"})
  with pytest.raises(ConfigError, match="export: the model has a variable collection named "
                     "'fold', a name the artifact reserves"):
    finalize({**v, "fold": {"t": np.ones(1, np.float32)}})


def test_an_artifact_folder_given_as_a_pathlib_path(convbn, tmp_path):
  # Written, reported, recoded and loaded from a pathlib.Path as from its str; the path used to
  # reach str.endswith and end in an AttributeError after the files were written.
  out = tmp_path / "export"
  report = export_model(out, variables=convbn["variables"], input_shape=(8, 8, 3),
                        masks=convbn["masks"], specs=convbn["specs"],
                        fold=convbn["comp"].fold_norms)
  on_disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  assert report["total_bytes"] == on_disk
  assert read_spec(out) == read_spec(str(out)) and read_spec(out / "spec.json.gz")["version"] == 4
  recode(out, tmp_path / "recoded")
  want = np.asarray(load(str(out), convbn["model"]).logits(X8[:4]))
  for path in (out, tmp_path / "recoded"):
    np.testing.assert_array_equal(np.asarray(load(path, convbn["model"]).logits(X8[:4])), want)
  with pytest.raises(ConfigError, match="^model.exported: the artifact folder must be a path"):
    load(None, convbn["model"])


def _one_line_error(path, match, model=None):
  with pytest.raises(ConfigError, match=match) as info:
    load(path, model if model is not None else ConvBN())
  assert "\n" not in str(info.value)


def test_tampered_truncated_mismatched_or_foreign_artifacts_raise_one_line(convbn, tmp_path):
  src = convbn["out"]
  spec = read_spec(src)
  data = open(os.path.join(src, "arrays.bin"), "rb").read()

  def write(name, arrays=data, spec_obj=spec):
    d = tmp_path / name
    d.mkdir()
    (d / "arrays.bin").write_bytes(arrays)
    (d / "spec.json").write_text(json.dumps(spec_obj))
    return str(d)

  copy = lambda: json.loads(json.dumps(spec))  # noqa: E731
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0x40
  _one_line_error(write("tampered", bytes(flipped)), "does not match the SHA-256 in its spec")
  _one_line_error(write("truncated", data[:-10]),
                  f"has {len(data) - 10} bytes, the spec says {len(data)}; the file is truncated")
  text = copy()
  text["arrays"]["bytes"] = str(len(data))  # the right size, as text
  _one_line_error(write("text", spec_obj=text), rf"the spec's arrays bytes is '{len(data)}', not "
                  "an integer; the spec is corrupted")
  outside = copy()
  outside["arrays"]["file"] = "../tampered/arrays.bin"  # another artifact's arrays
  _one_line_error(write("outside", spec_obj=outside), r"the spec's arrays file must be a file "
                  r"name in the artifact folder, got '../tampered/arrays.bin'")
  index = [l["path"] for l in spec["layers"]].index("params/body/kernel")
  bad_shape = copy()
  bad_shape["layers"][index]["shape"] = [3, 3, 8, 24]  # it is [3, 3, 8, 16]
  _one_line_error(write("shape", spec_obj=bad_shape),
                  r"artifact layer 'params/body/kernel': segment 'scale' has 64 bytes, a layer of "
                  r"shape \[3, 3, 8, 24\] needs 4 or 96; the spec does not match the arrays")
  bad_shape["layers"][index]["shape"] = [3, 3, 16, 16]
  _one_line_error(write("shape2", spec_obj=bad_shape), "params/body/kernel")
  bad_encoding = copy()
  bad_encoding["layers"][index]["encoding"] = "zzz"
  _one_line_error(write("encoding", spec_obj=bad_encoding),
                  r"^artifact layer 'params/body/kernel' encoding must be one of .*, got 'zzz'")
  moved = copy()
  moved["layers"][index]["segments"]["scale"] += 4
  following = moved["layers"][index + 1]["segments"]
  following[next(iter(following))] -= 4  # the next tensor's first segment loses 4 bytes
  _one_line_error(write("moved", spec_obj=moved), "segment 'scale' has 68 bytes, a layer of shape "
                                                  r"\[3, 3, 8, 16\] needs 4 or 64")
  grown = copy()
  grown["layers"][index]["segments"]["scale"] += 4
  _one_line_error(write("grown", spec_obj=grown), f"the spec's segments add up to "
                                                  f"{spec['arrays']['raw_bytes'] + 4} bytes")
  _one_line_error(src, r"model.exported: params/body/kernel has shape \[3, 3, 8, 16\] in the "
                       r"artifact, .* needs \[3, 3, 3, 16\]", model=BodyOnRGB())
  _one_line_error(str(tmp_path / "absent"), "model.exported: no spec.json.gz or spec.json in")
  broken = write("json", spec_obj={})
  (tmp_path / "json" / "spec.json").write_text("{not json")
  _one_line_error(broken, "is not valid JSON")
  (tmp_path / "json" / "spec.json.gz").write_bytes(
      gzip.compress(json.dumps(spec).encode())[:-12])  # cut short
  _one_line_error(broken, "spec.json.gz' is not valid gzipped JSON")
  damaged = bytearray(gzip.compress(json.dumps(spec).encode()))
  damaged[10] ^= 0x01  # inside the deflate stream: zlib's own error
  (tmp_path / "json" / "spec.json.gz").write_bytes(bytes(damaged))
  _one_line_error(broken, "spec.json.gz' is not valid gzipped JSON")
  version = copy()
  version["version"] = 1
  _one_line_error(write("version", spec_obj=version), "has format version 1")
  no_segments = copy()
  del no_segments["layers"][3]["segments"]
  _one_line_error(write("malformed", spec_obj=no_segments), "has a malformed spec")


class BodyOnRGB(nn.Module):
  """ConvBN's variable tree with ``body`` reading 3 channels: the first mismatch is body's
  kernel."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    y = nn.BatchNorm(use_running_average=True, name="norm_a")(y)
    z = nn.BatchNorm(use_running_average=True, name="norm_b")(
        nn.Conv(16, (3, 3), use_bias=False, name="body")(x))
    out = nn.Dense(10, name="head")((y.mean((1, 2)).sum(-1, keepdims=True) + z).mean((1, 2)))
    return nn.BatchNorm(use_running_average=True, name="norm_c")(out)
