"""Bad flags of the benchmark jobs (bench, bench_export, export_check): one line naming the flag,
before anything is built, compiled or loaded; and what bench reports from its timed rounds.
Refusals run the job in this process (``run_job``), but one per job as ``python -m``."""

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags

from conftest import REPO
from jaxcompress.errors import ConfigError

# Flag names that more than one of the jobs defines (each runs alone, as its own ``python -m``).
_SHARED_FLAGS = ("steps", "rounds", "batch_size", "weights", "model")


def _job(name: str):
  """``experiments.<name>``, imported in this process; the flags of the shared names that another
  job defined here first are dropped before, so that its own definitions do not clash."""
  module = f"experiments.{name}"
  if module not in sys.modules:
    for flag in _SHARED_FLAGS:
      if flag in flags.FLAGS:
        delattr(flags.FLAGS, flag)
  return importlib.import_module(module)


def _run(*args, **env):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


BENCH = dict(variants=None, steps=8, rounds=5, batch_size=128)
BENCH_EXPORT = dict(model="resnet20", fraction=0.5, batch_size=128, steps=5, rounds=7,
                    finetune_epochs=0.0, finetune_lr=0.02, exported="", multiple=8, max_kept=0.75)
EXPORT_CHECK = dict(model="resnet20", sparsity=0.8, weight_bits=4, act_bits=8,
                    calibration_images=512)


@pytest.mark.parametrize("override", [{}, {"variants": []}, {"variants": ["plain", "gpt_all"]},
                                      {"steps": 1, "rounds": 1, "batch_size": 50_000}])
def test_bench_accepts_good_flags(override):
  _job("bench").check_flags(**{**BENCH, **override})


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 0}, "--batch_size must be >= 1, got 0"),
    ({"batch_size": 50_001}, "--batch_size must be <= 50000, got 50001; the random training set "
                             "has that many images"),
    ({"steps": -1}, "--steps must be >= 1, got -1"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"rounds": 0}, "--rounds must be >= 1, got 0"),
    ({"variants": ["plain", "plane"]}, "--variants must be one of all, gpt_all, gpt_plain, kd, "
                                       "plain, prune, waquant, wquant, got 'plane'"),
])
def test_bench_refuses_bad_flags(override, message):
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
    _job("bench").check_flags(**{**BENCH, **override})


