"""The composed train step: every subset of prune / quantize / distill, on a tiny MLP."""

import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import compose
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model

SHAPE = (6, 6, 3)


def _specs(prune=False, quant=False, distill=False, **overrides):
  specs = {
      "prune": dict(method="magnitude" if prune else "none", sparsity=0.75),
      "quant": dict(weight_bits=4 if quant else 0, act_bits=8 if quant else 0,
                    first_last_bits=8 if quant else 0),
      "distill": dict(alpha=0.5 if distill else 0.0)}
  for key, value in overrides.items():
    section, field = key.split("__")
    specs[section][field] = value
  return dict(prune=compose.PruneSpec.from_dict(specs["prune"]),
              quant=compose.QuantSpec.from_dict(specs["quant"]),
              distill=compose.DistillSpec.from_dict(specs["distill"]))


OPT = optax.sgd(0.05)


def _batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [Batch(rng.normal(size=(8, *SHAPE)).astype(np.float32),
                rng.integers(0, 4, 8).astype(np.int32), np.ones(8, np.float32))
          for _ in range(n)]


def _setup(specs, total_steps=12):
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  teacher, tvars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  x = _batches(1)[0].image
  comp = compose.build(student, svars, x, optimizer=OPT, total_steps=total_steps,
                       teacher=teacher, **specs)
  state = comp.init_state(svars, x, teacher_vars=tvars, calibration=[x])
  return comp, state, tvars


@pytest.mark.parametrize("prune,quant,distill", [
    (False, False, False), (True, False, False), (False, True, False), (False, False, True),
    (True, True, True)])
def test_every_subset_trains_in_one_jitted_step(prune, quant, distill):
  comp, state, tvars = _setup(_specs(prune, quant, distill))
  step = comp.make_train_step()
  args = (tvars,) if distill else ()
  losses = []
  for i in range(12):
    state, metrics = step(state, _batches(3)[i % 3], *args)
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1, "the composed step recompiled"
  # no host callback in the step: it would cost milliseconds per step on any backend
  assert "callback" not in step.lower(state, _batches(1)[0], *args).as_text()
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert ("kd_loss" in metrics) == distill and ("teacher_agreement" in metrics) == distill
  assert ("sparsity" in metrics) == prune
  assert (comp.quantizer is not None) == quant and (comp.teacher is not None) == distill
  if prune:  # final sparsity reached inside the run, pruned weights exactly zero
    kernels = [state.params["model"][f"fc{i}"]["kernel"] for i in (2,)]
    for k in kernels:
      assert np.sum(np.asarray(k) == 0) == round(0.75 * k.size)
    assert np.all(np.asarray(state.params["model"]["fc1"]["kernel"]) != 0)  # first layer dense
    assert np.all(np.asarray(state.params["model"]["fc3"]["kernel"]) != 0)  # last layer dense


def test_self_distillation_has_zero_kd_loss_and_full_agreement():
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  comp = compose.build(student, svars, _batches(1)[0].image, optimizer=OPT, total_steps=6,
                       teacher=student, **_specs(distill=True))
  state = comp.init_state(svars, _batches(1)[0].image)
  _, (_, metrics) = comp.loss_fn(state.params, state.model_state, _batches(1)[0], None, svars)
  assert float(metrics["kd_loss"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics["teacher_agreement"]) == 1.0


def test_lsq_steps_are_trained_and_pruning_leaves_them_alone():
  comp, state, _ = _setup(_specs(prune=True, quant=True, quant__method="lsq"))
  before = jax.tree.map(np.asarray, state.params["qsteps"])
  step = comp.make_train_step()
  for b in _batches(3):
    state, _ = step(state, b)
  after = state.params["qsteps"]
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
  assert any(changed)
  assert all(np.all(np.asarray(x) > 0) for x in jax.tree.leaves(after))


def test_an_lsq_step_carried_across_zero_is_used_as_its_absolute_value(tmp_path):
  """Adam moves a step by about its learning rate, so a small step may cross zero: the model and
  the export then use |s|, as if it had not (the step's sign is no grid)."""
  from jaxcompress.export import load
  comp, state, _ = _setup(_specs(quant=True, quant__method="lsq"))
  x = _batches(1)[0].image
  flipped = jax.tree.map(lambda s: -s, state.params["qsteps"])
  logits = lambda st: np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(st), x))
  negative = state.replace(params={**state.params, "qsteps": flipped})
  np.testing.assert_array_equal(logits(negative), logits(state))
  comp.export(str(tmp_path), negative)
  np.testing.assert_array_equal(np.asarray(load(str(tmp_path), comp.student).logits(x)),
                                logits(state))


