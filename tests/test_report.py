"""The main job's report: tables named by the dataset's labels, each model at its own size."""

import math
import os

import pytest

from configs import cifar_distill
from conftest import disk_full
from experiments import autocompress_report, report
from jaxcompress.datasets import dataset_spec

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def _row(model, accuracy, base, size=None):
  row = {"model": model, "accuracy": accuracy, "loss": 0.5,
         "precision": [round(base + 0.01 * i, 3) for i in range(10)],
         "recall": [round(base + 0.02 * i, 3) for i in range(10)]}
  if size is not None:
    row["size_bytes"] = size
  return row


def _results(exported=True):
  compressed = {**_row("resnet20", 91.07, 0.70, 64_172 if exported else None), "sparsity": 0.8,
                "weight_bits": 4, "act_bits": 8}
  if exported:
    compressed.update(compression_ratio=16.8, exported_accuracy=91.07, export_agreement=1.0)
  return {
      "teacher": {**_row("resnet56", 93.39, 0.80, 3_412_072)},
      "original": {**_row("resnet20", 91.73, 0.75, 1_078_888), "sparsity": 0.0},
      "before_finetune": {**_row("resnet20", 60.12, 0.40), "sparsity": 0.8, "weight_bits": 4,
                          "act_bits": 8},
      "compressed": compressed,
      "train": {"seconds": 120.0, "epochs": 2.0, "steps": 780},
  }


def _cells(table: str) -> list[list[str]]:
  """The stripped cells of every line of a Markdown table (the rule line included)."""
  return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]


def test_per_class_table_names_classes_by_the_datasets_labels():
  table = report.per_class_table(_results(), dataset_spec("cifar10").label_names)
  cells = _cells(table)
  assert cells[0] == ["class", "teacher", "original student", "compressed, before fine-tuning",
                      "compressed, fine-tuned"]
  assert [c.replace("-", "") for c in cells[1]] == ["", ":", ":", ":", ":"]  # numbers right
  assert [row[0] for row in cells[2:]] == list(CIFAR10)
  # Class 3 (cat): teacher precision 0.80 + 0.03, recall 0.80 + 0.06; fine-tuned 0.73 / 0.76.
  assert cells[2 + 3] == ["cat", "0.830 / 0.860", "0.780 / 0.810", "0.430 / 0.460",
                          "0.730 / 0.760"]


def test_per_class_table_falls_back_to_indices_without_names():
  cells = _cells(report.per_class_table(_results(), None))
  assert [row[0] for row in cells[2:]] == [str(i) for i in range(10)]


def test_markdown_table_one_row_per_model():
  cells = _cells(report.markdown_table(_results()))
  assert cells[0] == ["model", "accuracy %", "size (bytes)", "ratio", "sparsity", "weight bits",
                      "act bits"]
  assert cells[2:] == [
      ["teacher (resnet56)", "93.39", "3,412,072", "0.32x", "-", "-", "-"],
      ["original student (resnet20)", "91.73", "1,078,888", "1.0x", "0.000", "-", "-"],
      ["compressed, before fine-tuning (resnet20)", "60.12", "64,172", "16.8x", "0.800", "4",
       "8"],
      ["compressed, fine-tuned (resnet20)", "91.07", "64,172", "16.8x", "0.800", "4", "8"]]


def test_the_one_shot_model_is_placed_at_the_compressed_size_not_the_float_size():
  sizes = report.model_sizes(_results())
  assert sizes == {"teacher": 3_412_072, "original": 1_078_888, "before_finetune": 64_172,
                   "compressed": 64_172}
  # Not exported: neither compressed model has a size, and neither is drawn at the float size.
  assert report.model_sizes(_results(exported=False)) == {"teacher": 3_412_072,
                                                          "original": 1_078_888}


def test_write_report_uses_the_label_names_and_writes_the_plots(tmp_path):
  config = cifar_distill.get_config("quick")
  report.write_report(str(tmp_path), config, _results(), metrics=[])
  text = open(tmp_path / "report.md").read()
  assert "Per-class precision / recall on cifar10 test" in text
  cells = _cells(text[text.index("| class "):])
  assert cells[2][:2] == ["airplane", "0.800 / 0.800"] and cells[11][0] == "truck"
  assert "recall 0" not in text and [row[0] for row in cells[2:12]] == list(CIFAR10)
  assert ["compressed, before fine-tuning (resnet20)", "60.12", "64,172", "16.8x"] in [
      row[:4] for row in _cells(text[text.index("| model "):])]
  assert os.path.getsize(tmp_path / "accuracy_vs_size.png") > 1000