@pytest.mark.parametrize("override", [
    {}, {"fraction": 0.0, "norm": "l2", "weights": "", "eval": True, "finetune_epochs": 1.5,
         "finetune_lr": 0.1},
    {"exported": "runs/x/export", "model": "mlp"},  # with --exported: an artifact's model
    {"exported": "runs/x/export", "max_kept": 1.0, "multiple": 16, "dataset": "mnist"},
    {"exported": "runs/x/export", "eval": True, "dataset": "cifar100", "fraction": 0.5},
    {"exported": "runs/x/export", "eval": True, "mean": "0.5", "std": "0.2,0.25, 0.3"},
])
def test_bench_export_accepts_good_flags(override):
  _job("bench_export").check_flags(**{**BENCH_EXPORT, **override})


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 0}, "--batch_size must be >= 1, got 0"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"rounds": -2}, "--rounds must be >= 1, got -2"),
    ({"multiple": 0}, "--multiple must be >= 1, got 0"),
    ({"fraction": 1.5}, "--fraction must be in [0.0, 1.0), got 1.5"),
    ({"fraction": -0.5}, "--fraction must be in [0.0, 1.0), got -0.5"),
    ({"fraction": 1.0}, "--fraction must be in [0.0, 1.0), got 1.0"),
    ({"max_kept": 0.0}, "--max_kept must be in (0.0, 1.0], got 0.0"),
    ({"max_kept": 1.5}, "--max_kept must be in (0.0, 1.0], got 1.5"),
    ({"finetune_epochs": -1.0}, "--finetune_epochs must be >= 0, got -1.0; 0 skips the "
                                "fine-tuning"),
    ({"finetune_lr": 0.0}, "--finetune_lr must be > 0, got 0.0"),
    ({"finetune_lr": float("nan")}, "--finetune_lr must be > 0, got nan"),
    ({"model": "mlp"}, "--model must be a CIFAR ResNet (resnet20 ... resnet110), got 'mlp'; "
                       "channel surgery needs one; time any other model's artifact with "
                       "--exported"),
    ({"model": "resnet21"}, "--model must be one of char_gpt, "),
    ({"exported": "x", "dataset": "imagenet"}, "--dataset must be one of cifar10, cifar100, "
                                               "fashion_mnist, mnist, got 'imagenet'"),
    # a flag the chosen mode does not use, given a value other than its default
    ({"finetune_epochs": 1.0}, "--finetune_epochs must be left at its default 0.0 without --eval, "
                               "got 1.0; the fine-tuned model is only evaluated with --eval"),
    ({"finetune_lr": 0.1}, "--finetune_lr must be left at its default 0.02 without --eval, got "
                           "0.1; the fine-tuned model is only evaluated with --eval"),
    ({"eval": True, "finetune_lr": 0.1}, "--finetune_lr must be left at its default 0.02 with "
                                         "--finetune_epochs=0, got 0.1; that skips the "
                                         "fine-tuning"),
    ({"dataset": "mnist", "eval": True}, "--dataset must be left at its default 'cifar10' "
                                         "without --exported, got 'mnist'; only an artifact's "
                                         "benchmark uses it"),
    ({"multiple": 16}, "--multiple must be left at its default 8 without --exported, got 16"),
    ({"max_kept": 0.5}, "--max_kept must be left at its default 0.75 without --exported, got 0.5"),
    ({"exported": "x", "fraction": 0.9}, "--fraction must be left at its default 0.5 with "
                                         "--exported, got 0.9; the artifact is slimmed "
                                         "(--multiple, --max_kept), not pruned"),
    ({"exported": "x", "norm": "l2"}, "--norm must be left at its default 'l1' with --exported"),
    ({"exported": "x", "weights": ""}, "--weights must be left at its default 'resnet20_cifar10' "
                                       "with --exported, got ''; the artifact holds its weights"),
    ({"exported": "x", "eval": True, "finetune_epochs": 1.0},
     "--finetune_epochs must be left at its default 0.0 with --exported, got 1.0; only the ResNet "
     "surgery's shrunk model is fine-tuned"),
    ({"exported": "x", "finetune_lr": 0.1}, "--finetune_lr must be left at its default 0.02 with "
                                            "--exported, got 0.1"),
    ({"mean": "0.5", "std": "0.25"}, "--mean must be left at its default '' without --exported"),
    ({"exported": "x", "mean": "0.5", "std": "0.25"}, "--mean must be left at its default '' "
                                                      "without --eval, got '0.5'; only the test "
                                                      "images of --eval are normalised"),
    ({"exported": "x", "eval": True, "std": "0.25"}, "--std is given without --mean: give both, "
                                                     "or neither for the dataset's default "
                                                     "normalisation"),
    ({"exported": "x", "eval": True, "mean": "a,b,c", "std": "1"},
     "--mean must be comma-separated numbers (pixel / 255 units), e.g. 0.4914,0.4822,0.4465, "
     "got 'a,b,c'"),
    ({"exported": "x", "eval": True, "mean": "0.5", "std": "0.2,0"},
     "--std must be finite values > 0 (pixel / 255 units), got (0.2, 0.0)"),
    ({"exported": "x", "eval": True, "mean": "0.1,0.2", "std": "1"},
     "--mean must be one value per channel of the 3-channel images, or one for all, got "
     "(0.1, 0.2)"),
])
def test_bench_export_refuses_bad_flags(override, message):
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
    _job("bench_export").check_flags(**{**BENCH_EXPORT, **override})


