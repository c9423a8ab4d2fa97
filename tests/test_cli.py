"""Entry points as a user runs them: the JSON contract, and one-line errors for bad input.

Refusals run the job in this process (``run_job``: the same ``cli.run``, without a subprocess's
start-up); one refusal per job runs as ``python -m``, for the real exit of the process."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, pretrained, requires_cifar10


def _run(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("job,listed", [("experiments.cifar_distill", ["--config", "--workdir"]),
                                        ("experiments.evaluate", ["--config"])])
def test_help_lists_the_flags_the_job_takes(job, listed):
  # the flags its docstring's command gives; absl's --help lists the main module's key flags
  proc = _run(job, "--help", timeout=120)
  assert re.findall(r"^  (--\w+):", proc.stdout, re.M) == listed


@pytest.mark.parametrize("override,message", [
    ("--config.model.name=resnet21", "error: model.name must be one of cnn_cifar, cnn_mnist, "
                                     "mlp, resnet110, resnet20, resnet32, resnet44, resnet56, "
                                     "got 'resnet21'"),
    ("--config.model.nme=resnet20", "error: bad flag: --config.model.nme: model has no field "
                                    "'nme'; did you mean \"name\""),
    ("--config.trian.epochs=1", "error: bad flag: --config.trian.epochs: the config has no "
                                "field 'trian'"),
    ("--config.model.weights=/absent.npz", "error: model.weights: no such file '/absent.npz'"),
    ("--config.data.name=svhn", "error: data.name must be one of"),
])
def test_bad_input_is_one_line_and_nonzero(run_job, override, message):
  code, _, err = run_job("experiments.evaluate", "--config=configs/evaluate.py", override)
  assert code == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1].startswith(message), err[-2000:]
  assert "Traceback" not in err


def test_wrong_depth_weights_name_the_problem(run_job):
  code, _, err = run_job("experiments.evaluate", "--config=configs/evaluate.py",
                         "--config.model.name=resnet32",
                         f"--config.model.weights={pretrained('resnet20')}")
  assert code == 2 and "Traceback" not in err
  assert "missing 60 tensors" in err.splitlines()[-1]


def test_missing_data_says_how_to_get_it(tmp_path):  # the evaluate job's python -m refusal
  proc = _run("experiments.evaluate", "--config=configs/evaluate.py",
              f"--config.model.weights={pretrained('resnet20')}",
              env={"TFDS_DATA_DIR": str(tmp_path)})
  assert proc.returncode == 2
  last = proc.stderr.splitlines()[-1]
  assert f"not prepared under '{tmp_path}'" in last and "tfds build cifar10" in last


@requires_cifar10
@pytest.mark.realdata
def test_pretrained_resnet20_reproduces_published_accuracy():
  proc = _run("experiments.evaluate", "--config=configs/evaluate.py",
              "--config.model.name=resnet20",
              f"--config.model.weights={pretrained('resnet20')}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert abs(result["accuracy"] - 91.73) <= 0.02
  assert result["examples"] == 10000
  assert len(result["precision"]) == len(result["recall"]) == 10
  assert result["loss"] < 0.5


@pytest.mark.parametrize("override,message", [
    ("--config.prune.sparsty=0.5", "error: bad flag: --config.prune.sparsty: prune has no field "
                                   "'sparsty'; did you mean \"sparsity\""),
    ("--config.train.zzz=5", "error: bad flag: --config.train.zzz: train has no field 'zzz'"),
    ("--config.train.epochs=-1", "error: train.epochs must be >= 0, got -1"),
    ("--config.quant.method=apot", "error: quant.method must be one of kmeans, lsq, minmax"),
    ("--config.seed=-3", "error: seed must be an integer in [0, 2**32) (it seeds NumPy's and "
                         "JAX's generators), got -3"),
    ("--config.seed=9223372036854775808", "error: seed must be an integer in [0, 2**32) (it seeds "
                                          "NumPy's and JAX's generators), got 9223372036854775808"),
])
def test_main_job_bad_input_writes_nothing(run_job, tmp_path, override, message):
  workdir = tmp_path / "run"
  code, _, err = run_job("experiments.cifar_distill", "--config=configs/cifar_distill.py:quick",
                         f"--workdir={workdir}",
                         f"--config.student.weights={pretrained('resnet20')}",
                         f"--config.teacher.weights={pretrained('resnet20')}", override)
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1].startswith(message), err[-2000:]
  assert not workdir.exists()


@pytest.mark.parametrize("job,config,message", [
    ("cifar_distill", "autocompress.py:quick", "(configs/cifar_distill.py is one): it has budget, "
                                               "scan, uniform, which this job does not read"),
    ("autocompress", "cifar_distill.py:quick", "(configs/autocompress.py is one): it lacks "
                                               "budget, scan, uniform"),
    ("train", "iterative_prune.py:quick", "(configs/train.py is one): it lacks parallel and has "
                                          "prune, which this job does not read"),
])
def test_a_config_of_another_job_is_one_line_and_writes_nothing(run_job, tmp_path, job, config,
                                                                 message):
  """Run, cifar_distill ignored autocompress's sections and ran into an autocompress workdir as
  its own; the others failed on a missing section with a traceback. (The bad seed, refused just
  after, keeps a run that gets past this check from training.)"""
  workdir = tmp_path / "run"
  code, _, err = run_job(f"experiments.{job}", f"--config=configs/{config}",
                         f"--workdir={workdir}", "--config.seed=-1")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1] == (f"error: --config=configs/{config} is no config of "
                                  f"this job {message}")
  assert not workdir.exists()


def test_an_override_given_twice_is_refused(run_job, tmp_path):
  # ml_collections would decay at the joined tuple (0.5, 0.5) for a tuple field given twice
  workdir = tmp_path / "run"
  code, _, err = run_job("experiments.cifar_distill", "--config=configs/cifar_distill.py:quick",
                         f"--workdir={workdir}", "--config.train.decay_at=(0.5,)",
                         "--config.seed=1", "--config.train.decay_at=(0.5,)")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1] == (
      "error: bad flag: --config.train.decay_at is given more than once; the overrides of a "
      "tuple are joined, not replaced by the last: give all its values in one")
  assert not workdir.exists()
  # any other field given twice keeps the last value, as absl flags do
  code, _, err = run_job("experiments.cifar_distill", "--config=configs/cifar_distill.py:quick",
                         f"--workdir={workdir}", "--config.seed=1", "--config.seed=-3")
  assert code == 2 and err.splitlines()[-1].startswith(
      "error: seed must be an integer in [0, 2**32) (it seeds NumPy's and JAX's generators), "
      "got -3")
  assert not workdir.exists()


def test_main_job_wrong_depth_teacher_weights(tmp_path):  # cifar_distill's python -m refusal
  workdir = tmp_path / "run"
  proc = _run("experiments.cifar_distill", "--config=configs/cifar_distill.py:quick",
              f"--workdir={workdir}", "--config.teacher.name=resnet56",
              f"--config.teacher.weights={pretrained('resnet20')}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("error: teacher.weights=")
  assert "missing 180 tensors" in proc.stderr.splitlines()[-1]
  assert not workdir.exists()


@pytest.mark.parametrize("job,config,slash", [
    ("experiments.cifar_distill", "cifar_distill.py:quick", ""),
    ("experiments.train_lm", "shakespeare.py:quick", ""),
    ("experiments.train_lm", "shakespeare.py:quick", "/")])  # as a shell completes a folder
def test_a_workdir_that_is_a_file_is_one_line_and_left_alone(run_job, tmp_path, job, config,
                                                              slash):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  code, _, err = run_job(job, f"--config=configs/{config}", f"--workdir={path}{slash}")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1] == (f"error: --workdir={path}{slash} is a file; give a folder "
                                  "(new or a run's, to resume)")
  assert path.read_text() == "mine"


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_workdir_that_links_to_nothing_is_one_line(run_job, tmp_path, slash):
  link = tmp_path / "run"
  link.symlink_to(tmp_path / "gone")
  code, _, err = run_job("experiments.train_lm", "--config=configs/shakespeare.py:quick",
                         f"--workdir={link}{slash}")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1] == (f"error: --workdir={link}{slash} is a symbolic link to "
                                  f"{tmp_path / 'gone'}, which does not exist; make "
                                  "that folder or give another")
  assert os.listdir(tmp_path) == ["run"]


def test_an_empty_workdir_is_one_line():  # train_lm's python -m refusal
  proc = _run("experiments.train_lm", "--config=configs/shakespeare.py:quick", "--workdir=")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.splitlines()[-1] == ("error: --workdir must name a folder (new, or a run's "
                                          "to resume), got ''")


def test_a_workdir_that_cannot_be_made_names_the_flag(run_job, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  text = tmp_path / "text.txt"
  text.write_text("to be, or not to be: that is the question. " * 400)
  workdir = tmp_path / "notes.txt" / "run"
  code, _, err = run_job("experiments.train_lm", "--config=configs/shakespeare.py:quick",
                         f"--workdir={workdir}", f"--config.data.path={text}",
                         "--config.data.context=16")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[-1] == f"error: --workdir={workdir}: Not a directory: {workdir}"


FAILING_FS = """
import errno, os
from absl import flags
from experiments import cli

