"""Costs: kept entries, MACs and BOPs by hand; bytes against a real export."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export
from jaxcompress.budget import Option
from jaxcompress.models import create_model


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv")(x))  # 8x8x3 -> 4x4x8
    return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_macs_by_hand():
  model = TinyCNN()
  x = np.zeros((2, 8, 8, 3), np.float32)
  variables = model.init(jax.random.key(0), x)
  macs = budget.layer_macs(model, variables, x)
  assert macs == {"conv": 4 * 4 * (3 * 3 * 3 * 8), "head": 128 * 10}
  assert budget.option_bops(macs["head"], Option(0.5, 4, 8), 0.5) == 640 * 4 * 8


def test_keep_masks_prune_the_smallest_magnitudes():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  keep = budget.keep_mask(w, 0.7)
  order = np.argsort(np.abs(w).ravel(), kind="stable")
  want = np.ones(w.size, bool)
  want[order[:round(0.7 * w.size)]] = False
  np.testing.assert_array_equal(keep.ravel(), want)
  channel = budget.keep_mask(w, 0.5, "channel")
  l1 = np.abs(w).reshape(-1, 6).sum(0)
  dropped = set(np.argsort(l1, kind="stable")[:3])
  assert all(not channel[..., c].any() if c in dropped else channel[..., c].all()
             for c in range(6))
  assert budget.density(channel, "channel") == 0.5
  nm = budget.keep_mask(w, 0.5, "nm")  # 2 of every 4 input channels (axis -2)
  assert np.all(nm.sum(axis=-2) == 2)


@pytest.mark.parametrize("sparsity,bits", [(0.0, 8), (0.5, 4), (0.9, 2), (0.97, 3)])
def test_planned_bytes_bound_the_exported_bytes(sparsity, bits, tmp_path):
  model, variables = create_model("mlp", num_classes=10, image_shape=(8, 8, 1), seed=0)
  x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
  w = np.asarray(variables["params"]["fc2"]["kernel"])
  keep = budget.keep_mask(w, sparsity)
  # Export the same pattern at `bits` bits (fc1, fc3 at 8) and read fc2's codes from the spec.
  params = jax.tree.map(np.asarray, variables["params"])
  params["fc2"]["kernel"] = np.where(keep, w, 0).astype(np.float32)
  quant = compose.QuantSpec(layer_bits=(("fc1", 8, 8), ("fc2", bits, 8), ("fc3", 8, 8)))
  comp = compose.build(model, {"params": params}, x, optimizer=optax.sgd(0.0), total_steps=1,
                       quant=quant)
  state = comp.init_state({"params": params}, x, calibration=[x])
  out = str(tmp_path / "export")
  comp.export(out, state, input_shape=(8, 8, 1))
  spec = export.read_spec(out)
  meta = next(m for m in spec["layers"] if m["path"] == "params/fc2/kernel")
  codes = meta["segments"].get("positions", 0) + meta["segments"]["values"]
  planned = budget.weight_bytes(keep, bits)
  assert codes <= planned
  # By hand, the dense and bitmap forms bound it too: values at `bits` bits, one bit per entry.
  n, nnz = w.size, int(keep.sum())
  assert planned <= min(-(-n * bits // 8), -(-n // 8) + -(-nnz * bits // 8))