def test_bench_export_normalises_with_the_flags_or_the_datasets_defaults():
  normalization = _job("bench_export").normalization
  assert normalization("0.5", "0.2, 0.25,0.3", "cifar10", 3) == ((0.5,), (0.2, 0.25, 0.3))
  assert normalization("", "", "cifar10", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert normalization("", "", "mnist", 1) == ((0.1307,), (0.3081,))


def test_export_check_accepts_good_flags():
  _job("export_check").check_flags(**{**EXPORT_CHECK, "sparsity": 0.0, "weight_bits": 2,
                                      "act_bits": 8, "calibration_images": 50_000})


@pytest.mark.parametrize("override,message", [
    ({"sparsity": 1.5}, "--sparsity must be in [0.0, 1.0), got 1.5"),
    ({"sparsity": -0.1}, "--sparsity must be in [0.0, 1.0), got -0.1"),
    ({"weight_bits": 9}, "--weight_bits must be an integer in [2, 8], got 9; 4 or 8 bits are the "
                         "usual choices"),
    ({"act_bits": 1}, "--act_bits must be an integer in [2, 8], got 1; 4 or 8 bits are the usual "
                      "choices"),
    ({"calibration_images": 0}, "--calibration_images must be >= 1, got 0"),
    ({"calibration_images": 50_001}, "--calibration_images must be <= 50000, got 50001; the "
                                     "CIFAR-10 training split has that many images"),
    ({"model": "resnet21"}, "--model must be one of char_gpt, "),
])
def test_export_check_refuses_bad_flags(override, message):
  with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
    _job("export_check").check_flags(**{**EXPORT_CHECK, **override})


@pytest.mark.parametrize("args,message", [
    (("experiments.bench", "--variants=plain", "--steps=-1"), "--steps must be >= 1, got -1"),
    (("experiments.bench_export", "--model=mlp", "--weights="),
     "--model must be a CIFAR ResNet (resnet20 ... resnet110), got 'mlp'"),
    (("experiments.bench_export", "--exported=runs/missing/export", "--fraction=0.9"),
     "--fraction must be left at its default 0.5 with --exported, got 0.9"),
    (("experiments.bench_export", "--exported=runs/missing/export", "--dataset=imagenet"),
     "--dataset must be one of cifar10, cifar100, fashion_mnist, mnist, got 'imagenet'"),
])
def test_bad_flag_is_one_line_before_any_work(run_job, args, message):
  code, out, err = run_job(*args)
  assert code == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines == [lines[-1]] and lines[-1].startswith(f"error: {message}"), err[-2000:]
  assert "Traceback" not in err and out == ""


def test_export_check_names_the_weights_flag(tmp_path):  # export_check's python -m refusal
  missing = tmp_path / "missing.npz"
  proc = _run("experiments.export_check", f"--workdir={tmp_path / 'run'}", f"--weights={missing}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f"error: --weights: no such file {str(missing)!r}; give a "), lines
  assert not (tmp_path / "run").exists()


def test_bench_export_asks_for_the_model_of_an_artifact_that_names_none(tmp_path):  # python -m
  import optax
  from jaxcompress import compose
  from jaxcompress.models import create_model
  model, variables = create_model("mlp", num_classes=10, image_shape=(32, 32, 3))
  x = np.zeros((2, 32, 32, 3), np.float32)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                       quant=compose.QuantSpec(weight_bits=8))
  comp.export(str(tmp_path / "export"), comp.init_state(variables, x))  # no model_name
  proc = _run("experiments.bench_export", f"--exported={tmp_path / 'export'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: --exported={tmp_path / 'export'} names no model (it was exported without "
      "model_name): give it with --model=MODULE:FACTORY")


def test_bench_export_names_the_dataset_flag_of_an_unprepared_dataset(run_job, tmp_path):
  # The error named data.name, a config field bench_export has no flag for, and came after the
  # timing; the user typed --dataset.
  import optax
  from jaxcompress import compose
  from jaxcompress.models import create_model
  model, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  x = np.zeros((2, 28, 28, 1), np.float32)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                       quant=compose.QuantSpec(weight_bits=8))
  comp.export(str(tmp_path / "export"), comp.init_state(variables, x), model_name="mlp")
  code, out, err = run_job("experiments.bench_export", f"--exported={tmp_path / 'export'}",
                           "--eval", "--dataset=mnist", "--steps=1", "--rounds=1",
                           "--batch_size=2", env={"TFDS_DATA_DIR": str(tmp_path / "empty")})
  assert code == 2, err[-2000:]
  last = err.splitlines()[-1]
  assert last.startswith("error: --dataset: "), last
  assert "data.name" not in last and "data.data_dir" not in last and out == ""


