"""What every entry point shares: ``--config``/``--workdir`` flags and one-line user errors."""

from __future__ import annotations

import ast
import atexit
import importlib
import os
import re
import signal
import sys
import traceback
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxcompress.checkpoint import write_error_code
from jaxcompress.errors import ConfigError
from jaxcompress.jsonio import dumps

# The flags defined here are the calling job's key flags, which its --help lists.
flags.disclaim_key_flags()


def define_flags(default_config: str, *, workdir: bool = True) -> config_flags.ConfigFlag:
  """Defines ``--config`` (with ``--config.a.b=v`` overrides) and optionally ``--workdir``, as
  key flags of the calling job."""
  if workdir:
    flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results; a rerun "
                        "with the same folder resumes.", required=True)
  config = config_flags.DEFINE_config_file("config", default_config,
                                           "Config file (path[:variant]).", lock_config=True)
  flags.declare_key_flag("config")
  return config


def fail(message: str, code: int = 2) -> None:
  """Prints ``error: message`` on one line to stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run`` with user mistakes reported as one line and exit code 2, no traceback."""

  def guarded(argv):
    logging.set_verbosity(logging.ERROR)  # TFDS and orbax warn of nothing a user must act on
    logging.get_absl_handler().addFilter(_quiet_failed_writes)
    if len(argv) > 1:  # a flag typed without its dashes would otherwise be ignored
      fail(f"unexpected argument {argv[1]!r}; every setting is a flag: --name=value")
    if "config" in flags.FLAGS:
      try:
        config = flags.FLAGS["config"].value
        config.keys()
      except (OSError, ValueError) as e:  # config_flags loads the file lazily
        fail(f"--config={flags.FLAGS['config'].config_filename}: " + " ".join(str(e).split()))
      if not isinstance(config, ml_collections.ConfigDict):
        fail(f"--config={flags.FLAGS['config'].config_filename}: get_config() returns "
             f"{type(config).__name__}, not an ml_collections.ConfigDict")
      _check_sections(config)
      seed = config.get("seed", 0)
      # NumPy's usual seed range; JAX takes 63 bits at most (2**63 failed inside the model's
      # init, blamed on model.name) and jobs add small offsets (rounds) to the seed
      if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        fail(f"seed must be an integer in [0, 2**32) (it seeds NumPy's and JAX's generators), "
             f"got {seed!r}")
    workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
    if workdir is not None and not workdir.strip():
      fail("--workdir must name a folder (new, or a run's to resume), got ''")
    if workdir:  # ~ is the home folder, as in the data, weights and text paths (the shell leaves
      workdir = flags.FLAGS.workdir = os.path.expanduser(workdir)  # it in --workdir=~/x as is)
    plain = workdir and os.path.normpath(workdir)  # a trailing / would hide a file or a link
    if plain and os.path.exists(plain) and not os.path.isdir(plain):
      fail(f"--workdir={workdir} is a file; give a folder (new or a run's, to resume)")
    if plain and os.path.islink(plain) and not os.path.exists(plain):  # makedirs: EEXIST
      fail(f"--workdir={workdir} is a symbolic link to {os.readlink(plain)}, which does not "
           "exist; make that folder or give another")
    try:
      main(argv)
    except ConfigError as e:
      fail(str(e))
    except OSError as e:  # the system refused (missing file, read-only folder, full disk)
      if e.strerror is None:  # raised without an errno: a program's error, kept whole
        raise
      where = "" if e.filename is None else f": {e.filename}"
      folder = workdir and os.path.abspath(workdir)
      inside = folder and e.filename is not None and os.path.commonpath(
          [folder, os.path.abspath(str(e.filename))]) == folder
      fail(f"--workdir={workdir}: {e.strerror}{where}" if inside else f"{e.strerror}{where}")

  # A scheduler preempts with SIGTERM: unwind as for Ctrl-C, so the workdir's lock is released
  # and half-written outputs are cleaned up; a rerun on any host resumes.
  signal.signal(signal.SIGTERM, _terminated)
  try:
    app.run(guarded, flags_parser=_parse_flags)
  except Terminated:
    _stop("terminated (SIGTERM); rerun the same command to resume", 128 + signal.SIGTERM)
  except KeyboardInterrupt:
    _stop("interrupted; rerun the same command to resume", 130)


def _check_sections(config: ml_collections.ConfigDict) -> None:
  """One line for a config written for another job (``configs/autocompress.py`` given to
  ``experiments.cifar_distill``): its top-level fields differ from the job's own config's. Run,
  it failed on a missing section with a traceback, or ignored the extra ones and ran into that
  job's workdir, whose recorded config it matches."""
  default = flags.FLAGS["config"].default
  own = set(importlib.import_module(os.path.splitext(default)[0].replace("/", ".")).get_config())
  lacks, extra = sorted(own - set(config)), sorted(set(config) - own)
  if lacks or extra:
    fail(f"--config={flags.FLAGS['config'].config_filename} is no config of this job ({default} "
         "is one): it " + " and ".join(
             [f"lacks {', '.join(lacks)}"] * bool(lacks)
             + [f"has {', '.join(extra)}, which this job does not read"] * bool(extra)))


