"""The post-training quantization study: its wiring, its table/JSON contract, its errors."""

import json
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from configs import common
from configs import evaluate as evaluate_config_file
from configs import ptq as ptq_config
from conftest import pretrained, requires_cifar10
from experiments.evaluate_job import evaluate_config
from experiments.ptq_eval import parse_scheme, post_training_quantization, ptq_sweep, ptq_table
from jaxcompress.data import open_split
from jaxcompress.errors import ConfigError
from jaxcompress.models.functional import variables_of
from test_cli import _run

SCHEMES = ("w8a8/minmax", "w4", "k4")


def _mock_config(**ptq):
  c = ptq_config.get_config()
  c.model.name, c.model.weights = "mlp", ""
  c.data.name = "mnist"
  c.data.mean, c.data.std = (0.5,), (0.5,)
  c.data.eval_batch_size = 40
  c.ptq.schemes = SCHEMES
  c.ptq.calibration_examples = 48
  c.ptq.calibration_batch_size = 16
  for k, v in ptq.items():
    c.ptq[k] = v
  return c


def test_study_end_to_end_on_mock_data():
  c = _mock_config()
  with tfds.testing.mock_data(num_examples=100):
    result = post_training_quantization(c)
    ec = evaluate_config_file.get_config()
    ec.model, ec.data = c.model, c.data
    oracle = evaluate_config(ec)  # the plain evaluate entry point, not the study's code
  rows = result["rows"]
  assert [r["scheme"] for r in rows] == ["float", *SCHEMES]
  assert rows[0]["accuracy"] == oracle["accuracy"] and rows[0]["loss"] == pytest.approx(
      oracle["loss"], rel=1e-6)
  assert result["examples"] == 100 and result["calibration_examples"] == 48
  for r in rows:
    assert r["delta"] == pytest.approx(r["accuracy"] - oracle["accuracy"])
    assert 0 <= r["agreement"] <= 100
  assert rows[0]["agreement"] == 100 and rows[0]["weight_bits"] == rows[0]["act_bits"] == 32
  w8a8 = rows[1]
  assert (w8a8["weight_bits"], w8a8["act_bits"], w8a8["first_last_bits"]) == (8, 8, 8)
  assert w8a8["agreement"] >= 95, w8a8  # 8-bit PTQ changes few predictions of the float model
  assert (rows[2]["weight_bits"], rows[2]["act_bits"], rows[2]["kmeans"]) == (4, 32, False)
  assert (rows[3]["weight_bits"], rows[3]["kmeans"], rows[3]["calibration"]) == (4, True, None)

  assert json.loads(json.dumps(result)) == result  # one JSON line, plain types only
  lines = ptq_table(result).splitlines()
  assert len(lines) == 2 + len(rows)
  assert [x.strip() for x in lines[0].strip("|").split("|")][:3] == [
      "scheme", "accuracy %", "Δ vs float (points)"]
  for line, r in zip(lines[2:], rows):
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert cells[0] == r["scheme"] and float(cells[1]) == pytest.approx(r["accuracy"], abs=0.005)
    assert float(cells[2]) == pytest.approx(r["delta"], abs=0.005)


