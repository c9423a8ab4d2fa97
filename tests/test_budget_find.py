"""``budget.find_plan``: the planner in one call, on a model defined only here.

Oracles: brute force over every combination of the layers' options (the least summed damage
within the budget), the bytes of each planned weight read back from an export of the model pruned
and quantized as planned, and the device presets' spaces written out by hand.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError

SPARSITIES, BITS = (0.5, 0.8), (2, 4, 8)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x)).mean((1, 2))
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
  held_out = [Batch(x, rng.integers(0, 4, 32).astype(np.int32), np.ones(32, np.float32))]
  model = Net()
  return model, model.init(jax.random.key(0), x), held_out


@pytest.fixture(scope="module")
def scanned(setup):
  """One scan of the grid below, planned again for each budget."""
  model, variables, held_out = setup
  return budget.find_plan(model, variables, held_out, size_bytes=10**6, sparsities=SPARSITIES,
                          weight_bits=BITS).sensitivity


def _brute_force(costs, damages, limit):
  best = None
  for choice in itertools.product(*[range(len(c)) for c in costs]):
    cost = sum(c[k] for c, k in zip(costs, choice))
    if cost <= limit:
      dmg = sum(d[k] for d, k in zip(damages, choice))
      best = dmg if best is None else min(best, dmg)
  return best


@pytest.mark.parametrize("size_bytes", [900, 3000])
def test_the_plan_is_the_least_damage_within_the_bytes(setup, scanned, size_bytes, tmp_path):
  model, variables, held_out = setup
  found = budget.find_plan(model, variables, held_out, size_bytes=size_bytes, overhead=100,
                           sparsities=SPARSITIES, weight_bits=BITS, sensitivity=scanned)
  assert found.sensitivity is scanned
  sens, plan = found.sensitivity, found.plan
  assert sens.compiles == 1
  assert [l.path for l in plan.layers] == list(sens.paths) == [
      "Conv_0", "Conv_1", "Dense_1", "Dense_0"]  # forward order (Dense_0 is built first)
  weights = {l.path: np.asarray(variables["params"][l.path]["kernel"]) for l in plan.layers}
  costs = [[budget.weight_bytes(budget.keep_mask(weights[p], o.sparsity), o.weight_bits)
            for o in opts] for p, opts in zip(sens.paths, sens.options)]
  assert plan.size_bytes == 100 + sum(l.bytes for l in plan.layers) <= size_bytes
  assert plan.damage == pytest.approx(_brute_force(costs, sens.damage, size_bytes - 100))
  # The model pruned and quantized as planned, exported: no planned weight takes more bytes.
  x = held_out[0].image
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=2,
                       prune=compose.PruneSpec(**plan.prune_fields()),
                       quant=compose.QuantSpec(**plan.quant_fields()))
  state = comp.init_state(variables, x, calibration=[x])
  state, _ = comp.make_train_step()(state, held_out[0])  # the one-shot masks
  comp.export(str(tmp_path), state)
  metas = {m["path"]: m for m in export.read_spec(str(tmp_path))["layers"]}
  for layer in plan.layers:
    meta = metas[f"params/{layer.weight}"]
    assert sum(int(meta["segments"].get(s, 0)) for s in ("positions", "values")) <= layer.bytes
    assert meta.get("bits", 32) == layer.weight_bits


def test_a_compute_budget_on_a_device_stays_in_its_space(setup):
  model, variables, held_out = setup
  full = budget.find_plan(model, variables, held_out, bops=1e12, device="gpu-sparse",
                          sparsities=SPARSITIES, weight_bits=BITS)
  limit = full.plan.bops // 2
  found = budget.find_plan(model, variables, held_out, bops=limit, device="gpu-sparse",
                           sparsities=SPARSITIES, weight_bits=BITS)
  assert found.plan.bops <= limit < full.plan.bops
  assert found.plan.structure == "nm"
  for layer in found.plan.layers:  # 2:4 or dense, int4 or int8 weights, int8 inputs
    assert layer.sparsity in (0.0, 0.5) and layer.weight_bits in (4, 8) and layer.act_bits == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(), r"budget: give exactly one of size_bytes and bops, got none"),
    (dict(size_bytes=1000, bops=1e6), "give exactly one of size_bytes and bops"),
    (dict(size_bytes=-5), r"size_bytes must be > 0, got -5"),
    (dict(size_bytes=float("inf")), r"size_bytes must be a finite number > 0, got inf"),
    (dict(size_bytes=1000, sparsities=(80,)), r"sparsities\[0\] must be in \[0.0, 1.0\), got 80"),
    (dict(size_bytes=1000, weight_bits=(4, 16)), r"weight_bits\[1\] must be"),
    (dict(size_bytes=1000, weight_bits=()), r"weight_bits must be a non-empty list of bit "
     r"widths in \[2, 8\], got \(\)"),
    (dict(bops=1e6, act_bits=()), r"act_bits must be a non-empty list"),
    (dict(size_bytes=1000, sparsities=0.5), r"^sparsities must be a list of sparsities in "
     r"\[0, 1\), got 0.5; pass \(0.5,\)$"),
    (dict(size_bytes=1000, weight_bits=4), r"^weight_bits must be a list of bit widths in "
     r"\[2, 8\], got 4; pass \(4,\)$"),
    (dict(bops=1e6, act_bits=8), r"^act_bits must be a list of bit widths in \[2, 8\], got 8"),
    (dict(size_bytes=1000, device="tpu"), r"device must be one of any, gpu-sparse, int8-npu, "
     r"mcu, got 'tpu'"),
    (dict(bops=1e6, device="mcu"), r"^bops: device='mcu' takes a size budget, not "
     r"bops=1000000.0; give size_bytes=$"),
    (dict(size_bytes=50, overhead=10), r"size_bytes must be reachable under device='any': the "
     r"smallest plan takes [\d,]+ bytes \(10 of them overhead\), got 50"),
    (dict(size_bytes=1000, device="gpu-sparse"), r"sensitivity: scanned other layers or options "
     r"than device='gpu-sparse' and these grids offer"),
    (dict(size_bytes=1000, device="mcu", per_channel=False), r"^per_channel must be True for "
     r"device='mcu', which quantizes weights per output channel, got False$"),
])
def test_bad_budgets_are_one_line_errors(setup, scanned, kwargs, match):
  model, variables, held_out = setup
  with pytest.raises(ConfigError, match=match):
    budget.find_plan(model, variables, held_out, sensitivity=scanned,
                     **{"sparsities": SPARSITIES, "weight_bits": BITS, **kwargs})


def test_a_device_list_a_scan_of_another_type_and_a_generator_are_one_line(setup, scanned):
  model, variables, held_out = setup
  with pytest.raises(ConfigError, match=r"^device must be one of any, gpu-sparse, int8-npu, mcu, "
                     r"got \['any'\]$"):
    budget.find_plan(model, variables, held_out, size_bytes=10**6, device=["any"],
                     sparsities=SPARSITIES, weight_bits=BITS)
  with pytest.raises(ConfigError, match=r"^sensitivity must be the Sensitivity of an earlier call "
                     r"\(found.sensitivity\), or None to scan, got 'a dict'$"):
    budget.find_plan(model, variables, held_out, size_bytes=10**6, sensitivity={"a": 1},
                     sparsities=SPARSITIES, weight_bits=BITS)
  with pytest.raises(ConfigError, match=r"^held_out must be a list of held-out batches, got "
                     r"'a generator'; pass list\(...\)$"):
    budget.find_plan(model, variables, (b for b in held_out), size_bytes=10**6,
                     sparsities=SPARSITIES, weight_bits=BITS)


def test_numpy_numbers_are_budgets_and_an_empty_held_out_slice_is_one_line(setup, scanned):
  model, variables, held_out = setup
  found = budget.find_plan(model, variables, held_out, size_bytes=np.int64(10**6),
                           overhead=np.int64(100), sparsities=SPARSITIES, weight_bits=BITS,
                           sensitivity=scanned)
  assert found.allocation.cost + 100 <= 10**6
  padding = [b._replace(weight=np.zeros_like(b.weight)) for b in held_out]
  empty = [Batch(b.image[:0], b.label[:0], b.weight[:0]) for b in held_out]
  for batches in (padding, empty):
    with pytest.raises(ConfigError, match=r"^sensitivity: the held-out batches hold no example "
                       r"of weight > 0"):
      budget.find_plan(model, variables, batches, size_bytes=10**6, sparsities=SPARSITIES,
                       weight_bits=BITS)
  with pytest.raises(ConfigError, match=r"^sensitivity: the held-out batches must be "
                     r"jaxcompress.data.Batch \(image, label, weight\), got a ndarray$"):
    budget.find_plan(model, variables, [b.image for b in held_out], size_bytes=10**6,
                     sparsities=SPARSITIES, weight_bits=BITS)
  negative = [b._replace(weight=np.where(np.arange(len(b.weight)) == 1, -0.5, 1.0))
              for b in held_out]
  with pytest.raises(ConfigError, match=r"^sensitivity: the held-out batches hold a weight of "
                     r"-0.5; weights are >= 0 \(0 marks padding\)$"):
    budget.find_plan(model, variables, negative, size_bytes=10**6, sparsities=SPARSITIES,
                     weight_bits=BITS)


def test_labels_of_another_shape_than_the_outputs_are_one_line(setup):
  model, variables, held_out = setup
  wrong = [b._replace(label=b.label[:16]) for b in held_out]
  with pytest.raises(ConfigError, match=r"batch.label must have one class id per output, shape "
                     r"\(32,\) for the model's outputs \(32, 4\), got shape \(16,\)"):
    budget.find_plan(model, variables, wrong, size_bytes=10**6, sparsities=SPARSITIES,
                     weight_bits=BITS)


def test_params_alone_instead_of_variables_are_one_line(setup):
  model, variables, held_out = setup
  want = (r"^variables must be the model's variables, a dict with a 'params' entry \(what init "
          r"returns\), got .a dict with keys \['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'\].; pass "
          r"\{'params': params, ...\}, not the params alone$")
  with pytest.raises(ConfigError, match=want):
    budget.find_plan(model, variables["params"], held_out, size_bytes=10**6,
                     sparsities=SPARSITIES, weight_bits=BITS)
  with pytest.raises(ConfigError, match=want):
    budget.scan(model, variables["params"], held_out, {"Conv_0": [budget.Option(0.5, 4, 8)]},
                calibration=[held_out[0].image])


def test_one_calibration_array_is_one_line(setup):
  model, variables, held_out = setup
  with pytest.raises(ConfigError, match=r"^calibration must be a sequence of input batches, got "
                     r"'one array of shape \(32, 8, 8, 3\)'; pass \[x\]$"):
    budget.find_plan(model, variables, held_out, size_bytes=10**6, sparsities=SPARSITIES,
                     weight_bits=BITS, calibration=held_out[0].image)


def test_class_ids_outside_the_outputs_are_one_line(setup):
  # The model has 4 outputs: id 9 has no logit (its cross-entropy would be nan); id 7 on an
  # example of weight 0 (padding) is never used, so it stays allowed.
  model, variables, held_out = setup
  b = held_out[0]
  padded = b._replace(label=b.label.copy(), weight=b.weight.copy())
  padded.label[0], padded.weight[0] = 7, 0.0
  found = budget.find_plan(model, variables, [padded], size_bytes=10**6, sparsities=SPARSITIES,
                           weight_bits=BITS)
  assert np.isfinite(found.sensitivity.base_loss)
  wrong = padded._replace(label=padded.label.copy())
  wrong.label[1] = 9
  with pytest.raises(ConfigError, match=r"^sensitivity: batch.label holds class ids outside the "
                     r"model's classes, e.g. 9; labels must be in \[0, num_classes\)"):
    budget.find_plan(model, variables, [wrong], size_bytes=10**6, sparsities=SPARSITIES,
                     weight_bits=BITS)


class _OptimizedLSTM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(6)(nn.RNN(nn.OptimizedLSTMCell(5))(nn.Embed(6, 4)(ids)))


def test_weights_outside_every_traced_layer_are_warned_about():
  # nn.OptimizedLSTMCell computes its gates' products itself: the planner cannot see them. By
  # hand, per example of 3 steps: the gates run 3 x (4 x 4 x 5 + 4 x 5 x 5) = 540 MACs, which the
  # plan leaves out; its BOPs are the head's 3 steps x its kept weights of 5 x 6 at its bits (the
  # lookup is 0).
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 6, (4, 3)).astype(np.int32)
  model = _OptimizedLSTM()
  variables = model.init(jax.random.key(0), ids)
  held_out = [Batch(ids, rng.integers(0, 6, (4, 3)).astype(np.int32), np.ones(4, np.float32))]
  with pytest.warns(UserWarning, match=r"^find_plan: OptimizedLSTMCell_0/hf/kernel, .* belong "
                    r"to no Conv.*they stay float and dense, and the plan's BOPs leave out their "
                    r"products$"):
    found = budget.find_plan(model, variables, held_out, bops=10**9, sparsities=SPARSITIES,
                             weight_bits=BITS)
  head, = [l for l in found.plan.layers if l.path == "Dense_0"]
  assert [l.path for l in found.plan.layers] == ["Embed_0", "Dense_0"]
  kept = 30 - round(head.sparsity * 30)
  assert found.plan.bops == head.bops == 3 * kept * head.weight_bits * head.act_bits


class NormOnly(nn.Module):  # no weight of rank >= 2: nothing a plan could compress
  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(x.reshape(len(x), -1))[:, :4]


def test_a_model_with_no_layer_to_compress_is_one_line(setup):
  _, _, held_out = setup
  model = NormOnly()
  variables = model.init(jax.random.key(0), held_out[0].image)
  with pytest.raises(ConfigError, match=r"^model: the model has no layer to compress \(no Conv, "):
    budget.find_plan(model, variables, held_out, size_bytes=10**6, sparsities=SPARSITIES,
                     weight_bits=BITS)