def test_kmeans_method_shares_weights_over_the_codebook():
  comp, state, _ = _setup(_specs(prune=True, quant=True, quant__method="kmeans",
                                 quant__weight_bits=3))
  step = comp.make_train_step()
  for i in range(12):
    state, _ = step(state, _batches(3)[i % 3])
  books = state.model_state["kmeans"]
  assert set(books) == {"fc2/kernel"}  # first and last layers stay uniform 8-bit
  assert books["fc2/kernel"].shape == (8,)
  shared, _ = compose._share_weights(state.params["model"], books, update=False)
  values = set(np.unique(np.asarray(shared["fc2"]["kernel"])).tolist())
  assert values <= set(np.asarray(books["fc2/kernel"]).tolist()) | {0.0}
  zeros = np.asarray(state.params["model"]["fc2"]["kernel"]) == 0
  assert zeros.sum() == round(0.75 * zeros.size)
  assert np.all(np.asarray(shared["fc2"]["kernel"])[zeros] == 0)


def test_kmeans_with_first_last_bits_0_leaves_the_first_and_last_layers_float():
  """QuantSpec: first_last_bits=0 leaves the first and last layers float, k-means or not."""
  comp, state, _ = _setup(_specs(quant=True, quant__method="kmeans", quant__weight_bits=2,
                                 quant__act_bits=0, quant__first_last_bits=0))
  books = state.model_state["kmeans"]
  assert set(books) == {"fc2/kernel"}
  assert all(l.config.weight_bits is None for l in state.model_state["quant"].layers)
  _, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  used, _ = compose._share_weights(state.params["model"], books, update=False)
  for name in ("fc1", "fc3"):  # the float weights, bit for bit
    np.testing.assert_array_equal(used[name]["kernel"], svars["params"][name]["kernel"])
  assert len(np.unique(np.asarray(used["fc2"]["kernel"]))) <= 4


@pytest.mark.parametrize("total", [3, 10, 100, 1000, 11700])
def test_prune_schedule_reaches_the_target_inside_the_run(total):
  every, begin, end = _specs(prune=True)["prune"].steps(total)
  assert end % every == 0 and begin % every == 0 and begin < end
  assert end <= max(total - 1, every), (every, begin, end)


def test_a_gradual_schedule_needs_two_steps():
  model, variables = create_model("mlp", num_classes=4, image_shape=(4, 4, 1), seed=0)
  x = np.zeros((2, 4, 4, 1), np.float32)
  prune = compose.PruneSpec(sparsity=0.5, schedule="gradual")
  with pytest.raises(ConfigError, match="prune.schedule must be one_shot or constant for a run "
                     "of 1 step"):
    compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=1, prune=prune)
  compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2, prune=prune)


@pytest.mark.parametrize("key,value,match", [
    ("prune__method", "taylor", "prune.method must be one of"),
    ("prune__structure", "block", "prune.structure must be one of"),
    ("prune__sparsity", 1.0, r"prune.sparsity must be in \[0.0, 1.0\), got 1.0"),
    ("quant__method", "apot", "quant.method must be one of kmeans, lsq, minmax, got 'apot'"),
    ("quant__weight_bits", 9, r"quant.weight_bits must be 0 \(float\) or an integer in \[2, 8\]"),
    ("distill__temperature", -1.0, "distill.temperature must be > 0"),
    ("distill__alpha", 1.5, r"distill.alpha must be in \[0.0, 1.0\], got 1.5"),
    ("distill__feature_weight", -1.0, "distill.feature_weight must be >= 0"),
    ("distill__feature_weight", 1.0, r"distill.feature_pairs must be at least one .* with "
     r"distill.feature_weight > 0, got \(\); add pairs"),
    ("prune__sparsity_", 0.5, "prune field must be one of"),
    ("prune__rules", ("hidden", True), r"prune.rules\[0\] must be a \(regex, True/False\) pair, "
     "got 'hidden'"),
    ("prune__rules", (("[", True),), r"prune.rules\[0\] regex must be a valid regex"),
    ("prune__seed", "a", "prune.seed must be an integer, got 'a'"),
    ("prune__m", "4", "prune.m must be an integer, got '4'; N:M keeps n of every m weights"),
    ("prune__n", True, "prune.n must be an integer, got True"),
    ("prune__n", 2.0, "prune.n must be an integer, got 2.0"),
    ("prune__update_every", 2.5, "prune.update_every must be an integer >= 1, got 2.5"),
    ("prune__structure", "channel", "prune.scope must be layer with prune.structure=channel"),
    ("prune__norm", "l2", r"prune.norm must be l1 with prune.method=movement \(its scores are "
     "signed"),
    ("prune__norm", "l3", r"prune.norm must be one of l1, l2, got 'l3'"),
    ("quant__weight_bits", 4.5, r"quant.weight_bits must be 0 \(float\) or an integer in \[2, 8\], "
     "got 4.5"),
    ("quant__per_channel", "no", "quant.per_channel must be True or False, got 'no'"),
    ("quant__layer_bits", (("[", 4, 8),), r"quant.layer_bits\[0\] regex must be a valid regex"),
    ("quant__layer_bits", (("a", 4.5, 8),), r"quant.layer_bits\[0\] weight_bits must be"),
    ("distill__temperature", float("inf"), "distill.temperature must be a finite number > 0"),
    ("distill__temperature", float("nan"), "distill.temperature must be a finite number > 0"),
    ("distill__feature_weight", float("nan"), "distill.feature_weight must be a finite number"),
    ("distill__feature_pairs", (1.5,), r"distill.feature_pairs must be \(student path, teacher "
     r"path\) pairs, got 1.5"),
    ("distill__feature_pairs", ("ab",), r"distill.feature_pairs must be \(student path, teacher "
     r"path\) pairs, got 'ab'"),
])
def test_bad_specs_fail_when_built(key, value, match):
  extra = {"prune__structure": {"prune__scope": "global"},  # scope only matters with them
           "prune__m": {"prune__structure": "nm", "prune__sparsity": 0.5},
           "prune__n": {"prune__structure": "nm", "prune__sparsity": 0.5},
           "prune__norm": {"prune__method": "movement", "prune__structure": "kernel"}}
  if key in extra and (value in ("channel", "l2", "l3") or key in ("prune__m", "prune__n")):
    key_values = {**extra[key], key: value}
  else:
    key_values = {key: value}
  with pytest.raises(ConfigError, match=match):
    _specs(prune=True, quant=True, distill=True, **key_values)


