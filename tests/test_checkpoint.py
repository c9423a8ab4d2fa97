"""Workdir bookkeeping: a run's config is recorded once and a different one is refused; one
writer per workdir."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import common
from conftest import disk_full
from jaxcompress.checkpoint import Stages, check_workdir, release_workdir, write_json
from jaxcompress.errors import ConfigError


def test_a_plain_dict_is_recorded_and_a_different_one_refused(tmp_path):
  config = {"data": {"name": "mnist"}, "train": {"epochs": 2.0}}
  check_workdir(config, str(tmp_path))
  assert json.load(open(tmp_path / "config.json")) == config
  check_workdir(dict(config), str(tmp_path))  # the same run: resumes
  with pytest.raises(ConfigError, match=r"holds a run with a different config: train.epochs is "
                                        r"2.0 there, 3.0 here; use a new --workdir"):
    check_workdir({**config, "train": {"epochs": 3.0}}, str(tmp_path))


def test_ignored_fields_are_neither_recorded_nor_compared(tmp_path):
  config = {"parallel": {"num_processes": 1}, "train": {"epochs": 2.0, "lr": 0.1}}
  ignore = ("parallel", "train.epochs")
  check_workdir(config, str(tmp_path), ignore=ignore)
  assert json.load(open(tmp_path / "config.json")) == {"train": {"lr": 0.1}}
  check_workdir({"parallel": {"num_processes": 2}, "train": {"epochs": 4.0, "lr": 0.1}},
                str(tmp_path), ignore=ignore)
  with pytest.raises(ConfigError, match=r"train.lr is 0.1 there, 0.2 here"):
    check_workdir({"train": {"epochs": 2.0, "lr": 0.2}}, str(tmp_path), ignore=ignore)
  # A record that holds an ignored field (an older run's) still resumes.
  write_json(str(tmp_path / "config.json"), config)
  check_workdir({"parallel": {"num_processes": 2}, "train": {"epochs": 2.0, "lr": 0.1}},
                str(tmp_path), ignore=ignore)


def test_the_refusal_names_the_first_differing_field_of_another_model(tmp_path):
  from configs import cifar_distill
  check_workdir(cifar_distill.get_config("quick"), str(tmp_path))
  other = cifar_distill.get_config("quick")
  other.student.name, other.prune.sparsity = "resnet32", 0.5
  with pytest.raises(ConfigError) as e:
    check_workdir(other, str(tmp_path))
  # The config's own order: the student section comes before prune.
  assert str(e.value) == (f"--workdir={tmp_path} holds a run with a different config: "
                          'student.name is "resnet20" there, "resnet32" here and 1 more field; '
                          "use a new --workdir or delete that one")
  extra = json.loads(cifar_distill.get_config("quick").to_json())
  extra["train"]["new_field"] = "x"  # a field the recorded run did not have
  with pytest.raises(ConfigError, match='train.new_field is absent there, "x" here;'):
    check_workdir(extra, str(tmp_path))


def test_a_config_dict_is_recorded_as_its_json(tmp_path):
  section = common.train_config()
  check_workdir(section, str(tmp_path))
  assert json.load(open(tmp_path / "config.json")) == json.loads(section.to_json())


_HOLD = ("import sys, time; from jaxcompress.checkpoint import check_workdir; "
         "check_workdir({'data': {'name': 'mnist'}}, sys.argv[1]); print('held', flush=True); "
         "time.sleep(600)")


def test_one_writer_per_workdir_and_a_crashed_writers_lock_is_taken_over(tmp_path):
  config = {"data": {"name": "mnist"}}
  workdir = str(tmp_path / "run")
  child = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], stdout=subprocess.PIPE,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert child.stdout.readline().strip() == b"held"
    lock = json.load(open(os.path.join(workdir, "lock")))
    assert lock["pid"] == child.pid and lock["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"^workdir {workdir} is in use by process {child.pid} "
                                          r"\(started \d\d:\d\d:\d\d on host .*\); wait for it "
                                          r"or use another workdir$"):
      check_workdir(config, workdir)
  finally:
    child.kill()  # SIGKILL: no atexit, the lock stays behind
    child.wait()
  assert json.load(open(os.path.join(workdir, "lock")))["pid"] == child.pid
  with pytest.warns(UserWarning, match=rf"taking over the lock left by process {child.pid}"):
    check_workdir(config, workdir)
  assert json.load(open(os.path.join(workdir, "lock")))["pid"] == os.getpid()
  check_workdir(config, workdir)  # the same process again (e.g. after the pretrain stage): fine
  check_workdir(config, str(tmp_path / "other"))  # locks are per workdir
  release_workdir(workdir)
  release_workdir(str(tmp_path / "other"))
  assert not os.path.exists(os.path.join(workdir, "lock"))


def test_a_lock_of_a_killed_process_its_parent_has_not_reaped_is_taken_over(tmp_path):
  child = subprocess.Popen(["sleep", "60"])
  write_json(str(tmp_path / "lock"), {"pid": child.pid, "host": socket.gethostname(),
                                      "time": time.time()})
  child.kill()
  os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, but a zombie until reaped
  try:
    with pytest.warns(UserWarning, match=rf"taking over the lock left by process {child.pid}"):
      check_workdir({}, str(tmp_path))
  finally:
    child.wait()
  release_workdir(str(tmp_path))


def test_a_lock_from_another_host_refuses_and_says_how_to_remove_it(tmp_path):
  write_json(str(tmp_path / "lock"), {"pid": 1234, "host": "elsewhere", "time": time.time()})
  with pytest.raises(ConfigError, match=r"is in use by process 1234 \(started .* on host "
                                        r"elsewhere\); .*if that job is gone, delete .*lock\)$"):
    check_workdir({"data": {}}, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_a_refused_config_leaves_no_lock_behind(tmp_path):
  write_json(str(tmp_path / "config.json"), {"data": {"name": "cifar10"}})
  with pytest.raises(ConfigError, match="different config"):
    check_workdir({"data": {"name": "mnist"}}, str(tmp_path))
  assert not (tmp_path / "lock").exists()


def test_a_hand_broken_record_is_one_line_naming_the_file(tmp_path):
  """'{' alone is not JSON, nor is a list a config: each names its file and leaves no lock."""
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(ConfigError, match=r"^\S+config.json is not valid JSON \(JSONDecodeError: "
                                        r"Expecting property name .*\); fix or delete it$"):
    check_workdir({"data": {}}, str(tmp_path))
  assert not (tmp_path / "lock").exists()
  (tmp_path / "stages.json").write_text("[1]")
  with pytest.raises(ConfigError, match=r"^\S+stages.json holds a JSON list, not an object; fix "
                                        r"or delete it$"):
    Stages(str(tmp_path))


def test_the_lock_is_removed_when_the_process_exits(tmp_path):
  code = ("import sys; from jaxcompress.checkpoint import check_workdir; "
          "check_workdir({'data': {}}, sys.argv[1])")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert (tmp_path / "config.json").exists() and not (tmp_path / "lock").exists()


# orbax leaves the coroutines of the failed restore unfinished; nothing leaks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_of_another_model_is_refused_naming_the_entry(tmp_path):
  import jax.numpy as jnp
  import optax

  from jaxcompress.checkpoint import Checkpointer
  from jaxcompress.steps import TrainState
  opt = optax.sgd(0.1, momentum=0.9)
  state = lambda hidden: TrainState.create(
      {"fc1": {"kernel": jnp.zeros((4, hidden))}, "fc2": {"kernel": jnp.ones((hidden, 2))}},
      {}, opt)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(3, state(8), {"seconds": 1.0})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  restored, meta = ckpt.restore(state(8))
  assert int(restored.step) == 0 and meta == {"seconds": 1.0}
  with pytest.raises(ConfigError) as e:
    ckpt.restore(state(16))
  assert str(e.value) == (f"{tmp_path / 'checkpoints'}: the checkpoint of step 3 was written for "
                          "another model or config: params/fc1/kernel is (4, 8) float32 there, "
                          "(4, 16) float32 here; use a new --workdir or delete that one")
  with pytest.raises(ConfigError, match="params/fc3/kernel is absent there, "):
    ckpt.restore(state(8).replace(params={**state(8).params, "fc3": {"kernel": jnp.ones(2)}}))
  ckpt.close()


def _small_state(dtype="float32"):
  import jax
  import jax.numpy as jnp
  import optax

  from jaxcompress.steps import TrainState
  return TrainState.create({"fc": {"kernel": jnp.ones((3, 2), dtype)}, "key": jax.random.key(0)},
                           {}, optax.sgd(0.1))


def test_a_checkpoint_of_another_dtype_is_refused_not_cast(tmp_path):
  from jaxcompress.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(3, _small_state())
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  restored, _ = ckpt.restore(_small_state())  # a typed PRNG key restores as itself
  assert str(restored.params["key"].dtype) == "key<fry>"
  with pytest.raises(ConfigError, match=r"params/fc/kernel is \(3, 2\) float32 there, \(3, 2\) "
                                        r"bfloat16 here"):
    ckpt.restore(_small_state("bfloat16"))
  ckpt.close()


@pytest.mark.parametrize("damage", ["meta", "state"])
def test_a_damaged_checkpoint_is_one_line_naming_the_step_to_resume_from(tmp_path, damage):
  import shutil

  from jaxcompress.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  for step in (2, 4):
    ckpt.save(step, _small_state(), {"seconds": 1.0})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "4"
  if damage == "meta":
    (folder / "meta" / "metadata").write_text("{not json")
  else:
    shutil.rmtree(folder / "state")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  with pytest.raises(ConfigError) as e:
    ckpt.restore(_small_state())
  assert str(e.value).startswith(f"{folder}: the checkpoint of step 4 cannot be read, it is "
                                 "damaged (")
  assert str(e.value).endswith(f"); delete {folder} to resume from step 2")
  shutil.rmtree(folder)  # as the message says
  restored, meta = Checkpointer(str(tmp_path / "checkpoints")).restore(_small_state())
  assert meta == {"seconds": 1.0}


def test_a_step_not_after_the_latest_is_refused_not_skipped(tmp_path):
  from jaxcompress.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  for step in (10, 20):
    ckpt.save(step, _small_state())
  ckpt.restore(_small_state(), step=10)
  for step in (15, 20):  # going on from step 10, or saving step 20 again
    with pytest.raises(ConfigError, match=rf"step {step} cannot be saved, the folder holds step 20 "
                                          rf"already .*delete the steps \[20\]"):
      ckpt.save(step, _small_state())
  with pytest.raises(ConfigError, match=r"no checkpoint of step 15 to restore \(steps saved: "
                                        r"\[10, 20\]\)$"):
    ckpt.restore(_small_state(), step=15)
  ckpt.close()
  empty = Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match=r"no checkpoint of step None to restore \(steps saved: "
                                        r"none\)$"):
    empty.restore(_small_state())
  empty.close()


def test_steps_a_kill_left_beyond_max_to_keep_are_removed_on_reopening(tmp_path):
  from jaxcompress.checkpoint import Checkpointer
  folder = str(tmp_path / "checkpoints")
  # What a kill leaves between the commit of step 3 and orbax's removal of step 1 (which orbax
  # does only at a later save, and a finished run, resumed, saves nothing).
  ckpt = Checkpointer(folder, max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _small_state())
  ckpt.close()
  ckpt = Checkpointer(folder)
  ckpt.restore(_small_state())
  ckpt.close()
  assert sorted(os.listdir(folder)) == ["2", "3"]  # as the uninterrupted run keeps


def test_a_python_scalar_in_the_state_restores(tmp_path):
  from jaxcompress.checkpoint import Checkpointer
  state = {"step": 3, "w": np.arange(4, dtype=np.float32)}  # as flax's TrainState starts: step=0
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, state)
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  restored, _ = ckpt.restore({"step": 0, "w": np.zeros(4, np.float32)})
  ckpt.close()
  assert int(restored["step"]) == 3
  np.testing.assert_array_equal(restored["w"], state["w"])


def test_a_record_after_a_cut_line_drops_that_line(tmp_path):
  from jaxcompress.checkpoint import MetricsLog
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a crash mid-write
  log = MetricsLog(str(path))
  log.write({"step": 2, "loss": 1.5})
  log.write_final(2, {"accuracy": 0.5})
  assert log.read() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                        {"step": 2, "final": True, "accuracy": 0.5}]


def test_a_record_on_a_full_disk_names_the_log_and_leaves_its_records(tmp_path, monkeypatch):
  from jaxcompress.checkpoint import MetricsLog
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n')
  log = MetricsLog(str(path))
  disk_full(monkeypatch, path)
  with pytest.raises(OSError) as e:
    log.write({"step": 2, "loss": 1.5})
  assert e.value.errno == 28 and e.value.filename == str(path)  # ENOSPC, naming the file
  monkeypatch.undo()
  assert log.read() == [{"step": 1, "loss": 2.0}]


def test_empty_step_folders_never_make_a_saved_step_removed(tmp_path):
  from jaxcompress.checkpoint import Checkpointer
  folder = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(folder))
  for step in (1, 2):
    ckpt.save(step, _small_state())
  ckpt.close()
  for step in (3, 4):  # what an interrupted copy of the folder may leave
    (folder / str(step)).mkdir()
  ckpt = Checkpointer(str(folder))
  assert sorted(os.listdir(folder)) == ["1", "2", "3", "4"]
  with pytest.raises(ConfigError) as e:
    ckpt.restore(_small_state())
  ckpt.close()
  assert str(e.value).startswith(f"{folder / '4'}: the checkpoint of step 4 cannot be read")
  assert str(e.value).endswith(f"; delete {folder / '3'} and {folder / '4'} to resume from step 2")
  for step in (3, 4):  # as the refusal says
    (folder / str(step)).rmdir()
  ckpt = Checkpointer(str(folder))
  assert ckpt.latest_step() == 2
  ckpt.restore(_small_state())
  ckpt.close()


def test_results_records_and_the_printed_line_are_strict_json_with_null_for_nan(tmp_path,
                                                                                capsys):
  from experiments.cli import print_json
  from jaxcompress.checkpoint import MetricsLog, Stages

  def strict(text):  # what JavaScript, jq and strict parsers accept: no NaN, Infinity
    return json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))

  got = {"loss": float("nan"), "eval": {"grad_norm": np.float64(np.inf), "bits": [1.5, -np.inf]},
         "accuracy": 25.0, "teacher": None}
  want = {"loss": None, "eval": {"grad_norm": None, "bits": [1.5, None]}, "accuracy": 25.0,
          "teacher": None}
  write_json(str(tmp_path / "results.json"), got)
  assert strict((tmp_path / "results.json").read_text()) == want
  log = MetricsLog(str(tmp_path / "metrics.jsonl"))
  log.write({"step": 1, **got})
  log.truncate_after(1)
  assert [strict(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, **want}]
  print_json(got)
  assert strict(capsys.readouterr().out) == want
  # A job's own state keeps the numbers a rerun resumes from: a nan loss comes back nan.
  Stages(str(tmp_path)).record("after", {"loss": float("nan")})
  assert np.isnan(Stages(str(tmp_path))["after"]["loss"])


def test_a_full_disk_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  path.write_text('{"accuracy": 1.0}')
  disk_full(monkeypatch, path)
  with pytest.raises(OSError) as e:
    write_json(str(path), {"accuracy": 2.0})
  assert e.value.errno == 28 and e.value.filename == str(path)  # ENOSPC, naming the file
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["results.json"]
  assert path.read_text() == '{"accuracy": 1.0}'


def test_a_full_disk_leaves_no_lock_and_no_temporary_one(tmp_path, monkeypatch):
  disk_full(monkeypatch, tmp_path / "lock")
  with pytest.raises(OSError) as e:
    check_workdir({"a": 1}, str(tmp_path))
  assert e.value.errno == 28 and e.value.filename == str(tmp_path / "lock")  # ENOSPC
  assert os.listdir(tmp_path) == []


CUT_SHORT_SAVE = """
import resource, signal
import numpy as np
from absl import flags
from experiments import cli
from jaxcompress.checkpoint import Checkpointer

