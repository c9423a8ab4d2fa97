"""Train-step variants timed by ``experiments/bench.py``.

Each variant is the composed ResNet-20 CIFAR train step (:mod:`jaxcompress.compose`) with a
subset of the compression methods switched on, so ``python -m experiments.bench`` measures what
each method adds to the step: ``plain`` (none), ``prune`` (80 % gradual magnitude pruning),
``wquant`` (4-bit per-channel weights), ``waquant`` (+ 8-bit inputs), ``kd`` (Hinton KD with the
ResNet-56 teacher's forward in the step) and ``all``. ``teacher_forward`` times the teacher's
eval-mode forward alone, the yardstick of the ``kd`` target.

The transformer pair runs on a small character-level GPT (context 64, width 128, 4 layers, 4
heads, batch 32 of random token ids): ``gpt_plain`` is the plain supervised step
(:func:`jaxcompress.steps.supervised_loss`), ``gpt_all`` the composed step with 2:4 sparsity along
every attention/MLP kernel's reduction axis, 4-bit weights and 8-bit inputs (embedding and head at
8 bits) and token-level KD from a float GPT teacher of the same shape.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
import optax

from configs import cifar_distill
from experiments.pipeline import compression_specs
from jaxcompress import compose
from jaxcompress.data import Batch
from jaxcompress.errors import unknown
from jaxcompress.models import CharGPT, create_model
from jaxcompress.models.functional import functional
from jaxcompress.optim import OptimizerSpec, make_optimizer
from jaxcompress.steps import TrainState, make_train_step, supervised_loss

VARIANTS = {  # name -> (prune, weight quant, activation quant, distill)
    "plain": (False, False, False, False),
    "prune": (True, False, False, False),
    "wquant": (False, True, False, False),
    "waquant": (False, True, True, False),
    "kd": (False, False, False, True),
    "all": (True, True, True, True),
}
GPT_VARIANTS = ("gpt_plain", "gpt_all")
GPT = dict(vocab_size=65, context=64, width=128, depth=4, heads=4)
GPT_BATCH = 32


class Variant(NamedTuple):
  """A ready-to-run step; ``run`` times ``steps`` calls and keeps the last state."""
  step: Callable
  state: list  # one-element box: the state is replaced on every call
  args: tuple

  def run(self, batches, steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps; returns (examples/s wall, process CPU seconds)."""
    state = self.state[0]
    jax.block_until_ready(state)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, _ = self.step(state, batches[i % len(batches)], *self.args)
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    self.state[0] = state
    return steps * batches[0].image.shape[0] / wall, cpu


def _config(prune: bool, wquant: bool, aquant: bool, distill: bool):
  c = cifar_distill.get_config()
  c.prune.method = "magnitude" if prune else "none"
  c.quant.weight_bits = 4 if wquant else 0
  c.quant.first_last_bits = 8 if (wquant or aquant) else 0
  c.quant.act_bits = 8 if aquant else 0
  c.distill.alpha = 0.9 if distill else 0.0
  return c


def build_variant(name: str, sample_x: np.ndarray, teacher=None) -> Variant:
  """The composed train step of variant ``name`` on randomly initialised ResNet-20 weights."""
  prune, wquant, aquant, distill = VARIANTS[name]
  config = _config(prune, wquant, aquant, distill)
  student, student_vars = create_model("resnet20", num_classes=10, image_shape=(32, 32, 3))
  model, tvars = teacher if distill else (None, None)
  optimizer = make_optimizer(OptimizerSpec.from_mapping(config.train), 390,
                             decay_mask=compose.decay_mask)
  comp = compose.build(student, student_vars, sample_x, optimizer=optimizer,
                       total_steps=390 * 30, teacher=model, **compression_specs(config))
  state = comp.init_state(student_vars, sample_x, teacher_vars=tvars, calibration=[sample_x])
  return Variant(comp.make_train_step(), [state], (tvars,) if distill else ())


def teacher_forward(teacher) -> Callable:
  """``fn(batch) -> logits`` of the teacher in eval mode, jitted (the KD step's extra work)."""
  model, variables = teacher
  fwd = jax.jit(lambda v, x, fm=functional(model): fm.apply(v, x)[0])
  return lambda batch: fwd(variables, batch.image)


