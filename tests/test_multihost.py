"""Several processes on 127.0.0.1 (gloo CPU collectives) compute what one process does.

2 processes x 2 simulated CPU devices against 1 process x 4 devices: the same global batches (the
example ids each process reads), the same losses, an evaluation equal to an unsharded one of the
same parameters; the jobs as 2 processes give
the results of 1; a coordinator that does not answer, a process id out of range, or processes with
different numbers of devices, is one line; SIGTERM reaches the job's handler after joining; a
write that fails on process 0 (the pretrained weights, the serving function, stages.json, the
export's size report, the report, metrics.jsonl) stops every process with its line.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO

N_TRAIN, N_EVAL, BATCH, EVAL_BATCH, EPOCHS = 40, 19, 8, 8, 2

# Trains the composed step (prune + quantize + distill, tiny MLPs) with fit for 1 epoch, then
# resumes to EPOCHS from that checkpoint, then evaluates; prints what it read and computed.
STEP_SCRIPT = textwrap.dedent(f"""
    import json, os, sys
    import numpy as np
    from jaxcompress import parallel
    parallel.initialize_distributed(parallel.DistributedSpec.from_mapping(json.loads(sys.argv[1])))
    import jax, optax
    from jaxcompress import compose
    from jaxcompress.data import ArraySplit, DataSpec
    from jaxcompress.models import create_model
    from jaxcompress.steps import make_eval_step
    from jaxcompress.train import LoopSpec, evaluate_split, fit

    class Recorded:  # a split that notes which examples each read asks for
      def __init__(self, images, labels):
        self.split, self.reads = ArraySplit(images, labels), []
      def __len__(self):
        return len(self.split)
      def read(self, indices):
        self.reads.append(np.asarray(indices).tolist())
        return self.split.read(indices)

    shape = (6, 6, 3)
    rng = np.random.default_rng(0)
    train = Recorded(rng.integers(0, 256, ({N_TRAIN}, *shape), dtype=np.uint8),
                     rng.integers(0, 10, {N_TRAIN}).astype(np.int32))
    test_images = rng.integers(0, 256, ({N_EVAL}, *shape), dtype=np.uint8)
    test_labels = rng.integers(0, 10, {N_EVAL}).astype(np.int32)
    test = Recorded(test_images, test_labels)
    data = DataSpec(name="cifar10", batch_size={BATCH}, eval_batch_size={EVAL_BATCH},
                    mean=(0.5,) * 3, std=(0.25,) * 3)
    student, svars = create_model("mlp", num_classes=10, image_shape=shape, seed=1)
    teacher, tvars = create_model("mlp", num_classes=10, image_shape=shape, seed=2)
    x = rng.normal(size=(8, *shape)).astype(np.float32)
    specs = dict(prune=compose.PruneSpec.from_dict(dict(method="magnitude", sparsity=0.75,
                                                        update_every=2)),
                 quant=compose.QuantSpec.from_dict(dict(weight_bits=4, act_bits=8,
                                                        first_last_bits=8)),
                 distill=compose.DistillSpec.from_dict(dict(alpha=0.5)))
    total = {EPOCHS} * ({N_TRAIN} // {BATCH})
    comp = compose.build(student, svars, x, optimizer=optax.sgd(0.05), total_steps=total,
                         teacher=teacher, **specs)
    state = comp.init_state(svars, x, teacher_vars=tvars, calibration=[x])
    mesh = parallel.make_mesh()
    step = comp.make_train_step(mesh=mesh, seed=0)
    teacher_vars = (parallel.replicate(mesh, tvars),)
    workdir = sys.argv[2]
    for epochs in (1, {EPOCHS}):  # the second call restores the first one's checkpoint
      state, info = fit(state, step, train, data, LoopSpec(epochs=epochs, log_every_steps=1),
                        workdir, mesh=mesh, step_args=teacher_vars, seed=3)
    train_reads = list(train.reads)
    ev = make_eval_step(comp.logits_fn, mesh=mesh)
    result = evaluate_split(ev, parallel.replicate(mesh, comp.eval_variables(state)), test, data,
                            mesh=mesh, predictions=True)
    # The oracle for the sharded evaluation: one unsharded call on this process's device.
    from jaxcompress.data import normalize
    logits = comp.logits_fn(parallel.to_host(comp.eval_variables(state)),
                            normalize(test_images, data.mean, data.std))
    print(json.dumps({{"train_reads": train_reads, "eval_reads": test.reads, "eval": result,
                      "logits": np.asarray(logits, np.float64).tolist(),
                      "labels": test_labels.tolist(),
                      "steps": info["steps"], "devices": jax.device_count(),
                      "local_devices": jax.local_device_count()}}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _parallel(processes: int, port: int, pid: int) -> dict:
  if processes == 1:
    return {"distributed": False}
  return {"distributed": True, "coordinator_address": f"127.0.0.1:{port}",
          "num_processes": processes, "process_id": pid, "initialization_timeout": 60}


def _launch(commands: list[tuple[list[str], int]], timeout: float = 300) -> list:
  """Starts ``(command, CPU devices)`` pairs at once and waits for all; kills them on timeout.

  Returns:
    ``(returncode, stdout, stderr)`` of each.
  """
  procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd, devices in commands]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


def _last_json(out) -> dict:
  rc, stdout, stderr = out
  assert rc == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory):
  """The composed step trained and evaluated by 1 process x 4 devices and 2 processes x 2."""
  root = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  one = [([sys.executable, "-c", STEP_SCRIPT, json.dumps(_parallel(1, 0, 0)),
           str(root / "one")], 4)]
  two = [([sys.executable, "-c", STEP_SCRIPT, json.dumps(_parallel(2, port, pid)),
           str(root / "two")], 2) for pid in range(2)]
  runs = [_last_json(o) for o in _launch(two + one)]
  return {"two": runs[:2], "one": runs[2], "root": root}


def test_two_processes_read_disjoint_shards_of_the_same_global_batches(step_runs):
  one, two = step_runs["one"], step_runs["two"]
  assert one["devices"] == 4 and one["local_devices"] == 4
  assert all(r["devices"] == 4 and r["local_devices"] == 2 for r in two)
  steps = EPOCHS * (N_TRAIN // BATCH)
  assert len(one["train_reads"]) == steps and all(len(r["train_reads"]) == steps for r in two)
  for i, ids in enumerate(one["train_reads"]):
    # The oracle: global batch i of its epoch is a slice of the (seed, epoch) permutation.
    epoch, k = divmod(i, N_TRAIN // BATCH)
    order = np.random.default_rng([3, epoch]).permutation(N_TRAIN)
    assert ids == order[k * BATCH:(k + 1) * BATCH].tolist()
    # Process p reads rows [p * B/2, (p + 1) * B/2) of it: disjoint halves, together the batch.
    assert two[0]["train_reads"][i] == ids[:BATCH // 2]
    assert two[1]["train_reads"][i] == ids[BATCH // 2:]
  for epoch in range(EPOCHS):
    seen = sum((r["train_reads"][i] for r in two
                for i in range(epoch * 5, epoch * 5 + 5)), [])
    assert sorted(seen) == list(range(N_TRAIN))  # each example once an epoch


def test_two_processes_train_and_evaluate_like_one(step_runs):
  one, two = step_runs["one"], step_runs["two"]
  losses = {}
  for name in ("one", "two"):
    records = [json.loads(l) for l in open(step_runs["root"] / name / "metrics.jsonl")]
    # Process 0 alone logs: one record a step, each step once.
    assert [r["step"] for r in records] == list(range(1, EPOCHS * N_TRAIN // BATCH + 1))
    losses[name] = [r["loss"] for r in records]
    assert sorted(os.listdir(step_runs["root"] / name / "checkpoints")) == ["10", "5"]
  # The gradients of 2 processes are summed in another order than 4 devices of one process: the
  # first steps agree to float32 rounding; later, 4-bit weights and mask refreshes magnify the
  # last bits (1 vs 2 vs 4 devices of one process agree to 1e-7 for 7 steps, 2 processes drift
  # 6e-5 at step 3 and 4e-3 by step 7), as reordering one batch's rows does on one device. A
  # shard read twice or dropped moves a step's loss by 10-30 %.
  np.testing.assert_allclose(losses["two"][:2], losses["one"][:2], rtol=2e-5)
  np.testing.assert_allclose(losses["two"], losses["one"], rtol=2e-2)
  assert losses["one"][-1] != losses["one"][0]
  for run in (one, *two):
    assert run["steps"] == EPOCHS * N_TRAIN // BATCH
    # Every process reports the whole split, each example counted once, as one unsharded call
    # on the same parameters computes it (NumPy's cross-entropy in float64).
    logits, labels = np.asarray(run["logits"]), np.asarray(run["labels"])
    assert run["eval"]["examples"] == N_EVAL == len(logits)
    assert run["eval"]["predictions"] == logits.argmax(-1).tolist()
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(N_EVAL), labels]
    np.testing.assert_allclose(run["eval"]["loss"], nll.mean(), rtol=1e-5)
    assert run["eval"]["accuracy"] == pytest.approx(100 * np.mean(logits.argmax(-1) == labels))
  assert two[0]["eval"] == two[1]["eval"]
  # Evaluation reads: process p reads its rows of each padded batch, together each example once.
  batches = -(-N_EVAL // EVAL_BATCH)
  for p, run in enumerate(two):
    assert len(run["eval_reads"]) == batches
    for b, ids in enumerate(run["eval_reads"]):
      lo = b * EVAL_BATCH + p * EVAL_BATCH // 2
      assert ids == list(range(lo, min(lo + EVAL_BATCH // 2, N_EVAL)))
  assert sorted(sum(two[0]["eval_reads"] + two[1]["eval_reads"], [])) == list(range(N_EVAL))
  assert two[1]["eval_reads"][-1] == []  # the last batch's second half is all padding


# Runs ``python -m MODULE ARGS...`` on mock TFDS data (64 examples a split).
MOCK_JOB = textwrap.dedent("""
    import runpy, sys
    import tensorflow_datasets as tfds
    module, sys.argv = sys.argv[1], sys.argv[1:]
    with tfds.testing.mock_data(num_examples=64):
      runpy.run_module(module, run_name="__main__", alter_sys=True)
""")

TRAIN_CONFIG = textwrap.dedent("""
    from configs import train
    def get_config():
      c = train.get_config()
      c.model.name, c.data.name = "mlp", "mnist"
      c.data.mean, c.data.std = (0.5,), (0.5,)
      c.data.batch_size, c.data.eval_batch_size = 16, 24
      c.train.epochs, c.train.schedule, c.train.learning_rate = 2.0, "constant", 0.01
      c.train.log_every_steps, c.train.checkpoint_every_steps = 2, 3
      return c
""")

DISTILL_CONFIG = textwrap.dedent("""
    from configs import cifar_distill
    def get_config():
      c = cifar_distill.get_config("quick")
      c.data.name, c.data.mean, c.data.std = "mnist", (0.5,), (0.5,)
      c.data.batch_size, c.data.eval_batch_size = 16, 24
      c.student.name = c.teacher.name = "mlp"
      c.student.weights = c.teacher.weights = {weights!r}
      c.distill.feature_pairs = (("fc1", "fc1"),)
      c.prune.rules = (("fc1/kernel", False), ("fc3/kernel", False), (".*/kernel", True))
      c.quant.calibration_examples = 32
      c.train.epochs, c.train.log_every_steps = 2.0, 2
      c.export.serving = False  # the artifact is enough here; serving export costs time
      return c
""")


def _job_commands(module: str, config: str, workdir: str, processes: int, port: int) -> list:
  commands = []
  for pid in range(processes):
    flags = [f"--config.parallel.{k}={v}" for k, v in _parallel(processes, port, pid).items()]
    commands.append(([sys.executable, "-c", MOCK_JOB, module, f"--config={config}",
                      f"--workdir={workdir}", *flags], 4 // processes))
  return commands


@pytest.fixture(scope="module")
def job_runs(tmp_path_factory):
  """experiments.train and experiments.cifar_distill run by 2 processes x 2 devices and by
  1 process x 4 devices, on mock data."""
  from jaxcompress.models import create_model
  root = tmp_path_factory.mktemp("jobs")
  _, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=3)
  weights = root / "mlp.npz"  # PyTorch layout: fcN.weight is [out, in]
  np.savez(weights, **{f"{n}.{k}": np.asarray(l[p]).T if p == "kernel" else np.asarray(l[p])
                       for n, l in v["params"].items()
                       for p, k in (("kernel", "weight"), ("bias", "bias"))})
  (root / "train_cfg.py").write_text(TRAIN_CONFIG)
  (root / "distill_cfg.py").write_text(DISTILL_CONFIG.format(weights=str(weights)))
  runs = {}
  for module, cfg in (("experiments.train", "train_cfg.py"),
                      ("experiments.cifar_distill", "distill_cfg.py")):
    dirs = {n: root / f"{module}_{n}" for n in (2, 1)}
    outs = _launch(sum((_job_commands(module, str(root / cfg), str(dirs[n]), n, _free_port())
                        for n in (2, 1)), []))
    runs[module] = {2: (outs[:2], dirs[2]), 1: (outs[2:], dirs[1])}
  return runs


def _close(a, b, path=""):
  """Asserts two JSON values equal: floats to a relative 1e-5, everything else exactly."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float):
    assert a == pytest.approx(b, rel=1e-5), path
  else:
    assert a == b, path


def test_train_job_on_two_processes_gives_the_one_process_result(job_runs):
  (two, two_dir), (one, _) = job_runs["experiments.train"][2], job_runs["experiments.train"][1]
  results = [_last_json(o) for o in two + one]
  for r in results:
    r.pop("train_seconds")
  _close(results[0], results[2])
  assert results[1] == results[0]  # every process reports the whole evaluation
  assert results[0]["examples"] == 64 and results[0]["epochs"] == 2.0
  records = [json.loads(l) for l in open(two_dir / "metrics.jsonl")]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)) and {2, 4, 6, 8} <= set(steps)  # each logged once
  assert sum(1 for r in records if r.get("final")) == 1
  assert sorted(os.listdir(two_dir / "checkpoints"))[-1] == "8"


def test_main_job_on_two_processes_gives_the_one_process_results(job_runs):
  (two, two_dir), (one, one_dir) = (job_runs["experiments.cifar_distill"][2],
                                    job_runs["experiments.cifar_distill"][1])
  printed = [_last_json(o) for o in two + one]
  assert printed[1] == printed[0]  # process 1 reports process 0's results
  on_disk = [json.load(open(d / "results.json")) for d in (two_dir, one_dir)]
  assert on_disk[0] == printed[0]
  for r in on_disk:
    r["train"].pop("seconds")
  # The artifact's Huffman-coded streams take bytes that depend on the codes themselves, which a
  # float rounding in the two-process reduction may move by one: sizes agree to a thousandth.
  sizes = [r["compressed"].pop("size_bytes") for r in on_disk]
  ratios = [r["compressed"].pop("compression_ratio") for r in on_disk]
  assert sizes[0] == pytest.approx(sizes[1], rel=1e-3)
  assert ratios[0] == pytest.approx(ratios[1], rel=1e-3)
  _close(on_disk[0], on_disk[1])
  assert on_disk[0]["compressed"]["export_agreement"] == 1.0
  assert sizes[0] == sum(
      os.path.getsize(two_dir / "export" / f) for f in os.listdir(two_dir / "export"))
  assert "parallel" not in json.load(open(two_dir / "config.json"))
  assert not os.path.exists(two_dir / "lock")  # process 0's lock, released at its exit
  steps = [json.loads(l)["step"] for l in open(two_dir / "metrics.jsonl")]
  assert steps == sorted(set(steps))  # written once, by process 0


@pytest.mark.parametrize("module,flags,message", [
    ("experiments.train", dict(num_processes=2, process_id=1, initialization_timeout=2,
                               coordinator_address="127.0.0.1:{port}"),
     "error: parallel.coordinator_address: no coordinator answers at 127.0.0.1:{port} after 2 s"),
    ("experiments.cifar_distill", dict(num_processes=2, process_id=2,
                                       coordinator_address="127.0.0.1:{port}"),
     "error: parallel.process_id must be in [0, 2)"),
    ("experiments.train", dict(process_id=1, initialization_timeout=90,  # num_processes left out
                               coordinator_address="127.0.0.1:{port}"),
     "error: parallel.num_processes: jax.distributed.initialize failed (Number of processes"),
])
def test_bad_multiprocess_settings_are_one_line_within_bounded_time(module, flags, message):
  port = _free_port()  # nothing listens there
  config = "configs/train.py" if module == "experiments.train" else "configs/cifar_distill.py"
  cmd = [sys.executable, "-m", module, f"--config={config}", "--workdir=/nonexistent/w",
         "--config.parallel.distributed=True",
         *[f"--config.parallel.{k}={str(v).format(port=port)}" for k, v in flags.items()]]
  start = time.monotonic()
  rc, _, err = _launch([(cmd, 1)], timeout=120)[0]
  assert time.monotonic() - start < 80
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 2 and lines[-1].startswith(message.format(port=port)), err[-2000:]
  assert "Traceback" not in err


# Joins a 2-process run with a Python SIGTERM handler installed first (as experiments/cli.py does
# to stop, release the workdir and resume on a rerun), then sends itself SIGTERM.
SIGTERM_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from jaxcompress import parallel
    parallel.initialize_distributed(parallel.DistributedSpec.from_mapping(json.loads(sys.argv[1])))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    print("SIGTERM ignored")
""")


def test_sigterm_reaches_the_jobs_handler_in_a_multiprocess_run():
  port = _free_port()
  outs = _launch([([sys.executable, "-c", SIGTERM_SCRIPT, json.dumps(_parallel(2, port, pid))], 1)
                  for pid in range(2)], timeout=120)
  for rc, out, err in outs:
    assert rc == 143 and "SIGTERM ignored" not in out, err[-2000:]


# Process 0's failures inside on_main_process, as each process sees them.
ON_MAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxcompress import parallel
    from jaxcompress.errors import ConfigError
    parallel.initialize_distributed(parallel.DistributedSpec.from_mapping(json.loads(sys.argv[1])))

    def raises(e):
      def fn():
        raise e
      return fn

    caught = []
    for e in (NotADirectoryError(20, "Not a directory", "/w/file/run"), ConfigError(""),
              KeyError("k")):
      try:
        parallel.on_main_process(raises(e))
        caught.append(None)
      except Exception as got:
        caught.append([type(got).__name__, str(got)])

    # The main job's export stage, which process 0 alone writes: here over export.max_bytes.
    import numpy as np, optax
    from configs import cifar_distill
    from experiments import pipeline
    from jaxcompress import compose
    from jaxcompress.data import DataSpec
    from jaxcompress.models import create_model
    config = cifar_distill.get_config("quick")
    config.data.name, config.student.name = "mnist", "mlp"
    config.export.serving, config.export.max_bytes = False, 100
    model, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
    x = np.zeros((2, 28, 28, 1), np.float32)
    prune = compose.PruneSpec.from_dict(dict(method="magnitude", sparsity=0.5, schedule="one_shot"))
    comp = compose.build(model, v, x, optimizer=optax.sgd(0.1), total_steps=1, prune=prune)
    try:
      pipeline._export(config, DataSpec.from_mapping(config.data), sys.argv[2], comp,
                       comp.init_state(v, x), 1, [], None)
    except Exception as got:
      caught.append([type(got).__name__, str(got)])
    print(json.dumps({"caught": caught, "value": parallel.on_main_process(lambda: 5)}))
""")


def test_a_failure_on_process_0_stops_every_process_with_the_same_error(tmp_path):
  port = _free_port()
  outs = _launch([([sys.executable, "-c", ON_MAIN_SCRIPT, json.dumps(_parallel(2, port, pid)),
                    str(tmp_path)], 1) for pid in range(2)], timeout=120)
  main, other = (_last_json(o) for o in outs)
  same = [["NotADirectoryError", "[Errno 20] Not a directory: '/w/file/run'"], ["ConfigError", ""]]
  export = main["caught"].pop()  # the artifact over its cap: one line on every process
  assert export[0] == "ConfigError" and export[1].startswith("export.max_bytes: the artifact")
  assert other["caught"].pop() == export
  assert main == {"caught": [*same, ["KeyError", "'k'"]], "value": 5}
  assert other == {"caught": [*same, ["RuntimeError", "process 0 failed: KeyError: 'k'"]],
                   "value": None}
  assert os.listdir(tmp_path) == []  # no export.tmp left behind


def test_processes_with_different_device_counts_are_one_line():
  port = _free_port()
  commands = []
  for pid, devices in ((0, 1), (1, 3)):
    flags = [f"--config.parallel.{k}={v}" for k, v in _parallel(2, port, pid).items()]
    commands.append(([sys.executable, "-m", "experiments.train", "--config=configs/train.py",
                      "--workdir=/nonexistent/w", *flags], devices))
  for rc, _, err in _launch(commands, timeout=120):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and lines[-1] == (
        "error: parallel.distributed: the processes have different numbers of devices "
        "(process 0: 1, process 1: 3); give each the same (CUDA_VISIBLE_DEVICES, XLA_FLAGS)"), err
    assert "Traceback" not in err


# The main job (its weights pretrained first) with one write of process 0 failing (its folder
# turned read-only after the job checked it): every process must stop with that line.
WRITE_FAILS_JOB = textwrap.dedent("""
    import errno, importlib, runpy, sys
    import tensorflow_datasets as tfds
    module, name, *only = sys.argv.pop(1).split(":")  # only: the path the write fails for
    owner = importlib.import_module(module)
    *classes, name = name.split(".")
    for cls in classes:
      owner = getattr(owner, cls)
    original = getattr(owner, name)
    def read_only(first, *args, **kwargs):
      if only and not str(first).endswith(only[0]):
        return original(first, *args, **kwargs)
      raise PermissionError(errno.EACCES, "Permission denied", "/read-only")
    setattr(owner, name, read_only)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    with tfds.testing.mock_data(num_examples=64):
      runpy.run_module(module, run_name="__main__", alter_sys=True)
""")

WRITE_FAILS_CONFIG = textwrap.dedent("""
    from configs import cifar_distill
    def get_config():
      c = cifar_distill.get_config("quick")
      c.data.name, c.data.mean, c.data.std = "mnist", (0.5,), (0.5,)
      c.data.batch_size, c.data.eval_batch_size = 16, 16
      c.student.name, c.student.weights, c.teacher.name = "mlp", "mlp_pre", ""
      c.distill.alpha, c.distill.feature_weight, c.distill.feature_pairs = 0.0, 0.0, ()
      c.prune.rules = (("fc1/kernel", False), ("fc3/kernel", False), (".*/kernel", True))
      c.quant.calibration_examples = 16
      c.weights_dir, c.pretrain.epochs, c.train.epochs = {weights!r}, 0.25, 0.5
      return c
""")


# Two processes cost ~10-20 s a run: the first write of the job (the pretrained weights) fails
# there; the later ones are checked below to run inside on_main_process.
@pytest.mark.parametrize("fails", ["experiments.pipeline:save_weights"])
def test_a_failed_write_of_process_0_stops_every_process(tmp_path, fails):
  port = _free_port()
  (tmp_path / "cfg.py").write_text(WRITE_FAILS_CONFIG.format(weights=str(tmp_path / "weights")))
  commands = [([sys.executable, "-c", WRITE_FAILS_JOB, fails, "experiments.cifar_distill",
                f"--config={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'run'}",
                *[f"--config.parallel.{k}={v}" for k, v in _parallel(2, port, pid).items()]], 1)
              for pid in range(2)]
  for rc, _, err in _launch(commands, timeout=150):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and lines[-1] == "error: Permission denied: /read-only", err[-2000:]
    assert "Traceback" not in err


def test_the_late_writes_of_the_main_job_run_inside_on_main_process(tmp_path, monkeypatch):
  """stages.json, metrics.jsonl, the serving function, the reports and the size report are
  written by process 0 alone inside parallel.on_main_process, which shares a failure with every
  process (the case above shows it for the pretrained weights); run in one process, every call
  of each write records whether it ran there."""
  import importlib
  import tensorflow_datasets as tfds
  from experiments import pipeline
  from jaxcompress import parallel
  namespace = {}
  exec(WRITE_FAILS_CONFIG.format(weights=str(tmp_path / "weights")), namespace)
  depth, seen = [0], {}
  share = parallel.on_main_process

  def counted(fn, *args, **kwargs):
    depth[0] += 1
    try:
      return share(fn, *args, **kwargs)
    finally:
      depth[0] -= 1

  monkeypatch.setattr(parallel, "on_main_process", counted)
  writes = ["jaxcompress.checkpoint:write_json:stages.json",
            "jaxcompress.checkpoint:MetricsLog.write", "jaxcompress.export:save_serving",
            "experiments.pipeline:write_text:export_size.md", "experiments.report:write_report"]
  for where in writes:
    module, name, *only = where.split(":")
    owner = importlib.import_module(module)
    *classes, name = name.split(".")
    for cls in classes:
      owner = getattr(owner, cls)
    original = getattr(owner, name)

    def watched(first, *args, _where=where, _only=only, _original=original, **kwargs):
      if not _only or str(first).endswith(_only[0]):
        seen[_where] = seen.get(_where, True) and depth[0] > 0
      return _original(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, watched)
  with tfds.testing.mock_data(num_examples=64):
    pipeline.train_and_evaluate(namespace["get_config"](), str(tmp_path / "run"))
  assert seen == {where: True for where in writes}