@pytest.mark.parametrize("field,value,match", [
    ("n", 0, r"^prune.n must be in \[1, prune.m=4\), got 0$"),
    ("n", -3, r"^prune.n must be in \[1, prune.m=4\), got -3$"),
    ("m", 0, r"^prune.m must be an integer >= 2, got 0; N:M keeps n of every m weights$"),
    ("n", 2.5, r"^prune.n must be an integer, got 2.5"),
    ("norm", "l3", r"^prune.norm must be one of l1, l2, got 'l3'$"),
])
def test_n_m_and_norm_are_checked_beside_any_structure(field, value, match):
  # a config section holds them all: a bad value beside unstructured pruning is a mistake too
  with pytest.raises(ConfigError, match=match):
    compose.PruneSpec(sparsity=0.5, **{field: value})


def test_a_one_shot_schedule_may_begin_after_the_unused_end():
  spec = compose.PruneSpec(sparsity=0.5, schedule="one_shot", begin=0.7)
  assert spec.begin == 0.7 and spec.end == 0.5


@pytest.mark.parametrize("schedule", ["one_shot", "gradual"])
def test_a_schedule_that_begins_at_the_end_of_the_run_is_refused(schedule):
  # begin=1.0 puts the first pruning step at total_steps, one past the last step of the run:
  # the run would end dense while asked for a sparsity.
  with pytest.raises(ConfigError, match=rf"prune.begin must be < 1 with prune.schedule={schedule}"
                     r", got 1.0; pruning that begins at the end of the run prunes nothing"):
    compose.PruneSpec(sparsity=0.5, schedule=schedule, begin=1.0, end=1.0)
  compose.PruneSpec(sparsity=0.5, schedule="constant", begin=1.0)  # constant ignores begin


def test_a_one_shot_schedule_late_in_the_run_prunes_inside_it():
  comp, state, _ = _setup(_specs(prune=True, prune__schedule="one_shot", prune__begin=0.95),
                          total_steps=10)
  step = comp.make_train_step()
  for i in range(10):
    state, _ = step(state, _batches(3)[i % 3])
  k = np.asarray(state.params["model"]["fc2"]["kernel"])
  assert np.sum(k == 0) == round(0.75 * k.size)


class _Narrow(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(9)(x))
    return nn.Dense(3)(nn.relu(nn.Dense(5, name="mid")(x)))  # mid: 9 x 5 = 45 entries


@pytest.mark.parametrize("prune", [dict(sparsity=0.7, schedule="gradual"),
                                   dict(sparsity=0.7, schedule="constant"),
                                   dict(sparsity=0.9, layer_sparsity=(("mid/kernel", 0.7),))])
