"""The main job end to end on mock data with tiny models: contract, resume, bad input."""

import json
import os
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar_distill, cifar_sft
from conftest import check_calibration_images
from experiments import pipeline
from experiments.pipeline import train_and_evaluate
from jaxcompress.errors import ConfigError
from jaxcompress import export as export_lib
from jaxcompress.export import read_spec
from jaxcompress.models import create_model


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory):
  """A random MLP saved as a PyTorch-layout state dict (``fcN.weight`` is ``[out, in]``)."""
  _, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=3)
  sd = {}
  for name, layer in v["params"].items():
    sd[f"{name}.weight"] = np.asarray(layer["kernel"]).T
    sd[f"{name}.bias"] = np.asarray(layer["bias"])
  path = tmp_path_factory.mktemp("weights") / "mlp.npz"
  np.savez(path, **sd)
  return str(path)


def _config(weights, module=cifar_distill):
  c = module.get_config("quick")
  c.data.name = "mnist"
  c.data.mean, c.data.std = (0.5,), (0.5,)
  c.data.batch_size, c.data.eval_batch_size = 16, 32
  c.student.name, c.student.weights = "mlp", weights
  c.teacher.name, c.teacher.weights = "mlp", weights
  c.distill.feature_pairs = (("fc1", "fc1"),)  # quick's hints at every block, for an MLP
  c.prune.rules = (("fc1/kernel", False), ("fc3/kernel", False), (".*/kernel", True))
  c.quant.calibration_examples = 32
  c.train.epochs = 2.0
  c.train.log_every_steps = 2
  c.export.enabled = False
  return c


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=64):
    return train_and_evaluate(config, str(workdir))


def test_main_job_writes_the_results_contract_and_resumes(mlp_weights, tmp_path):
  config = _config(mlp_weights)
  config.export.enabled = True
  results = _run(config, tmp_path)
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk == json.loads(json.dumps(results))
  for key in ("teacher.accuracy", "original.accuracy", "original.size_bytes",
              "compressed.accuracy", "compressed.sparsity", "compressed.weight_bits",
              "compressed.act_bits", "train.seconds", "train.epochs"):
    section, field = key.split(".")
    assert on_disk[section][field] is not None, key
  n_params = (784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)
  assert on_disk["original"]["size_bytes"] == 4 * n_params
  assert on_disk["train"]["epochs"] == 2.0
  for row in ("original", "before_finetune", "compressed"):  # MNIST-like images: finite logits
    assert on_disk[row]["nonfinite"] == 0, row
  assert on_disk["compressed"]["weight_bits"] == 4 and on_disk["compressed"]["act_bits"] == 8
  # 80 % of fc2 (the only pruned kernel) is zero.
  assert on_disk["compressed"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
  assert on_disk["before_finetune"]["sparsity"] == pytest.approx(0.8, abs=1e-4)  # measured
  for name in ("report.md", "curves.png", "accuracy_vs_size.png", "metrics.jsonl"):
    assert os.path.getsize(tmp_path / name) > 0
  # The artifact: its bytes on disk are what the results report, and it predicts like the
  # fake-quant model it came from.
  c = on_disk["compressed"]
  disk = sum(os.path.getsize(tmp_path / "export" / f) for f in os.listdir(tmp_path / "export"))
  assert c["size_bytes"] == disk
  assert c["compression_ratio"] == pytest.approx(on_disk["original"]["size_bytes"] / disk,
                                                 rel=1e-3)
  # By hand: fc1 and fc3 8-bit dense; fc2 4-bit values of the 20 % kept plus a 1-bit map;
  # per-channel scales and biases in float32; a few KiB of JSON spec.
  budget = 784 * 256 + 128 * 10 + 256 * 128 * (0.2 * 0.5 + 1 / 8) + 8 * (256 + 128 + 10) + 8192
  assert disk < budget
  assert c["export_agreement"] == 1.0  # bit-identical logits (compose.eval_variables)
  assert abs(c["exported_accuracy"] - c["accuracy"]) <= 100 / 64 + 1e-9
  assert os.listdir(tmp_path / "serving")
  report = open(tmp_path / "report.md").read()
  assert "compressed, fine-tuned" in report and "Per-class precision / recall" in report
  assert re.search(r"\n\| 9 +\| ", report)  # MNIST's label names are the digits
  # A rerun of the same command finds every stage done and returns the same results.
  assert json.loads(json.dumps(_run(config, tmp_path))) == on_disk


def test_mnist_given_no_mean_or_std_is_normalised_with_its_own_statistics(mlp_weights, tmp_path):
  """The config's defaults name no normalisation: MNIST's own (mean 0.1307, std 0.3081 of
  pixel / 255, PyTorch's MNIST example) apply, and the serving function takes uint8 digits."""
  config = _config(mlp_weights)
  given = cifar_distill.get_config("quick").data
  config.data.mean, config.data.std = given.mean, given.std  # what a user who names none has
  config.export.enabled, config.train.epochs = True, 1.0
  _run(config, tmp_path)
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), np.uint8)
  loaded = export_lib.load(str(tmp_path / "export"),
                           create_model("mlp", num_classes=10, image_shape=(28, 28, 1))[0])
  by_hand = (images.astype(np.float32) / 255 - 0.1307) / 0.3081  # NumPy, published statistics
  served = export_lib.load_serving(str(tmp_path / "serving"))(images)
  np.testing.assert_allclose(np.asarray(served), np.asarray(loaded.logits(by_hand)), rtol=1e-4,
                             atol=1e-4)


