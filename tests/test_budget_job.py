"""The budget job end to end on mock data with a tiny model: contract, budget met, bad input."""

import json
import os
import types

import flax
import flax.linen as nn
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import autocompress
from conftest import check_calibration_images
from experiments import autocompress_job
from experiments.autocompress_job import train_and_evaluate
from jaxcompress import parallel
from jaxcompress.checkpoint import write_json
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, register, registry


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory):
  """A random MLP's variables as a flax ``.msgpack`` file."""
  _, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=3)
  path = tmp_path_factory.mktemp("weights") / "mlp.msgpack"
  path.write_bytes(flax.serialization.to_bytes(variables))
  return str(path)


def _config(weights, **budget):
  c = autocompress.get_config("quick")
  c.data.name = "mnist"
  c.data.mean, c.data.std = (0.5,), (0.5,)
  c.data.batch_size, c.data.eval_batch_size = 16, 32
  c.data.val_examples = 16
  c.budget.sizing = "fixed"  # the cost model's bound: every plan's artifact within its bytes
  c.student.name, c.student.weights = "mlp", weights
  c.teacher.name, c.teacher.weights = "mlp", weights
  c.distill.feature_pairs = (("fc1", "fc1"),)
  c.quant.calibration_examples = 32
  c.train.epochs = 1.0
  c.train.log_every_steps = 2
  c.export.serving = False
  c.scan.sparsities = (0.5, 0.9)
  c.scan.weight_bits = (2, 4, 8)
  c.budget.weight_bits = (4, 8)  # 2 bits scanned, not planned
  c.scan.batch_size = 16
  for key, value in budget.items():
    c.budget[key] = value
  return c


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=64):
    return train_and_evaluate(config, str(workdir))


FLOAT32 = 4 * ((784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10))


def test_job_meets_the_budget_and_writes_the_contract(mlp_weights, tmp_path, monkeypatch):
  config = _config(mlp_weights, ratio=4.0)
  config.scan.refine_rounds = 1
  config.budget.fixed_edges = True
  written = []

  def stop_at_the_second_scan_write(path, obj, **kwargs):  # stopped inside its scan
    written.append(path)
    if len(written) == 2:
      raise KeyboardInterrupt
    write_json(path, obj, **kwargs)

  monkeypatch.setattr(autocompress_job, "write_json", stop_at_the_second_scan_write)
  with pytest.raises(KeyboardInterrupt):
    _run(config, tmp_path)
  assert written == [str(tmp_path / "scan.json")] * 2
  stopped = json.load(open(tmp_path / "scan.json"))
  assert (len(stopped["measured"]), stopped["compiles"]) == (2, 1)  # the float model and one
  assert "complete" not in stopped
  monkeypatch.undo()
  results = _run(config, tmp_path)
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk == json.loads(json.dumps(results))
  limit = FLOAT32 // 4
  assert on_disk["budget"]["limit"] == limit
  for name in ("compressed", "uniform"):
    row = on_disk[name]
    for field in ("accuracy", "size_bytes", "compression_ratio", "bops"):
      assert row[field] is not None, (name, field)
    disk = sum(os.path.getsize(tmp_path / name.replace("compressed", "auto") / "export" / f)
               for f in ("spec.json.gz", "arrays.bin"))
    assert row["size_bytes"] == disk <= limit
  assert on_disk["compressed"]["size_bytes"] <= on_disk["predicted"]["size_bytes"]
  assert on_disk["uniform"]["size_bytes"] <= on_disk["uniform"]["predicted_size_bytes"]
  plan = on_disk["plan"]
  assert [l["path"] for l in plan] == ["fc1", "fc2", "fc3"]
  # 2 bits is measured by the scan, but no plan or candidate uses it.
  measured = json.load(open(tmp_path / "scan.json"))["measured"]
  assert any(key[2] == 2 for key, _ in measured)
  assert all(l["weight_bits"] in (4, 8) for c in on_disk["candidates"].values()
             for l in c["plan"]) and on_disk["uniform"]["weight_bits"] in (4, 8)
  assert all(set(l) >= {"path", "sparsity", "weight_bits", "act_bits", "bytes"} for l in plan)
  assert on_disk["predicted"]["size_bytes"] <= limit
  assert on_disk["predicted"]["sized_for"] == on_disk["uniform"]["sized_for"] == limit
  assert on_disk["sensitivity"]["compiles"] == 2  # once in each run of the scan
  assert json.load(open(tmp_path / "scan.json"))["complete"] is True
  for name in ("auto", "uniform"):  # both plans measured whole before fine-tuning
    assert 0 <= on_disk["one_shot"][name]["accuracy"] <= 100
    assert np.isfinite(on_disk["one_shot"][name]["damage"])
  cands = on_disk["candidates"]  # the plan with the least whole-plan damage is the one trained
  assert set(cands) == {"global", "lamp", "context1"} and on_disk["chosen"] in cands
  for name in ("global", "lamp"):  # budget.fixed_edges: first and last layer dense at 8 bits
    edges = [l for l in cands[name]["plan"] if l["path"] in ("fc1", "fc3")]
    assert [(l["sparsity"], l["weight_bits"]) for l in edges] == [(0.0, 8), (0.0, 8)]
  assert cands[on_disk["chosen"]]["plan"] == plan
  assert on_disk["one_shot"]["auto"]["damage"] == min(c["one_shot"]["damage"]
                                                      for c in cands.values())
  assert all(c["predicted_size_bytes"] <= limit for c in cands.values())
  hessian = on_disk["sensitivity"]["hessian"]
  assert set(hessian["traces"]) == {"fc1", "fc2", "fc3"}
  assert -1 <= hessian["spearman_options"] <= 1 and hessian["columns"] > 0
  # The exported weights are pruned as planned: count the zeros of each kernel by hand.
  from jaxcompress import export
  loaded = export.load(str(tmp_path / "auto" / "export"), create_model(
      "mlp", num_classes=10, image_shape=(28, 28, 1))[0])
  for l in plan:
    kernel = np.asarray(loaded.variables["params"][l["path"]]["kernel"])
    assert np.sum(kernel == 0) >= round(l["sparsity"] * kernel.size)
  for name in ("report.md", "sensitivity.png", "accuracy_vs_size.png"):
    assert os.path.getsize(tmp_path / name) > 0
  report = open(tmp_path / "report.md").read()
  assert "`fc2`" in report and "uniform" in report and "Hessian-trace proxy" in report
  # A rerun of the finished point returns its results; nothing is measured or written again.
  before = {n: (tmp_path / n).read_bytes() for n in ("scan.json", "results.json", "report.md")}
  assert _run(config, tmp_path) == on_disk
  assert {n: (tmp_path / n).read_bytes() for n in before} == before


