"""Channel surgery of experiments.resnet_surgery: the masks it needs (against NumPy), the shrunk
model equals the masked one and exports smaller, the folded ResNet equals the BatchNorm one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.resnet_surgery import fold_resnet, inner_channel_masks, shrink_channels
from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, load
from jaxcompress.models import get_model
from jaxcompress.pruning import apply_masks, channel_masks, magnitude_masks
from jaxcompress.selection import trace_layers
from test_export_runtime import random_variables

MODEL = get_model("resnet20")
VARS = random_variables(MODEL, (8, 8, 3))
X = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
BLOCKS = [f"layer{s}_{b}" for s in (1, 2, 3) for b in range(3)]
MASKS = inner_channel_masks(VARS["params"], 0.5, norm="l1")


def _masked_logits(masks):
  v = {**VARS, "params": apply_masks(VARS["params"], masks)}
  return jax.jit(MODEL.apply)(v, X)


def test_inner_masks_prune_the_lowest_l1_channels_of_conv1_and_their_batchnorm():
  for block in BLOCKS:
    kernel = VARS["params"][block]["conv1"]["kernel"]
    c = kernel.shape[-1]
    norms = np.abs(kernel).reshape(-1, c).sum(0)
    pruned = np.sort(np.argsort(norms, kind="stable")[:round(0.5 * c)])
    mask = np.asarray(MASKS[block]["conv1"]["kernel"])
    np.testing.assert_array_equal(np.flatnonzero(mask.reshape(-1, c).max(0) == 0), pruned)
    assert set(np.unique(mask)) == {0.0, 1.0}
    for leaf in ("scale", "bias"):
      np.testing.assert_array_equal(np.flatnonzero(np.asarray(MASKS[block]["bn1"][leaf]) == 0),
                                    pruned)
    assert np.all(np.asarray(MASKS[block]["conv2"]["kernel"]) == 1)
  assert np.all(np.asarray(MASKS["conv1"]["kernel"]) == 1)
  l2 = inner_channel_masks(VARS["params"], 0.25, norm="l2")["layer3_0"]["conv1"]["kernel"]
  norms = np.sqrt((np.asarray(VARS["params"]["layer3_0"]["conv1"]["kernel"]) ** 2)
                  .reshape(-1, 64).sum(0))
  assert sorted(np.flatnonzero(np.asarray(l2).reshape(-1, 64)[0] == 0)) == sorted(
      np.argsort(norms)[:16])


def test_shrunk_model_equals_the_masked_model_and_its_artifact_is_smaller(tmp_path):
  model, small = shrink_channels("resnet20", VARS, MASKS)
  assert tuple(model.inner_widths) == (8, 8, 8, 16, 16, 16, 32, 32, 32)
  assert small["params"]["layer2_1"]["conv1"]["kernel"].shape == (3, 3, 32, 16)
  assert small["params"]["layer2_1"]["conv2"]["kernel"].shape == (3, 3, 16, 32)
  assert small["batch_stats"]["layer2_1"]["bn1"]["var"].shape == (16,)
  count = lambda v: sum(np.size(a) for a in jax.tree.leaves(v["params"]))  # noqa: E731
  assert count(small) < 0.55 * count(VARS)
  want = np.asarray(_masked_logits(MASKS))
  np.testing.assert_allclose(jax.jit(model.apply)(small, X), want, rtol=1e-5, atol=1e-5)
  # Exported with its BatchNorms folded, the shrunk model loads into the narrow ResNet.
  fold = trace_layers(model, small, X).batchnorms
  assert len(fold) == 19 and "layer2_1/bn1" in fold
  full = export_model(str(tmp_path / "full"), variables=VARS, masks=MASKS, input_shape=(8, 8, 3),
                      compress=False)
  narrow = export_model(str(tmp_path / "small"), variables=small, input_shape=(8, 8, 3),
                        fold=fold, compress=False)
  assert narrow["float32_bytes"] == 4 * count(small)
  # Dense float32: 4 bytes an entry; each folded BatchNorm's gain and bias replace its scale and
  # bias, its statistics are not stored. The masked full-width model, stored sparse, is larger.
  assert narrow["arrays_raw_bytes"] == 4 * count(small)
  assert narrow["total_bytes"] < 0.7 * full["total_bytes"]
  loaded = load(str(tmp_path / "small"), model)
  np.testing.assert_allclose(loaded.logits(X), want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ConfigError, match=r"layer1_0/bn1/mean has shape \[8\] in the artifact, "
                                        r"CifarResNet needs \[16\]"):
    load(str(tmp_path / "small"), MODEL)


def test_kernel_only_channel_masks_are_refused_unless_not_strict():
  rules = [(r"layer\d+_\d+/conv1/kernel", True), (".*", False)]
  kernel_only = channel_masks(VARS["params"], 0.5, rules=rules)
  with pytest.raises(ConfigError, match=r"of layer\d_\d/conv1 is masked but layer\d_\d/bn1 still "
                                        r"outputs relu\(.*mask bn1's scale and bias too"):
    shrink_channels("resnet20", VARS, kernel_only)
  model, _ = shrink_channels("resnet20", VARS, kernel_only, strict=False)
  assert tuple(model.inner_widths) == (8, 8, 8, 16, 16, 16, 32, 32, 32)


def test_unstructured_masks_and_other_models_are_refused():
  with pytest.raises(ConfigError, match="channel 0 is only partly masked"):
    shrink_channels("resnet20", VARS, magnitude_masks(VARS["params"], 0.5))
  with pytest.raises(ConfigError, match="must be a CIFAR ResNet .* got 'cnn_cifar'"):
    shrink_channels("cnn_cifar", VARS, MASKS)
  with pytest.raises(ConfigError, match=r"^variables: 9 basic blocks, resnet32 has 15; give the "
                                        r"model name the variables were built for$"):
    shrink_channels("resnet32", VARS, MASKS)  # ResNet-20's variables


def test_folded_resnet_equals_the_batchnorm_resnet():
  folded = fold_resnet(VARS)
  assert "bn1" not in folded["params"]["layer1_0"]
  k, bn = VARS["params"]["conv1"]["kernel"], VARS["params"]["bn1"]
  st = VARS["batch_stats"]["bn1"]
  g = bn["scale"] / np.sqrt(st["var"].astype(np.float64) + 1e-5)  # NumPy oracle of the fold
  np.testing.assert_allclose(folded["params"]["conv1"]["kernel"], k * g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(folded["params"]["conv1"]["bias"], bn["bias"] - st["mean"] * g,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(get_model("resnet20", folded=True).apply)(folded, X),
                             jax.jit(MODEL.apply)(VARS, X), rtol=1e-4, atol=1e-4)