flags.DEFINE_string("workdir", None, "")

def main(argv):
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
  ckpt = Checkpointer(flags.FLAGS.workdir + "/checkpoints")
  try:
    ckpt.save(1, {"w": np.random.default_rng(0).random(100_000, np.float32)})
  finally:
    ckpt.close()

cli.run(main)
"""


def test_a_save_the_file_system_refuses_is_one_line(tmp_path):
  """tensorstore raises a failed write (here the kernel's EFBIG: the file-size limit, as a full
  disk's ENOSPC) as a ValueError and orbax logs it from each of its threads with a traceback:
  the job says it in one line, naming the folder."""
  pytest.importorskip("resource")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", CUT_SHORT_SAVE, f"--workdir={tmp_path}"],
                        cwd=repo, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": repo})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [f"error: --workdir={tmp_path}: File too large: "
                                      f"{tmp_path / 'checkpoints'}"]


def test_a_write_stopped_by_ctrl_c_leaves_the_old_file_and_no_temporary_one(tmp_path):
  """SIGTERM unwinds as Ctrl-C (experiments/cli.py): the job's cleanup must not leave half a
  file under the temporary name."""
  from jaxcompress.checkpoint import write_file
  path = tmp_path / "report.md"
  path.write_text("old")

  def write(tmp):
    with open(tmp, "w") as f:
      f.write("half of the new")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    write_file(str(path), write)
  assert os.listdir(tmp_path) == ["report.md"] and path.read_text() == "old"
