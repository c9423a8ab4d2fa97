"""The pruning experiments end to end on mock data: one-shot sensitivity and iterative search.

Oracles are independent of the code under test: masks from ``np.argsort`` of ``|w|``, the MLP's
forward pass and cross-entropy in NumPy, pruned counts from the kernel shapes.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import iterative_prune as iterative_config
from configs import prune_sensitivity as sensitivity_config
from experiments import sensitivity
from experiments.sensitivity import (iterative_search, iterative_table, keep_nonzero,
                                     one_shot_sensitivity, one_shot_table)
from jaxcompress import pruning
from jaxcompress.data import load_split
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model
from jaxcompress.steps import supervised_loss

N = 64  # mock examples per split


def _tiny(config):
  """Shrinks a config to an MLP on mock MNIST."""
  config.model.name = "mlp"
  config.model.weights = ""
  config.data.name = "mnist"
  config.data.mean, config.data.std = (0.5,), (0.5,)
  config.data.batch_size = 16
  config.data.eval_batch_size = 24  # 64 = 2 full batches + a padded one
  config.prune.rules = ((".*/kernel", True), (".*", False))  # every kernel, as the oracles prune
  return config


def test_default_policy_keeps_the_first_and_last_layer_dense():
  config = sensitivity_config.get_config()
  _tiny(config).prune.rules = ()
  config.prune.sparsities, config.prune.scopes = (0.5,), ("layer",)
  with tfds.testing.mock_data(num_examples=N):
    result = one_shot_sensitivity(config)
  fc2 = _mlp_params()["fc2"]["kernel"].size  # fc1 first, fc3 last: only fc2 is pruned
  assert (result["results"][0]["pruned"], result["results"][0]["prunable"]) == (fc2 // 2, fc2)


@functools.lru_cache(maxsize=1)
def _mlp_params():
  """The MLP's parameters as NumPy (seed 0, as the experiments build it)."""
  _, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=0)
  return {k: {n: np.asarray(a) for n, a in v.items()} for k, v in variables["params"].items()}


def _numpy_masks(params, sparsity, scope):
  """Magnitude masks of every kernel: the round(s * n) smallest |w| (stable order) are zeroed."""
  kernels = {k: v["kernel"] for k, v in params.items()}
  masks = {}
  if scope == "layer":
    for k, w in kernels.items():
      keep = np.ones(w.size, bool)
      keep[np.argsort(np.abs(w).ravel(), kind="stable")[:round(sparsity * w.size)]] = False
      masks[k] = keep.reshape(w.shape)
  else:
    flat = np.concatenate([np.abs(w).ravel() for w in kernels.values()])
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = False
    start = 0
    for k, w in kernels.items():
      masks[k] = keep[start:start + w.size].reshape(w.shape)
      start += w.size
  return masks


def _numpy_eval(params, images, labels, masks=None):
  """Accuracy (percent), mean cross-entropy and the count of examples with a non-finite logit of
  the MLP, in NumPy."""
  x = (images.astype(np.float64) / 255 - 0.5) / 0.5
  x = x.reshape(len(x), -1)
  names = sorted(params, key=lambda k: int(k[2:]))  # fc1, fc2, fc3
  for i, k in enumerate(names):
    w = params[k]["kernel"] * (masks[k] if masks else 1)
    x = x @ w + params[k]["bias"]
    if i < len(names) - 1:
      x = np.maximum(x, 0)
  logz = np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1)) + x.max(1)
  loss = np.mean(logz - x[np.arange(len(x)), labels])
  finite = np.isfinite(x).all(1)
  return 100 * np.mean(finite & (np.argmax(x, 1) == labels)), loss, int(np.sum(~finite))


def _kernel_sizes(params):
  return [v["kernel"].size for v in params.values()]