def test_a_run_ends_at_the_count_final_masks_gives(prune):
  # round(0.7 * 45) = round(31.499999999999996) = 31 (by hand); float32's 0.69999999 * 45
  # rounds to 31.5 and half to even to 32, which the run pruned before.
  model, rng = _Narrow(), np.random.default_rng(0)
  batch = Batch(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32),
                np.ones(8, np.float32))
  variables = model.init(jax.random.PRNGKey(0), batch.image)
  comp = compose.build(model, variables, batch.image, optimizer=optax.sgd(0.01), total_steps=12,
                       prune=compose.PruneSpec(method="magnitude", **prune))
  state, step = comp.init_state(variables, batch.image), comp.make_train_step()
  for _ in range(12):
    state, _ = step(state, batch)
  final = comp.final_masks({"model": variables["params"]})["model"]["mid"]["kernel"]
  assert np.sum(np.asarray(final) == 0) == 31
  assert np.sum(np.asarray(state.params["model"]["mid"]["kernel"]) == 0) == 31


class _Deep(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    for i, width in enumerate((9, 7, 5)):  # d1: 9 x 7 = 63 entries, d2: 7 x 5 = 35
      x = nn.relu(nn.Dense(width, name=f"d{i}")(x))
    return nn.Dense(3, name="out")(x)


def _lamp_masks_by_hand(kernels, sparsity):
  """LAMP (Lee et al. 2021): ``w_u^2 / sum_{v >= u} w_v^2`` over each layer's ascending ``w^2``;
  the lowest ``round(sparsity * n)`` of all layers pruned."""
  scores = []
  for k in kernels:
    sq = np.sort(np.square(np.asarray(k, np.float64)).ravel())
    lamp = sq / np.cumsum(sq[::-1])[::-1]
    scores.append(lamp[np.argsort(np.argsort(np.square(np.asarray(k, np.float64)).ravel(),
                                             kind="stable"), kind="stable")].reshape(k.shape))
  cut = np.sort(np.concatenate([s.ravel() for s in scores]))[
      round(sparsity * sum(s.size for s in scores)) - 1]
  return [s > cut for s in scores]


@pytest.mark.parametrize("method,scope", [("random", "layer"), ("lamp", "global")])
def test_final_masks_score_as_the_run_does(method, scope):
  # They ranked by magnitude whatever prune.method: a random or LAMP run was evaluated "before
  # fine-tuning" with magnitude masks it never trains with.
  model, rng = _Deep(), np.random.default_rng(0)
  batch = Batch(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32),
                np.ones(8, np.float32))
  variables = model.init(jax.random.PRNGKey(0), batch.image)
  # d2 ten times larger: a global magnitude threshold prunes d1 alone, LAMP both
  variables["params"]["d2"]["kernel"] = 10 * variables["params"]["d2"]["kernel"]
  comp = compose.build(model, variables, batch.image, optimizer=optax.sgd(0.01), total_steps=6,
                       prune=compose.PruneSpec(method=method, scope=scope, sparsity=0.5,
                                               schedule="constant", seed=3))
  state, step = comp.init_state(variables, batch.image), comp.make_train_step()
  for _ in range(6):
    state, _ = step(state, batch)
  final = comp.final_masks({"model": variables["params"]})["model"]
  kept = [np.asarray(final[p]["kernel"]) != 0 for p in ("d1", "d2")]
  ran = [np.asarray(state.params["model"][p]["kernel"]) != 0 for p in ("d1", "d2")]
  for k, r in zip(kept, ran):
    np.testing.assert_array_equal(k, r)
  if method == "lamp":
    by_hand = _lamp_masks_by_hand([variables["params"][p]["kernel"] for p in ("d1", "d2")], 0.5)
    for k, h in zip(kept, by_hand):
      np.testing.assert_array_equal(k, h)


def test_nm_without_sparsity_or_on_ungroupable_weights_fails_when_built():
  with pytest.raises(ConfigError, match=r"prune.sparsity must be > 0 with prune.structure=nm .*"
                     r"got 0.0; N:M prunes 1 - n/m = 0.5"):
    compose.PruneSpec(structure="nm")

  class Depthwise(nn.Module):  # the middle conv sums over 1 input channel: no groups of 4
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3))(x)
      x = nn.Conv(8, (3, 3), feature_group_count=8)(x)
      return nn.Dense(4)(nn.Conv(8, (1, 1))(x).mean((1, 2)))

  x = _batches(1)[0].image
  model = Depthwise()
  variables = model.init(jax.random.key(0), x)
  prune = compose.PruneSpec(structure="nm", sparsity=0.5)
  with pytest.raises(ConfigError, match=r"prune.m \(leaf 'model/Conv_1/kernel', axis 2 of length "
                     r"1\) must be a divisor of 1, got 4; exclude this leaf"):
    compose.build(model, variables, x, optimizer=OPT, total_steps=4, prune=prune)
  comp = compose.build(model, variables, x, optimizer=OPT, total_steps=4,
                       prune=dataclasses.replace(prune, rules=(("Conv_2/kernel", True),)))
  assert comp.prune_enabled