def test_the_header_gives_the_sparsity_reached_not_the_one_asked_for(tmp_path):
  config = cifar_distill.get_config("quick")
  config.prune.structure, config.prune.n, config.prune.m = "nm", 2, 4  # prunes 1/2, not 0.8
  results = _results()
  results["compressed"]["sparsity"] = results["before_finetune"]["sparsity"] = 0.5
  report.write_report(str(tmp_path), config, results, metrics=[])
  text = open(tmp_path / "report.md").read()
  assert "nm pruning to 50%" in text and "pruning to 80%" not in text


def test_short_runs_capped_exports_and_per_layer_bits_read_right(tmp_path):
  config = cifar_distill.get_config("quick")
  config.quant.layer_bits = (("stem", 8, 8), ("body", 4, 8))
  results = _results()
  results["train"]["seconds"] = 2.33
  results["compressed"]["zeroed_to_fit"] = 293
  report.write_report(str(tmp_path), config, results, metrics=[])
  text = open(tmp_path / "report.md").read()
  assert "epochs in 2.3 s of training" in text  # not "0.0 min"
  assert "weights 4/8-bit by layer (quant.layer_bits)" in text
  assert "the export zeroed 293 more of the smallest kept weights" in text


def test_ratios_are_rounded_once_and_in_order():
  got = [report._ratio(r) for r in (0.034, 0.949, 0.95, 0.951, 1.0, 16.84)]
  assert got == ["0.034x", "0.95x", "0.95x", "1.0x", "1.0x", "16.8x"]


def test_the_header_gives_the_ratio_the_table_gives(tmp_path):
  # A tiny model whose artifact outweighs its float32 parameters: 1,000 / 29,400 = 0.034x.
  results = _results()
  results["original"]["size_bytes"] = 1_000
  results["compressed"].update(size_bytes=29_400, compression_ratio=round(1_000 / 29_400, 3))
  report.write_report(str(tmp_path), cifar_distill.get_config("quick"), results, metrics=[])
  text = open(tmp_path / "report.md").read()
  assert ["compressed, fine-tuned (resnet20)", "91.07", "29,400", "0.034x"] in [
      row[:4] for row in _cells(text[text.index("| model "):])]
  assert "artifact bytes on disk): 0.034x;" in text  # not 0.0x


def test_a_model_without_a_finite_accuracy_or_a_size_still_reports(tmp_path):
  results = {"teacher": {"model": "t", "accuracy": float("nan"), "size_bytes": 4000},
             "original": {"model": "o", "accuracy": 91.0, "size_bytes": 1000}}
  report.plot_accuracy_vs_size(results, str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").stat().st_size > 0
  nan_before = _results()
  nan_before["before_finetune"]["accuracy"] = float("nan")  # no arrow from a NaN point
  report.plot_accuracy_vs_size(nan_before, str(tmp_path / "before.png"))
  assert (tmp_path / "before.png").stat().st_size > 0
  table = autocompress_report.results_table(
      {"original": {"accuracy": 91.0, "size_bytes": 1000, "compression_ratio": None},
       "compressed": {"accuracy": 90.0, "size_bytes": None, "compression_ratio": None}})
  assert [line.split("|")[4].strip() for line in table.splitlines()[2:]] == ["1.0x", "-"]
  # The column is the artifacts' bytes on disk; the original's bytes are its float32 parameters.
  assert "float32 parameters, not a file" in table.splitlines()[2].split("|")[1]


@pytest.mark.parametrize("plot,extra", [(report.plot_accuracy_vs_size, {}),
                                        (autocompress_report.plot_accuracy_vs_size,
                                         {"budget": {"kind": "ratio"}})])
def test_a_plot_on_a_full_disk_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch,
                                                                        plot, extra):
  path = tmp_path / "accuracy_vs_size.png"
  path.write_bytes(b"old plot")
  disk_full(monkeypatch, path)
  with pytest.raises(OSError) as e:
    plot({**_results(), **extra}, str(path))
  assert e.value.errno == 28 and e.value.filename == str(path)  # ENOSPC, naming the file
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["accuracy_vs_size.png"] and path.read_bytes() == b"old plot"