def test_export_max_bytes_zeroes_the_smallest_pruned_weights_until_the_artifact_fits(
    mlp_weights, tmp_path):
  config = _config(mlp_weights)
  config.export.enabled, config.export.serving = True, False
  config.export.max_bytes = -1
  with pytest.raises(ConfigError, match="export.max_bytes") as e:
    _run(config, tmp_path / "bad")
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "bad")
  config.export.enabled, config.export.max_bytes = False, 5000
  with pytest.raises(ConfigError, match="export.enabled=False writes none"):
    _run(config, tmp_path / "bad")
  assert not os.path.exists(tmp_path / "bad")
  config.export.enabled = True
  config.export.max_bytes = 10 ** 9  # fits as trained: nothing zeroed
  free = _run(config, tmp_path / "free")["compressed"]
  assert free["zeroed_to_fit"] == 0 and free["export_agreement"] == 1.0
  # Below what fc1 and fc3 take dense (fc1 alone 784 x 256 codes, Huffman-coded: at least a bit
  # each): refused before training, nothing written.
  config.export.max_bytes = 10
  with pytest.raises(ConfigError, match=r"^export.max_bytes must be at least ([\d,]+), what this "
                     r"model's artifact takes with every prunable weight zero \(with the "
                     r"starting weights; the trained ones may take more\), got 10") as e:
    _run(config, tmp_path / "small")
  floor = int(str(e.value).split("at least ")[1].split(", what")[0].replace(",", ""))
  assert 784 * 256 // 8 < floor < free["size_bytes"] and not os.path.exists(tmp_path / "small")
  config.export.max_bytes = cap = free["size_bytes"] - 1500
  capped = _run(config, tmp_path / "capped")["compressed"]
  disk = sum(os.path.getsize(tmp_path / "capped" / "export" / f)
             for f in os.listdir(tmp_path / "capped" / "export"))
  assert capped["size_bytes"] == disk <= cap
  # fc2 (the only pruned kernel) holds 4-bit values: 1,500 bytes take about 3,000 of its entries
  # (fewer where Huffman codes them shorter); fc1 and fc3 keep theirs.
  assert 2000 <= capped["zeroed_to_fit"] <= 4000
  assert capped["accuracy"] == free["accuracy"]  # the model trained as before; the artifact not
  nnz, free_nnz = ({m["path"]: m.get("nnz")
                    for m in export_lib.read_spec(str(tmp_path / run / "export"))["layers"]}
                   for run in ("capped", "free"))
  assert free_nnz["params/fc2/kernel"] - nnz["params/fc2/kernel"] == capped["zeroed_to_fit"]
  assert nnz["params/fc1/kernel"] == free_nnz["params/fc1/kernel"]
  assert (capped["max_bytes"], free["max_bytes"]) == (cap, 10 ** 9)
  # Another cap in a finished run's workdir: the trained model is kept, only the export runs again
  # (the run capped from the start is the oracle).
  recapped = _run(config, tmp_path / "free")["compressed"]
  assert recapped == capped
  assert json.load(open(tmp_path / "free" / "results.json"))["compressed"] == capped


