"""fit's metrics.jsonl: each record once across resumes, each number an evaluation returns."""

import json

import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.data import DataSpec
from jaxcompress.models import create_model
from jaxcompress.steps import TrainState, make_train_step, supervised_loss
from jaxcompress.train import LoopSpec, fit

RNG = np.random.default_rng(0)
TRAIN = (RNG.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
         RNG.integers(0, 10, 64).astype(np.int32))  # batch 16: 4 steps an epoch
DATA = DataSpec.from_mapping({"name": "mnist", "batch_size": 16, "mean": (0.5,), "std": (0.5,)})
MODEL, VARIABLES = create_model("mlp", num_classes=10, image_shape=(8, 8, 1))
TX = optax.adam(1e-2)
STEP = make_train_step(supervised_loss(MODEL), TX)


class Stop(Exception):
  pass


def _stop_at_once(state, batch):
  raise Stop


def _norm(state):
  return {"norm": float(jnp.sum(state.params["fc1"]["kernel"] ** 2))}


def _fit(workdir, epochs, step=STEP, eval_fn=_norm):
  loop = LoopSpec(epochs=epochs, log_every_steps=3, checkpoint_every_steps=5)
  state = TrainState.create(VARIABLES["params"], {}, TX)
  return fit(state, step, TRAIN, DATA, loop, str(workdir), eval_fn=eval_fn)


def _log(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [(r["step"], "eval" if "eval_norm" in r else "train") for r in map(json.loads, f)]


def test_a_run_extended_and_stopped_before_its_next_checkpoint_evaluates_once(tmp_path):
  # 1 epoch (checkpoint at step 4, not evaluated: its caller does), then extended to 2: the
  # extension evaluates step 4 and is stopped before step 5's checkpoint, then rerun.
  _fit(tmp_path, 1)
  try:
    _fit(tmp_path, 2, _stop_at_once)
  except Stop:
    pass
  _fit(tmp_path, 2)
  # An uninterrupted extension logs every 3 steps and at each checkpoint (4, 5, 8), and step 4's
  # evaluation once, after its training record.
  assert _log(tmp_path) == [(3, "train"), (4, "train"), (4, "eval"), (5, "train"), (6, "train"),
                            (8, "train")]


def test_an_evaluations_numpy_and_jax_scalars_are_logged_and_its_lists_left_out(tmp_path):
  metrics = {"jax": jnp.float32(0.25), "numpy": np.float32(0.5), "count": np.int64(3),
             "python": 0.75, "recall": [0.5, 1.0], "name": "x"}
  _fit(tmp_path, 2, eval_fn=lambda s: metrics)  # 8 steps: epoch 1 is evaluated at step 4
  with open(tmp_path / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "loss" not in r]
  assert evals == [{"step": 4, "epoch": 1.0, "eval_jax": 0.25, "eval_numpy": 0.5,
                    "eval_count": 3, "eval_python": 0.75}]


def test_the_metrics_of_a_train_step_without_a_loss_are_logged(tmp_path):
  def step(state, batch):
    state, metrics = STEP(state, batch)
    return state, {"xent": metrics["loss"]}

  _fit(tmp_path, 1, step)  # 4 steps: logged at step 3 and at the checkpoint that ends the run
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [(r["step"], sorted(r)) for r in records] == [
      (n, ["epoch", "images_per_s", "step", "xent"]) for n in (3, 4)]