flags.DEFINE_string("workdir", None, "")
flags.DEFINE_integer("errno", None, "")
flags.DEFINE_string("file", None, "")

def main(argv):
  path = flags.FLAGS.file or os.path.join(flags.FLAGS.workdir, "results.json")
  raise OSError(flags.FLAGS.errno, os.strerror(flags.FLAGS.errno), path)

cli.run(main)
"""


@pytest.mark.parametrize("code,reason", [(30, "Read-only file system"),
                                         (28, "No space left on device"),
                                         (122, "Disk quota exceeded")])
def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, code, reason):
  """A read-only file system, a full disk, a quota: the file and the reason, no traceback."""
  proc = subprocess.run([sys.executable, "-c", FAILING_FS, f"--workdir={tmp_path}",
                         f"--errno={code}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (f"error: --workdir={tmp_path}: {reason}: "
                                          f"{tmp_path / 'results.json'}")


def test_a_file_beside_the_workdir_is_not_said_to_lie_in_it(tmp_path):
  """``run_weights/`` shares its first characters with ``--workdir=run`` and no more."""
  path = tmp_path / "run_weights" / "w.msgpack"
  proc = subprocess.run([sys.executable, "-c", FAILING_FS, f"--workdir={tmp_path / 'run'}",
                         "--errno=28", f"--file={path}"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == f"error: No space left on device: {path}"


CLAIMER = """
from absl import flags
from experiments import cli
from jaxcompress.checkpoint import check_workdir