def test_feature_adapters_start_from_the_seed(mlp_weights, tmp_path, monkeypatch):
  """The 1x1 adapter of a hint between layers of other widths (student fc1: 256, teacher fc2:
  128) is initialised from config.seed, like the run's other random draws: it started from
  key 0 whatever the seed, so a seed study never varied it."""
  class Stop(Exception):
    pass

  adapters = []

  def stop(state, *args, **kwargs):
    adapters.append(jax.tree.leaves(jax.device_get(state.params["adapters"])))
    raise Stop

  monkeypatch.setattr(pipeline, "fit", stop)
  for seed in (0, 1, 1):
    config = _config(mlp_weights)
    config.seed = seed
    config.distill.feature_pairs = (("fc1", "fc2"),)
    with pytest.raises(Stop):
      _run(config, tmp_path / str(len(adapters)))
  (zero,), (one,), (again,) = adapters  # one kernel
  assert zero.size == 256 * 128
  np.testing.assert_array_equal(one, again)
  assert np.mean(zero == one) < 0.01


def test_sft_ablation_runs_without_a_teacher(mlp_weights, tmp_path):
  results = _run(_config(mlp_weights, cifar_sft), tmp_path)
  assert results["teacher"]["accuracy"] is None
  metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert metrics and "kd_loss" not in metrics[0]


def _mlp_forward(layers: dict, x: np.ndarray) -> np.ndarray:
  """NumPy logits of the MLP whose ``{fcN: (kernel [in, out], bias)}`` are ``layers``."""
  h = x.reshape(len(x), -1).astype(np.float64)
  for name in ("fc1", "fc2", "fc3"):
    kernel, bias = (np.asarray(a, np.float64) for a in layers[name])
    h = h @ kernel + bias
    h = np.maximum(h, 0) if name != "fc3" else h
  return h


def test_the_held_out_slice_is_evaluated_as_numpy_evaluates_the_saved_models(mlp_weights,
                                                                             tmp_path):
  """With data.val_examples, results.json holds the original's and the compressed model's
  metrics on the last that many training examples (they were trained on nothing else)."""
  config = _config(mlp_weights, cifar_sft)  # no teacher: the cheapest run
  config.data.val_examples = 16
  config.quant.act_bits = config.quant.first_last_bits = 0  # the artifact's weights are its model
  config.export.enabled, config.export.serving = True, False
  results = _run(config, tmp_path)
  assert json.load(open(tmp_path / "results.json")) == json.loads(json.dumps(results))
  with tfds.testing.mock_data(num_examples=64):
    source = tfds.data_source("mnist", split="train")
    held = [source[i] for i in range(48, 64)]  # the last 16 of the 64 training examples
  x = (np.stack([e["image"] for e in held]) / 255.0 - 0.5) / 0.5
  y = np.array([e["label"] for e in held])
  sd = np.load(mlp_weights)  # PyTorch layout: fcN.weight is [out, in]
  original = {n: (sd[f"{n}.weight"].T, sd[f"{n}.bias"]) for n in ("fc1", "fc2", "fc3")}
  student, _ = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  params = export_lib.load(str(tmp_path / "export"), student).variables["params"]
  exported = {n: (params[n]["kernel"], params[n]["bias"]) for n in ("fc1", "fc2", "fc3")}
  for row, layers in (("original", original), ("compressed", exported)):
    logits = _mlp_forward(layers, x)
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(16), y]
    val = results[row]["val"]
    assert val["examples"] == 16 and results[row]["accuracy"] is not None, row
    assert val["loss"] == pytest.approx(nll.mean(), rel=1e-5), row
    assert val["accuracy"] == pytest.approx(100 * np.mean(logits.argmax(-1) == y)), row
    assert val["nonfinite"] == 0, row
  assert results["compressed"]["export_agreement"] == 1.0
  assert "val" not in results["before_finetune"]