def test_a_scan_measured_with_other_settings_is_refused(mlp_weights, tmp_path, monkeypatch):
  """A scan.json copied into another run's workdir (its budget and grid may differ) must have
  been measured on the same model, held-out slice and damage: mixed in, its float model's loss
  would be taken for this run's."""
  def stop_after_the_first_scan_write(path, obj, **kwargs):
    write_json(path, obj, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(autocompress_job, "write_json", stop_after_the_first_scan_write)
  with pytest.raises(KeyboardInterrupt):
    _run(_config(mlp_weights, ratio=4.0), tmp_path / "kl")
  (tmp_path / "ce").mkdir()
  (tmp_path / "ce" / "scan.json").write_bytes((tmp_path / "kl" / "scan.json").read_bytes())

  def mixed(path, obj, **kwargs):
    raise AssertionError(f"measured into another scan's {path}")

  monkeypatch.setattr(autocompress_job, "write_json", mixed)
  config = _config(mlp_weights, ratio=8.0)
  config.scan.damage = "ce"
  with pytest.raises(ConfigError, match=r"^.*ce/scan.json holds a scan measured with "
                     r'scan.damage="kl", this run has "ce"; .* use a new --workdir') as e:
    _run(config, tmp_path / "ce")
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path / "ce") == ["scan.json"]


def test_a_copied_scan_of_another_grid_ranks_the_hessian_proxy_on_this_grid(
    mlp_weights, tmp_path, monkeypatch):
  """The Hessian-trace proxy's ranking kept with a scan.json is over that scan's options."""
  def stop_once_complete(path, obj, **kwargs):
    write_json(path, obj, **kwargs)
    if obj.get("complete"):
      raise KeyboardInterrupt

  monkeypatch.setattr(autocompress_job, "write_json", stop_once_complete)
  with pytest.raises(KeyboardInterrupt):
    _run(_config(mlp_weights, ratio=4.0), tmp_path / "a")
  # a column per (sparsity or none, weight bits) every layer offers: (1 + 2) x 3
  assert json.load(open(tmp_path / "a" / "scan.json"))["hessian"]["columns"] == 9
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "scan.json").write_bytes((tmp_path / "a" / "scan.json").read_bytes())
  config = _config(mlp_weights, ratio=4.0)
  config.scan.sparsities = (0.5, 0.8, 0.9)
  with pytest.raises(KeyboardInterrupt):
    _run(config, tmp_path / "b")
  hessian = json.load(open(tmp_path / "b" / "scan.json"))["hessian"]
  assert hessian["columns"] == (1 + 3) * 3 and hessian["grid"]["sparsities"] == [0.5, 0.8, 0.9]


