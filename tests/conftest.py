"""Shared fixtures: paths to the shared data and weights, the real-data skip marker, a
compilation cache for the session, and a job's entry point run in this process.

The suite's time is mostly XLA compiling small programs, so it compiles them unoptimised
(``JAX_DISABLE_MOST_OPTIMIZATIONS``, inherited by the jobs the tests start: a third less time
on 2 CPU cores). Tests marked ``realdata`` run the full CIFAR-10 test split and compile
optimised. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest ...`` runs the whole suite
optimised."""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # before jax reads its flags

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import app, flags, logging  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PRETRAINED = os.path.join(SHARED, "pretrained")


def has_real_cifar10() -> bool:
  """True when $TFDS_DATA_DIR holds the prepared CIFAR-10."""
  root = os.environ.get("TFDS_DATA_DIR", "")
  return bool(root) and os.path.isdir(os.path.join(root, "cifar10"))


requires_cifar10 = pytest.mark.skipif(
    not has_real_cifar10(), reason="TFDS_DATA_DIR does not hold cifar10")


def weights_folder() -> str:
  """The pretrained CIFAR ResNets: ``$JAXCOMPRESS_WEIGHTS_DIR``, else ``../shared/pretrained``."""
  return os.environ.get("JAXCOMPRESS_WEIGHTS_DIR") or PRETRAINED


def pretrained(name: str) -> str:
  """Path of a pretrained ``{name}_cifar10.npz``; skips the test when it is absent."""
  path = os.path.join(weights_folder(), f"{name}_cifar10.npz")
  if not os.path.isfile(path):
    pytest.skip(f"{path} not present")
  return path


class _Calibrated(Exception):
  """Raised by the stand-in calibration of :func:`check_calibration_images`: the run stops."""


def check_calibration_images(run, monkeypatch, examples: int) -> None:
  """Checks that a job's ``run()`` on mock MNIST of ``examples + 20`` training images
  calibrates its input ranges on exactly the first ``examples`` of them, normalised
  (``quantization.calibrate`` is replaced by one that records its batches and stops the run)."""
  import tensorflow_datasets as tfds

  from jaxcompress import data, quantization
  seen = []

  def calibrate(qz, variables, qstate, batches, **kwargs):
    seen.extend(np.asarray(b) for b in batches)
    raise _Calibrated

  monkeypatch.setattr(quantization, "calibrate", calibrate)
  with tfds.testing.mock_data(num_examples=examples + 20):
    x, _ = data.load_split("mnist", "train", progress=False)
    with pytest.raises(_Calibrated):
      run()
  want = (x[:examples].astype(np.float64) / 255 - 0.5) / 0.5  # no zero-padded images among them
  np.testing.assert_allclose(np.concatenate(seen), want, atol=1e-6)


def disk_full(monkeypatch, path) -> None:
  """Makes every file opened to write (mode ``w``, ``a`` or ``x``) whose name starts with ``path``
  (the file itself or a temporary name beside it) the Linux ``/dev/full``, on which a write fails
  as on a full disk (``ENOSPC``, raised by the kernel)."""
  import builtins
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  real_open = builtins.open

  def fake_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(path)) and (
        set(mode) & set("wax")):
      file = "/dev/full"
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", fake_open)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Compiled programs kept on disk for the session: the many tests that build the same jitted
  step (same model, same shapes) compile it once per worker instead of once per test."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def optimised_for_real_data(request, monkeypatch):
  """Tests marked ``realdata`` (and the jobs they start) compile with XLA's optimisations: they
  run the 10,000 test images, where an unoptimised program costs more than it saves."""
  if request.node.get_closest_marker("realdata") is None:
    yield
    return
  before = jax.config.read("jax_disable_most_optimizations")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)



def _job_flags() -> dict:
  """``{name: (module, flag)}`` of the flags that jobs defined in this process: their own,
  ``cli``'s (``--config``, ``--workdir``) and ml_collections' ``--config.a.b`` overrides; not the
  libraries' (orbax defines flags when first imported, once)."""
  return {flag.name: (module, flag)
          for module, defined in flags.FLAGS.flags_by_module_dict().items() for flag in defined
          if module.startswith(("experiments.", REPO))  # REPO: a job run as __main__
          or flag.name.startswith("config.")}


@pytest.fixture
def run_job(monkeypatch, capfd):
  """Runs a job's entry point in this process as ``python -m JOB ARGS...`` runs it (the same
  ``cli.run``, flag parsing and exit, in the repository), for refusals, which end before any
  work: a subprocess's interpreter and JAX start-up cost more than the check.

  ``run_job(job, *args, env=None)`` returns ``(exit code, stdout, stderr)``, all the process
  wrote to file descriptors 1 and 2, as a subprocess's pipes hold it. absl's one-time set-up of
  a process (its log handler, faulthandler) is left to pytest's. The job defines its flags
  afresh, as in its own process: the flags of jobs that tests imported are set aside for the run
  and put back after, and the job's own are removed.
  """
  import runpy
  import signal
  import sys
  import warnings

  monkeypatch.setattr(app._run_init, "done", True)  # pylint: disable=protected-access
  handler, verbosity = signal.getsignal(signal.SIGTERM), logging.get_verbosity()

  def run(job, *args, env=None):
    for name, value in (env or {}).items():
      monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [job, *args])
    monkeypatch.chdir(REPO)
    capfd.readouterr()  # what the test wrote before is not the job's
    others = _job_flags()
    for name in others:
      delattr(flags.FLAGS, name)
    try:
      with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        # a job a test imported: run afresh as __main__, as python -m runs it
        warnings.filterwarnings("ignore", ".* found in sys.modules", RuntimeWarning)
        runpy.run_module(job, run_name="__main__", alter_sys=True)
    finally:
      for name in _job_flags():
        delattr(flags.FLAGS, name)
      for name, (module, flag) in others.items():
        flags.FLAGS[name] = flag
        flags.FLAGS.register_flag_by_module(module, flag)
      flags.FLAGS.unparse_flags()
      signal.signal(signal.SIGTERM, handler)
      logging.set_verbosity(verbosity)
    out, err = capfd.readouterr()
    return stop.value.code, out, err

  return run