def test_one_shot_matches_numpy_pruning_and_compiles_eval_once():
  config = _tiny(sensitivity_config.get_config())
  with tfds.testing.mock_data(num_examples=N):
    result = one_shot_sensitivity(config)
    images, labels = load_split("mnist", "test", progress=False)
  params = _mlp_params()
  sizes = _kernel_sizes(params)

  assert result["eval_compiles"] == 1  # dense + 8 points, one compiled eval step
  assert result["examples"] == N
  acc, loss, nonfinite = _numpy_eval(params, images, labels)
  assert result["dense"]["accuracy"] == pytest.approx(acc)
  assert result["dense"]["loss"] == pytest.approx(loss, rel=1e-4)
  assert result["dense"]["nonfinite"] == nonfinite == 0
  points = [(r["scope"], r["sparsity"]) for r in result["results"]]
  assert points == [(s, p) for s in ("layer", "global") for p in (0.3, 0.5, 0.7, 0.9)]
  for r in result["results"]:
    expected = (sum(round(r["sparsity"] * n) for n in sizes) if r["scope"] == "layer"
                else round(r["sparsity"] * sum(sizes)))
    assert (r["pruned"], r["prunable"]) == (expected, sum(sizes))
    masks = _numpy_masks(params, r["sparsity"], r["scope"])
    acc, loss, nonfinite = _numpy_eval(params, images, labels, masks)
    assert r["accuracy"] == pytest.approx(acc), r
    assert r["loss"] == pytest.approx(loss, rel=1e-4), r
    assert r["nonfinite"] == nonfinite, r

  json.loads(json.dumps(result))  # the printed JSON line round-trips
  table = [[c.strip() for c in line.strip("|").split("|")]
           for line in one_shot_table(result).splitlines()]
  assert len(table) == 2 + 1 + 8 and table[2][:4] == ["dense", "0.00", "0.0000", "0.0000"]
  assert (result["dense"]["pruned"], result["dense"]["prunable"]) == (0, sum(sizes))
  assert table[3] == ["layer", "0.30", "0.3000", f"{result['results'][0]['model_sparsity']:.4f}",
                      f"{result['results'][0]['accuracy']:.2f}",
                      f"{result['results'][0]['accuracy'] - result['dense']['accuracy']:+.2f}"]


def test_one_shot_counts_the_examples_with_non_finite_logits(monkeypatch):
  # fc3's bias of class 3 is NaN: every example's logits hold a NaN, each counted wrong and in
  # nonfinite, at every point (the bias is not pruned); the rows lacked the count.
  def nan_bias(*args, **kwargs):
    model, variables = create_model(*args, **kwargs)
    bias = np.asarray(variables["params"]["fc3"]["bias"]).copy()
    bias[3] = np.nan
    variables["params"]["fc3"]["bias"] = jnp.asarray(bias)
    return model, variables

  monkeypatch.setattr(sensitivity, "create_model", nan_bias)
  config = _tiny(sensitivity_config.get_config())
  config.prune.sparsities, config.prune.scopes = (0.5,), ("layer",)
  with tfds.testing.mock_data(num_examples=N):
    result = one_shot_sensitivity(config)
    images, labels = load_split("mnist", "test", progress=False)
  params = _mlp_params()
  params = {**params, "fc3": {**params["fc3"], "bias": np.where(np.arange(10) == 3, np.nan,
                                                                params["fc3"]["bias"])}}
  acc, _, nonfinite = _numpy_eval(params, images, labels)
  assert (acc, nonfinite) == (0.0, N)
  for row in (result["dense"], *result["results"]):
    assert (row["accuracy"], row["nonfinite"]) == (acc, nonfinite)


def test_one_shot_counts_the_zeros_of_the_model_it_evaluates():
  # Weights already half zero (a pruned checkpoint): 30 % masks change nothing, so the model
  # evaluated at "0.3" is 50 % sparse, as its dense row is; the masks alone counted 30 %.
  kernel = np.arange(1.0, 101.0, dtype=np.float32).reshape(10, 10)
  kernel[::2] = 0.0
  params = {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.ones((10,), jnp.float32)}}
  seen = []
  rows = sensitivity.sweep(params, lambda p: seen.append(p) or {"accuracy": 0.0, "loss": 0.0},
                           [0.3, 0.7], ["layer"], rules=((".*/kernel", True), (".*", False)))
  zeros = [int(np.sum(np.asarray(p["fc"]["kernel"]) == 0)) for p in seen]  # NumPy recount
  assert zeros == [50, 70]
  assert [(r["pruned"], r["prunable"], r["achieved"]) for r in rows] == [(50, 100, 0.5),
                                                                         (70, 100, 0.7)]
  assert [r["model_sparsity"] for r in rows] == [50 / 110, 70 / 110]
  assert sensitivity.sparsity_counts(params, ((".*/kernel", True), (".*", False)))[
      "achieved"] == 0.5


