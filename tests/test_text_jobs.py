"""The text jobs as a user runs them: train_lm and shakespeare_distill end to end on a tiny
synthetic text with tiny models, and one-line errors for bad input (most run in this process,
``run_job``; one per job as ``python -m``)."""

import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from experiments import lm_lib
from experiments.lm_pipeline import calibration_windows
from jaxcompress import text
from jaxcompress.errors import ConfigError

WORDS = ("the", "king", "shall", "love", "not", "my", "lord", "and", "thou", "art")
TINY_LM = ("--config.data.context=8", "--config.data.batch_size=4",
           "--config.data.eval_batch_size=8")
TINY_GPT = ("--config.model.width=8", "--config.model.depth=1", "--config.model.heads=2",
            "--config.train.steps=6", "--config.train.warmup_steps=1",
            "--config.train.log_every_steps=2", "--config.train.checkpoint_every_steps=2")
TINY_DISTILL = ("--config.train.steps=4", "--config.train.log_every_steps=2",
                "--config.lstm.context=4", "--config.lstm.teacher.model.width=8",
                "--config.lstm.teacher.train.steps=4",
                "--config.lstm.teacher.train.warmup_steps=1", "--config.lstm.train.steps=4",
                "--config.lstm.train.log_every_steps=2", "--config.sample.length=0",
                "--config.quant.calibration_examples=8")


def _run(*args, env=None):
  """Runs ``python -m ARGS``; the jobs share this session's compilation cache (conftest), so a
  step compiled by one run (the same tiny model and shapes) is read back by the next."""
  cache = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=1200,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **cache, **(env or {})})


