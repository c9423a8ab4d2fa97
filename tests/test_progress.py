"""jaxcompress.progress: a bar whose output is a log file (not a terminal) redraws a bounded
number of times."""

import io

import numpy as np
import tqdm.std

from jaxcompress import progress
from jaxcompress.data import Batch
from jaxcompress.steps import evaluate, make_eval_step


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def _redraws(stream, monkeypatch, *, steps: int = 200, dt: float = 0.05) -> int:
  """The carriage returns a bar writes over ``steps`` updates, ``dt`` simulated seconds apart."""
  clock = [1000.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
  with progress.bar(total=steps, file=stream, desc="train", unit="step") as bar:
    for _ in range(steps):
      clock[0] += dt
      bar.update(1)
  return stream.getvalue().count("\r")


def test_log_file_redraws_once_per_interval(monkeypatch):
  # 200 updates 0.05 s apart: 10 s of work. tqdm's 0.1 s default redraws tens of times; every
  # 10 s is one redraw, plus the first draw and the final one at close: 10 / 10 + 2 = 3.
  log = io.StringIO()
  assert progress.LOG_INTERVAL_S == 10.0
  assert _redraws(log, monkeypatch) <= 3
  assert "200/200" in log.getvalue().rsplit("\r", 1)[-1]  # the last draw has the full count


def test_terminal_keeps_the_fast_redraws(monkeypatch):
  # at most 100 (every 0.1 s); tqdm paces itself below that as its miniters adapts
  assert _redraws(_Terminal(), monkeypatch) > 20


def test_a_notebook_keeps_the_fast_redraws(monkeypatch):
  # tqdm.auto draws a widget there; its stream (the kernel's) is no terminal, but the widget
  # redraws in place, so the log interval must not slow it down
  monkeypatch.setattr(progress, "_NOTEBOOK", True)
  assert _redraws(io.StringIO(), monkeypatch) > 20


def test_evaluation_piped_to_a_log_writes_a_few_redraws(capsys, monkeypatch):
  # The evaluation loop's bar on a captured (not a terminal) stderr: 200 batches, 0.05 s each
  # on a simulated clock, are 10 s of work; drawn first, once at 10 s and cleared at close
  # (leave=False), where tqdm's 0.1 s default redraws tens of times.
  clock = [1000.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
  x, y = np.eye(2, dtype=np.float32)[[0]], np.zeros(1, np.int32)

  def batches():
    for _ in range(200):
      clock[0] += 0.05
      yield Batch(x, y, np.ones(1, np.float32))

  step = make_eval_step(lambda v, img: img * v)
  assert evaluate(step, 1.0, batches(), num_classes=2, total=200)["examples"] == 200
  assert capsys.readouterr().err.count("\r") <= 3