flags.DEFINE_string("workdir", None, "")

cli.run(lambda argv: check_workdir({"seed": 0}, flags.FLAGS.workdir))
"""


def test_a_workdir_under_the_home_folder_is_made_there(tmp_path):
  """``--workdir=~/run`` (the shell expands no ``~`` after ``=``) is HOME/run, not ./~/run."""
  home, here = tmp_path / "home", tmp_path / "here"
  here.mkdir()
  proc = subprocess.run([sys.executable, "-c", CLAIMER, "--workdir=~/run"], cwd=here,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO, "HOME": str(home)})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((home / "run" / "config.json").read_text()) == {"seed": 0}
  assert os.listdir(here) == []


SLEEPER = """
import os, sys, time
from absl import flags
from experiments import cli
from jaxcompress.checkpoint import claim_workdir

flags.DEFINE_string("workdir", None, "")

def main(argv):
  os.makedirs(flags.FLAGS.workdir)
  claim_workdir(flags.FLAGS.workdir)
  print("claimed", flush=True)
  time.sleep(120)

cli.run(main)
"""


def test_sigterm_ends_as_ctrl_c_and_releases_the_workdir(tmp_path):
  """A preempting scheduler's SIGTERM: one line, exit 143, the lock gone for the next run."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-c", SLEEPER, f"--workdir={workdir}"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().strip() == "claimed"
  assert (workdir / "lock").exists()
  proc.terminate()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143
  assert err.strip().splitlines()[-1] == ("error: terminated (SIGTERM); rerun the same command "
                                          "to resume")
  assert "Traceback" not in err
  assert not (workdir / "lock").exists()