def _words(n: int, seed: int = 0, extra: str = "") -> str:
  rng = np.random.default_rng(seed)
  return "".join(WORDS[i] + (",\n" if j % 7 == 6 else " ")
                 for j, i in enumerate(rng.integers(0, len(WORDS), n))) + extra


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A 3,000-character text and a transformer trained on it by ``train_lm``."""
  root = tmp_path_factory.mktemp("text")
  path = root / "input.txt"
  path.write_text(_words(600))
  workdir = root / "lm"
  proc = _run("experiments.train_lm", "--config=configs/shakespeare.py:quick",
              f"--config.data.path={path}", f"--workdir={workdir}", *TINY_LM, *TINY_GPT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"root": root, "text": str(path), "lm": str(workdir),
          "printed": json.loads(proc.stdout.strip().splitlines()[-1]),
          "command": ("experiments.train_lm", "--config=configs/shakespeare.py:quick",
                      f"--config.data.path={path}", f"--workdir={workdir}", *TINY_LM, *TINY_GPT)}


def test_train_lm_reports_losses_in_nats_and_bits(tiny):
  result = json.load(open(os.path.join(tiny["lm"], "results.json")))
  assert result == tiny["printed"]
  assert result["steps"] == 6 and result["vocab_size"] == len(set(_words(600)))
  for split in ("validation", "test", "val111k"):
    assert result[f"bits_{split}"] == pytest.approx(result[f"loss_{split}"] / math.log(2))
    assert 0 < result[f"loss_{split}"] < 2 * math.log(result["vocab_size"])
    assert result[f"nonfinite_{split}"] == 0  # a finite loss: no position's logits were NaN
  assert result["size_bytes"] == 4 * result["params"]
  for name in ("weights.msgpack", "vocab.json", "config.json", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(tiny["lm"], name))
  logged = [json.loads(l) for l in open(os.path.join(tiny["lm"], "metrics.jsonl"))]
  assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]
  # The same command again: the finished run is read back, its log and results unchanged,
  # nothing evaluated or written again.
  written = {n: os.stat(os.path.join(tiny["lm"], n)).st_mtime_ns
             for n in ("weights.msgpack", "results.json")}
  proc = _run(*tiny["command"])
  assert "eval" not in proc.stderr
  assert {n: os.stat(os.path.join(tiny["lm"], n)).st_mtime_ns for n in written} == written
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["loss_test"] == result["loss_test"]
  again = [json.loads(l) for l in open(os.path.join(tiny["lm"], "metrics.jsonl"))]
  assert again == logged and sum(bool(r.get("final")) for r in again) == 1


def _kernels(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _kernels(v, f"{prefix}{k}/")
    elif k == "kernel":
      yield prefix + k, np.asarray(v)


def _is_2_of_4(kernel: np.ndarray, reduce_axes: int) -> bool:
  """At most 2 non-zeros in every 4 consecutive weights along the flattened reduction axes."""
  flat = kernel.reshape(int(np.prod(kernel.shape[:reduce_axes])), -1)
  groups = (flat != 0).reshape(flat.shape[0] // 4, 4, flat.shape[1])
  return bool((groups.sum(1) <= 2).all())


def test_distill_end_to_end_contract(tiny):
  from jaxcompress import export
  from jaxcompress.models import get_model

  workdir = tiny["root"] / "distill"
  proc = _run("experiments.shakespeare_distill", "--config=configs/shakespeare_distill.py:quick",
              f"--config.data.path={tiny['text']}", f"--config.teacher.checkpoint={tiny['lm']}",
              f"--workdir={workdir}", *TINY_LM, *TINY_DISTILL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.load(open(workdir / "results.json"))
  assert r["teacher"]["loss_test"] == pytest.approx(tiny["printed"]["loss_test"], rel=1e-5)
  assert r["teacher"]["loss_val111k"] == pytest.approx(tiny["printed"]["loss_val111k"], rel=1e-5)
  for split in ("validation", "test", "val111k"):
    assert r["teacher"][f"nonfinite_{split}"] == 0
  for row in (r["ptq"], r["compressed"], r["sft"], r["lstm"]["compressed"]):
    assert row["nonfinite_test"] == row["exported_nonfinite_test"] == 0
    assert math.isfinite(row["loss_test"])
  for row in (r["compressed"], r["sft"], r["lstm"]["compressed"]):
    assert row["nonfinite_val111k"] == 0 and math.isfinite(row["loss_val111k"])
    assert row["export_agreement"] == 1.0
    assert row["exported_loss_test"] == row["loss_test"]
    assert row["sparsity"] == pytest.approx(0.5)
  for fam in (r, r["lstm"]):  # (the spec's few KB outweigh these tiny models' savings)
    assert fam["compressed"]["compression_ratio"] == pytest.approx(
        fam["teacher"]["size_bytes"] / fam["compressed"]["size_bytes"], rel=1e-3)
  assert r["sft"]["size_bytes"] > 0 and "loss_test" in r["sft"]
  on_disk = sum(os.path.getsize(workdir / "kd" / "export" / f)
                for f in os.listdir(workdir / "kd" / "export"))
  assert r["compressed"]["size_bytes"] == on_disk
  report = open(workdir / "report.md").read()
  for label in ("transformer teacher (float32)", "transformer PTQ", "plain fine-tuning",
                "transformer compressed + KD", "LSTM compressed + KD", "Sampled from"):
    assert label in report

  # 2:4 along the reduction axis of every attention and MLP kernel of the artifact.
  model = get_model("char_gpt", tiny["printed"]["vocab_size"],
                    context=8, width=8, depth=1, heads=2, mlp_ratio=4, dropout=0.0)
  params = export.load(str(workdir / "kd" / "export"), model).variables["params"]
  kernels = dict(_kernels(params))
  assert set(kernels) == {"block0/attn/query/kernel", "block0/attn/key/kernel",
                          "block0/attn/value/kernel", "block0/attn/out/kernel",
                          "block0/fc/kernel", "block0/proj/kernel", "head/kernel"}
  for path, kernel in kernels.items():
    if path != "head/kernel":
      assert _is_2_of_4(kernel, 2 if path.endswith("out/kernel") else 1), path
  assert (kernels["head/kernel"] != 0).mean() > 0.9  # the head stays dense


def test_a_kill_after_the_teacher_leaves_no_lock_in_its_folder(tiny):
  """The distillation job trains its teacher in WORKDIR/teacher; killed (SIGKILL) in a later
  stage, it must not leave that folder's lock behind, and a rerun takes over and gives back one
  that a kill right after the teacher's results.json left (nothing else ever would)."""
  workdir = tiny["root"] / "killed"
  args = ("experiments.shakespeare_distill", "--config=configs/shakespeare_distill.py:quick",
          f"--config.data.path={tiny['text']}", f"--workdir={workdir}", "--config.sft=False",
          "--config.lstm.enabled=False", "--config.teacher.model.width=8",
          "--config.teacher.model.depth=1", "--config.teacher.model.heads=2",
          "--config.teacher.train.steps=2", "--config.teacher.train.warmup_steps=1",
          *TINY_LM, *TINY_DISTILL)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  err = tiny["root"] / "killed.err"
  with open(err, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
  while not (workdir / "ptq" / "export").exists():  # the teacher is trained and evaluated
    if proc.poll() is not None:
      pytest.fail(f"the job ended before its export: {err.read_text()[-3000:]}")
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (workdir / "teacher" / "results.json").exists() and (workdir / "lock").exists()
  assert not (workdir / "teacher" / "lock").exists()
  dead = {"pid": proc.pid, "host": socket.gethostname(), "time": time.time()}
  (workdir / "teacher" / "lock").write_text(json.dumps(dead))
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (workdir / "teacher" / "lock").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "context", "unknown_char"])
def test_bad_text_is_one_line_and_writes_nothing(run_job, tmp_path, case):
  path = tmp_path / "input.txt"
  args = list(TINY_LM)
  if case == "empty":
    path.write_text("")
  elif case == "context":
    path.write_text(_words(20))  # about 100 characters: 5 in validation and test
    args.append("--config.data.context=64")
  elif case == "unknown_char":
    path.write_text(_words(600, extra="Z" * 40))  # the last 40 characters: not in training
  message = {"missing": "data.path: no text file at", "empty": "is empty",
             "context": "data.context must be at most", "unknown_char":
             "data.path: the test split of"}[case]
  workdir = tmp_path / "run"
  code, _, err = run_job("experiments.train_lm", "--config=configs/shakespeare.py:quick",
                         f"--config.data.path={path}", f"--workdir={workdir}", *args, *TINY_GPT)
  assert code == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
  if case == "unknown_char":
    assert "holds 1 character(s) outside the training vocabulary" in lines[-1]
  assert "Traceback" not in err
  assert not workdir.exists()