def gpt_batches(count: int = 4) -> list[Batch]:
  """Random next-character batches for the GPT variants: ids ``[32, 64]``, labels shifted."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, GPT["vocab_size"], (count, GPT_BATCH, GPT["context"] + 1), np.int32)
  return [Batch(x[:, :-1], x[:, 1:], np.ones(GPT_BATCH, np.float32)) for x in ids]


def build_gpt_variant(name: str, sample_ids: np.ndarray) -> Variant:
  """``gpt_plain`` (supervised step) or ``gpt_all`` (2:4 + W4A8 + KD), random weights."""
  model = CharGPT(**GPT)
  variables = model.init(jax.random.key(0), sample_ids)
  optimizer = optax.adamw(3e-4, weight_decay=0.1)
  if name == "gpt_plain":
    state = TrainState.create(variables["params"], {}, optimizer)
    return Variant(make_train_step(supervised_loss(model), optimizer), [state], ())
  teacher_vars = model.init(jax.random.key(1), sample_ids)
  comp = compose.build(
      model, variables, sample_ids, optimizer=optimizer, total_steps=1000, teacher=model,
      prune=compose.PruneSpec(method="magnitude", structure="nm", n=2, m=4, sparsity=0.5,
                              schedule="one_shot"),
      quant=compose.QuantSpec(weight_bits=4, act_bits=8, first_last_bits=8),
      distill=compose.DistillSpec(alpha=0.9, temperature=2.0))
  state = comp.init_state(variables, sample_ids, teacher_vars=teacher_vars,
                          calibration=[sample_ids])
  return Variant(comp.make_train_step(), [state], (teacher_vars,))


def check_names(names: list[str] | None) -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` naming ``--variants`` for a name in
  ``names`` that is no variant (None or empty: all variants, valid)."""
  for n in names or ():
    if n not in VARIANTS and n not in GPT_VARIANTS:
      raise unknown("--variants", n, list(VARIANTS) + list(GPT_VARIANTS))


def build_variants(names: list[str] | None, sample_x: np.ndarray,
                   sample_ids: np.ndarray) -> tuple[dict, Callable | None]:
  """Builds the named variants (all when ``names`` is None) and the ResNet-56 teacher-forward
  timer (None when no CIFAR variant is named)."""
  check_names(names)
  names = list(VARIANTS) + list(GPT_VARIANTS) if not names else names
  gpt = {n: build_gpt_variant(n, sample_ids) for n in names if n in GPT_VARIANTS}
  if not any(n in VARIANTS for n in names):
    return gpt, None
  teacher = create_model("resnet56", num_classes=10, image_shape=(32, 32, 3))
  cifar = {n: build_variant(n, sample_x, teacher) for n in names if n in VARIANTS}
  return {**cifar, **gpt}, teacher_forward(teacher)


# Instructions that launch no work of their own in a compiled XLA program.
_FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})
_CALLEES = re.compile(r"(?:calls|to_apply|true_computation|false_computation|branch_computations"
                      r"|body|condition)=\{?([%\w.\-, ]+)\}?")


def _opcode(rest: str) -> str | None:
  """The opcode of one HLO instruction, from the text after its ``=``: shape, then opcode."""
  if rest.startswith("("):  # a tuple shape
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest[rest.find(" "):]
  match = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
  return match.group(1) if match else None


def hlo_op_counts(text: str) -> tuple[collections.Counter, collections.Counter]:
  """``(every step, inside conditionals and loops)``: opcode counts of the top-level
  instructions of a compiled program's text (``jax.jit(f).lower(...).compile().as_text()``).

  Top level means the entry computation and what it calls directly, not the inside of a fusion:
  on a GPU each counted instruction but a conditional or a loop is about one kernel launch or
  copy. Instructions in the branches of a conditional (and bodies of a loop) are counted apart,
  as they run only when taken.
  """
  computations, current, entry = {}, None, None
  for line in text.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif line == "}":
      current = None
    elif current is not None:
      match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*)$", line)
      if match:
        callees = [c.strip().lstrip("%") for group in _CALLEES.findall(match.group(1))
                   for c in group.split(",") if c.strip()]
        computations[current].append((_opcode(match.group(1)), callees))
  every, branches = collections.Counter(), collections.Counter()

  def visit(name, counts):
    for op, callees in computations.get(name, ()):
      if op in _FREE_OPS or op is None:
        continue
      counts[op] += 1
      if op in ("conditional", "while", "call"):
        for callee in callees:
          visit(callee, counts if op == "call" else branches)

  if entry is not None:
    visit(entry, every)
  return every, branches


def step_ops(variant: Variant, batch) -> dict:
  """What one call of ``variant``'s step runs, compiled for this process's backend: top-level
  ops per step and in conditionals (:func:`hlo_op_counts`), and XLA's cost analysis."""
  compiled = variant.step.lower(variant.state[0], batch, *variant.args).compile()
  every, branches = hlo_op_counts(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {"ops_per_step": sum(every.values()), "fusions": every["fusion"],
          "copies": every["copy"], "custom_calls": every["custom-call"],
          "conditionals": every["conditional"], "loops": every["while"],
          "sorts": every["sort"], "ops_in_conditionals": sum(branches.values()),
          "sorts_in_conditionals": branches["sort"],
          "gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
          "mb_accessed": round(float(cost.get("bytes accessed", 0.0)) / 1e6, 1)}
