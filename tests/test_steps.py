"""Train/eval steps and the optimizer, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from jaxcompress import parallel
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model
from jaxcompress.optim import OptimizerSpec, learning_rate_schedule, make_optimizer
from jaxcompress.steps import (TrainState, cross_entropy, evaluate, make_eval_step,
                               make_train_step, supervised_loss, weighted_mean)


def _train_cfg(**kw):
  c = common.train_config()
  c.update(kw)
  return OptimizerSpec.from_mapping(c)


def _batch(n=16, shape=(8, 8, 3), classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return Batch(rng.normal(size=(n, *shape)).astype(np.float32),
               rng.integers(0, classes, n).astype(np.int32), np.ones(n, np.float32))


def test_cross_entropy_matches_numpy():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(cross_entropy(logits, labels), -np.log(p[[0, 1], labels]),
                             rtol=1e-6)


def test_labels_outside_the_classes_are_nan_in_training_and_refused_in_evaluation():
  logits = np.zeros((4, 3), np.float32)
  losses = np.asarray(cross_entropy(logits, np.array([0, 2, -1, 3])))
  np.testing.assert_allclose(losses[:2], np.log(3), rtol=1e-6)  # uniform over 3 classes
  assert np.isnan(losses[2:]).all()  # -1 and 3 index no class: no plausible loss
  step = make_eval_step(lambda v, img: img * v)
  batch = Batch(np.eye(3, dtype=np.float32), np.array([0, 1, 7], np.int32),
                np.ones(3, np.float32))
  with pytest.raises(ConfigError, match=r"^confusion matrix: labels must be class ids in "
                                        r"\[0, 3\), got 7 at position 2 \(1 outside\)$"):
    evaluate(step, 1.0, [batch], num_classes=3)
  from jaxcompress.metrics import classification_report
  with pytest.raises(ConfigError, match=r"^classification report: the confusion matrix must be "
                                        r"square \(classes x classes\), got shape \(2, 3\)$"):
    classification_report(np.ones((2, 3), np.int64))


def test_a_label_the_model_has_no_class_for_is_refused_in_evaluation():
  # Logits of 3 equal classes for 5-class data: a label below 3 has loss log(3), label 4 none.
  step = make_eval_step(lambda v, img: img @ v)
  x, w = np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)
  ok = Batch(x, np.array([0, 1, 2, 1], np.int32), np.ones(4, np.float32))
  assert evaluate(step, w, [ok], num_classes=5)["loss"] == pytest.approx(np.log(3), rel=1e-6)
  padded = Batch(x, np.array([0, 1, 4, 3], np.int32), np.array([1, 1, 1, 0], np.float32))
  with pytest.raises(ConfigError, match=r"^eval: the model's logits have 3 classes, fewer than "
                                        r"num_classes=5, and label 4 has no class in them \(its "
                                        r"loss would be nan\); give a model with 5 outputs$"):
    evaluate(step, w, [ok, padded], num_classes=5)


def test_weighted_mean_by_hand():
  values = jnp.array([1.0, 2.0, 3.0, 4.0])
  # Weights need not sum to 1 or more: 0.1 each is the plain mean.
  np.testing.assert_allclose(weighted_mean(values, jnp.full(4, 0.1)), 2.5, rtol=1e-6)
  np.testing.assert_allclose(weighted_mean(values, jnp.array([1.0, 3.0, 0.0, 0.0])),
                             (1 + 6) / 4, rtol=1e-6)
  # A value of weight 0 is left out even when it is nan (a padded example's label -1).
  padded = jnp.array([1.0, 2.0, jnp.nan, jnp.nan])
  np.testing.assert_allclose(weighted_mean(padded, jnp.array([1.0, 1.0, 0.0, 0.0])), 1.5)
  assert float(weighted_mean(values, jnp.zeros(4))) == 0.0
  # Per-example weights over [B, T] values weigh every position of the example.
  seq = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(weighted_mean(seq, jnp.array([0.0, 2.0])), 4.0, rtol=1e-6)


def test_a_batch_weight_of_the_wrong_shape_is_a_one_line_error():
  model, variables = create_model("mlp", num_classes=4, image_shape=(8, 8, 3), seed=0)
  loss_fn = supervised_loss(model)
  batch = _batch()
  args = (variables["params"], {}, batch, jax.random.key(0))
  for weight, got in ((None, "None"), (np.ones((16, 1), np.float32), r"shape \(16, 1\)")):
    with pytest.raises(ConfigError, match=r"^batch.weight must have shape \(16,\) \(one per "
                       r"example\) or \(16,\) \(one per label\), got " + got):
      loss_fn(*args[:2], batch._replace(weight=weight), args[3])


def test_train_step_lowers_loss_and_compiles_once():
  model, variables = create_model("resnet20", num_classes=4, image_shape=(8, 8, 3))
  traces = []
  loss_fn = supervised_loss(model)

  def counting_loss(*args):
    traces.append(1)
    return loss_fn(*args)

  opt = make_optimizer(_train_cfg(epochs=1, learning_rate=0.05, schedule="constant"), 10)
  params = variables.pop("params")
  state = TrainState.create(params, variables, opt)
  step = make_train_step(counting_loss, opt)
  batch = _batch()
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert len(traces) == 1, "the second call of the jitted step retraced"
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 8
  # BatchNorm running statistics moved away from their initial values.
  assert not np.allclose(state.model_state["batch_stats"]["bn1"]["mean"], 0.0)


def test_sgd_matches_pytorch_update_rule():
  # PyTorch SGD: g' = g + wd * p; buf = m * buf + g'; p -= lr * buf.
  cfg = _train_cfg(learning_rate=0.1, momentum=0.9, weight_decay=0.01, schedule="constant")
  opt = make_optimizer(cfg, 10)
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  state = opt.init(p)
  buf, pn = np.zeros(2), np.array([1.0, -2.0])
  for _ in range(3):
    upd, state = opt.update(g, state, p)
    p = optax.apply_updates(p, upd)
    buf = 0.9 * buf + (np.array([0.5, 0.25]) + 0.01 * pn)
    pn = pn - 0.1 * buf
  np.testing.assert_allclose(p["w"], pn, rtol=1e-6)


def test_step_schedule_and_warmup_by_hand():
  sched = learning_rate_schedule(_train_cfg(epochs=10, schedule="step", learning_rate=1.0,
                                            decay_at=(0.5, 0.8), decay_factor=0.1), 10)
  assert [float(sched(s)) for s in (0, 49, 50, 79, 80, 99)] == pytest.approx(
      [1, 1, 0.1, 0.1, 0.01, 0.01])
  warm = learning_rate_schedule(_train_cfg(epochs=10, schedule="cosine", learning_rate=1.0,
                                           warmup_epochs=1), 10)
  assert float(warm(5)) == pytest.approx(0.5)
  assert float(warm(10)) == pytest.approx(1.0)
  assert float(warm(55)) == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine


@pytest.mark.parametrize("field,value,match", [
    ("optimizer", "adam", "train.optimizer must be one of adamw, sgd, got 'adam'"),
    ("epochs", -1, r"train.epochs must be >= 0, got -1"),
    ("schedule", "linear", "train.schedule must be one of"),
    ("momentum", 1.5, r"train.momentum must be in \[0.0, 1.0\)"),
])
def test_bad_train_config(field, value, match):
  with pytest.raises(ConfigError, match=match):
    make_optimizer(_train_cfg(**{field: value}), 10)


def test_evaluate_counts_per_class_precision_and_recall():
  # A fixed "model" that predicts argmax of its input: the report is known by hand.
  x = np.eye(3, dtype=np.float32)[[0, 1, 2, 2, 1]]
  y = np.array([0, 1, 2, 1, 0], np.int32)
  step = make_eval_step(lambda v, img: img * v)
  batches = [Batch(x[:3], y[:3], np.ones(3, np.float32)),
             Batch(np.concatenate([x[3:], x[:1]]), np.concatenate([y[3:], y[:1]]),
                   np.array([1, 1, 0], np.float32))]
  out = evaluate(step, 1.0, batches, num_classes=3)
  assert out["examples"] == 5 and out["accuracy"] == pytest.approx(60.0)
  assert out["precision"] == pytest.approx([1.0, 0.5, 0.5])
  assert out["recall"] == pytest.approx([0.5, 0.5, 1.0])


def test_evaluate_spreads_an_example_weight_over_its_sequence_labels():
  # Sequences of 3 labels, the model predicting the argmax of each position's input; the second
  # example is padding (weight 0): counted by hand over the first example's 3 positions.
  x = np.eye(2, dtype=np.float32)[[[0, 1, 1], [1, 1, 1]]]  # [2, 3, 2]
  y = np.array([[0, 1, 0], [0, 0, 0]], np.int32)
  step = make_eval_step(lambda v, img: img * v)
  out = evaluate(step, 1.0, [Batch(x, y, np.array([1, 0], np.float32))], num_classes=2)
  assert out["examples"] == 3 and out["accuracy"] == pytest.approx(200 / 3)
  assert out["precision"] == pytest.approx([1.0, 0.5]) and out["recall"] == pytest.approx(
      [0.5, 1.0])
  with pytest.raises(ConfigError, match=r"^batch.weight must have shape \(2,\) \(one per "
                                        r"example\) or \(2, 3\)"):
    evaluate(step, 1.0, [Batch(x, y, None)], num_classes=2)
  # A negative weight was read as padding and its example silently left out.
  with pytest.raises(ConfigError, match=r"^batch.weight must be >= 0, got -1.0 "):
    evaluate(step, 1.0, [Batch(x, y, np.array([1, -1], np.float32))], num_classes=2)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_train_step_leaves_the_callers_arrays_alive(use_mesh):
  # The state is built from the caller's own arrays; a donating step used to delete them
  # ("RuntimeError: Array has been deleted") on the first call.
  mesh = parallel.make_mesh(jax.devices()[:1]) if use_mesh else None
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
  model_state = {"stats": {"count": jnp.array([0.0])}}
  opt = optax.sgd(0.5)
  state = TrainState.create(params, model_state, opt)

  def loss_fn(p, ms, batch, rng):
    del rng
    loss = jnp.sum(p["w"] * batch)
    return loss, ({"stats": {"count": ms["stats"]["count"] + 1}}, {})

  step = make_train_step(loss_fn, opt, mesh=mesh)
  batch = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  if mesh is not None:
    state = parallel.replicate(mesh, state)  # on one device: may keep the caller's buffers
  new, _ = step(state, batch)
  new2, _ = step(new, batch)
  # Everything the caller held is still readable and unchanged ...
  np.testing.assert_array_equal(np.asarray(params["w"]), [[1.0, -2.0], [0.5, 3.0]])
  np.testing.assert_array_equal(np.asarray(model_state["stats"]["count"]), [0.0])
  np.testing.assert_array_equal(np.asarray(state.params["w"]), [[1.0, -2.0], [0.5, 3.0]])
  # ... including the intermediate state, and the steps did what SGD does (w -= 0.5 * batch).
  np.testing.assert_allclose(np.asarray(new.params["w"]), [[0.5, -3.0], [-1.0, 1.0]])
  np.testing.assert_allclose(np.asarray(new2.params["w"]), [[0.0, -4.0], [-2.5, -1.0]])
  assert int(new2.step) == 2 and float(new2.model_state["stats"]["count"][0]) == 2.0


def test_evaluating_nothing_is_a_one_line_error():
  from jaxcompress.data import DataSpec
  from jaxcompress.train import evaluate_split
  step = make_eval_step(lambda v, img: img.reshape(img.shape[0], -1)[:, :3] * v)
  data = DataSpec(eval_batch_size=4, mean=(0.0,), std=(1.0,))
  empty = (np.zeros((0, 2, 2, 1), np.uint8), np.zeros((0,), np.int32))
  with pytest.raises(ConfigError, match=r"^eval: the split has no examples, nothing to evaluate$"):
    evaluate_split(step, 1.0, empty, data)
  padding = Batch(np.zeros((2, 2, 2, 1), np.float32), np.zeros(2, np.int32),
                  np.zeros(2, np.float32))
  with pytest.raises(ConfigError, match=r"^eval: no example of weight > 0 to evaluate$"):
    evaluate(step, 1.0, [padding], num_classes=3)


def test_an_integer_parameter_is_refused_in_one_line():
  from flax import nnx

  from jaxcompress import compose
  from jaxcompress.models.functional import variables_of

  class Counted(nnx.Module):
    def __init__(self, *, rngs):
      self.a = nnx.Linear(4, 8, rngs=rngs)
      self.b = nnx.Linear(8, 3, rngs=rngs)
      self.calls = nnx.Param(jnp.zeros((), jnp.int32))  # an integer in params

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  x = np.ones((2, 4), np.float32)
  model = Counted(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2)
  match = r"^params\['model'\]\['calls'\] has dtype int32; trained parameters must be floating"
  with pytest.raises(ConfigError, match=match):
    comp.init_state(variables, x)
  with pytest.raises(ConfigError, match=r"^params\['calls'\] has dtype int32"):
    TrainState.create(variables["params"], {}, optax.sgd(0.1))


def test_confusion_matrix_counts_by_hand_and_refuses_a_bad_class_count():
  from jaxcompress.metrics import confusion_matrix
  cm = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 2, 1, 2]), 3)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  for bad in (2.0, -1, 0, None, True):
    with pytest.raises(ConfigError, match=r"^confusion matrix num_classes must be an integer "
                                          r">= 1, got "):
      confusion_matrix(np.zeros(0, np.int32), np.zeros(0, np.int32), bad)


def test_an_example_with_nan_or_inf_logits_counts_as_wrong_and_as_nonfinite():
  """By hand: only row 2 is right; the all-NaN row (label 0: argmax would say 0) and the row
  with an inf logit (its label's) have no prediction."""
  logits = np.array([[np.nan] * 3, [0, np.inf, 0], [0, 0, 5], [5, 0, 0]], np.float32)
  batch = Batch(logits, np.array([0, 1, 2, 1], np.int32), np.ones(4, np.float32))
  got = evaluate(make_eval_step(lambda v, x: x), None, [batch], num_classes=3, predictions=True)
  assert got["predictions"] == [-1, -1, 2, 0]
  assert (got["accuracy"], got["examples"], got["nonfinite"]) == (25.0, 4, 2)
  assert got["precision"] == [0.0, 0.0, 1.0] and got["recall"] == [0.0, 0.0, 1.0]


def test_two_missing_predictions_never_agree():
  """By hand: positions 0 and 3 agree on a class; 1 (both -1, NaN logits twice) and 2 (-1
  against 2) have no prediction to agree on; 4 differs: 2 of 5."""
  from jaxcompress.metrics import prediction_agreement
  assert prediction_agreement([0, -1, -1, 3, 1], [0, -1, 2, 3, 2]) == 0.4
  assert prediction_agreement([-1, -1], [-1, -1]) == 0.0
  with pytest.raises(ConfigError, match=r"^prediction agreement: predictions of shape \(2,\) "
                                        r"against \(3,\); give one prediction per example"):
    prediction_agreement([0, 1], [0, 1, 2])


def test_label_errors_counts_the_labels_of_non_zero_weight_outside_the_classes():
  from jaxcompress.steps import label_errors
  logits = np.zeros((3, 4, 5), np.float32)  # [B, T, C]: ids 0..4
  labels = np.array([[0, 5, -1, 4], [7, 1, 2, 3], [9, 9, 0, -2]], np.int32)
  per_token = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [2, 0, 1, 1]], np.float32)
  # By hand: row 0 counts 5 (not -1, weight 0); row 1 nothing (7 has weight 0); row 2 9 and -2.
  assert float(label_errors(logits, labels, per_token)) == 3.0
  assert float(label_errors(logits, labels, np.array([1, 0, 1], np.float32))) == 2 + 3