def test_training_curves_follow_each_key_over_the_records_that_have_it(tmp_path, monkeypatch):
  figures = []
  monkeypatch.setattr(report, "_save", lambda fig, path, **kw: figures.append(fig))
  metrics = [{"epoch": 1, "loss": 2.0, "kd_loss": 1.5, "accuracy": 0.4, "teacher_agreement": 0.5},
             {"epoch": 2, "eval_accuracy": 70.0},
             {"epoch": 3, "loss": 1.0, "accuracy": 0.6, "sparsity": 0.5}]  # resumed without KD
  report.plot_curves(metrics, str(tmp_path / "curves.png"))
  losses, accuracy, sparsity = figures[0].axes
  lines = {ax_line.get_label(): (list(ax_line.get_xdata()), list(ax_line.get_ydata()))
           for ax in (losses, accuracy) for ax_line in ax.get_lines()}
  assert lines == {"loss": ([1, 3], [2.0, 1.0]), "kd_loss": ([1], [1.5]),
                   "train batch accuracy": ([1, 3], [40.0, 60.0]),
                   "agrees w/ teacher": ([1], [50.0]), "test accuracy": ([2], [70.0])}
  assert [list(line.get_ydata()) for line in sparsity.get_lines()] == [[0.5]]
  # A window of skipped steps logs its nan loss as null: a gap in the curve.
  report.plot_curves([*metrics, {"epoch": 4, "loss": None, "accuracy": None}], "unused")
  assert math.isnan(figures[1].axes[0].get_lines()[0].get_ydata()[-1])


def test_the_header_names_the_teacher_whenever_it_teaches(tmp_path):
  # With alpha = 0 the teacher still teaches through the hints: the header said "no teacher".
  config = cifar_distill.get_config("quick")  # alpha 0.9, hints at the 9 blocks, weight 1.0
  expected = {
      (0.9, 1.0): "KD from resnet20 (T=4.0, alpha=0.9; hints at 9 layer pair(s), weight 1.0);",
      (0.9, 0.0): "KD from resnet20 (T=4.0, alpha=0.9);",
      (0.0, 1.0): "feature distillation from resnet20 (hints at 9 layer pair(s), weight 1.0);",
      (0.0, 0.0): "no teacher;"}
  for (alpha, feature_weight), header in expected.items():
    config.distill.alpha, config.distill.feature_weight = alpha, feature_weight
    report.write_report(str(tmp_path), config, _results(), metrics=[])
    assert header in open(tmp_path / "report.md").read()


def test_the_held_out_slices_accuracy_is_shown_beside_the_test_accuracy(tmp_path):
  # results.json with data.val_examples > 0: original.val and compressed.val hold the held-out
  # slice's metrics (the teacher and the one-shot model are not evaluated on it).
  config = cifar_distill.get_config("quick")
  config.data.val_examples = 5000
  results = _results()
  results["original"]["val"] = {**_row("resnet20", 92.4567, 0.7), "examples": 5000}
  results["compressed"]["val"] = {**_row("resnet20", 89.9951, 0.7), "examples": 5000}
  report.write_report(str(tmp_path), config, results, metrics=[])
  text = open(tmp_path / "report.md").read()
  cells = _cells(text[text.index("| model "):text.index("\n\n", text.index("| model "))])
  assert cells[0] == ["model", "accuracy %", "val accuracy %", "size (bytes)", "ratio",
                      "sparsity", "weight bits", "act bits"]
  # 92.4567 and 89.9951 to two decimals, by hand: 92.46 and 90.00; no val for the teacher and
  # the one-shot model.
  assert [row[:3] for row in cells[2:]] == [
      ["teacher (resnet56)", "93.39", "-"], ["original student (resnet20)", "91.73", "92.46"],
      ["compressed, before fine-tuning (resnet20)", "60.12", "-"],
      ["compressed, fine-tuned (resnet20)", "91.07", "90.00"]]
  assert ("Val accuracy: on the last 5,000 training examples, held out of training "
          "(data.val_examples); the other accuracies are on test.") in text
  # Without val (data.val_examples=0) neither the column nor the sentence appears.
  report.write_report(str(tmp_path), config, _results(), metrics=[])
  text = open(tmp_path / "report.md").read()
  assert "val accuracy" not in text.lower()
