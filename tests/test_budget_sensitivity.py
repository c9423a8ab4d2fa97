"""The sensitivity scan: one compilation for the whole grid, values against NumPy."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcompress import budget, compose
from jaxcompress.budget import Option
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model

SHAPE = (6, 6, 3)


def _setup():
  model, variables = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  rng = np.random.default_rng(0)
  batches = [Batch(rng.normal(size=(8, *SHAPE)).astype(np.float32),
                   rng.integers(0, 4, 8).astype(np.int32), np.ones(8, np.float32))
             for _ in range(2)]
  batches[1] = batches[1]._replace(weight=np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32))
  return model, variables, batches


def _numpy_loss(variables, batches, pruned):
  """Mean cross-entropy of the MLP in NumPy, with some kernels replaced."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in variables["params"].items()}
  for k, w in pruned.items():
    p[k]["kernel"] = w
  total = weight = 0.0
  for b in batches:
    h = b.image.reshape(len(b.image), -1).astype(np.float64)
    h = np.maximum(h @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    z = h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
    z = z - z.max(1, keepdims=True)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), b.label]
    total += float(np.sum(ce * b.weight))
    weight += float(np.sum(b.weight))
  return total / weight


@pytest.fixture(scope="module")
def scanned():
  model, variables, batches = _setup()
  grid = [Option(s, w, 8) for s in (0.0, 0.5, 0.9) for w in (2, 4, 8)]
  mixed = grid + [Option(0.0, 4, 4)]  # fc2's input bits differ between options: measured
  sens = budget.scan(model, variables, batches, {"fc1": grid, "fc2": mixed, "fc3": grid[:3]},
                     calibration=[b.image for b in batches])
  return model, variables, batches, sens


def test_the_whole_grid_compiles_once(scanned):
  *_, sens = scanned
  assert sens.compiles == 1
  # The float model; fc1: 2 sparsities, 3 bit widths; fc2: the same and 2 input bit widths;
  # fc3 (dense options only): 3 bit widths.
  assert len(sens.measured) == 1 + (2 + 3) + (2 + 3 + 2) + 3


def test_pruned_losses_match_numpy(scanned):
  _, variables, batches, sens = scanned
  assert sens.base_loss == pytest.approx(_numpy_loss(variables, batches, {}), rel=1e-4)
  w = np.asarray(variables["params"]["fc2"]["kernel"], np.float64)
  cut = np.sort(np.abs(w).ravel())[round(0.9 * w.size) - 1]
  pruned = np.where(np.abs(w) > cut, w, 0)
  want = _numpy_loss(variables, batches, {"fc2": pruned})
  assert sens.measured[("fc2", 0.9, 0, 0)][0] == pytest.approx(want, rel=1e-4)


def test_traced_bits_equal_the_static_quantizer(scanned):
  """fc2 at 4-bit weights and 8-bit inputs, the rest float: as compose's quantizer computes it."""
  model, variables, batches, sens = scanned
  x = batches[0].image
  quant = compose.QuantSpec(layer_bits=(("fc1", 0, 0), ("fc2", 4, 8), ("fc3", 0, 0)))
  import optax
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=1, quant=quant)
  state = comp.init_state(variables, x, calibration=[b.image for b in batches])
  total = weight = 0.0
  for b in batches:
    z = np.asarray(comp.logits_fn(comp.eval_variables(state), b.image), np.float64)
    z = z - z.max(1, keepdims=True)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), b.label]
    total += float(np.sum(ce * b.weight))
    weight += float(np.sum(b.weight))
  i = sens.paths.index("fc2")
  k = sens.options[i].index(Option(0.0, 4, 8))
  assert sens.base_loss + sens.damage[i][k] == pytest.approx(total / weight, rel=1e-4)


def test_predict_interpolates_between_measured_sparsities(scanned):
  *_, sens = scanned
  d5 = sens.predict("fc2", 0.5, 0)
  d9 = sens.predict("fc2", 0.9, 0)
  assert sens.predict("fc2", 0.7, 0) == pytest.approx((d5 + d9) / 2)


def test_predict_refuses_what_the_scan_did_not_measure(scanned):
  *_, sens = scanned
  with pytest.raises(ConfigError, match=r"weight_bits \(layer 'fc1'\) must be a width the scan "
                     r"measured, one of \[2, 4, 8\], got 3"):
    sens.predict("fc1", 0.5, 3)
  with pytest.raises(ConfigError, match="path must be a scanned layer .*got 'fc9'"):
    sens.predict("fc9", 0.5, 4)