SLOW_CLEANUP = SLEEPER.replace("def main(argv):", """import atexit

def cleanup():
  print("cleaning", flush=True)
  time.sleep(2)

atexit.register(cleanup)

def main(argv):""")


def test_a_second_sigterm_during_the_cleanup_is_ignored(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP, f"--workdir={tmp_path / 'run'}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().strip() == "claimed"
  proc.terminate()
  assert proc.stdout.readline().strip() == "cleaning"
  proc.terminate()  # as a scheduler may repeat it
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143 and "Traceback" not in err and "Exception" not in err, err
  assert err.strip().splitlines()[-1] == ("error: terminated (SIGTERM); rerun the same command "
                                          "to resume")


@pytest.mark.parametrize("job", ["evaluate", "ptq", "prune_sensitivity"])
def test_a_workdir_given_to_a_job_that_writes_nothing_is_one_line(run_job, tmp_path, job):
  code, out, err = run_job(f"experiments.{job}", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and "Traceback" not in err and out == ""
  assert err.splitlines()[-1] == ("error: bad flag: --workdir: this job writes no files "
                                  "(it prints its results), so it takes no --workdir")
  assert not (tmp_path / "run").exists()


def test_an_argument_without_dashes_is_one_line():  # bench's python -m refusal
  proc = _run("experiments.bench", "variants=plain", timeout=120)  # ignored: every variant runs
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
  assert proc.stderr.splitlines()[-1] == ("error: unexpected argument 'variants=plain'; every "
                                          "setting is a flag: --name=value")


@pytest.mark.parametrize("text,message", [
    ("hi\n", "the config file fails: line 1: NameError: name 'hi' is not defined"),
    ("def get_config(:\n", "the config file fails: SyntaxError: "),
    ("def get_config():\n  return 1 / 0\n",
     "the config file fails: line 2: ZeroDivisionError: division by zero"),
    ("def get_config():\n  return {'seed': 0}\n",
     "get_config() returns dict, not an ml_collections.ConfigDict"),
])
def test_a_config_file_that_fails_is_one_line(run_job, tmp_path, text, message):
  config = tmp_path / "mine.py"
  config.write_text(text)
  code, _, err = run_job("experiments.evaluate", f"--config={config}")
  assert code == 2 and "Traceback" not in err, err[-2000:]
  assert err.splitlines()[-1].startswith(f"error: --config={config}: {message}")


RAISER = """
import errno, os
from absl import flags
from experiments import cli

flags.DEFINE_string("workdir", None, "")

def main(argv):
  code, text, name = os.environ["OS_ERROR"].split(",")
  raise OSError(getattr(errno, code), text, name.format(workdir=flags.FLAGS.workdir) or None)

cli.run(main)
"""


@pytest.mark.parametrize("error,message", [
    ("ENOSPC,No space left on device,{workdir}/results.json",
     "error: --workdir={workdir}: No space left on device: {workdir}/results.json"),
    ("EROFS,Read-only file system,/weights/mlp.msgpack",
     "error: Read-only file system: /weights/mlp.msgpack"),
    ("ENOSPC,No space left on device,", "error: No space left on device"),
])
def test_a_refusal_of_the_system_is_one_line(tmp_path, error, message):
  """A full disk or a read-only mount (a plain OSError, not one of its named subclasses) ends a
  job with the system's one line, naming the file where it has one."""
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", RAISER, f"--workdir={workdir}"], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "OS_ERROR": error})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == message.format(workdir=workdir)
