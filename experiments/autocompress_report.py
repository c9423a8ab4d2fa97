"""The budget job's human-readable output: ``report.md``, ``sensitivity.png`` (per-layer damage)
and ``accuracy_vs_size.png`` (the plan against the uniform recipe), written atomically."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcompress import tables  # noqa: E402
from jaxcompress.checkpoint import write_file, write_text  # noqa: E402

THRESHOLDS = {"global": "magnitude", "lamp": "LAMP scores",
              "kernel": "whole kernels' L2 norms"}  # what a global plan thresholds


def _save(fig, path: str) -> None:
  """Saves ``fig`` as a PNG at ``path`` atomically (:func:`write_file`) and closes it."""
  try:
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
  finally:
    plt.close(fig)


def plot_sensitivity(sens, path: str) -> None:
  """Heatmap: one row per layer, one column per (sparsity, weight bits); loss increase."""
  cols = sorted({(o.sparsity, o.weight_bits) for opts in sens.options for o in opts})
  grid = np.full((len(sens.paths), len(cols)), np.nan)
  for i, (opts, dmg) in enumerate(zip(sens.options, sens.damage)):
    for o, d in zip(opts, dmg):
      j = cols.index((o.sparsity, o.weight_bits))
      grid[i, j] = d if np.isnan(grid[i, j]) else min(grid[i, j], d)
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(cols)), max(3, 0.3 * len(sens.paths))))
  im = ax.imshow(np.log10(np.maximum(grid, 1e-4)), aspect="auto", cmap="magma_r")
  ax.set_xticks(range(len(cols)), [f"{s:g}/{b}b" for s, b in cols], rotation=90, fontsize=7)
  ax.set_yticks(range(len(sens.paths)), sens.paths, fontsize=7)
  ax.set_xlabel("sparsity / weight bits")
  fig.colorbar(im, ax=ax, label="log10 held-out loss increase")
  ax.set_title("per-layer sensitivity (that layer alone compressed)")
  _save(fig, path)


def plot_accuracy_vs_size(results: dict, path: str) -> None:
  """Accuracy against artifact bytes: the plan, the uniform recipe, the original float32."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, marker in (("compressed", "auto plan", "*"), ("uniform", "uniform", "o")):
    row = results.get(key)
    if row and row.get("size_bytes"):
      ax.scatter([row["size_bytes"]], [row["accuracy"]], marker=marker, s=90, label=label)
  orig = results.get("original", {})
  if orig.get("size_bytes"):
    ax.scatter([orig["size_bytes"]], [orig["accuracy"]], marker="s", s=60, label="float32")
  if results["budget"]["kind"] == "size":
    ax.axvline(results["budget"]["limit"], ls="--", c="gray", label="budget")
  ax.set_xscale("log")
  ax.set_xlabel("artifact bytes on disk")
  ax.set_ylabel("test accuracy %")
  ax.legend()
  _save(fig, path)


def plan_table(plan: list[dict]) -> str:
  """The plan, one row per layer."""
  rows = [(f"`{l['path']}`", f"{l['sparsity']:.2f}", l["weight_bits"], l["act_bits"],
           f"{l['bytes']:,}", f"{l['bops']:,}", f"{l['damage']:.4f}") for l in plan]
  return tables.markdown_table(("layer", "sparsity", "weight bits", "input bits", "bytes",
                                "BOPs", "predicted damage"), rows, align="lrrrrrr")


def results_table(results: dict) -> str:
  """Auto against uniform at the same budget (and the original)."""
  rows = []
  for key, label in (("original", "original (float32 parameters, not a file)"),
                     ("compressed", "auto plan"),
                     ("uniform", "uniform recipe")):
    r = results.get(key)
    if not r:
      continue
    size = r.get("size_bytes")
    ratio = r.get("compression_ratio") or (1.0 if key == "original" else None)
    rows.append((label, f"{r['accuracy']:.2f}", "-" if size is None else f"{size:,}",
                 "-" if ratio is None else f"{ratio:.1f}x",
                 f"{r['bops']:,}" if r.get("bops") else "-"))
  return tables.markdown_table(("model", "accuracy %", "bytes on disk", "ratio", "BOPs"), rows,
                               align="lrrrr")


def candidates_table(results: dict) -> str:
  """Every candidate plan and the uniform recipe, measured whole before fine-tuning."""
  rows = [(f"{name}{' (chosen)' if name == results.get('chosen') else ''}",
           f"{c['predicted_size_bytes']:,}", f"{c['predicted_damage']:.4f}",
           f"{c['one_shot']['damage']:.4f}", f"{c['one_shot']['accuracy']:.2f}")
          for name, c in results.get("candidates", {}).items()]
  u = results.get("one_shot", {}).get("uniform")
  if u:
    rows.append(("uniform recipe", "-", "-", f"{u['damage']:.4f}", f"{u['accuracy']:.2f}"))
  return tables.markdown_table(("candidate", "predicted bytes", "predicted damage",
                                "whole-plan damage", "held-out accuracy %"), rows,
                               align="lrrrr")


def _hessian_lines(h: dict | None) -> list[str]:
  if not h:
    return []
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  return ["", f"Hessian-trace proxy ({h['samples']} Hutchinson vectors per batch, "
          f"{h['seconds']:.0f} s) against the measured damage: Spearman "
          f"{fmt(h['spearman_options'])} over every option of every layer, median "
          f"{fmt(h['spearman_layers'])} over the layers' ranking in each of {h['columns']} "
          "(sparsity, bits) columns."]