# experiments.bench on fake variants with known per-round images/s and CPU seconds (after a
# warm-up call), in a process of its own (its flags share names with the other jobs').
FAKE_BENCH = textwrap.dedent("""
    import sys
    import numpy as np
    from absl import flags
    from experiments import bench, bench_lib
    from jaxcompress.data import Batch
    per_round = {"plain": [(100.0, 1.0), (50.0, 2.0), (200.0, 0.5)],
                 "kd": [(40.0, 3.0), (60.0, 2.0), (10.0, 4.0)]}
    class Fake:
      def __init__(self, name):
        self.rounds = iter([(1.0, 0.0)] + per_round[name])
      def run(self, batches, steps):
        return next(self.rounds)
    ids = np.zeros((1, 4), np.int32)
    bench_lib.build_variants = lambda names, *_: ({n: Fake(n) for n in names},
                                                  lambda b: np.zeros(1))
    bench_lib.gpt_batches = lambda: [Batch(ids, ids, np.ones(1))]
    bench.time_pipeline = lambda *a, **k: (1000.0, 0.0)
    flags.FLAGS(sys.argv)
    bench.main(sys.argv[:1])
""")


def test_bench_reports_medians_and_cpu_over_the_rounds_wall_time():
  """images/s is the median round, the ratio the step-time ratio of the medians, CPU per wall
  second the sum of the rounds' CPU seconds over the sum of their wall seconds; the header names
  the one device the steps run on, not every device of the host."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", FAKE_BENCH, "--variants=plain,kd", "--rounds=3",
                         "--steps=2", "--batch_size=8"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[0] == "one cpu device (of 2), 3 rounds x 2 steps, median"
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["images_per_s"] == {"plain": 100.0, "kd": 40.0}
  assert result["ratio_to_plain"] == {"plain": 1.0, "kd": 2.5}
  # plain: 3.5 CPU s over 16/100 + 16/50 + 16/200 = 0.56 wall s; kd: 9 over 0.4 + 0.2667 + 1.6
  assert result["cpu_per_wall_s"] == {"plain": 6.25, "kd": 3.97}


# experiments.bench --ops on one fake variant: a step that sorts in a conditional only.
FAKE_OPS = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import flags
    from experiments import bench, bench_lib
    from jaxcompress.data import Batch
    def step(state, batch):
      state = jax.lax.cond(state[0] > 0, lambda: jnp.sort(state), lambda: state)
      return state + jnp.sum(batch.image), {}
    ids = np.zeros((1, 4), np.int32)
    variant = bench_lib.Variant(jax.jit(step), [jnp.arange(5.0)], ())
    bench_lib.build_variants = lambda names, *_: ({n: variant for n in names}, None)
    bench_lib.gpt_batches = lambda: [Batch(ids, ids, np.ones(1))]
    flags.FLAGS(sys.argv)
    bench.main(sys.argv[:1])
""")