def test_keep_nonzero_holds_exactly_the_existing_zeros():
  w = np.array([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]], np.float32)
  params = {"fc": {"kernel": jnp.asarray(w)}}
  opt = pruning.prune(optax.sgd(0.1), pruning.constant_schedule(0.0), structure=keep_nonzero)
  state = opt.init(params)
  for _ in range(5):
    updates, state = opt.update({"fc": {"kernel": jnp.ones((2, 3))}}, state, params)
    params = optax.apply_updates(params, updates)
  out = np.asarray(params["fc"]["kernel"])
  assert np.all(out[w == 0] == 0)  # exactly zero, though their gradient was 1 at every step
  np.testing.assert_allclose(out[w != 0], w[w != 0] - 0.5, atol=1e-6)  # 5 steps of 0.1 * 1


def _iterative(workdir, data=None, **prune):
  config = _tiny(iterative_config.get_config())
  config.data.val_examples = 16  # 48 training examples left: 3 steps of 16 per round
  config.train.epochs = 1.0
  config.train.log_every_steps = 1
  config.prune.sparsities = (0.5, 0.8)
  config.prune.tolerance = 100.0  # every round passes: the search runs to the end
  config.prune.update(prune)
  config.data.update(data or {})
  with tfds.testing.mock_data(num_examples=N):
    return iterative_search(config, str(workdir))


def test_iterative_exact_sparsity_validation_on_train_split_and_resume(tmp_path, monkeypatch):
  # The mock has no split sizes: the held-out spec comes from data.last_examples (tested on the
  # real CIFAR-10 in test_data.py), here a stand-in that shows what it was asked.
  monkeypatch.setattr(sensitivity.data_lib, "last_examples",
                      lambda name, split, n, data_dir=None: f"{name}:{split}:last{n}")
  result = _iterative(tmp_path)
  assert result["val_split"] == "mnist:train:last16"
  params = _mlp_params()
  sizes = _kernel_sizes(params)

  with open(tmp_path / "results.json") as f:
    assert json.load(f) == result
  assert [h["sparsity"] for h in result["history"]] == [0.5, 0.8]
  for h in result["history"]:
    assert h["within_tolerance"] and h["steps"] == 3
    assert (h["pruned"], h["prunable"]) == (sum(round(h["sparsity"] * n) for n in sizes),
                                            sum(sizes))
  assert result["sparsity"] == 0.8 and result["pruned"] == result["history"][-1]["pruned"]
  assert result["val_accuracy"] == result["history"][-1]["val_accuracy"]
  assert result["train_compiles"] == 1  # one compiled step for every round
  assert result["test_examples"] == N

  # Validation reads the last 16 *training* examples; the test split is only for the report.
  with tfds.testing.mock_data(num_examples=N):
    train = load_split("mnist", "train", progress=False)
    test = load_split("mnist", "test", progress=False)
  dense_val = _numpy_eval(params, train[0][-16:], train[1][-16:])
  assert result["dense_val_accuracy"] == pytest.approx(dense_val[0])
  assert result["dense_test_accuracy"] == pytest.approx(_numpy_eval(params, *test)[0])
  # No logit of the dense model is NaN or Inf (NumPy), nor of the rounds' and chosen model's.
  assert (result["dense_val_nonfinite"], result["dense_test_nonfinite"]) == (
      dense_val[2], _numpy_eval(params, *test)[2]) == (0, 0)
  assert [h["val_nonfinite"] for h in result["history"]] == [0, 0]
  assert result["test_nonfinite"] == 0

  table = iterative_table(result).splitlines()
  assert len(table) == 3 + 2 + 2 and table[-1].startswith("chosen sparsity 0.80")
  assert sorted(os.listdir(tmp_path / "round_1" / "checkpoints")) == ["3"]

  assert _iterative(tmp_path) == result  # a finished search returns its results.json
  os.remove(tmp_path / "results.json")  # as if killed before writing it:
  resumed = _iterative(tmp_path)  # every round restored from its final checkpoint
  assert resumed["train_compiles"] == 0  # nothing was trained again
  strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "history",
                                                             "train_compiles")}
  assert strip(resumed) == strip(result)
  assert [h["val_accuracy"] for h in resumed["history"]] == [
      h["val_accuracy"] for h in result["history"]]

  with pytest.raises(ConfigError, match="a different config: prune.tolerance is 100.0 there, "
                                        "0.5 here;"):
    _iterative(tmp_path, tolerance=0.5)