class Tiny(nn.Module):
  """Three dense layers: the middle one is the only one k-means touches."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(16, name="first")(x))
    x = nn.relu(nn.Dense(16, name="middle")(x))
    return nn.Dense(5, name="last")(x)


def test_sweep_compiles_once_per_quantizer_and_quantizes_what_it_says():
  model = Tiny()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 8)).astype(np.float32)
  y = rng.integers(0, 5, 64)
  variables = model.init(jax.random.key(0), x)
  seen, jitted = [], {}

  def evaluate(logits_fn, v, desc):
    fn = jitted.setdefault(logits_fn, jax.jit(logits_fn))
    logits = np.asarray(fn(v, x))
    seen.append((desc, logits_fn, v))
    pred = logits.argmax(-1)
    return {"accuracy": float(np.mean(pred == y) * 100), "loss": 0.0, "predictions": pred}

  rows = ptq_sweep(model, variables, ["w8a8/minmax", "w8a8/percentile", "w4", "k2"],
                   [x[:32], x[32:]], evaluate, first_last_bits=0, percentile=90)
  fns = {desc: fn for desc, fn, _ in seen}
  assert fns["w8a8/minmax"] is fns["w8a8/percentile"]  # one compiled step, two calibrations
  assert fns["w4"] is not fns["w8a8/minmax"] and fns["k2"] is fns["float"]

  states = {desc: v for desc, _, v in seen}
  mm, pct = states["w8a8/minmax"]["quant"], states["w8a8/percentile"]["quant"]
  assert [l.path for l in mm.layers] == ["middle"]  # first_last_bits=0: first/last stay float
  hidden = np.maximum(x @ np.asarray(variables["params"]["first"]["kernel"])
                      + np.asarray(variables["params"]["first"]["bias"]), 0)
  np.testing.assert_allclose(mm.ranges["middle"], [hidden.min(), hidden.max()], rtol=1e-5)
  assert pct.ranges["middle"][1] < mm.ranges["middle"][1]  # the 90th percentile clips the top

  k2 = jax.tree.map(np.asarray, states["k2"]["params"])
  original = jax.tree.map(np.asarray, variables["params"])
  assert len(np.unique(k2["middle"]["kernel"])) <= 4
  np.testing.assert_array_equal(k2["first"]["kernel"], original["first"]["kernel"])
  np.testing.assert_array_equal(k2["last"]["kernel"], original["last"]["kernel"])
  assert rows[-1]["kmeans"] and rows[-1]["first_last_bits"] == 32
  assert "first/last float" in rows[-1]["method"]


class NoFlag(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="last")(nn.relu(nn.Dense(16, name="first")(x)))


class NnxTiny(nnx.Module):
  def __init__(self, rngs):
    self.first, self.last = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    return self.last(nnx.relu(self.first(x)))


@pytest.mark.parametrize("kind", ["linen without a train flag", "nnx"])
def test_sweep_takes_any_flax_model(kind):
  x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
  if kind == "nnx":
    model = NnxTiny(nnx.Rngs(0))
    variables = variables_of(model)
  else:
    model = NoFlag()
    variables = model.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, variables["params"])
  want = (np.maximum(x @ p["first"]["kernel"] + p["first"]["bias"], 0) @ p["last"]["kernel"]
          + p["last"]["bias"]).argmax(-1)  # the float model in NumPy

  def evaluate(logits_fn, v, desc):
    pred = np.asarray(logits_fn(v, x)).argmax(-1)
    return {"accuracy": float(np.mean(pred == want) * 100), "loss": 0.0, "predictions": pred}

  with warnings.catch_warnings():  # no layer between first and last: no rule for them either
    warnings.simplefilter("error", UserWarning)
    rows = ptq_sweep(model, variables, ["w8a8/minmax", "k3"], [x], evaluate)
  assert rows[0]["accuracy"] == 100.0 and [r["scheme"] for r in rows] == ["float", "w8a8/minmax",
                                                                           "k3"]


def test_first_last_float_on_a_model_of_two_layers_is_refused_not_reported_as_quantized():
  # Without a layer between the first and last, first_last_bits=0 leaves every row the float
  # model: the "w8a8" row was the NumPy float forward pass exactly, labelled 8-bit.
  x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
  model = NoFlag()
  variables = model.init(jax.random.key(0), x)
  evaluate = lambda fn, v, desc: {"accuracy": 0.0, "loss": 0.0,
                                  "predictions": np.asarray(fn(v, x)).argmax(-1)}
  with pytest.raises(ConfigError, match=r"^ptq.first_last_bits must be an integer in \[2, 8\] "
                     r"for a model with no layer between its first and last, got 0"):
    ptq_sweep(model, variables, ["w8a8"], [x], evaluate, first_last_bits=0)


@pytest.mark.parametrize("text", ["w9a8", "w4/percentile", "w8a8/median", "x4", "k1", "w8a1", 8])
def test_bad_scheme_is_one_clear_error(text):
  with pytest.raises(ConfigError, match=r"^ptq.schemes must be "):
    parse_scheme(text)


def test_schemes_parse_to_their_bits():
  assert parse_scheme("w4a8")[1:] == (4, 8, False, "minmax")
  assert parse_scheme("w8a8/mse")[1:] == (8, 8, False, "mse")
  assert parse_scheme("w3")[1:] == (3, None, False, None)
  assert parse_scheme("k4")[1:] == (4, None, True, None)


def test_cli_bad_scheme_ends_the_process_with_one_line(tmp_path):  # ptq's python -m refusal
  proc = _run("experiments.ptq", "--config=configs/ptq.py", "--config.ptq.schemes=('w8a8', 'w4a9')",
              env={"TFDS_DATA_DIR": str(tmp_path)})  # no data there: the error must come first
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.splitlines()[-1]
  assert last.startswith("error: ptq.schemes must be a scheme whose bits"), proc.stderr[-2000:]


@pytest.mark.parametrize("override,message", [
    ("--config.ptq.first_last_bits=1", "error: ptq.first_last_bits must be 0 (float) or"),
    ("--config.ptq.schemes=()", "error: ptq.schemes must be a non-empty tuple of schemes"),
    ("--config.ptq.schemes=('w8a8', 'w4', 'w8a8')", "error: ptq.schemes must be distinct schemes "
                                                   "(['w8a8'] repeated)"),
    # min-max is the default calibration: the same quantizer under two names, evaluated twice
    ("--config.ptq.schemes=('w8a8', 'w8a8/minmax')",
     "error: ptq.schemes must be distinct schemes (['w8a8'] repeated), got ('w8a8', "
     "'w8a8/minmax'); 'w8a8/minmax' is the same quantizer as 'w8a8'"),
    # 10**12 died with an OverflowError traceback in the k-means loop, after the other schemes
    ("--config.ptq.kmeans_iters=1000000000000", "error: ptq.kmeans_iters must be at most "
                                                "2147483647 (the Lloyd loop counts in int32), got "
                                                "1000000000000; a few dozen iterations converge"),
    ("--config.ptq.schemes=('w4', 'k4', 'w4a8/mse', 'w4a8')", None),  # all distinct: runs on
])
def test_cli_bad_input_is_one_line_before_any_data(run_job, override, message, tmp_path):
  code, _, err = run_job("experiments.ptq", "--config=configs/ptq.py", override,
                         env={"TFDS_DATA_DIR": str(tmp_path)})  # no data: the error comes first
  if message is None:  # a good value: the first error is the missing data's
    assert "ptq.schemes" not in err and "cifar10" in err.splitlines()[-1]
    return
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1].startswith(message), err[-2000:]


@requires_cifar10
@pytest.mark.realdata
def test_pretrained_resnet20_w8a8_ptq_within_0_3_points():
  proc = _run("experiments.ptq", "--config=configs/ptq.py",
              f"--config.model.weights={pretrained('resnet20')}",
              "--config.ptq.schemes=('w8a8/minmax',)")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  float_row, w8a8 = result["rows"]
  assert abs(float_row["accuracy"] - 91.73) <= 0.02
  assert abs(w8a8["delta"]) <= 0.3 and result["examples"] == 10000


@requires_cifar10
@pytest.mark.parametrize("train_split", ["test+train", "train[100:]"])
def test_the_reported_calibration_split_reads_back_the_calibration_images(train_split):
  # "test+train[:8]" is all of test and 8 train images to TFDS, not the first 8 of test+train.
  c = _mock_config(schemes=("w8",), calibration_examples=8, calibration_batch_size=8)
  c.data = common.data_config("cifar10")
  c.data.train_split, c.data.eval_split, c.data.eval_batch_size = train_split, "test[:16]", 16
  result = post_training_quantization(c)
  first = open_split("cifar10", train_split).read(np.arange(8))[0]  # TFDS reads both specs
  reported = open_split("cifar10", result["calibration_split"])
  assert len(reported) == 8
  assert result["calibration_examples"] == 8
  np.testing.assert_array_equal(reported.read(np.arange(8))[0], first)