def test_a_resumed_scan_evaluates_only_what_is_missing(scanned):
  model, variables, batches, sens = scanned
  grid = {p: o for p, o in zip(sens.paths, sens.options)}
  calls = []
  again = budget.scan(model, variables, batches, grid, calibration=[b.image for b in batches],
                      measured=sens.measured, progress=calls.append)
  assert again.compiles == 0 and calls == []
  for a, b in zip(again.damage, sens.damage):
    np.testing.assert_array_equal(a, b)
  partial = dict(list(sens.measured.items())[:-2])
  resumed = budget.scan(model, variables, batches, grid, calibration=[b.image for b in batches],
                        measured=partial, progress=calls.append)
  assert len(calls) == 2 and resumed.measured.keys() == sens.measured.keys()


def _log_softmax(z):
  z = z - z.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_kl_damage_matches_numpy():
  """``damage='kl'``: the mean KL divergence from the float model's predictions, by NumPy."""
  model, variables, batches = _setup()
  sens = budget.scan(model, variables, batches, {"fc2": [Option(0.9, 0, 8)]}, damage="kl",
                     calibration=[b.image for b in batches])
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in variables["params"].items()}
  w = p["fc2"]["kernel"]
  cut = np.sort(np.abs(w).ravel())[round(0.9 * w.size) - 1]

  def logits(x, w2):
    h = np.maximum(x.reshape(len(x), -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    h = np.maximum(h @ w2 + p["fc2"]["bias"], 0)
    return h @ p["fc3"]["kernel"] + p["fc3"]["bias"]

  total = weight = 0.0
  for b in batches:
    x = b.image.astype(np.float64)
    ref, new = _log_softmax(logits(x, w)), _log_softmax(logits(x, np.where(np.abs(w) > cut, w, 0)))
    total += float(np.sum(np.sum(np.exp(ref) * (ref - new), 1) * b.weight))
    weight += float(np.sum(b.weight))
  assert sens.base_loss == pytest.approx(0.0, abs=1e-6)
  assert sens.damage[0][0] == pytest.approx(total / weight, rel=1e-4)
  assert sens.loss == "kl"


class _NormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(12, name="fc1")(x.reshape(len(x), -1))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h))
    return nn.Dense(4, name="fc2")(h)


def test_adapted_norms_use_each_batchs_statistics():
  """``adapt_norms=True``: BatchNorm normalises with the held-out batch's own mean and variance."""
  rng = np.random.default_rng(1)
  batches = [Batch(rng.normal(size=(16, *SHAPE)).astype(np.float32),
                   rng.integers(0, 4, 16).astype(np.int32), np.ones(16, np.float32))]
  model = _NormNet()
  variables = model.init(jax.random.key(0), batches[0].image)  # stored stats: mean 0, var 1
  sens = budget.scan(model, variables, batches, {"fc1": [Option(0.5, 0, 8)]}, adapt_norms=True,
                     calibration=[batches[0].image])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  w = p["fc1"]["kernel"]
  cut = np.sort(np.abs(w).ravel())[round(0.5 * w.size) - 1]

  def ce(w1):
    b = batches[0]
    h = b.image.reshape(16, -1).astype(np.float64) @ w1 + p["fc1"]["bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    z = np.maximum(h, 0) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return float(np.mean(-_log_softmax(z)[np.arange(16), b.label]))

  assert sens.base_loss == pytest.approx(ce(w), rel=1e-4)
  assert sens.base_loss + sens.damage[0][0] == pytest.approx(
      ce(np.where(np.abs(w) > cut, w, 0)), rel=1e-4)


def test_evaluator_measures_a_whole_plan_like_numpy():
  """Two layers pruned at once (a plan, not one layer alone): the loss NumPy computes."""
  model, variables, batches = _setup()
  evaluate = budget.Evaluator(model, variables, batches, calibration=[b.image for b in batches])
  pruned, keeps = {}, {}
  for name, s in (("fc1", 0.5), ("fc3", 0.9)):
    w = np.asarray(variables["params"][name]["kernel"], np.float64)
    cut = np.sort(np.abs(w).ravel())[round(s * w.size) - 1]
    keeps[name] = np.abs(w) > cut
    pruned[name] = np.where(keeps[name], w, 0)
  loss, _ = evaluate(keeps, {}, {})
  assert loss == pytest.approx(_numpy_loss(variables, batches, pruned), rel=1e-4)
  assert evaluate.compiles == 1