def test_user_mistakes_are_one_line_errors(tmp_path):
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE)
  batch = _batches(1)[0]
  with pytest.raises(ConfigError, match=r"variables must be the model's variables, a dict with "
                     r"a 'params' entry .*; pass \{'params': params, ...\}"):
    compose.build(student, svars["params"], batch.image, optimizer=OPT, total_steps=4)
  comp = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4, teacher=student,
                       **_specs(quant=True, distill=True))
  with pytest.raises(ConfigError, match=r"calibration must be a sequence of input batches, got "
                     r"'one array of shape \(8, 6, 6, 3\)'; pass \[x\]"):
    comp.init_state(svars, batch.image, teacher_vars=svars, calibration=batch.image)
  state = comp.init_state(svars, batch.image, teacher_vars=svars, calibration=[batch.image])
  with pytest.raises(ConfigError, match=r"train step: takes 1 input\(s\) after the batch, got 0 "
                     r"\(with distillation: step\(state, batch, teacher_vars\)\)"):
    comp.make_train_step()(state, batch)
  with pytest.raises(ConfigError, match=r"batch.label must be integer class ids \(shape \(8,\)\), "
                     r"got float32 of shape \(8, 4\); one-hot labels: pass their argmax"):
    comp.make_train_step()(state, batch._replace(label=np.eye(4, dtype=np.float32)[batch.label]),
                           svars)
  with pytest.raises(ConfigError, match=r"^train step: the batch must be jaxcompress.data.Batch "
                     r"\(image, label, weight\), got a tuple"):
    comp.make_train_step()(state, (batch.image, batch.label), svars)
  with pytest.raises(ConfigError, match=r"^train step: the model fails on batch.image of shape "
                     r"\(8, 5, 6, 3\) \(For parameter \"kernel\" in \"/fc1\", .* received has "
                     r"shape \(108, \d+\)\.\)"):
    comp.make_train_step()(state, batch._replace(image=batch.image[:, :5]), svars)
  with pytest.raises(ConfigError, match=r"quant.layer_bits\[0\] must be a regex that fully "
                     r"matches a layer path \(fc1, fc2, fc3\), got 'fc9'"):
    compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4,
                  quant=compose.QuantSpec(layer_bits=(("fc9", 4, 8),)))
  for pair, model, wrong in ((("fc9", "fc2"), "student", "fc9"),
                             (("fc2", "fc7"), "teacher", "fc7")):
    hints = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4,
                          teacher=student, distill=compose.DistillSpec(
                              alpha=0.5, feature_weight=1.0, feature_pairs=(pair,)))
    with pytest.raises(ConfigError, match=r"distill.feature_pairs must be a module path of the "
                       rf"{model} that its forward calls, e.g. one of its layers: fc1, fc2, fc3, "
                       rf"got '{wrong}'"):
      hints.init_state(svars, batch.image, teacher_vars=svars)
  with pytest.raises(ConfigError, match=r"export input_shape must be one example's shape, without "
                     r"the batch axis \(build's sample: \(6, 6, 3\)\), got \(8, 6, 6, 3\)"):
    comp.export(str(tmp_path / "export"), state, input_shape=batch.image.shape)
  # Of the right rank but another size: the MLP's first kernel would take 5 * 6 * 3 inputs.
  with pytest.raises(ConfigError, match=r"^export input_shape \(5, 6, 3\) differs from build's "
                     r"sample's \(6, 6, 3\), and on it params/fc1/kernel would have shape "
                     r"\(90, (\d+)\), not the trained \(108, \1\); give input_shape=\(6, 6, 3\)"):
    comp.export(str(tmp_path / "export"), state, input_shape=(5, 6, 3))
  assert not os.path.exists(tmp_path / "export")


