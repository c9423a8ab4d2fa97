"""The main job killed with SIGKILL in every stage and rerun ends exactly as an uninterrupted run.

One reference run, and one chain of runs on another workdir, each killed (SIGKILL, no cleanup) at
the next point: mid-pretraining, while evaluating, mid-epoch fine-tuning, while writing a
checkpoint, while exporting, while writing the reports; the last run of the chain finishes. Both
run as subprocesses on mock MNIST with tiny MLPs (weights pretrained by the job itself), in their
own folders with the same relative paths, so every output can be compared byte for byte.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO

# The job on mock data: 256 examples, batch 16 (16 steps an epoch); both weights are pretrained
# (1 epoch each), fine-tuning is 3 epochs with an evaluation after each and a checkpoint every
# 4 steps.
DRIVER = """
import tensorflow_datasets as tfds
from configs import cifar_distill
from experiments.pipeline import train_and_evaluate

c = cifar_distill.get_config("quick")
c.data.name, c.data.mean, c.data.std = "mnist", (0.5,), (0.5,)
c.data.batch_size, c.data.eval_batch_size = 16, 64
c.weights_dir = "weights"
c.student.name, c.student.weights = "mlp", "mlp_mnist"
c.teacher.name, c.teacher.weights = "mlp", "mlp_mnist"
c.pretrain.epochs = 1.0
c.distill.feature_pairs = (("fc1", "fc1"),)
c.prune.rules = ()
c.quant.calibration_examples = 32
c.train.epochs, c.train.eval_every_epochs = 3.0, 1
c.train.log_every_steps, c.train.checkpoint_every_steps = 2, 4
with tfds.testing.mock_data(num_examples=256):
  train_and_evaluate(c, "run")
"""
TOTAL_STEPS = 48
WALL_TIME = ("seconds", "images_per_s")


def _start(folder, cache):
  """Starts the job in ``folder``; compilations are shared through the cache folder ``cache``."""
  os.makedirs(folder, exist_ok=True)
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("JAXCOMPRESS_WEIGHTS_DIR", None)
  return subprocess.Popen([sys.executable, "-c", DRIVER], cwd=folder, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]


def _stages(run):
  try:
    with open(os.path.join(run, "stages.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _lines(path):
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def _listdir(path):
  try:
    return os.listdir(path)
  except OSError:
    return []


def _kill_when(proc, name, condition):
  """Polls ``condition()`` and SIGKILLs ``proc`` the moment it holds; fails if ``proc`` ends."""
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f"the job ended before the kill point '{name}': {proc.stderr.read()[-3000:]}")
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()


def _without_wall_time(tree):
  if isinstance(tree, dict):
    return {k: _without_wall_time(v) for k, v in tree.items() if k not in WALL_TIME}
  if isinstance(tree, list):
    return [_without_wall_time(v) for v in tree]
  return tree


def _files(folder):
  """``{relative path: bytes}`` of every file under ``folder``."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _final_state(run):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run, "checkpoints")))
  assert manager.latest_step() == TOTAL_STEPS
  state = manager.restore(TOTAL_STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return state["state"]


def _outputs(folder):
  run = os.path.join(folder, "run")
  with open(os.path.join(run, "results.json")) as f:
    results = json.load(f)
  metrics = {}
  for log in ("metrics.jsonl", "pretrain/mlp_mnist/metrics.jsonl"):
    with open(os.path.join(run, log)) as f:
      metrics[log] = [json.loads(line) for line in f]
  leftovers = [n for n in os.listdir(run) if "tmp" in n]
  return dict(results=_without_wall_time(results), metrics=_without_wall_time(metrics),
              export=_files(os.path.join(run, "export")),
              serving=_files(os.path.join(run, "serving")),
              weights=_files(os.path.join(folder, "weights")),
              state=_final_state(run), leftovers=leftovers,
              stages=_without_wall_time(_stages(run)))


def test_killed_in_every_stage_and_rerun_ends_as_an_uninterrupted_run(tmp_path):
  ref = _start(tmp_path / "ref", tmp_path / "cache")
  chain = str(tmp_path / "chain")
  run = os.path.join(chain, "run")
  ckpts = os.path.join(run, "checkpoints")
  points = [
      ("pretraining", lambda _: any(n.isdigit() for n in _listdir(
          os.path.join(run, "pretrain", "mlp_mnist", "checkpoints")))),
      ("evaluating", lambda _: "teacher" in _stages(run) and "before" not in _stages(run)),
      ("fine-tuning mid-epoch", lambda _: _lines(os.path.join(run, "metrics.jsonl")) >= 7),
      ("checkpointing", lambda earlier: any("tmp" in n and n not in earlier
                                            for n in _listdir(ckpts))),
      ("exporting", lambda _: os.path.isdir(os.path.join(run, "export.tmp"))),
      ("writing reports", lambda _: os.path.exists(os.path.join(run, "layers.md"))),
  ]
  for name, condition in points:
    earlier = set(_listdir(ckpts))  # a save the previous kill interrupted is not this one's
    _kill_when(_start(chain, tmp_path / "cache"), name, lambda: condition(earlier))
  assert not os.path.exists(os.path.join(run, "results.json"))
  _finish(_start(chain, tmp_path / "cache"))
  _finish(ref)
  want, got = _outputs(tmp_path / "ref"), _outputs(chain)
  assert got["leftovers"] == [] and want["leftovers"] == []
  for key in ("results", "metrics", "stages"):
    assert got[key] == want[key], key
  for key in ("export", "serving", "weights"):
    assert got[key] and got[key].keys() == want[key].keys(), key
    for path in want[key]:
      assert got[key][path] == want[key][path], f"{key}/{path}"
  flat_want, flat_got = (ocp.tree.to_flat_dict(t) for t in (want["state"], got["state"]))
  assert flat_got.keys() == flat_want.keys()
  for path, value in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(value), err_msg=path)