def test_each_round_draws_its_own_step_keys(tmp_path, monkeypatch):
  """Every round's fine-tuning starts at step 0, and the step's key (dropout's) is folded from the
  step: each round drew round 0's keys, step for step, so a model with dropout saw the same masks
  in every round."""
  keys = []

  def recording(model, compute_dtype="float32"):
    loss = supervised_loss(model, compute_dtype)

    def loss_fn(params, model_state, batch, rng):
      jax.debug.callback(lambda k: keys.append(np.asarray(k).tobytes()),
                         jax.random.key_data(rng))
      return loss(params, model_state, batch, rng)
    return loss_fn

  monkeypatch.setattr(sensitivity, "supervised_loss", recording)
  result = _iterative(tmp_path)
  assert [h["steps"] for h in result["history"]] == [3, 3]
  assert len(keys) == 6 and len(set(keys)) == 6


def test_iterative_validates_on_the_named_split(tmp_path):
  # The mock ignores slices ("test[:32]" reads all of test), so this checks the mechanism: the
  # whole named split, none of it held out of training.
  result = _iterative(tmp_path, data=dict(val_examples=0, eval_split="test[32:]"),
                      sparsities=(0.5,), val_split="test[:32]")
  with tfds.testing.mock_data(num_examples=N):
    test = load_split("mnist", "test", progress=False)
  params = _mlp_params()
  assert (result["val_split"], result["val_examples"], result["eval_split"]) == (
      "test[:32]", N, "test[32:]")
  assert result["history"][0]["steps"] == 4  # no examples held out of training: 64 / 16
  assert result["dense_val_accuracy"] == pytest.approx(_numpy_eval(params, *test)[0])
  assert result["dense_test_accuracy"] == pytest.approx(_numpy_eval(params, *test)[0])


@pytest.mark.parametrize("data,prune,message", [
    ({}, dict(scope="regional"), "prune.scope must be one of global, layer, got 'regional'"),
    ({}, dict(sparsities=(0.5, 1.0)), r"prune.sparsities\[1\] must be in \[0.0, 1.0\), got 1.0"),
    ({}, dict(tolerance=-1.0), "prune.tolerance must be a number >= 0"),
    ({}, dict(val_split="test[:32]"), "data.val_examples must be 0 when prune.val_split"),
    (dict(val_examples=0), dict(val_split="test"), "prune.val_split must be a split disjoint "
                                                   "from data.eval_split='test'"),
    (dict(val_examples=0, eval_split="test[:32]"), dict(val_split="train"),
     r"prune.val_split must be a split disjoint from the examples fine-tuned on \(train\)"),
    (dict(eval_split="train"), {}, "data.eval_split='train' is data.train_split, the examples "
                                   "trained on"),
    (dict(val_examples=0), {}, "data.val_examples must be > 0 .or set prune.val_split."),
    ({}, dict(rules=(("nomatch.*", True),)), r"prune.rules must be rules that select at least "
     r"one weight to prune \(e.g. fc1/kernel, fc2/kernel, fc3/kernel\), got \(\('nomatch.\*', "
     r"True\),\)"),
    ({}, dict(rules=(0.5,)), r"^prune.rules\[0\] must be a \(regex, value\) pair, got 0.5;"),
    ({}, dict(rules=("fc1",)), r"^prune.rules\[0\] must be a \(regex, value\) pair, got 'fc1';"),
])
def test_iterative_bad_config_is_one_clear_error(tmp_path, data, prune, message):
  with pytest.raises(ConfigError, match=message):
    _iterative(tmp_path, data=data, **prune)
  assert not os.listdir(tmp_path)  # rejected before anything is written


def test_one_shot_bad_scope_or_rules_name_the_field():
  config = _tiny(sensitivity_config.get_config())
  config.prune.scopes = ("layer", "globl")
  with pytest.raises(ConfigError, match=r"prune.scopes\[1\] must be one of global, layer"):
    one_shot_sensitivity(config)
  config = _tiny(sensitivity_config.get_config())
  config.prune.rules = (("nomatch.*", True),)
  with tfds.testing.mock_data(num_examples=N):
    with pytest.raises(ConfigError, match=r"prune.rules must be rules that select at least one "
                       r"weight"):
      one_shot_sensitivity(config)