def test_distillation_without_teacher_is_refused():
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE)
  with pytest.raises(ConfigError, match="needs a teacher"):
    compose.build(student, svars, _batches(1)[0].image, optimizer=OPT, total_steps=4,
                  **_specs(distill=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prune={"sparsity": 0.5}), r"prune must be a compose.PruneSpec, got \{'sparsity': 0.5\}; "
     r"from a dict: compose.PruneSpec.from_dict\(d\)"),
    (dict(quant=compose.PruneSpec()), r"quant must be a compose.QuantSpec, got PruneSpec\("),
    (dict(optimizer=None), r"optimizer must be an optax.GradientTransformation, e.g. "
     r"optax.adam\(1e-3\), got None"),
    (dict(total_steps=0, prune=compose.PruneSpec(sparsity=0.5, schedule="one_shot")),
     r"total_steps must be >= 1, got 0"),
])
def test_build_arguments_of_the_wrong_kind_are_one_line_errors(kwargs, match):
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE)
  with pytest.raises(ConfigError, match=match):
    compose.build(student, svars, _batches(1)[0].image, **{"optimizer": OPT, "total_steps": 4,
                                                           **kwargs})


def test_inputs_given_as_python_lists_are_one_line_errors():
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE)
  batch = _batches(1)[0]
  with pytest.raises(ConfigError, match=r"inputs must be arrays .* got a float at "
                     r"inputs\[0\]\[0\]\[0\]\[0\]; pass np.asarray"):
    compose.build(student, svars, batch.image.tolist(), optimizer=OPT, total_steps=4)
  comp = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4)
  state = comp.init_state(svars, batch.image)
  with pytest.raises(ConfigError, match="the batch's image must be an array with a batch axis"):
    comp.make_train_step()(state, batch._replace(image=batch.image.tolist()))


def test_a_string_where_a_number_belongs_is_a_one_line_error():
  with pytest.raises(ConfigError, match=r"prune.sparsity must be a number in \[0.0, 1.0\), got "
                     r"'0.8'"):
    compose.PruneSpec(sparsity="0.8")


def test_a_teacher_of_other_classes_or_no_teacher_variables_is_a_one_line_error():
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  batch = _batches(1)[0]
  # Refused when built, before any variables or compilation: both traced by jax.eval_shape.
  for distill in (dict(alpha=0.5), dict(alpha=0.0, feature_weight=1.0,
                                        feature_pairs=(("fc1", "fc1"),))):
    with pytest.raises(ConfigError, match=r"^teacher: its outputs have 5 classes \(shape "
                       r"\(8, 5\)\), the student's 4 \(shape \(8, 4\)\); distillation needs a "
                       r"teacher of the same classes$"):
      compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4,
                    teacher=create_model("mlp", num_classes=5, image_shape=SHAPE)[0],
                    distill=compose.DistillSpec(**distill))
  teacher, tvars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  comp = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4,
                       teacher=teacher, **_specs(distill=True))
  state = comp.init_state(svars, batch.image, teacher_vars=tvars)
  step = comp.make_train_step()
  with pytest.raises(ConfigError, match=r"train step: distillation needs the teacher's variables, "
                     r"the step's third argument"):
    step(state, batch, None)
  with pytest.raises(ConfigError, match=r"batch.label must have one class id per output, shape "
                     r"\(8,\) for the model's outputs \(8, 4\), got shape \(6,\)"):
    step(state, batch._replace(label=batch.label[:6]), tvars)


def test_nan_weights_or_inputs_are_refused_at_init_and_export(tmp_path):
  model, variables = create_model("mlp", num_classes=4, image_shape=(4, 4, 1), seed=0)
  x = np.zeros((2, 4, 4, 1), np.float32)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=4,
                       prune=compose.PruneSpec(sparsity=0.5))
  bad = jax.tree.map(np.array, variables)
  bad["params"]["fc2"]["kernel"][0, :3] = np.nan
  with pytest.raises(ConfigError, match=r"^student_vars\['params'\]\['fc2'\]\['kernel'\] holds "
                                        r"3 NaN/Inf value\(s\)"):
    comp.init_state(bad, x)
  with pytest.raises(ConfigError, match=r"^sample_x holds 32 NaN/Inf value\(s\)"):
    comp.init_state(variables, x + np.inf)
  with pytest.raises(ConfigError, match=r"^teacher_vars\['params'\]\['fc2'\]\['kernel'\] holds "
                                        r"3 NaN/Inf value\(s\)"):  # its logits: a nan KD loss
    comp.init_state(variables, x, teacher_vars=bad)
  state = comp.init_state(variables, x)
  diverged = state.replace(params=jax.tree.map(lambda a: a * np.nan, state.params))
  with pytest.raises(ConfigError, match=r"^export: params/fc1/bias holds \d+ NaN/Inf"):
    comp.export(str(tmp_path / "export"), diverged)
  assert not (tmp_path / "export").exists()
  # quantized: named as the weights, not as the input ranges training drove to NaN
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=4,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, x, calibration=[x])
  params = jax.tree.map(lambda a: a * np.nan, state.params["model"])
  diverged = state.replace(params={**state.params, "model": params})
  with pytest.raises(ConfigError, match=r"^export: params/fc1/bias holds \d+ NaN/Inf.*diverged"):
    comp.export(str(tmp_path / "export"), diverged)
  assert not (tmp_path / "export").exists()


