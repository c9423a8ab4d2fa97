"""Compress to a budget: sensitivity scan, per-layer plan, KD fine-tuning, evaluate, export.

  python -m experiments.autocompress --config=configs/autocompress.py:quick --workdir=runs/auto25 \
      --config.budget.ratio=25

Writes WORKDIR/results.json, report.md, sensitivity.png, accuracy_vs_size.png, and the main job's
output for each plan under WORKDIR/auto and WORKDIR/uniform; prints results.json as the last
line. Rerun the same command to resume after an interruption.
"""

from experiments import cli

CONFIG = cli.define_flags("configs/autocompress.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.autocompress_job import train_and_evaluate
  cli.print_json(train_and_evaluate(CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main)
