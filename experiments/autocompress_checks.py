"""The budget job's checks of its own config sections: one line for each bad input.

:func:`check_budget` (one budget, what the device preset takes) and :func:`check_scan` (the scan
grid and the held-out slice's size). The held-out slice, the last examples of
``data.train_split``, never overlaps ``data.eval_split``: ``load_data`` checks it
(:func:`jaxcompress.data.check_splits`).
"""

from __future__ import annotations

from jaxcompress import budget as budget_lib
from jaxcompress.errors import ConfigError, check_positive, invalid, is_number


def check_budget(config, float32_bytes: int | None = None) -> tuple[str, float]:
  """``(kind, limit)``: ``size`` in bytes or ``bops`` per example; one line for bad input."""
  b = config.budget
  if not config.export.enabled:  # the artifact's bytes and accuracy are what a point reports
    raise invalid("export.enabled", config.export.enabled, "True in the budget job (each plan's "
                  "artifact is exported, measured against the budget and evaluated)")
  if config.export.get("max_bytes", 0):  # sub_config sets it to each plan's own size budget
    raise invalid("export.max_bytes", config.export.max_bytes, "0 in the budget job (each plan's "
                  "artifact is capped at the budget itself)", "give the cap as budget.size_bytes")
  if config.quant.method == "kmeans":  # the scan, the costs and the caps are uniform codes
    raise invalid("quant.method", config.quant.method, "minmax or lsq in the budget job (plans "
                  "are scanned, sized and capped as uniform integer codes)")
  preset = budget_lib.get_preset(b.device)
  for field in ("size_bytes", "ratio", "bops"):
    check_positive(f"budget.{field}", b[field], zero=True)  # 0: not this budget
  if 0 < b.ratio <= 1:
    raise invalid("budget.ratio", b.ratio, "> 1 (the float32 size over the budget) or 0 (not "
                  "this budget)")
  given = [f for f in ("size_bytes", "ratio", "bops") if b[f]]
  if not given:
    raise ConfigError("budget: give one of budget.size_bytes, budget.ratio or budget.bops, e.g. "
                      "--config.budget.ratio=25")
  if "bops" in given and len(given) > 1:
    raise ConfigError(f"budget: budget.bops={b.bops} and budget.{given[0]}={b[given[0]]} "
                      "contradict (a plan meets one budget); give one of them")
  if set(given) == {"size_bytes", "ratio"} and float32_bytes is not None and (
      int(float32_bytes // b.ratio) != int(b.size_bytes)):
    raise ConfigError(f"budget: budget.size_bytes={b.size_bytes} and budget.ratio={b.ratio} "
                      f"contradict (float32 size {float32_bytes:,} / {b.ratio} = "
                      f"{int(float32_bytes // b.ratio):,} bytes); give one of them")
  kind = "bops" if given == ["bops"] else "size"
  if kind not in preset.budgets:
    raise invalid(f"budget.{given[0]}", b[given[0]], f"not set for budget.device={b.device}, "
                  f"which takes a {' or '.join(preset.budgets)} budget")
  if preset.per_channel and not config.quant.per_channel:
    raise invalid("quant.per_channel", config.quant.per_channel,
                  f"True with budget.device={b.device} (per-channel weights)")
  if b.sizing not in ("fixed", "coded"):
    raise invalid("budget.sizing", b.sizing, "fixed or coded")
  if not 0 <= b.coded_margin < 0.5:
    raise invalid("budget.coded_margin", b.coded_margin, "a fraction in [0, 0.5)")
  if b.sparsity not in ("auto", "layer", *GLOBAL_SCORES):
    raise invalid("budget.sparsity", b.sparsity, "auto, layer, global, lamp or kernel")
  if b.sparsity in GLOBAL_SCORES and not global_allowed(kind, preset):
    raise invalid("budget.sparsity", b.sparsity, "auto or layer here (global, lamp and kernel "
                  "need a size budget on a device with unstructured sparsity: any, mcu)")
  if kind == "bops":
    return kind, float(b.bops)
  if float32_bytes is None:
    return kind, 0.0
  return kind, float(int(b.size_bytes) if b.size_bytes else int(float32_bytes // b.ratio))


# budget.sparsity values of a global-threshold plan -> the score it thresholds (pruning.SCORES;
# kernel: whole kernels by the RMS of their entries, budget.threshold_plans).
GLOBAL_SCORES = {"global": "magnitude", "lamp": "lamp", "kernel": "kernel"}
AUTO_THRESHOLDS = ("global", "lamp")  # the global-threshold plans budget.sparsity=auto makes


def global_allowed(kind: str, preset) -> bool:
  """Whether a global-threshold plan fits this budget: size only, unstructured sparsity."""
  return kind == "size" and preset.structure == "unstructured"


def check_scan(config) -> None:
  """The scan grid and the held-out slice's size."""
  s = config.scan
  if not config.data.val_examples > 0:
    raise invalid("data.val_examples", config.data.val_examples, "> 0: the sensitivity scan "
                  "measures on the last data.val_examples examples of data.train_split, held out "
                  "from fine-tuning; the held-out slice is empty")
  if not s.sparsities or any(not (is_number(x) and 0 < x < 1) for x in s.sparsities):
    raise invalid("scan.sparsities", s.sparsities, "a non-empty list of fractions in (0, 1)")
  for field in ("weight_bits", "act_bits"):
    if not s[field] or any(not (is_number(x, integer=True) and 2 <= x <= 8) for x in s[field]):
      raise invalid(f"scan.{field}", s[field], "a non-empty list of integer bit widths in [2, 8]")
  if s.batch_size < 1:
    raise invalid("scan.batch_size", s.batch_size, ">= 1")
  n = config.data.val_examples
  if s.adapt_norms and n > s.batch_size and n % s.batch_size:
    raise invalid("scan.batch_size", s.batch_size, f"a divisor of data.val_examples={n} with "
                  "scan.adapt_norms=True", "each held-out batch is normalised with its own "
                  "BatchNorm statistics, and a padded last batch would mix in zero images")
  for field, what in (("hessian_samples", "Hutchinson vectors per batch; 0 skips the proxy"),
                      ("refine_rounds", "rounds of refinement; 0 plans from the scan alone")):
    if s[field] < 0:
      raise invalid(f"scan.{field}", s[field], ">= 0", what)
  if s.damage not in budget_lib.DAMAGES:
    raise invalid("scan.damage", s.damage, "one of " + ", ".join(budget_lib.DAMAGES))
  if not set(config.budget.weight_bits) <= set(s.weight_bits):
    raise invalid("budget.weight_bits", config.budget.weight_bits, "bit widths of "
                  f"scan.weight_bits={s.weight_bits} (empty: all of them)")
  if config.uniform.only and not config.uniform.enabled:
    raise ConfigError("uniform: uniform.only=True and uniform.enabled=False contradict "
                      "(uniform.only fine-tunes the uniform recipe alone); drop one")


def excluded_bits(config) -> set[int]:
  """Scanned weight bit widths a plan may not use (``budget.weight_bits``; empty: none)."""
  return set(config.scan.weight_bits) - set(config.budget.weight_bits or config.scan.weight_bits)