def test_alpha_one_distils_examples_without_labels():
  comp, state, tvars = _setup(_specs(distill=True, distill__alpha=1.0))
  batch = _batches(1)[0]
  unlabelled = batch._replace(label=np.full(8, -1, np.int32))
  loss, (_, metrics) = comp.loss_fn(state.params, state.model_state, unlabelled,
                                    jax.random.key(0), tvars)
  # Distillation alone: the mean of the KD losses, the labels (none) play no part.
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(metrics["kd_loss"]), rtol=1e-6)
  labelled, _ = comp.loss_fn(state.params, state.model_state, batch, jax.random.key(0), tvars)
  np.testing.assert_allclose(float(labelled), float(loss), rtol=1e-6)


def test_alpha_one_measures_task_loss_and_accuracy_on_the_labelled_examples_only():
  # The unlabelled examples (-1) made task_loss nan and counted as wrong in the accuracy.
  comp, state, tvars = _setup(_specs(distill=True, distill__alpha=1.0))
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  batch = _batches(1)[0]
  labels = batch.label.copy()
  labels[[1, 4, 6]] = -1
  weight = np.array([1, 2, 1, 1, 1, 0.5, 1, 3], np.float32)
  _, (_, metrics) = comp.loss_fn(state.params, state.model_state,
                                 Batch(batch.image, labels, weight), jax.random.key(0), tvars)
  logits = np.asarray(student.apply(svars, batch.image), np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  mask = labels >= 0
  w = weight[mask]
  ce = -log_p[mask, labels[mask]]
  hit = np.argmax(logits[mask], -1) == labels[mask]
  np.testing.assert_allclose(float(metrics["task_loss"]), np.sum(w * ce) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.sum(w * hit) / w.sum(), rtol=1e-6)


def test_teacher_variables_of_the_wrong_kind_are_one_line_errors():
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  teacher, tvars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  batch = _batches(1)[0]
  specs = _specs(distill=True, distill__feature_weight=1.0,
                 distill__feature_pairs=(("fc1", "fc1"),))
  comp = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=4,
                       teacher=teacher, **specs)
  with pytest.raises(ConfigError, match=r"^init_state: feature hints .* pass teacher_vars="):
    comp.init_state(svars, batch.image)
  with pytest.raises(ConfigError, match=r"^teacher_vars must be the model's variables"):
    comp.init_state(svars, batch.image, teacher_vars=tvars["params"])
  state = comp.init_state(svars, batch.image, teacher_vars=tvars)
  with pytest.raises(ConfigError, match=r"^teacher_vars must be the model's variables"):
    comp.make_train_step()(state, batch, tvars["params"])
  other = {"params": {**tvars["params"], "fc1": {"kernel": tvars["params"]["fc1"]["kernel"][:, :5],
                                                 "bias": tvars["params"]["fc1"]["bias"][:5]}}}
  with pytest.raises(ConfigError, match=r"^teacher_vars: the teacher does not take these "
                                        r"variables \(.*\"/fc1\".*\(108, 5\)\.\); pass the "
                                        r"teacher's own"):
    comp.make_train_step()(state, batch, other)  # another width: another model's variables


class Lifted(nn.Module):
  """A Dense under nn.remat and a scanned block returning (carry, outputs)."""

  @nn.compact
  def __call__(self, x):
    h = nn.remat(nn.Dense)(8, name="mid")(x.reshape(x.shape[0], -1))

    class Step(nn.Module):
      @nn.compact
      def __call__(self, c, _):
        return nn.relu(nn.Dense(8, name="fc")(c)), None

    steps = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return nn.Dense(4, name="head")(steps(name="blocks")(h, None)[0])


@pytest.mark.parametrize("path,message", [
    ("mid", "'mid' runs inside a lifted transform"),
    ("blocks/fc", "'blocks/fc' runs inside a lifted transform"),
    ("blocks", "'blocks' returns a tuple, not one array"),
])
def test_a_hint_inside_a_lifted_transform_is_one_line(path, message):
  batch = _batches(1)[0]
  student = Lifted()
  svars = student.init(jax.random.key(0), batch.image)
  teacher, tvars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  comp = compose.build(student, svars, batch.image, optimizer=OPT, total_steps=2,
                       teacher=teacher, distill=compose.DistillSpec(
                           feature_weight=1.0, feature_pairs=((path, "fc1"),)))
  with pytest.raises(ConfigError, match=rf"^distill.feature_pairs: {message}"):
    comp.init_state(svars, batch.image, teacher_vars=tvars)