def test_an_unknown_sft_variant_names_the_file_the_user_gave():
  with pytest.raises(ValueError, match=r"^configs/cifar_sft.py: unknown variant 'fast'; valid: "
                                       r"quick$"):  # not configs/cifar_distill.py
    cifar_sft.get_config("fast")


def test_a_different_config_in_the_same_workdir_is_refused(mlp_weights, tmp_path):
  _run(_config(mlp_weights), tmp_path)
  other = _config(mlp_weights)
  other.prune.sparsity = 0.5
  with pytest.raises(ConfigError, match="holds a run with a different config: prune.sparsity is "
                                        "0.8 there, 0.5 here;"):
    _run(other, tmp_path)


def test_the_shortest_training_the_refusal_names_is_accepted(mlp_weights, tmp_path):
  config = _config(mlp_weights)
  config.train.epochs, config.prune.schedule = 0.001, "one_shot"  # gradual needs 2 steps
  with pytest.raises(ConfigError, match=r"at least ([\d.e-]+)\)") as e:
    _run(config, tmp_path / "short")
  config.train.epochs = float(re.search(r"at least ([\d.e-]+)\)", str(e.value)).group(1))
  assert _run(config, tmp_path / "hint")["train"]["steps"] == 1


def test_calibration_reads_exactly_the_first_training_images(mlp_weights, tmp_path, monkeypatch):
  config = _config(mlp_weights)
  config.quant.calibration_examples = 300  # a full batch of 256, then 44
  check_calibration_images(lambda: train_and_evaluate(config, str(tmp_path)), monkeypatch, 300)


@pytest.mark.parametrize("key,value,match", [
    ("distill.alpha", 1.5, r"distill.alpha must be in \[0.0, 1.0\]"),
    ("prune.method", "obd", "prune.method must be one of"),
    ("student.weights", "/absent.npz", "student.weights: no such file"),
    ("teacher.name", "resnet19", "teacher.name must be one of"),
    ("quant.calibration", "minmx", "quant.calibration must be one of ema, minmax, mse, "
     "percentile, got 'minmx'"),
    ("quant.calibration_examples", 0, "quant.calibration_examples must be an integer >= 1, "
     "got 0"),
    ("train.epochs", 0.01, r"train.epochs must be enough for one step \(an epoch is \d+ steps: at "
     r"least 0.\d+\), got 0.01"),
    ("pretrain.learning_rate", float("nan"), r"^pretrain.learning_rate must be a finite number > "
     r"0, got nan$"),
    ("pretrain.epochs", -1.0, r"^pretrain.epochs must be >= 0, got -1.0$"),
])
def test_bad_config_writes_nothing(mlp_weights, tmp_path, key, value, match):
  config = _config(mlp_weights)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("off", ["enabled", "serving"])
