"""The main job's human-readable output: ``report.md`` and PNG plots, each written under a
temporary name and renamed (a crash never leaves half a file)."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from jaxcompress import datasets  # noqa: E402
from jaxcompress import tables  # noqa: E402
from jaxcompress.checkpoint import write_file, write_text  # noqa: E402

ROWS = (("teacher", "teacher"), ("original", "original student"),
        ("before_finetune", "compressed, before fine-tuning"),
        ("compressed", "compressed, fine-tuned"))
MARKERS = {"teacher": "s", "original": "o", "before_finetune": "v", "compressed": "*"}


def _fmt(value: Any, spec: str = "") -> str:
  return "-" if value is None else format(value, spec)


def _rows(results: dict) -> list[tuple[str, str, dict]]:
  """``(key, label, row)`` for every row of ``results`` that has an accuracy, in report order."""
  return [(key, label, results[key]) for key, label in ROWS
          if (results.get(key) or {}).get("accuracy") is not None]


def _ratio(r: float) -> str:
  """``16.8x``; two significant digits below 1 (a teacher many times the student: ``0.034x``)."""
  one = f"{r:.1f}"  # decided on the rounded text: 0.95 is 0.9499... in binary
  return f"{one}x" if float(one) >= 1.0 else f"{r:.2g}x"


def markdown_table(results: dict) -> str:
  """One row per model: accuracy, size (:func:`model_sizes`), ratio to the original, sparsity,
  bits; where a row holds ``val`` (``data.val_examples > 0``), a column of the held-out slice's
  accuracy follows the test accuracy."""
  size0 = results["original"].get("size_bytes")
  sizes = model_sizes(results)
  val = any("val" in row for _, _, row in _rows(results))
  rows = []
  for key, label, row in _rows(results):
    size = sizes.get(key)
    held_out = (_fmt((row.get("val") or {}).get("accuracy"), ".2f"),) if val else ()
    rows.append((f"{label} ({row.get('model', '')})", f"{row['accuracy']:.2f}", *held_out,
                 _fmt(size, ","), _ratio(size0 / size) if size and size0 else "-",
                 _fmt(row.get("sparsity"), ".3f"), _fmt(row.get("weight_bits")),
                 _fmt(row.get("act_bits"))))
  header = ("model", "accuracy %", *(("val accuracy %",) if val else ()), "size (bytes)", "ratio",
            "sparsity", "weight bits", "act bits")
  return tables.markdown_table(header, rows, align="l" + "r" * (len(header) - 1))


def per_class_table(results: dict, label_names: Sequence[str] | None = None) -> str:
  """Per-class precision / recall: one line per class, named by ``label_names``, one column per
  model.

  Args:
    results: the ``results.json`` dict; each row holds ``precision`` and ``recall`` lists.
    label_names: the dataset's label names (``DatasetSpec.label_names``); class ``i`` is shown
      as ``label_names[i]``, or as ``i`` where there are no names.

  Returns:
    A markdown table whose cells read ``precision / recall``.
  """
  rows = [(label, row) for _, label, row in _rows(results) if row.get("recall") is not None]
  if not rows:
    return ""
  classes = len(rows[0][1]["recall"])
  names = list(label_names or [])
  if len(names) != classes:
    names = [str(i) for i in range(classes)]
  body = []
  for i, name in enumerate(names):
    cells = []
    for _, row in rows:
      p = (row.get("precision") or [None] * classes)[i]
      cells.append(f"{_fmt(p, '.3f')} / {_fmt(row['recall'][i], '.3f')}")
    body.append((name, *cells))
  return tables.markdown_table(("class", *(label for label, _ in rows)), body,
                               align="l" + "r" * len(rows))


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
  """Epochs and values of ``key`` over the records that have both (a resumed run may add keys);
  a value logged as ``null`` (not finite, e.g. the loss of skipped steps) is a gap (nan)."""
  have = [m for m in records if key in m and "epoch" in m]
  return [m["epoch"] for m in have], [math.nan if m[key] is None else scale * m[key]
                                      for m in have]


def plot_curves(metrics: list[dict], path: str) -> None:
  """Training curves: loss terms, train accuracy and sparsity against epochs.

  Each curve is drawn over the records that hold its key, so a log whose records differ in keys
  (a run resumed with another recipe) still plots.
  """
  train = [m for m in metrics if "loss" in m]
  if not train:
    return
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for key in ("loss", "task_loss", "kd_loss", "feature_loss"):
    epochs, values = _series(train, key)
    if values:
      axes[0].plot(epochs, values, label=key)
  axes[0].set(xlabel="epoch", ylabel="loss", title="losses")
  axes[0].legend()
  for key, label in (("accuracy", "train batch accuracy"),
                     ("teacher_agreement", "agrees w/ teacher")):
    epochs, values = _series(train, key, 100)
    if values:
      axes[1].plot(epochs, values, label=label)
  epochs, values = _series(metrics, "eval_accuracy")
  if values:
    axes[1].plot(epochs, values, "o-", label="test accuracy")
  axes[1].set(xlabel="epoch", ylabel="%", title="accuracy")
  axes[1].legend()
  epochs, values = _series(train, "sparsity")
  if values:
    axes[2].plot(epochs, values)
  axes[2].set(xlabel="epoch", ylabel="fraction of pruned weights", title="sparsity")
  fig.tight_layout()
  _save(fig, path, dpi=100)


def _save(fig, path: str, **kwargs) -> None:
  """Saves ``fig`` as a PNG at ``path`` (temporary name, then renamed) and closes it."""
  try:
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))
  finally:
    plt.close(fig)


def model_sizes(results: dict) -> dict[str, float]:
  """Bytes of each row that has a known size, for the accuracy-vs-size plot.

  Teacher and original student: their float32 parameters. The fine-tuned model: its exported
  artifact. The one-shot compressed model (before fine-tuning) has the same final sparsity and bit
  widths as the fine-tuned one, so it takes the artifact's size too; without an export neither
  compressed model has a known size and both are left out.
  """
  sizes = {key: row["size_bytes"] for key, _, row in _rows(results) if row.get("size_bytes")}
  if "compressed" in sizes and "before_finetune" not in sizes and results.get("before_finetune"):
    sizes["before_finetune"] = sizes["compressed"]
  return sizes


def plot_accuracy_vs_size(results: dict, path: str) -> None:
  """Accuracy against model bytes (log scale), one marker per model, named in a legend."""
  sizes = model_sizes(results)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  points = {}
  for i, (key, label, row) in enumerate(_rows(results)):
    if key not in sizes:
      continue
    x, y = sizes[key] / 1024, row["accuracy"]
    points[key] = (x, y)
    ax.scatter(x, y, s=90 if key == "compressed" else 55, marker=MARKERS.get(key, "o"),
               color=f"C{i}", zorder=3,
               label=f"{label} ({row.get('model', '')}): {x:,.1f} KiB, {y:.2f} %")
  if "before_finetune" in points and "compressed" in points and all(
      math.isfinite(points[k][1]) for k in ("before_finetune", "compressed")):
    ax.annotate("", xy=points["compressed"], xytext=points["before_finetune"],
                arrowprops=dict(arrowstyle="->", color="0.5", shrinkA=6, shrinkB=8), zorder=2)
  missing = [label for key, label, _ in _rows(results) if key not in sizes]
  if missing:
    ax.text(0.01, 0.01, "no size (not exported): " + ", ".join(missing), fontsize=7,
            color="0.4", transform=ax.transAxes)
  if points:
    xs = [x for x, _ in points.values()]
    ys = [y for _, y in points.values() if math.isfinite(y)] or [0.0]
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    pad = max(1.0, 0.15 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, frameon=False)
  ax.set(xscale="log", xlabel="model size (KiB, log scale)", ylabel="test accuracy (%)",
         title="accuracy vs size")
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  _save(fig, path, dpi=100, bbox_inches="tight")


def _duration(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def write_report(workdir: str, config, results: dict, metrics: list[dict]) -> None:
  """Writes ``report.md``, ``curves.png`` and ``accuracy_vs_size.png`` into ``workdir``."""
  plot_curves(metrics, os.path.join(workdir, "curves.png"))
  plot_accuracy_vs_size(results, os.path.join(workdir, "accuracy_vs_size.png"))
  c, p, q, d = results["compressed"], config.prune, config.quant, config.distill
  # The sparsity reached (N:M prunes 1 - n/m whatever prune.sparsity says; rules may select
  # fewer weights), not the one asked for.
  pruned = (f"{p.method} {p.structure} pruning to {c['sparsity']:.0%} ({p.schedule}, "
            f"{p.scope})" if p.method != "none" and p.sparsity > 0 else "no pruning")
  quant = (f"weights {q.weight_bits or 32}-bit, activations {q.act_bits or 32}-bit ({q.method})"
           if q.weight_bits or q.act_bits else "no quantization")
  if q.get("layer_bits"):  # a per-layer plan: the widths its layers take
    widths = sorted({int(w) for _, w, _ in q.layer_bits})
    quant = (f"weights {'/'.join(map(str, widths))}-bit by layer (quant.layer_bits), "
             f"activations {q.act_bits or 32}-bit ({q.method})")
  # The teacher teaches through the KD term, the hints, or both (distill.uses_teacher).
  hints = (f"hints at {len(d.feature_pairs)} layer pair(s), weight {d.feature_weight}"
           if d.feature_weight > 0 else "")
  if d.alpha > 0:
    teach = (f"KD from {config.teacher.name} (T={d.temperature}, alpha={d.alpha}"
             f"{'; ' + hints if hints else ''})")
  else:
    teach = f"feature distillation from {config.teacher.name} ({hints})" if hints else "no teacher"
  size = (f"Compression ratio (float32 params / artifact bytes on disk): "
          f"{_ratio(c['compression_ratio'])}; the exported artifact scores "
          f"{c['exported_accuracy']:.2f} % and agrees with the fake-quant model on "
          f"{100 * c['export_agreement']:.2f} % of the test images."
          if c.get("compression_ratio") else "Not exported (export.enabled is False).")
  if c.get("zeroed_to_fit"):  # the artifact is not the model the table's other numbers describe
    size += (f" To fit export.max_bytes, the export zeroed {c['zeroed_to_fit']:,} more of the "
             "smallest kept weights: the table's accuracy and sparsity are the fine-tuned "
             "model's, its size the artifact's.")
  trained = [f"`{p['weights']}` ({p['model']}, {p['epochs']:g} "
             f"epoch{'' if p['epochs'] == 1 else 's'} from scratch, "
             f"{p['accuracy']:.2f} % on {config.data.eval_split})"
             for p in results.get("pretrained", [])]
  lines = [
      f"# Compression report: {config.student.name} on {config.data.name}",
      "",
      *([f"Weights trained by this run's pretrain stage (not found in the weights folder): "
         f"{'; '.join(trained)}.", ""] if trained else []),
      f"{pruned.capitalize()}; {quant}; {teach}; {results['train']['epochs']:.2f} epochs in "
      f"{_duration(results['train']['seconds'])} of training.",
      "",
      markdown_table(results),
      "",
      *([f"Val accuracy: on the last {config.data.val_examples:,} training examples, held out "
         "of training (data.val_examples); the other accuracies are on "
         f"{config.data.eval_split}.", ""] if any("val" in row for _, _, row in _rows(results))
        else []),
      size,
      "",
      f"Per-class precision / recall on {config.data.name} {config.data.eval_split}:",
      "",
      per_class_table(results, datasets.dataset_spec(config.data.name).label_names),
      "",
      "![training curves](curves.png)",
      "",
      "![accuracy vs size](accuracy_vs_size.png)",
      "",
  ]
  write_text(os.path.join(workdir, "report.md"), "\n".join(lines))