class AlwaysDropping(nn.Module):
  """A teacher whose dropout is switched by a module attribute, not by a flag of __call__."""
  train: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.Dropout(0.5, deterministic=not self.train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(10)(h)


def test_a_teacher_that_drops_out_in_eval_mode_is_named_for_what_it_is():
  x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  teacher = AlwaysDropping()
  tvars = teacher.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
  comp = compose.build(AlwaysDropping(train=False), tvars, x, optimizer=optax.sgd(0.1),
                       total_steps=2, distill=compose.DistillSpec(alpha=0.5), teacher=teacher)
  with pytest.raises(ConfigError, match=r"^teacher: its forward draws random numbers in eval mode "
                     r"\(Dropout_0 needs PRNG for \"dropout\"\); the teacher runs without a key: "
                     r"give its __call__ a train or deterministic flag"):
    comp.teacher_apply(tvars, x)


class _TinyLM(nn.Module):
  """Tokens [B, T] -> logits [B, T, 5], with a hidden layer 'mid' of features [B, T, 8]."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8, name="mid")(nn.Embed(5, 8, name="emb")(x))
    return nn.Dense(5, name="head")(jax.nn.relu(h))


@pytest.mark.parametrize("batch,length,per_token", [(3, 4, True), (4, 4, False), (4, 4, True)])
def test_sequence_hints_are_per_position_against_numpy(batch, length, per_token):
  # A [B] hint added to [B, T] losses raised (B != T) or lined up with the positions (B == T).
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, (batch, length)).astype(np.int32)
  y = rng.integers(0, 5, (batch, length)).astype(np.int32)
  w = (rng.integers(0, 3, (batch, length)) if per_token else np.arange(batch) % 3)
  w = w.astype(np.float32)
  student, teacher = _TinyLM(), _TinyLM()
  svars, tvars = student.init(jax.random.key(1), x), teacher.init(jax.random.key(2), x)
  distill = compose.DistillSpec(alpha=0.5, temperature=2.0, feature_weight=0.7,
                                feature_pairs=(("mid", "mid"),))
  comp = compose.build(student, svars, x, optimizer=OPT, total_steps=4, teacher=teacher,
                       distill=distill)
  state = comp.init_state(svars, x, teacher_vars=tvars)
  loss, (_, metrics) = comp.loss_fn(state.params, state.model_state, Batch(x, y, w),
                                    jax.random.key(0), tvars)

  def run(model, variables):
    out, inter = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == "mid",
                             mutable=["intermediates"])
    return np.asarray(out, np.float64), np.asarray(inter["intermediates"]["mid"]["__call__"][0])

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  (s, s_mid), (t, t_mid) = run(student, svars), run(teacher, tvars)
  ce = -np.log(np.take_along_axis(softmax(s), y[..., None], -1)[..., 0])
  p_t, p_s = softmax(t / 2), softmax(s / 2)
  kd_tok = 4 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
  hint = np.mean((s_mid - t_mid) ** 2, -1)  # per token: the mean over the features
  w_tok = np.broadcast_to(w if per_token else w[:, None], (batch, length))
  mean = lambda v: np.sum(v * w_tok) / np.sum(w_tok)  # noqa: E731
  np.testing.assert_allclose(float(loss), mean(0.5 * ce + 0.5 * kd_tok + 0.7 * hint), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["feature_loss"]), mean(hint), rtol=1e-5)


def test_the_composed_loss_counts_labels_outside_the_classes_unless_alpha_is_one():
  batch = _batches(1)[0]
  labels = batch.label.copy()
  labels[[0, 3]], labels[5] = (-1, 4), 9  # 4 classes: three ids outside, one of weight 0
  weight = np.ones(8, np.float32)
  weight[5] = 0.0
  for alpha, want in ((0.0, 2.0), (0.5, 2.0), (1.0, None)):
    comp, state, tvars = _setup(_specs(distill=bool(alpha), distill__alpha=alpha))
    _, (_, metrics) = comp.loss_fn(state.params, state.model_state,
                                   Batch(batch.image, labels, weight), jax.random.key(0), tvars)
    assert metrics.get("label_errors") == want  # alpha = 1: the labels are not the loss's


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="inner")(x)))


def test_a_model_of_only_a_first_and_last_layer_says_why_nothing_is_pruned():
  model, x = TwoDense(), np.ones((4, 5), np.float32)
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match=r"^prune: the default rules keep the first and last layer "
                                       r"\('inner', 'out'\) dense .* PruneSpec\(rules=\.\.\.\)"):
    compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=4,
                  prune=compose.PruneSpec(sparsity=0.5))
