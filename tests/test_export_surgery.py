"""Channel surgery: the masks it needs (against NumPy), the shrunk model equals the masked one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import finalize, inner_channel_masks, shrink_channels, shrink_layers
from jaxcompress.export.runtime import layer_variables
from jaxcompress.models import get_model
from jaxcompress.pruning import apply_masks, channel_masks, magnitude_masks
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


def test_shrunk_model_equals_the_masked_model_and_is_smaller():
  model, small = shrink_channels("resnet20", VARS, MASKS)
  assert tuple(model.inner_widths) == (8, 8, 8, 16, 16, 16, 32, 32, 32)
  assert small["params"]["layer2_1"]["conv1"]["kernel"].shape == (3, 3, 32, 16)
  assert small["params"]["layer2_1"]["conv2"]["kernel"].shape == (3, 3, 16, 32)
  assert small["batch_stats"]["layer2_1"]["bn1"]["var"].shape == (16,)
  count = lambda v: sum(np.size(a) for a in jax.tree.leaves(v["params"]))
  assert count(small) < 0.55 * count(VARS)
  np.testing.assert_allclose(jax.jit(model.apply)(small, X), _masked_logits(MASKS),
                             rtol=1e-5, atol=1e-5)


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


def test_surgery_on_finalized_layers_is_exact():
  layers = finalize(VARS, masks=MASKS)
  shrunk, widths = shrink_layers(layers)
  assert widths == [8, 8, 8, 16, 16, 16, 32, 32, 32]
  full = get_model("resnet20", folded=True)
  small = get_model("resnet20", folded=True, inner_widths=widths)
  np.testing.assert_allclose(jax.jit(small.apply)(layer_variables(shrunk), X),
                             jax.jit(full.apply)(layer_variables(layers), X), rtol=1e-5, atol=1e-5)