def _quiet_failed_writes(record) -> bool:
  """Drops the log records, each with a traceback, that orbax's threads (and asyncio, for their
  tasks) write for a checkpoint save that could not write (a full disk): the save raises that
  failure in the job, which reports it in one line."""
  error = record.exc_info[1] if record.exc_info else None
  return write_error_code(record.getMessage()) is None and (
      error is None or write_error_code(error) is None)


def _stop(message: str, code: int) -> None:
  """``fail`` for a job stopped by a signal, once the unwinding has cleaned up: the exit handlers
  run (the workdir's lock is released), the rest of the interpreter's shutdown is skipped, as XLA
  may still be compiling on its threads (the stop can land inside a compile) and tearing down
  under it crashed with a segmentation fault."""
  print(f"error: {message}", file=sys.stderr)
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


class Terminated(KeyboardInterrupt):
  """SIGTERM received: raised in the main thread where the job is running."""


def _terminated(signum, frame):
  del frame
  signal.signal(signum, signal.SIG_IGN)  # a scheduler's repeated SIGTERMs: clean up once
  raise Terminated()


def _parse_flags(argv: list[str]) -> list[str]:
  if "workdir" not in flags.FLAGS and any(a.split("=", 1)[0] in ("--workdir", "-workdir")
                                          for a in argv[1:]):  # absl would suggest --log_dir
    fail("bad flag: --workdir: this job writes no files (it prints its results), so it takes "
         "no --workdir")
  try:
    rest = flags.FLAGS(argv)
    _refuse_joined_tuples(argv)
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports a misspelled ``--config.a.b`` as a KeyError/AttributeError whose text
    # is a quoted, multi-line "'x' Did you mean 'y'?"; fold it into one line.
    text = str(e)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = ast.literal_eval(text)
    if "Traceback" in text:  # an exception raised inside get_config(): keep its last line
      text = text.strip().splitlines()[-1]
    text = " ".join(text.split())
    unknown_field = re.fullmatch(r"'?([\w-]+)'?\s*(.*)", text)
    if isinstance(e, (KeyError, AttributeError)) and unknown_field:
      text = _unknown_field(argv, *unknown_field.groups()) or text
    fail("bad flag: " + text)
  except Exception as e:  # noqa: BLE001 (the config file's own code failed: a user's file)
    given = [a[len("--config="):] for a in argv if a.startswith("--config=")]
    path = given[-1] if given else flags.FLAGS["config"].default
    fail(f"--config={path}: the config file fails: {_where(e, path.split(':')[0])}"
         f"{type(e).__name__}: " + " ".join(str(e).split()))


def _refuse_joined_tuples(argv: list[str]) -> None:
  """One line for a tuple field overridden more than once: ml_collections joins the values
  ((15,) then (25,) runs (15, 25)) where every other flag keeps the last one given."""
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  for name in sorted({n for n in overrides if overrides.count(n) > 1}):
    value = flags.FLAGS["config"].value
    for part in name[len("--config."):].split("."):
      value = value[part]
    if isinstance(value, (tuple, list)):
      fail(f"bad flag: {name} is given more than once; the overrides of a tuple are joined, "
           "not replaced by the last: give all its values in one")


def _where(e: Exception, config_file: str) -> str:
  """``line N: `` (``FILE, line N: `` outside the config file) of the innermost frame of ``e``
  outside the installed packages, or nothing (a SyntaxError names its line itself)."""
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if "site-packages" not in f.filename and not f.filename.startswith("<")]
  if isinstance(e, SyntaxError) or not frames:
    return ""
  same = os.path.abspath(frames[-1].filename) == os.path.abspath(config_file)
  return f"{'' if same else frames[-1].filename + ', '}line {frames[-1].lineno}: "


def _unknown_field(argv: list[str], name: str, hint: str) -> str | None:
  """``--config.a.b: a has no field 'b'; did you mean ...`` for the override that names ``name``."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg.split("=", 1)[0][len("--config."):].split(".")
      if name in path:
        parent = ".".join(path[:path.index(name)]) or "the config"
        hint = hint[:1].lower() + hint[1:]
        return f"--config.{'.'.join(path)}: {parent} has no field {name!r}" + (
            f"; {hint}" if hint else "")
  return None


def print_json(result: dict) -> None:
  """Prints ``result`` as one line of strict JSON, a value that is not finite as ``null`` (the last
  line of a job's output, read by tools)."""
  print(dumps(result), flush=True)