def test_a_copied_scan_of_another_seed_ranks_the_hessian_proxy_from_this_seed(
    mlp_weights, tmp_path, monkeypatch):
  """A seed-1 run on a seed-0 scan.json ends as a seed-1 run on a fresh workdir: its Hessian
  traces are drawn from seed 1's random vectors (they were seed 0's, kept with the scan)."""
  def stop_once_complete(path, obj, **kwargs):
    write_json(path, obj, **kwargs)
    if obj.get("complete"):
      raise KeyboardInterrupt

  monkeypatch.setattr(autocompress_job, "write_json", stop_once_complete)
  traces = {}
  for folder, seed in (("seed0", 0), ("fresh1", 1), ("copied1", 1)):
    if folder == "copied1":
      (tmp_path / folder).mkdir()
      (tmp_path / folder / "scan.json").write_bytes((tmp_path / "seed0" / "scan.json").read_bytes())
    config = _config(mlp_weights, ratio=4.0)
    config.seed = seed
    with pytest.raises(KeyboardInterrupt):
      _run(config, tmp_path / folder)
    traces[folder] = json.load(open(tmp_path / folder / "scan.json"))["hessian"]["traces"]
  assert traces["copied1"] == traces["fresh1"] != traces["seed0"]


@pytest.mark.parametrize("budget,match", [
    (dict(ratio=10.0, size_bytes=1000), "contradict"),
    (dict(ratio=0.5), r"budget.ratio must be > 1 \(the float32 size over the budget\)"),
    (dict(ratio=10.0, bops=1e6), "contradict"),
    (dict(ratio=10.0, device="tpu"), "budget.device"),
    (dict(), "give one of"),
    (dict(ratio=10.0, device="int8-npu"), "budget.ratio"),
    (dict(size_bytes=100), "smallest plan takes"),
    (dict(ratio=10.0, weight_bits=(3, 8)), r"budget.weight_bits.*bit widths of scan.weight_bits"),
    (dict(ratio=10.0, sparsity="local"), "budget.sparsity.*auto, layer, global, lamp or kernel"),
    (dict(bops=1e6, sparsity="global"), "budget.sparsity.*need a size budget"),
    (dict(ratio=10.0, device="gpu-sparse", sparsity="global"), "budget.sparsity.*: any, mcu"),
    (dict(ratio=10.0, device="gpu-sparse", sparsity="lamp"), "budget.sparsity.*: any, mcu"),
    (dict(ratio=10.0, device="gpu-sparse", sparsity="kernel"), "budget.sparsity.*: any, mcu"),
    (dict(ratio=float("nan")), r"budget.ratio must be a finite number >= 0, got nan"),
    (dict(bops=float("nan")), r"budget.bops must be a finite number >= 0, got nan"),
])
def test_bad_budget_is_one_line_and_writes_nothing(mlp_weights, tmp_path, budget, match):
  with pytest.raises(ConfigError, match=match) as e:
    _run(_config(mlp_weights, **budget), tmp_path / "w")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")