def test_slim_without_a_serving_function_is_refused(mlp_weights, tmp_path, off):
  config = _config(mlp_weights)
  config.export.enabled, config.export.slim, config.export[off] = True, True, False
  with pytest.raises(ConfigError, match=rf"^export: export.slim=True slims the serving function, "
                     rf"but export.{off}=False writes none; drop one of them$"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_kmeans_weights_export_as_a_codebook_and_predict_alike(mlp_weights, tmp_path):
  config = _config(mlp_weights)
  config.quant.method, config.quant.weight_bits = "kmeans", 3
  config.distill.alpha = 0.0
  config.export.enabled, config.export.serving = True, False
  results = _run(config, tmp_path)
  spec = read_spec(str(tmp_path / "export"))
  kinds = {layer["path"]: layer["kind"] for layer in spec["layers"]}
  assert kinds["params/fc2/kernel"] == "kmeans" and kinds["params/fc1/kernel"] != "kmeans"
  assert results["compressed"]["export_agreement"] == 1.0


def test_a_failed_export_leaves_nothing_half_written_and_the_rerun_finishes(mlp_weights, tmp_path,
                                                                           monkeypatch):
  config = _config(mlp_weights)
  config.export.enabled = True

  def broken(*args, **kwargs):
    raise ConfigError("model.exported: unreadable")

  monkeypatch.setattr(export_lib, "load", broken)
  with pytest.raises(ConfigError, match="unreadable"):
    _run(config, tmp_path)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(("export", "serving"))]
  monkeypatch.undo()
  assert _run(config, tmp_path)["compressed"]["export_agreement"] == 1.0
  assert os.listdir(tmp_path / "export")


