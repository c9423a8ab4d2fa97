"""The main job's human-readable output: ``report.md`` and PNG plots."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROWS = (("teacher", "teacher"), ("original", "original student"),
        ("before_finetune", "compressed, before fine-tuning"),
        ("compressed", "compressed, fine-tuned"))


def _fmt(value: Any, spec: str = "") -> str:
  return "-" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
  """One row per model: accuracy, per-class recall, size, sparsity, bits."""
  classes = len(results["original"]["recall"])
  head = ("| model | accuracy % | size (bytes) | ratio | sparsity | weight bits | act bits | "
          + " | ".join(f"recall {i}" for i in range(classes)) + " |")
  lines = [head, "|" + "---|" * (7 + classes)]
  size0 = results["original"].get("size_bytes")
  for key, label in ROWS:
    row = results.get(key) or {}
    if row.get("accuracy") is None:
      continue
    size = row.get("size_bytes")
    ratio = f"{size0 / size:.1f}x" if size and size0 else "-"
    recall = " | ".join(f"{r:.3f}" for r in row.get("recall", [None] * classes))
    lines.append(f"| {label} ({row.get('model', '')}) | {row['accuracy']:.2f} | "
                 f"{_fmt(size, ',')} | {ratio} | {_fmt(row.get('sparsity'), '.3f')} | "
                 f"{_fmt(row.get('weight_bits'))} | {_fmt(row.get('act_bits'))} | {recall} |")
  return "\n".join(lines)


def plot_curves(metrics: list[dict], path: str) -> None:
  """Training curves: loss terms, train accuracy and sparsity against epochs."""
  train = [m for m in metrics if "loss" in m]
  if not train:
    return
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  epochs = [m["epoch"] for m in train]
  for key in ("loss", "task_loss", "kd_loss", "feature_loss"):
    if key in train[0]:
      axes[0].plot(epochs, [m[key] for m in train], label=key)
  axes[0].set(xlabel="epoch", ylabel="loss", title="losses")
  axes[0].legend()
  axes[1].plot(epochs, [100 * m["accuracy"] for m in train], label="train batch accuracy")
  if "teacher_agreement" in train[0]:
    axes[1].plot(epochs, [100 * m["teacher_agreement"] for m in train], label="agrees w/ teacher")
  evals = [m for m in metrics if "eval_accuracy" in m]
  if evals:
    axes[1].plot([m["epoch"] for m in evals if "epoch" in m],
                 [m["eval_accuracy"] for m in evals if "epoch" in m], "o-", label="test accuracy")
  axes[1].set(xlabel="epoch", ylabel="%", title="accuracy")
  axes[1].legend()
  if "sparsity" in train[0]:
    axes[2].plot(epochs, [m["sparsity"] for m in train])
  axes[2].set(xlabel="epoch", ylabel="fraction of pruned weights", title="sparsity")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_accuracy_vs_size(results: dict, path: str) -> None:
  """Accuracy against model bytes, one point per row that has both."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in ROWS:
    row = results.get(key) or {}
    size = row.get("size_bytes") or (results["original"]["size_bytes"]
                                     if key == "before_finetune" else None)
    if row.get("accuracy") is None or not size:
      continue
    ax.scatter(size / 1024, row["accuracy"], s=40)
    ax.annotate(label, (size / 1024, row["accuracy"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set(xscale="log", xlabel="model size (KiB, log scale)", ylabel="test accuracy (%)",
         title="accuracy vs size")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(workdir: str, config, results: dict, metrics: list[dict]) -> None:
  """Writes ``report.md``, ``curves.png`` and ``accuracy_vs_size.png`` into ``workdir``."""
  plot_curves(metrics, os.path.join(workdir, "curves.png"))
  plot_accuracy_vs_size(results, os.path.join(workdir, "accuracy_vs_size.png"))
  c, p, q, d = results["compressed"], config.prune, config.quant, config.distill
  pruned = (f"{p.method} {p.structure} pruning to {p.sparsity:.0%} ({p.schedule}, "
            f"{p.scope})" if p.method != "none" and p.sparsity > 0 else "no pruning")
  quant = (f"weights {q.weight_bits or 32}-bit, activations {q.act_bits or 32}-bit ({q.method})"
           if q.weight_bits or q.act_bits else "no quantization")
  teach = (f"KD from {config.teacher.name} (T={d.temperature}, alpha={d.alpha})"
           if d.alpha > 0 else "no teacher")
  size = (f"Compression ratio (float32 params / artifact bytes on disk): "
          f"{c['compression_ratio']:.1f}x; the exported artifact scores "
          f"{c['exported_accuracy']:.2f} % and agrees with the fake-quant model on "
          f"{100 * c['export_agreement']:.2f} % of the test images."
          if c.get("compression_ratio") else "Not exported (export.enabled is False).")
  lines = [
      f"# Compression report: {config.student.name} on {config.data.name}",
      "",
      f"{pruned.capitalize()}; {quant}; {teach}; {results['train']['epochs']:.2f} epochs in "
      f"{results['train']['seconds'] / 60:.1f} min of training.",
      "",
      markdown_table(results),
      "",
      size,
      "",
      "![training curves](curves.png)",
      "",
      "![accuracy vs size](accuracy_vs_size.png)",
      "",
  ]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines))