def test_teacher_with_another_vocabulary_is_one_line(tiny, tmp_path):  # run as python -m
  other = tmp_path / "other.txt"
  other.write_text(_words(600).upper())
  workdir = tmp_path / "run"
  proc = _run("experiments.shakespeare_distill", "--config=configs/shakespeare_distill.py:quick",
              f"--config.data.path={other}", f"--config.teacher.checkpoint={tiny['lm']}",
              f"--workdir={workdir}", *TINY_LM, *TINY_DISTILL)
  assert proc.returncode == 2
  last = proc.stderr.splitlines()[-1]
  assert last.startswith("error: teacher.checkpoint: the teacher's vocabulary"), last
  assert not workdir.exists()


def test_teacher_of_another_family_is_one_line(run_job, tiny, tmp_path):
  workdir = tmp_path / "run"  # the transformer's run given as the LSTM family's teacher
  code, _, err = run_job("experiments.shakespeare_distill",
                         "--config=configs/shakespeare_distill.py:quick",
                         f"--config.data.path={tiny['text']}",
                         f"--config.lstm.teacher.checkpoint={tiny['lm']}",
                         "--config.teacher.model.width=8", "--config.teacher.model.depth=1",
                         "--config.teacher.model.heads=2", f"--workdir={workdir}", *TINY_LM,
                         *TINY_DISTILL)
  assert code == 2
  last = err.splitlines()[-1]
  assert last.startswith(f"error: lstm.teacher.checkpoint: {tiny['lm']!r} holds a char_gpt "
                         "model, not this family's lstm.teacher.model.name=char_lstm"), last
  assert not workdir.exists()


def test_a_trained_model_under_the_home_folder_is_found_as_its_workdir_was_given(tmp_path,
                                                                                monkeypatch):
  """``--workdir=~/lm`` wrote HOME/lm; ``teacher.checkpoint=~/lm`` reads the same folder, its
  weights' fingerprint (which the workdir records) included: that one opened '~/lm' as given."""
  (tmp_path / "lm").mkdir()
  for name in ("weights.msgpack", "vocab.json", "config.json"):
    (tmp_path / "lm" / name).write_text("{}")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert lm_lib.check_trained("~/lm", "teacher.checkpoint") == [
      str(tmp_path / "lm" / "weights.msgpack"), str(tmp_path / "lm" / "vocab.json"),
      str(tmp_path / "lm" / "config.json")]
  assert lm_lib.weights_fingerprint("~/lm") == "sha256:" + hashlib.sha256(b"{}").hexdigest()[:16]