def test_a_fine_tuning_too_short_for_its_schedule_is_refused_before_the_scan(mlp_weights,
                                                                           tmp_path):
  config = _config(mlp_weights, ratio=10.0)
  config.train.epochs = 0.01
  with pytest.raises(ConfigError, match=r"^train.epochs must be enough for 2 step\(s\) of "
                     r"prune.schedule=gradual \(an epoch is \d+ steps\), got 0.01$"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_the_scan(
    mlp_weights, tmp_path, monkeypatch):
  two = types.SimpleNamespace(devices=np.empty(2))  # the check reads only the device count
  monkeypatch.setattr(parallel, "make_mesh", lambda: two)
  config = _config(mlp_weights, ratio=10.0)
  config.data.batch_size = 15
  with pytest.raises(ConfigError, match=r"^data.batch_size must be a positive multiple of the 2 "
                     r"devices, got 15; try 14$"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_feature_pairs_the_student_lacks_are_refused_before_the_scan(mlp_weights, tmp_path):
  config = _config(mlp_weights, ratio=10.0)
  config.distill.feature_weight, config.distill.feature_pairs = 1.0, (("layer1_0", "fc1"),)
  with pytest.raises(ConfigError, match=r"^distill.feature_pairs must be a module path of the "
                     r"student that its forward calls, e.g. one of its layers: fc1, fc2, fc3, "
                     r"got 'layer1_0'$"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_a_student_without_trained_weights_names_the_folder(mlp_weights, tmp_path):
  config = _config(mlp_weights, ratio=10.0)
  config.student.weights, config.weights_dir = "absent_mlp", str(tmp_path / "weights")
  with pytest.raises(ConfigError, match=r"^student.weights: no trained weights named 'absent_mlp' "
                     r"in the weights folder '.*weights'; a budget plan starts from trained"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_mcu_refuses_per_tensor_weights(mlp_weights, tmp_path):
  config = _config(mlp_weights, ratio=10.0, device="mcu")
  config.quant.per_channel = False
  with pytest.raises(ConfigError, match=r"^quant.per_channel must be True with "
                     r"budget.device=mcu") as e:
    _run(config, tmp_path / "w")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")


def test_held_out_slice_must_exist_and_miss_the_evaluation_split(mlp_weights, tmp_path):
  config = _config(mlp_weights, ratio=10.0)
  config.data.val_examples = 0
  with pytest.raises(ConfigError, match="held-out slice is empty"):
    _run(config, tmp_path / "w")
  config = _config(mlp_weights, ratio=10.0)
  config.data.eval_split = "train"
  with pytest.raises(ConfigError, match="data.eval_split='train' is data.train_split"):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


def test_a_channel_plan_is_served_slimmed_only_where_a_serving_function_is_written(mlp_weights):
  # export.slim without a serving function is refused by the main job's checks
  config = _config(mlp_weights, bops=10_000_000.0, device="int8-npu")
  assert not autocompress_job.sub_config(config, {}, {}, teacher=True).export.slim
  config.export.serving = True
  assert autocompress_job.sub_config(config, {}, {}, teacher=True).export.slim


def test_int8_npu_plan_prunes_channels_within_a_bops_budget(mlp_weights, tmp_path):
  config = _config(mlp_weights, bops=10_000_000.0, device="int8-npu")
  config.export.serving = True  # served with the removed channels skipped
  results = _run(config, tmp_path)
  dense_bops = 64 * (784 * 256 + 256 * 128 + 128 * 10)
  assert results["compressed"]["bops"] <= 10_000_000 < dense_bops
  assert results["predicted"]["sized_for"] is None  # a compute budget sizes no bytes
  plan = {l["path"]: l for l in results["plan"]}
  assert all((l["weight_bits"], l["act_bits"]) == (8, 8) for l in plan.values())
  assert plan["fc3"]["sparsity"] == 0  # the outputs stay
  assert set(results["candidates"]) == {"isolated"}  # no global threshold under a BOPs budget
  # The uniform recipe: the least fraction s of channels of fc1 and fc2 (1 % steps) within the
  # budget; by hand, kept channels k = C - round(s C) and BOPs = 64 (784 k1 + k1 k2 + 10 k2)
  # counting fc2's MACs on its 256 inputs: 64 (784 k1 + 256 k2 + 1280).
  bops = lambda s: 64 * (784 * (256 - round(s * 256)) + 256 * (128 - round(s * 128)) + 1280)
  s = next(x / 100 for x in range(100) if bops(x / 100) <= 10_000_000)
  uni = results["uniform"]
  assert (uni["sparsity"], uni["weight_bits"], uni["bops"]) == (s, 8, bops(s))
  assert uni["recipe"] == (f"{s:.0%} of the output channels of every layer but the last, "
                           "8-bit weights")
  from jaxcompress import export
  model = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))[0]
  kept = lambda k: int(np.sum(np.asarray(k).any(axis=0)))
  u = export.load(str(tmp_path / "uniform" / "export"), model).variables["params"]
  assert kept(u["fc1"]["kernel"]) <= 256 - round(s * 256)
  assert kept(u["fc2"]["kernel"]) <= 128 - round(s * 128) and kept(u["fc3"]["kernel"]) == 10
  # Whole output channels are gone from the exported kernels, as many as planned.
  loaded = export.load(str(tmp_path / "auto" / "export"), model)
  slimmed = results["compressed"]["serving_slimmed"]
  for name in ("fc1", "fc2"):
    kernel = np.asarray(loaded.variables["params"][name]["kernel"])
    dead = int(np.sum(~kernel.any(axis=0)))
    assert dead >= round(plan[name]["sparsity"] * kernel.shape[1])
    if name in slimmed:  # its kept channels rounded up to a multiple of 8
      assert slimmed[name] == [-(-(kernel.shape[1] - dead) // 8) * 8, kernel.shape[1]]
  assert slimmed  # the plan removes at least a quarter of some layer's channels
  x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
  served = export.load_serving(str(tmp_path / "auto" / "serving"))(x)
  np.testing.assert_allclose(served, loaded.logits((x / 255 - 0.5) / 0.5), rtol=1e-4, atol=1e-4)


def test_gpu_sparse_uniform_recipe_is_2_of_4_at_one_width(mlp_weights, tmp_path):
  """The uniform run alone (uniform.only): the plan is found, not fine-tuned."""
  config = _config(mlp_weights, ratio=9.5, device="gpu-sparse")
  config.train.epochs = 0.5
  config.uniform.only, config.uniform.enabled = True, False
  with pytest.raises(ConfigError, match="uniform.only=True and uniform.enabled=False contradict"):
    _run(config, tmp_path)
  assert not os.listdir(tmp_path)
  config.uniform.enabled = True
  results = _run(config, tmp_path)
  assert results["compressed"] is None and [l["path"] for l in results["plan"]] == [
      "fc1", "fc2", "fc3"]
  assert not os.path.exists(tmp_path / "auto")
  assert "not fine-tuned" in open(tmp_path / "report.md").read()
  uni = results["uniform"]
  assert (uni["sparsity"], uni["weight_bits"]) == (0.5, 4)  # dense 4-bit (8x) is too large
  assert uni["size_bytes"] <= uni["predicted_size_bytes"] <= results["budget"]["limit"]
  disk = sum(os.path.getsize(tmp_path / "uniform" / "export" / f)
             for f in ("spec.json.gz", "arrays.bin"))
  assert uni["size_bytes"] == disk
  from jaxcompress import export
  model = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))[0]
  params = export.load(str(tmp_path / "uniform" / "export"), model).variables["params"]
  for name in ("fc1", "fc2", "fc3"):  # at most 2 non-zeros in each 4 consecutive inputs
    kernel = np.asarray(params[name]["kernel"])
    groups = (kernel != 0).reshape(kernel.shape[0] // 4, 4, kernel.shape[1]).sum(axis=1)
    assert groups.max() <= 2, name


def test_sweep_plans_every_budget_from_one_scan(mlp_weights, tmp_path):
  """A sweep of global-threshold plans (budget.sparsity=global)."""
  config = _config(mlp_weights, sweep=(12.0, 3.0), sparsity="global")
  config.uniform.enabled = False
  config.train.epochs = 0.67  # 2 steps: the gradual schedule's ramp and its end
  sweep = _run(config, tmp_path)
  assert json.load(open(tmp_path / "sweep.json")) == json.loads(json.dumps(sweep))
  assert [p["ratio"] for p in sweep["points"]] == [3.0, 12.0]
  for p in sweep["points"]:
    assert p["limit"] == FLOAT32 // int(p["ratio"])
    assert p["compressed"]["size_bytes"] <= p["limit"]
    assert os.path.exists(tmp_path / f"ratio{p['ratio']:g}" / "results.json")
    assert not os.path.exists(tmp_path / f"ratio{p['ratio']:g}" / "scan.json")
    # A finished fine-tuning's lock is given back: a kill at a later point would leave it behind
    # for good, as a rerun returns a finished point without opening its runs.
    assert not os.path.exists(tmp_path / f"ratio{p['ratio']:g}" / "auto" / "lock")
  scan = json.load(open(tmp_path / "scan.json"))
  assert scan["compiles"] == 1  # the second budget evaluated nothing new
  for name in ("sweep.md", "pareto.png"):
    assert os.path.getsize(tmp_path / name) > 0
  results = json.load(open(tmp_path / "ratio12" / "results.json"))
  assert set(results["candidates"]) == {"global"} and results["predicted"]["optimality_gap"] is None
  assert results["compressed"]["size_bytes"] <= results["predicted"]["size_bytes"]
  # One magnitude threshold: every weight the plan keeps outweighs every weight it prunes.
  params = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=3)[1]["params"]
  kept, pruned = [], []
  for l in results["plan"]:
    w = np.sort(np.abs(np.asarray(params[l["path"]]["kernel"])).ravel())
    cut = round(l["sparsity"] * w.size)
    pruned.append(w[:cut])
    kept.append(w[cut:])
  assert 0 < sum(map(len, pruned)) and np.concatenate(pruned).max() <= np.concatenate(kept).min()
  assert all(l["weight_bits"] in (4, 8) for l in results["plan"])


@pytest.mark.parametrize("budget,match", [
    (dict(sweep=(3.0, 1e4)), r"^budget.sweep must be reachable .* smallest plan takes"),
    (dict(sweep=(3.0,), ratio=4.0), "contradict"),
    (dict(sweep=(3.0, 0.5)), "budget.sweep"),
])
def test_bad_sweep_is_one_line_and_writes_nothing(mlp_weights, tmp_path, budget, match):
  with pytest.raises(ConfigError, match=match):
    _run(_config(mlp_weights, **budget), tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("section,field,value,match", [
    ("scan", "damage", "mse", "scan.damage.*kl"),
    ("export", "enabled", False, "^export.enabled must be True in the budget job"),
    ("export", "max_bytes", 1000, r"^export.max_bytes must be 0 in the budget job \(each plan's "
                                  r"artifact is capped at the budget itself\), got 1000"),
    ("quant", "method", "kmeans", r"^quant.method must be minmax or lsq in the budget job "
                                  r"\(plans are scanned, sized and capped as uniform integer "
                                  r"codes\), got 'kmeans'$"),
    ("scan", "batch_size", 10, r"^scan.batch_size must be a divisor of data.val_examples=16 "
                               r"with scan.adapt_norms=True, got 10; each held-out batch"),
    ("scan", "hessian_samples", -1, r"^scan.hessian_samples must be >= 0, got -1; "),
    ("scan", "refine_rounds", -1, r"^scan.refine_rounds must be >= 0, got -1; "),
    ("scan", "sparsities", ("x",), r"^scan.sparsities must be a non-empty list of fractions in "
                                   r"\(0, 1\), got \('x',\)$"),
    ("scan", "weight_bits", (2.5, 4), r"^scan.weight_bits must be a non-empty list of integer bit "
                                      r"widths in \[2, 8\], got \(2.5, 4\)$"),
    ("scan", "act_bits", ((1, 2),), r"^scan.act_bits must be a non-empty list of integer bit "
                                    r"widths in \[2, 8\], got \(\(1, 2\),\)$"),
    ("parallel", "distributed", True, r"^parallel.distributed must be False for the budget job, "
                                      r"got True; it runs in one process"),
])
def test_bad_scan_or_export_field_is_one_line_and_writes_nothing(mlp_weights, tmp_path,
                                                                section, field, value, match):
  config = _config(mlp_weights, ratio=4.0)
  config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    _run(config, tmp_path / "w")
  assert not os.path.exists(tmp_path / "w")


class TinyConvNet(nn.Module):
  """Two 3x3 convs, a global average and a head: kernels to prune whole."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def test_kernel_plan_prunes_whole_kernels_within_the_budget(tmp_path, monkeypatch):
  # registered for this test only: the refusal tests list the registry's names
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
  register("tiny_conv_net", TinyConvNet)
  _, variables = create_model("tiny_conv_net", num_classes=10, image_shape=(28, 28, 1), seed=1)
  weights = tmp_path / "tiny.msgpack"
  weights.write_bytes(flax.serialization.to_bytes(variables))
  config = _config(str(weights), ratio=6.0, sparsity="kernel")
  config.student.name = config.teacher.name = "tiny_conv_net"
  config.distill.feature_pairs = (("conv2", "conv2"),)
  config.uniform.enabled = False
  config.train.epochs = 0.67
  results = _run(config, tmp_path / "w")
  float32 = 4 * (9 * 8 + 8 + 9 * 8 * 64 + 64 + 64 * 10 + 10)
  limit = float32 // 6
  assert set(results["candidates"]) == {"kernel"}
  size = sum(os.path.getsize(tmp_path / "w" / "auto" / "export" / f)
             for f in ("spec.json.gz", "arrays.bin"))
  assert results["compressed"]["size_bytes"] == size <= results["predicted"]["size_bytes"] <= limit
  plan = {l["path"]: l for l in results["plan"]}
  assert plan["head"]["sparsity"] == 0 and plan["conv2"]["sparsity"] > 0
  assert plan["conv1"]["weight_bits"] == plan["conv2"]["weight_bits"]  # one shared width
  # Both convs share one threshold in training: at most the planned number of kernels, counted
  # over both, hold a non-zero entry, wherever training moved them.
  from jaxcompress import export
  out = str(tmp_path / "w" / "auto" / "export")
  loaded = export.load(out, create_model("tiny_conv_net", num_classes=10,
                                         image_shape=(28, 28, 1))[0])
  live = kept = 0
  for name, kernels in (("conv1", 8), ("conv2", 8 * 64)):
    kernel = np.asarray(loaded.variables["params"][name]["kernel"])
    live += int(np.sum(np.any(kernel != 0, axis=(0, 1))))
    kept += kernels - round(plan[name]["sparsity"] * kernels)
  assert 0 < live <= kept
  conv2 = next(m for m in export.read_spec(out)["layers"] if m["path"] == "params/conv2/kernel")
  assert conv2["encoding"] == "blocks"
  trained = json.load(open(tmp_path / "w" / "auto" / "config.json"))["prune"]
  assert (trained["structure"], trained["scope"]) == ("kernel", "global")


def test_kernel_plan_needs_kernels(mlp_weights, tmp_path):
  with pytest.raises(ConfigError, match=r"^budget.sparsity='kernel': no layer of mlp has "
                     "kernels") as e:
    _run(_config(mlp_weights, ratio=4.0, sparsity="kernel"), tmp_path / "w")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")


def test_sweep_table_leaves_a_run_not_trained_blank():
  from experiments.autocompress_report import sweep_table
  table = sweep_table({"points": [
      {"ratio": 25.0, "limit": 43155, "compressed": None,  # uniform.only
       "uniform": {"accuracy": 89.0, "size_bytes": 41819}},
      {"ratio": 40.0, "limit": 26972, "compressed": {"accuracy": 84.98, "size_bytes": 26047},
       "uniform": {"accuracy": 84.5, "size_bytes": 25881}}]})
  rows = [[c.strip() for c in l.split("|")[1:-1]] for l in table.splitlines()
          if l.startswith(("| 25x", "| 40x"))]
  assert rows == [["25x", "43,155", "-", "-", "89.00", "41,819", "-"],
                  ["40x", "26,972", "84.98", "26,047", "84.50", "25,881", "+0.48"]]


def test_coded_sizing_plans_above_the_budget_and_exports_within_it(mlp_weights, tmp_path):
  config = _config(mlp_weights, ratio=4.0)
  config.budget.sizing = "huffman"
  with pytest.raises(ConfigError, match="budget.sizing") as e:
    _run(config, tmp_path / "bad")
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "bad")
  config.budget.sizing = "coded"
  config.scan.hessian_samples = 0
  config.uniform.only = True  # the plan is sized, not fine-tuned: the suite's time
  config.budget.sparsity, config.train.epochs = "global", 0.5
  coded = _run(config, tmp_path / "coded")
  limit = FLOAT32 // 4
  # The uniform recipe's 4-bit Gaussian weights Huffman-code in fewer bytes: it is sized at
  # more fixed-width bytes than the budget; the plan never at fewer. The artifact meets it.
  assert coded["predicted"]["sizing"] == "coded"
  assert coded["predicted"]["sized_for"] >= limit and coded["uniform"]["sized_for"] > limit
  assert coded["uniform"]["size_bytes"] <= limit and coded["uniform"]["zeroed_to_fit"] >= 0
  report = open(tmp_path / "coded" / "report.md").read()
  assert f"sized for {coded['predicted']['sized_for']:,} so that" in report


def test_calibration_reads_exactly_the_first_training_images(mlp_weights, tmp_path, monkeypatch):
  config = _config(mlp_weights, ratio=8.0)
  config.quant.calibration_examples = 300  # a full batch of 256, then 44
  check_calibration_images(lambda: train_and_evaluate(config, str(tmp_path)), monkeypatch, 300)