def test_bench_ops_counts_the_compiled_step_without_timing():
  proc = subprocess.run([sys.executable, "-c", FAKE_OPS, "--variants=plain", "--ops",
                         "--batch_size=8"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  ops = json.loads(proc.stdout.strip().splitlines()[-1])["ops"]["plain"]
  assert ops["conditionals"] == 1 and ops["sorts"] == 0 and ops["sorts_in_conditionals"] == 1
  assert ops["ops_per_step"] >= 2 and ops["mb_accessed"] >= 0
  assert "| plain " in proc.stdout


def test_bench_export_refuses_an_artifact_for_other_images_before_timing(run_job, tmp_path):
  """--eval feeds the artifact --dataset's test images: one of another shape is refused as
  evaluate does (model.exported there), before any timing or data (there is none here)."""
  from test_export_runtime import mlp_artifact
  mlp_artifact(str(tmp_path / "export"), input_shape=(8, 8, 3))
  code, out, err = run_job("experiments.bench_export", f"--exported={tmp_path / 'export'}",
                           "--eval", "--rounds=1", "--steps=1", "--batch_size=2",
                           env={"TFDS_DATA_DIR": str(tmp_path / "no_data")})
  assert code == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines == ["error: --exported input must be one float image of shape (32, 32, 3) for "
                   "cifar10, got '(8, 8, 3) float32'; its images are fed normalised, as float32"
                   ], err[-2000:]
  assert out == ""


# bench_export --exported --eval on the mock test split of --dataset; the last line printed is
# the images' own predictions, normalised with the dataset's usual statistics given here.
MOCK_EVAL = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from absl import flags
    from experiments import bench_export
    from jaxcompress.data import load_split
    from jaxcompress.export import load
    from jaxcompress.models import get_model
    flags.FLAGS(sys.argv)
    mean, std = json.loads(sys.argv[-1])
    with tfds.testing.mock_data(num_examples=40):
      bench_export.main(sys.argv[:1])
      images, labels = load_split(flags.FLAGS.dataset, "test", progress=False)
    logits = load(flags.FLAGS.exported, get_model("mlp")).logits(
        ((images / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32))
    print(json.dumps(100 * float(np.mean(np.argmax(logits, -1) == labels))))
""")


@pytest.mark.parametrize("dataset,mean,std", [("mnist", [0.1307], [0.3081]),
                                              ("fashion_mnist", [0.2860], [0.3530])])
def test_bench_export_evaluates_grey_images_with_their_own_normalisation(tmp_path, dataset,
                                                                         mean, std):
  from test_export_runtime import mlp_artifact
  mlp_artifact(str(tmp_path / "export"), input_shape=(28, 28, 1))
  proc = subprocess.run([sys.executable, "-c", MOCK_EVAL, f"--exported={tmp_path / 'export'}",
                         "--eval", f"--dataset={dataset}", "--rounds=1", "--steps=1",
                         "--batch_size=2", json.dumps([mean, std])], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  *_, result, expected = proc.stdout.strip().splitlines()
  result = json.loads(result)
  assert result["accuracy"]["full"] == pytest.approx(json.loads(expected), abs=0.01)


# bench_export's interleaved timing of a fake step that burns CPU, except in the second round,
# where it sleeps; prints the CPU s per wall s reported, the CPU seconds the process used while
# timing and the seconds slept.
FAKE_STEP = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from absl import flags
    from experiments import bench_export
    flags.FLAGS(sys.argv)
    class Done:
      def block_until_ready(self):
        return self
    calls, slept = [], [0.0]
    def step(variables, batch):  # 2 warm-up calls, then --rounds rounds of --steps calls
      calls.append(batch)
      if (len(calls) - 3) // flags.FLAGS.steps == 1:
        time.sleep(0.5)
        slept[0] += 0.5
      else:
        c0 = time.process_time()
        while time.process_time() - c0 < 0.02:
          pass
      return Done()
    c0 = time.process_time()
    _, cpu = bench_export.interleaved({"fake": (step, None)}, [np.zeros((4, 1), np.float32)])
    print(json.dumps([cpu["fake"], time.process_time() - c0, slept[0]]))
""")


def test_bench_export_cpu_per_wall_second_is_over_the_rounds_measured_wall_time():
  """A round that sleeps adds wall time, no CPU time: CPU s per wall s is at most the CPU
  seconds used over the seconds slept (a wall time estimated from the median round would leave
  the sleep out and report about 2 / 3)."""
  proc = subprocess.run([sys.executable, "-c", FAKE_STEP, "--rounds=3", "--steps=2"], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  reported, cpu_used, slept = json.loads(proc.stdout.strip().splitlines()[-1])
  assert slept == 1.0 and 0 < reported <= cpu_used / slept < 0.5