def test_calibration_takes_as_many_windows_as_asked():
  ids = np.arange(1000, dtype=np.int32)
  batches = calibration_windows(ids, 256, 100, 8, seed=0)
  assert [b.shape for b in batches] == [(100, 8), (100, 8), (56, 8)]
  for b in batches:  # consecutive characters of the text
    assert (np.diff(b, axis=1) == 1).all()
  assert [b.shape for b in calibration_windows(ids, 0, 100, 8, seed=0)] == [(1, 8)]


def test_a_rerun_on_another_text_is_refused(tmp_path):
  """``data.path`` unset: the text comes from ``$JAXCOMPRESS_TEXT_DIR``; a rerun of the same
  command over another text (same characters) must not resume the first text's run."""
  for name, seed in (("a", 0), ("b", 1)):
    (tmp_path / name / "tiny_shakespeare").mkdir(parents=True)
    (tmp_path / name / "tiny_shakespeare" / "input.txt").write_text(_words(600, seed=seed))
  workdir = tmp_path / "run"
  command = ("experiments.train_lm", "--config=configs/shakespeare.py:quick",
             f"--workdir={workdir}", *TINY_LM, *TINY_GPT)
  proc = _run(*command, env={"JAXCOMPRESS_TEXT_DIR": str(tmp_path / "a")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = (workdir / "results.json").read_bytes()
  proc = _run(*command, env={"JAXCOMPRESS_TEXT_DIR": str(tmp_path / "b")})
  assert proc.returncode == 2
  last = proc.stderr.splitlines()[-1]
  assert last.startswith(f"error: --workdir={workdir} holds a run with a different config: "
                         "data.text is \"sha256:"), last
  assert (workdir / "results.json").read_bytes() == before


def test_budget_example_plans_a_char_transformer(tiny, tmp_path):
  """examples/budget_char_gpt.py: a plan and the uniform recipe at one byte budget, each
  fine-tuned and exported by the text job; the artifacts hold the planned zeros."""
  from jaxcompress import export
  from jaxcompress.models import get_model
  from jaxcompress.rules import tree_get

  workdir = tmp_path / "budget"
  args = (f"--trained={tiny['lm']}", f"--text={tiny['text']}", "--steps=2", "--batch_size=4",
          "--held_out=4", f"--workdir={workdir}")
  proc = _run("examples.budget_char_gpt", "--ratio=1", *args)
  assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error: --ratio")
  assert not workdir.exists()
  proc = _run("examples.budget_char_gpt", "--ratio=12", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.load(open(workdir / "results.json"))
  # Width 8, 2 heads of 4, MLP 32: query, key, value and out 64 weights each, fc and proj 256.
  sizes = {"block0/attn/query": 64, "block0/attn/key": 64, "block0/attn/value": 64,
           "block0/attn/out": 64, "block0/fc": 256, "block0/proj": 256}
  assert r["budget"]["kernel_bytes"] == 4 * sum(sizes.values()) // 12
  assert [l["path"] for l in r["plan"]["layers"]] == list(sizes)
  assert r["scan"]["compiles"] == 1 and r["teacher"]["nonfinite_test"] == 0
  model = get_model("char_gpt", tiny["printed"]["vocab_size"],
                    context=8, width=8, depth=1, heads=2, mlp_ratio=4, dropout=0.0)
  zeros = {}
  for name in ("plan", "uniform"):
    assert r[name]["kernel_bytes"] <= r["budget"]["kernel_bytes"]
    assert r[name]["export_agreement"] == 1.0 and r[name]["nonfinite_test"] == 0
    params = export.load(str(workdir / name / "kd" / "export"), model).variables["params"]
    zeros[name] = {p: int(np.sum(np.asarray(tree_get(params, f"{p}/kernel")) == 0))
                   for p in sizes}
  for l in r["plan"]["layers"]:
    assert zeros["plan"][l["path"]] >= round(l["sparsity"] * sizes[l["path"]]), l
  assert sum(zeros["uniform"].values()) >= round(r["uniform"]["sparsity"] * sum(sizes.values()))
  report = open(workdir / "report.md").read()
  assert f"{r['plan']['loss_test']:.4f} |" in report and "`block0/fc`" in report


def test_budget_example_takes_a_trained_lstm(tiny, tmp_path):
  """The example's --trained may be an LSTM run: its two kernels are planned and the text job
  fine-tunes and exports it (the family follows the trained model)."""
  lstm = tmp_path / "lstm"
  proc = _run("experiments.train_lm", "--config=configs/shakespeare.py:lstm,quick",
              f"--config.data.path={tiny['text']}", f"--workdir={lstm}", *TINY_LM,
              "--config.model.width=8", "--config.train.steps=2",
              "--config.train.warmup_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / "budget"
  proc = _run("examples.budget_char_gpt", f"--trained={lstm}", f"--text={tiny['text']}",
              "--ratio=4", "--steps=2", "--batch_size=4", "--held_out=4", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.load(open(workdir / "results.json"))
  assert [l["path"] for l in r["plan"]["layers"]] == ["lstm0/input", "lstm0/cell/recurrent"]
  for name in ("plan", "uniform"):
    assert r[name]["kernel_bytes"] <= r["budget"]["kernel_bytes"]
    assert r[name]["export_agreement"] == 1.0


def _override(config, overrides: dict):
  for key, value in overrides.items():
    *path, field = key.split(".")
    section = config
    for name in path:
      section = section[name]
    section[field] = value
  return config


@pytest.mark.parametrize("variant,overrides,message", [
    ("quick", {"model.dropout": 1.5}, r"^model.dropout must be in \[0.0, 1.0\), got 1.5$"),
    ("quick", {"model.dropout": -0.1}, r"^model.dropout must be in \[0.0, 1.0\), got -0.1$"),
    ("quick", {"model.width": 0}, "^model.width must be an integer >= 1, got 0$"),
    ("quick", {"model.heads": 0}, "^model.heads must be an integer >= 1, got 0$"),
    ("quick", {"model.depth": 0}, "^model.depth must be an integer >= 1, got 0$"),
    ("quick", {"model.mlp_ratio": 0}, "^model.mlp_ratio must be an integer >= 1, got 0$"),
    ("quick", {"model.heads": 3}, "^model.width must be a multiple of model.heads=3, got 128$"),
    ("lstm,quick", {"model.layers": 0}, "^model.layers must be an integer >= 1, got 0$"),
    # a field the transformer does not take is refused too, not ignored
    ("quick", {"model.layers": -3}, "^model.layers must be an integer >= 1, got -3$"),
    ("lstm,quick", {"model.depth": 0}, "^model.depth must be an integer >= 1, got 0$"),
    ("lstm,quick", {"model.width": -4}, "^model.width must be an integer >= 1, got -4$"),
    ("quick", {"data.batch_size": 0}, "^data.batch_size must be >= 1, got 0$"),
    # Counted by hand: a block holds (4 + 2 mlp_ratio) width^2 + (9 + mlp_ratio) width parameters,
    # an LSTM layer 8 width^2 + 4 width; width=10**12 died with OverflowError, depth hung.
    ("quick", {"model.width": 10**12}, r"^model: a char_gpt of width=1000000000000, depth=4, "
     r"mlp_ratio=4 has at least 4.8e\+25 parameters, 1.79e\+17 GiB in float32, more than this "
     r"machine's .* GiB of memory; lower model.width or model.depth or model.mlp_ratio$"),
    ("quick", {"model.depth": 10**12}, r"^model: a char_gpt of width=128, depth=1000000000000, "
     r"mlp_ratio=4 has at least 1.98e\+17 parameters"),
    ("lstm,quick", {"model.layers": 10**12}, r"^model: a char_lstm of width=256, "
     r"layers=1000000000000 has at least 5.25e\+17 parameters"),
    ("quick", {"train.warmup_steps": 5000}, "^train.warmup_steps must be <= train.steps=2000"),
    ("quick", {"train.log_every_steps": 0}, "^train.log_every_steps must be >= 1, got 0$"),
])
def test_train_lm_bad_model_is_one_line_and_writes_nothing(tmp_path, variant, overrides,
                                                           message):
  from configs import shakespeare
  from experiments.lm_train_job import train_and_evaluate, validate_config

  with pytest.raises(ConfigError, match=message):
    validate_config(_override(shakespeare.get_config(variant), overrides))
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):  # raised before the text is read
    train_and_evaluate(_override(shakespeare.get_config(variant), overrides), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"sample.temperature": 0.0}, r"^sample.temperature must be a positive normal float32, in "
     r"\[1.1754943508222875e-38, 3.4028234663852886e\+38\], got 0.0$"),
    ({"sample.temperature": -1.0}, r"^sample.temperature must be a positive normal float32"),
    ({"sample.length": -1}, "^sample.length must be an integer >= 0, got -1$"),
    ({"sample.length": 10**12}, r"^sample.length must be at most \d+, the characters this "
     r"machine's .* GiB of memory holds \(one 8-byte id each\), got 1000000000000$"),
    ({"teacher.model.heads": 0}, "^teacher.model.heads must be an integer >= 1, got 0$"),
    ({"lstm.teacher.model.dropout": 1.0},
     r"^lstm.teacher.model.dropout must be in \[0.0, 1.0\), got 1.0$"),
    ({"lstm.train.steps": -1}, "^lstm.train.steps must be >= 0, got -1$"),
    ({"train.steps": 0}, r"^train.steps must be >= 1 \(the student's fine-tuning\), got 0$"),
    ({"lstm.teacher.checkpoint": "no_such_run"}, r"^lstm.teacher.checkpoint: 'no_such_run' "
     r"holds no trained model \(missing weights.msgpack, vocab.json, config.json\)"),
    ({"lstm.train.steps": 0}, r"^lstm.train.steps must be >= 1 \(the student's fine-tuning\), "
     "got 0$"),
    # checked before the text is read and the transformer family is built
    ({"data.context": 0}, "^data.context must be >= 1, got 0$"),
    ({"lstm.context": -3}, r"^lstm.context must be in \[1, data.context=64\] \(0: data.context\), "
     "got -3$"),
    ({"teacher.train.warmup_steps": 3000},
     "^teacher.train.warmup_steps must be <= teacher.train.steps=2000"),
    ({"quant.calibration_examples": 0}, "^quant.calibration_examples must be an integer >= 1"),
    ({"teacher.train.learning_rate": -1.0},
     "^teacher.train.learning_rate must be > 0, got -1.0$"),
    ({"lstm.teacher.train.schedule": "linear"},
     "^lstm.teacher.train.schedule must be one of constant, cosine, step, got 'linear'$"),
    ({"lstm.train.eval_every_epochs": 0}, "^lstm.train.eval_every_epochs must be >= 1, got 0$"),
])
def test_distill_bad_config_fails_before_any_training(tmp_path, overrides, message):
  from configs import shakespeare_distill
  from experiments.lm_pipeline import train_and_evaluate, validate_config

  with pytest.raises(ConfigError, match=message):
    validate_config(_override(shakespeare_distill.get_config("quick"), overrides))
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    train_and_evaluate(_override(shakespeare_distill.get_config("quick"), overrides),
                       str(workdir))
  assert not workdir.exists()


def test_default_text_configs_pass_validation():
  from configs import shakespeare, shakespeare_distill
  from experiments import lm_pipeline, lm_train_job

  for variant in (None, "quick", "lstm", "lstm,quick"):
    lm_train_job.validate_config(shakespeare.get_config(variant))
  for variant in (None, "quick"):
    lm_pipeline.validate_config(shakespeare_distill.get_config(variant))


def test_an_eval_batch_larger_than_the_split_evaluates_it_in_one_batch():
  from jaxcompress.steps import make_eval_step
  step = make_eval_step(lambda v, x: 10.0 * jnp.eye(5)[(x + 1) % 5])  # predicts id + 1
  ids = np.arange(11) % 5
  got = lm_lib.evaluate_lm(step, None, ids, batch_size=10**12, context=4, vocab_size=5)
  assert got == lm_lib.evaluate_lm(step, None, ids, batch_size=2, context=4, vocab_size=5)
  assert got["chars"] == 10 and got["accuracy"] == 100.0


def test_positions_with_non_finite_logits_predict_nothing_and_are_counted():
  # Logits NaN wherever the input character is 3, else predicting id + 1: of the 10 predicted
  # positions the 2 whose input is 3 (NumPy count) are wrong and non-finite, the rest right.
  from jaxcompress.steps import make_eval_step
  step = make_eval_step(lambda v, x: jnp.where((x == 3)[..., None], jnp.nan,
                                               10.0 * jnp.eye(5)[(x + 1) % 5]))
  ids = np.arange(11) % 5
  bad = int(np.sum(ids[:-1] == 3))
  got = lm_lib.evaluate_lm(step, None, ids, batch_size=2, context=4, vocab_size=5,
                           predictions=True)
  assert (got["chars"], got["nonfinite"], bad) == (10, 2, 2)
  assert got["accuracy"] == 100.0 * (10 - bad) / 10
  assert math.isnan(got["loss"]) and math.isnan(got["bits"])
  assert sorted(got["predictions"]) == sorted(np.where(ids[:-1] == 3, -1, (ids[:-1] + 1) % 5))


def test_real_windows_leave_out_the_padding_of_the_last_batch():
  """3 windows of 4 in batches of 2: the second batch pads one all-zero window (weight 0)."""
  held_out = list(text.eval_batches(np.arange(1, 14), batch_size=2, context=4))
  assert [b.image.shape for b in held_out] == [(2, 4), (2, 4)]
  got = lm_lib.real_windows(held_out)
  expected = [[[1, 2, 3, 4], [5, 6, 7, 8]], [[9, 10, 11, 12]]]
  assert [w.tolist() for w in got] == expected


def test_sample_is_the_prompt_and_length_characters():
  vocab = text.Vocabulary("abc")
  always_c = lambda v, x: jnp.broadcast_to(jnp.float32([0, 0, 50]), x.shape + (3,))
  for prompt in ("", "ab"):
    got = lm_lib.sample(always_c, None, vocab, prompt=prompt, length=5, context=4, seed=0,
                        temperature=1.0)
    assert got == prompt + "ccccc"


def test_sample_shows_a_bar_of_the_characters_drawn(capsys):
  # 7 characters to draw: a bar of 7, in characters, under the label given (on a stream that is
  # not a terminal it draws at the start, then every 10 s, and is cleared at the end).
  vocab = text.Vocabulary("abc")
  always_c = lambda v, x: jnp.broadcast_to(jnp.float32([0, 0, 50]), x.shape + (3,))
  lm_lib.sample(always_c, None, vocab, prompt="a", length=7, context=4, seed=0, temperature=1.0,
                desc="sample teacher")
  drawn = re.findall(r"sample teacher: .*?(\d+)/(\d+) .*?char/s", capsys.readouterr().err)
  assert drawn[0] == ("0", "7")


def test_sample_at_a_tiny_temperature_is_greedy():
  """At T = 1e-37, 50 / T and 100 / T both overflow float32 to inf, a tie; the limit T -> 0 is
  greedy, the largest logit: 'c' (np.argmax([0, 50, 100]) == 2)."""
  vocab = text.Vocabulary("abc")
  logits = np.float32([0, 50, 100])
  fixed = lambda v, x: jnp.broadcast_to(jnp.asarray(logits), x.shape + (3,))
  got = lm_lib.sample(fixed, None, vocab, prompt="", length=5, context=4, seed=0,
                      temperature=1e-37)
  assert got == vocab.chars[np.argmax(logits)] * 5


@pytest.mark.parametrize("temperature", [1e-40, 1e39, math.inf, math.nan, 0])
def test_sample_refuses_a_temperature_float32_cannot_divide_by(temperature):
  valid = "a positive normal float32, in [1.1754943508222875e-38, 3.4028234663852886e+38]"
  message = f"sample.temperature must be {valid}, got {temperature!r}"
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    lm_lib.sample(None, None, text.Vocabulary("abc"), prompt="", length=1, context=4, seed=0,
                  temperature=temperature)


def test_progress_bars_name_the_first_family_by_its_model(tmp_path, monkeypatch):
  """An LSTM teacher trained in the first family is shown as the LSTM's, as the report does."""
  from configs import shakespeare_distill
  from experiments import lm_pipeline
  from jaxcompress.models import get_model

  class Shown(Exception):
    pass

  def train_lm(*args, desc, **kwargs):
    raise Shown(desc)
  monkeypatch.setattr(lm_pipeline, "train_lm", train_lm)
  config = shakespeare_distill.get_config("quick")
  fam = lm_pipeline.Family("gpt", config, str(tmp_path), "", False, model_name="char_lstm",
                           module=get_model("char_lstm", 3, width=4, layers=1, dropout=0.0))
  with pytest.raises(Shown, match="^train LSTM teacher$"):
    lm_pipeline._run_family(fam, config, text.Corpus(text.Vocabulary("abc"), {}),
                              None, None)


def test_report_names_each_family_by_its_model():
  """A family trains the model its config names: an LSTM in the first family (the budget
  example's --trained LSTM) is reported as an LSTM, and a transformer in the second as one."""
  from configs import shakespeare_distill
  from experiments.lm_pipeline import format_report
  row = {"loss_test": 1.0, "bits_test": 1.0 / math.log(2), "size_bytes": 10, "loss_val111k": 1.0}
  family = lambda model: {"teacher": {**row, "model": model}, "ptq": row, "compressed": row,
                          "samples": {"teacher": "ab", "compressed": "ba"}}
  report = format_report({**family("char_lstm"), "lstm": family("char_gpt")},
                         shakespeare_distill.get_config("quick"))
  lines = report.splitlines()
  assert [l.split("|")[1].strip() for l in lines if l.startswith("|")][2:] == [
      "LSTM teacher (float32)", "LSTM PTQ (no training)", "**LSTM compressed + KD**",
      "transformer teacher (float32)", "transformer PTQ (no training)",
      "**transformer compressed + KD**"]
  assert "the LSTM teacher's loss on val111k" in report
  assert [l.split(" (")[0] for l in lines if l.startswith("## ")] == [
      "## Sampled from the LSTM teacher", "## Sampled from the LSTM compressed",
      "## Sampled from the transformer teacher", "## Sampled from the transformer compressed"]


def test_a_resume_whose_given_teacher_was_retrained_is_refused(tmp_path, monkeypatch):
  """The run is stopped once it has claimed its workdir; the teacher folder it was given then
  holds other weights: the rerun must refuse, not go on distilling from another teacher."""
  import hashlib
  import ml_collections
  from configs import shakespeare_distill
  from experiments import lm_pipeline
  from jaxcompress.checkpoint import release_workdir

  class Stopped(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stopped()
  monkeypatch.setattr(lm_pipeline, "_run_family", stop)
  path, teacher, workdir = tmp_path / "input.txt", tmp_path / "teacher", tmp_path / "run"
  path.write_text(_words(600))
  config = shakespeare_distill.get_config("quick")
  config.data.path, config.teacher.checkpoint = str(path), str(teacher)
  config.data.context, config.data.batch_size, config.data.eval_batch_size = 8, 4, 8
  config.teacher.model.update(width=8, depth=1, heads=2)
  config.lstm.enabled, config.sft, config.train.steps = False, False, 4
  model = ml_collections.ConfigDict(config.teacher.model.to_dict())
  vocab = text.load_corpus(str(path), 8).vocab

  def train_teacher(seed):  # a finished train_lm run's files, with the weights of ``seed``
    lm_lib.save_trained(str(teacher), lm_lib.build_model(model, vocab.size, 8, seed)[1], vocab)
    (teacher / "config.json").write_text(json.dumps({"model": model.to_dict(),
                                                     "data": {"context": 8}}))
    return "sha256:" + hashlib.sha256((teacher / "weights.msgpack").read_bytes()).hexdigest()[:16]

  def run():
    try:
      lm_pipeline.train_and_evaluate(config, str(workdir))
    finally:
      release_workdir(str(workdir))

  first = train_teacher(0)
  with pytest.raises(Stopped):
    run()
  with pytest.raises(Stopped):  # the same teacher: the run resumes
    run()
  second = train_teacher(1)
  assert second != first
  with pytest.raises(ConfigError, match=re.escape(
      f"--workdir={workdir} holds a run with a different config: teacher.weights is "
      f"\"{first}\" there, \"{second}\" here; use a new --workdir or delete that one")):
    run()