def test_validation_accepts_own_models_msgpack_and_orbax_weights_and_random_init(tmp_path,
                                                                                monkeypatch):
  import flax
  import orbax.checkpoint as ocp

  from experiments.pipeline import validate_config
  (tmp_path / "own_models_pipeline.py").write_text(
      "from jaxcompress.models import MLP\n"
      "def net(num_classes):\n  return MLP(num_classes=num_classes)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  _, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  msgpack = tmp_path / "w.msgpack"
  msgpack.write_bytes(flax.serialization.to_bytes(v))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(str(tmp_path / "ckpt"), v)
  config = _config("")
  config.student.name = config.teacher.name = "own_models_pipeline:net"
  validate_config(config)  # empty student weights: a random initialisation
  config.student.weights, config.teacher.weights = str(msgpack), str(tmp_path / "ckpt")
  validate_config(config)
  config.teacher.name = "own_models_pipeline:absent"
  with pytest.raises(ConfigError, match="teacher.name: module 'own_models_pipeline' has no "
                                        "attribute 'absent'"):
    validate_config(config)
  config.teacher.name, config.student.weights = "mlp", str(tmp_path / "w.txt")
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(ConfigError, match=r"student.weights: '.*w.txt' must be a PyTorch-layout"):
    validate_config(config)


def _user_model_file(tmp_path):
  """A module outside the library: an NNX student (takes ``rngs``) and a Linen teacher."""
  (tmp_path / "user_models.py").write_text('''
import flax.linen as nn
from flax import nnx


class Student(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.hidden = nnx.Linear(8, 512, rngs=rngs)
    self.head = nnx.Linear(512, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x))).mean((1, 2))
    return self.head(nnx.relu(self.hidden(x)))


class Teacher(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):  # no train flag
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))


def student(num_classes, rngs):
  return Student(num_classes, rngs=rngs)


def teacher(num_classes):
  return Teacher(num_classes)


def not_a_model(num_classes):
  return "model"


class WrongShape(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], 32 * 32 * 3))  # CIFAR only


class NoLayer(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return x.reshape(x.shape[0], -1)[:, :self.num_classes] * self.param(
        "scale", nn.initializers.ones, (1,))


def wrong_shape(num_classes):
  return WrongShape(num_classes)


def no_layer(num_classes):
  return NoLayer(num_classes)
''')


def test_main_job_on_user_models_given_as_module_factory(tmp_path, monkeypatch):
  _user_model_file(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _config("")
  config.student.name, config.student.weights = "user_models:student", ""
  config.teacher.name, config.teacher.weights = "user_models:teacher", ""
  config.distill.feature_weight = 0.0
  config.prune.rules = ()  # the library's policy: first and last layer dense
  config.export.enabled = True
  results = _run(config, tmp_path / "run")
  c = results["compressed"]
  assert c["export_agreement"] == 1.0
  assert c["size_bytes"] < results["original"]["size_bytes"]
  # Only `hidden` is pruned (conv first, head last): 80 % of its 8 x 512 kernel.
  assert c["sparsity"] == pytest.approx(round(0.8 * 4096) / 4096)
  assert os.path.isfile(tmp_path / "run" / "serving" / "model.jaxexport")
  rows = {line.split("`")[1]: line for line in
          (tmp_path / "run" / "layers.md").read_text().splitlines() if "`" in line}
  assert list(rows) == ["conv", "hidden", "head"]  # forward order
  assert "dense, 8-bit weights, 8-bit inputs, folds norm" in rows["conv"]
  assert "pruned, 4-bit weights, 8-bit inputs" in rows["hidden"]
  assert "dense, 8-bit weights, 8-bit inputs" in rows["head"]


@pytest.mark.parametrize("name, needle", [
    ("user_models:not_a_model", "student.name"),
    ("user_models:missing", "student.name"),
    ("no_such_module:f", "no_such_module"),
    ("user_models:wrong_shape", r"student.name: user_models:wrong_shape's forward fails on one "
                                r"input of shape \[28, 28, 1\]"),
    ("user_models:no_layer", "student.name: the model has no layer to compress"),
])
def test_bad_module_factory_is_one_line_and_writes_nothing(name, needle, tmp_path, monkeypatch):
  _user_model_file(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _config("")
  config.student.name, config.student.weights = name, ""
  with pytest.raises(ConfigError, match=needle) as e:
    _run(config, tmp_path / "run")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def _named_weights_config(folder):
  config = _config("")
  config.weights_dir = str(folder)
  config.student.weights, config.teacher.weights = "mlp_student", "mlp_teacher"
  config.teacher.name = "cnn_mnist"
  config.distill.feature_weight = 0.0
  config.prune.rules = ()
  config.pretrain.epochs = 1.0
  return config


def test_missing_weights_are_pretrained_saved_by_name_and_found_next_time(tmp_path):
  folder = tmp_path / "weights"
  results = _run(_named_weights_config(folder), tmp_path / "first")
  trained = {p["weights"]: p for p in results["pretrained"]}
  assert set(trained) == {"mlp_student", "mlp_teacher"}
  assert trained["mlp_teacher"]["model"] == "cnn_mnist" and trained["mlp_student"]["epochs"] == 1
  assert sorted(os.listdir(folder)) == ["mlp_student.msgpack", "mlp_teacher.msgpack"]
  # The original student is the pretrained one: its accuracy is the pretrain stage's.
  assert results["original"]["accuracy"] == trained["mlp_student"]["accuracy"]
  assert "mlp_student" in (tmp_path / "first" / "report.md").read_text()
  again = _run(_named_weights_config(folder), tmp_path / "second")
  assert again["pretrained"] == []  # found by name: nothing trained
  assert not (tmp_path / "second" / "pretrain").exists()
  assert again["original"]["accuracy"] == results["original"]["accuracy"]


@pytest.mark.parametrize("case, needle", [
    ("no_pretrain", r"teacher.weights: no weights named 'mlp_teacher' in the weights folder .* "
                    r"pretrain.epochs is 0.0"),
    ("read_only", r"weights_dir: .* set --config.weights_dir or \$JAXCOMPRESS_WEIGHTS_DIR to a "
                  r"writable folder"),
    ("wrong_shapes", r"student.weights: .*mlp_student.msgpack' does not fit the model"),
    ("pretrain_lr", r"^pretrain.learning_rate must be > 0, got -1.0$"),
])
def test_bad_weights_setups_are_one_line_and_write_nothing(case, needle, tmp_path):
  folder = tmp_path / "weights"
  folder.mkdir()
  config = _named_weights_config(folder)
  if case == "no_pretrain":
    config.pretrain.epochs = 0.0
  elif case == "pretrain_lr":
    config.pretrain.learning_rate = -1.0
  elif case == "read_only":
    if os.geteuid() == 0:
      folder = tmp_path / "file_not_folder"
      folder.write_text("")  # even root cannot create a folder inside a file
      config.weights_dir = str(folder / "weights")
    else:
      folder.chmod(0o500)
  else:
    import flax.serialization
    _, small = create_model("cnn_mnist", num_classes=10, image_shape=(28, 28, 1))
    (folder / "mlp_student.msgpack").write_bytes(flax.serialization.to_bytes(small))
  with pytest.raises(ConfigError, match=needle) as e:
    _run(config, tmp_path / "run")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_weights_named_for_another_dataset_are_refused_not_trained_under_that_name(tmp_path):
  # Missing weights are trained on the run's data and saved under their name: weights named
  # for CIFAR-10 trained on MNIST would be found, by that name, by the next CIFAR-10 run.
  folder = tmp_path / "weights"
  config = _named_weights_config(folder)  # data.name is mnist
  for name, named in (("mlp_cifar10", "cifar10"), ("mlp_fashion_mnist", "fashion_mnist")):
    config.student.weights = name
    with pytest.raises(ConfigError, match=rf"^student.weights: '{name}' names weights for "
                       rf"{named}, but data.name is 'mnist'; give weights for mnist \(a name "
                       r"such as 'mlp_mnist', or a path\)$"):
      _run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not folder.exists()
  # Found in the folder, they are refused alike: their classes or images are another dataset's.
  folder.mkdir()
  (folder / "mlp_teacher_cifar10.msgpack").write_bytes(b"")
  config.student.weights, config.teacher.weights = "mlp_mnist", "mlp_teacher_cifar10"
  with pytest.raises(ConfigError, match=r"^teacher.weights: 'mlp_teacher_cifar10' names weights "
                     r"for cifar10, but data.name is 'mnist'"):
    _run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_refused_run_creates_no_weights_folder(tmp_path):
  # Weights to pretrain make the job check that their folder can be written; a later check's
  # refusal must not leave that folder created.
  config = _named_weights_config(tmp_path / "new" / "weights")
  config.prune.sparsity = 1.5
  with pytest.raises(ConfigError, match=r"^prune.sparsity must be in \[0.0, 1.0\), got 1.5"):
    _run(config, tmp_path / "run")
  assert sorted(os.listdir(tmp_path)) == []


def test_no_config_or_job_names_the_shared_folder():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for folder in ("configs", "experiments"):
    for name in sorted(os.listdir(os.path.join(root, folder))):
      if name.endswith(".py"):
        with open(os.path.join(root, folder, name)) as f:
          assert "../shared" not in f.read(), f"{folder}/{name}"


def test_a_per_layer_plan_reports_the_widths_its_layers_take():
  from experiments.pipeline import _bits
  quant = cifar_distill.get_config("quick").quant
  quant.weight_bits, quant.act_bits = 4, 8
  assert (_bits(quant, 1), _bits(quant, 2)) == (4, 8)
  quant.layer_bits = (("fc1", 8, 8), ("fc2", 2, 8), ("fc3", 3, 0))  # as a budget plan sets them
  assert (_bits(quant, 1), _bits(quant, 2)) == ("2/3/8", "8/32")
  quant.layer_bits = (("fc1", 4, 8), ("fc2", 4, 8))
  assert (_bits(quant, 1), _bits(quant, 2)) == (4, 8)