def _bytes_text(results: dict) -> str:
  """The plan's predicted bytes and how they relate to the budget (``budget.sizing``)."""
  p, c = results["predicted"], results.get("compressed") or {}
  if results["budget"]["kind"] != "size":
    return (f"{p['size_bytes']:,} bytes of weight codes at fixed widths (under a compute budget "
            "the artifact's other bytes, its scales, biases and spec, are not planned)")
  if p.get("sizing") != "coded":
    return (f"at most {p['size_bytes']:,} bytes (codes at fixed widths; the export Huffman-codes "
            "them where that is smaller)")
  zeroed = c.get("zeroed_to_fit")
  return (f"{p['size_bytes']:,} bytes with codes at fixed widths, sized for {p['sized_for']:,} "
          "so that the export's Huffman coding brings them within the budget (estimated on the "
          "pretrained weights; the export zeroes the smallest weights should the trained ones "
          "take more" + ("" if zeroed is None else f": {zeroed:,} zeroed") + ")")


def write_report(workdir: str, results: dict, sens) -> None:
  """``report.md`` and the two plots."""
  plot_sensitivity(sens, os.path.join(workdir, "sensitivity.png"))
  plot_accuracy_vs_size(results, os.path.join(workdir, "accuracy_vs_size.png"))
  b, p, s = results["budget"], results["predicted"], results["sensitivity"]
  limit = f"{int(b['limit']):,} bytes" if b["kind"] == "size" else f"{int(b['limit']):,} BOPs"
  uni = results.get("uniform")
  lines = [
      "# Compression to a budget", "",
      f"Budget: {limit} per artifact (device `{b['device']}`: {b['hardware']}).", "",
      results_table(results), "",
      f"Predicted by the plan: {_bytes_text(results)}, {p['bops']:,} BOPs per "
      f"example, summed damage {p['damage']:.4f} " + (
          f"(optimality gap {p['optimality_gap']:.4g})." if p["optimality_gap"] is not None else
          f"(one global threshold on {THRESHOLDS[results['chosen']]}, the bits allocated "
          "exactly for it)."),
  ]
  if "uniform" in results and not uni:
    lines += ["", "Uniform recipe: no single sparsity and weight bit width reaches this budget."]
  if uni:
    lines += ["", f"Uniform recipe: {uni['recipe']}."]
  if results["compressed"] is None:
    lines += ["", "The plan was found, not fine-tuned (`uniform.only`)."]
  lines += [
      "", f"Sensitivity: {s['evaluations']} evaluations of {s['examples']} held-out training "
      f"examples ({'every pair' if s['joint'] else 'pruning and quantization apart'}), "
      f"{s['compiles']} compilation(s), {s['seconds']:.0f} s; float loss {s['base_loss']:.4f}, "
      f"accuracy {100 * s['base_accuracy']:.2f} %.", *_hessian_lines(s.get("hessian")), "",
      "## Candidates", "", "Measured whole on the held-out slice, before fine-tuning (damage: the "
      "held-out loss over the float model's; `isolated`: allocated over single-layer damages; "
      "`global`, `lamp`, `kernel`: bits allocated at one global threshold on magnitude, LAMP "
      "scores or whole kernels' L2 norms; "
      "`context<r>`: over damages measured around the uniform recipe or the previous round's "
      "plan).", "", candidates_table(results), "",
      "## Plan", "", plan_table(results["plan"]), "",
      "![sensitivity](sensitivity.png)", "", "![accuracy vs size](accuracy_vs_size.png)", ""]
  write_text(os.path.join(workdir, "report.md"), "\n".join(lines))


def plot_pareto(sweep: dict, path: str) -> None:
  """Accuracy against artifact bytes over a sweep: the auto plans' curve and the uniform one's."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, marker in (("compressed", "auto plan", "*-"), ("uniform", "uniform", "o--")):
    pts = sorted((p[key]["size_bytes"], p[key]["accuracy"]) for p in sweep["points"]
                 if p.get(key) and p[key].get("size_bytes"))
    if pts:
      ax.plot(*zip(*pts), marker[0], ls=marker[1:], ms=9 if marker[0] == "*" else 6, label=label)
  orig = sweep.get("original", {})
  if orig.get("accuracy") is not None:
    ax.axhline(orig["accuracy"], ls=":", c="gray", label="float32")
  ax.set_xscale("log")
  ax.set_xlabel("artifact bytes on disk")
  ax.set_ylabel("test accuracy %")
  ax.set_title("auto plan against uniform recipe, one scan, several budgets")
  ax.legend()
  _save(fig, path)


def sweep_table(sweep: dict) -> str:
  """One row per budget: both plans' accuracy and bytes, and the difference."""
  rows = []
  for p in sweep["points"]:
    a, u = p["compressed"], p.get("uniform")  # a: None under uniform.only
    rows.append((f"{p['ratio']:g}x", f"{int(p['limit']):,}",
                 "-" if not a else f"{a['accuracy']:.2f}", "-" if not a else f"{a['size_bytes']:,}",
                 "-" if not u else f"{u['accuracy']:.2f}",
                 "-" if not u else f"{u['size_bytes']:,}",
                 "-" if not (a and u) else f"{a['accuracy'] - u['accuracy']:+.2f}"))
  return tables.markdown_table(("budget", "limit bytes", "auto %", "auto bytes", "uniform %",
                                "uniform bytes", "auto - uniform (points)"), rows, align="lrrrrrr")


def write_sweep_report(workdir: str, sweep: dict) -> None:
  """``sweep.md`` (the table, links to each point's report) and ``pareto.png``."""
  plot_pareto(sweep, os.path.join(workdir, "pareto.png"))
  links = [f"- [{p['ratio']:g}x](ratio{p['ratio']:g}/report.md)" for p in sweep["points"]]
  lines = ["# Budget sweep", "", sweep_table(sweep), "", *links, "", "![pareto](pareto.png)", ""]
  write_text(os.path.join(workdir, "sweep.md"), "\n".join(lines))
