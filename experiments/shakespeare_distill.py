"""Compress a character-level transformer and an LSTM on Tiny Shakespeare: 2:4 sparsity, 4-bit
weights, 8-bit inputs, plain and token-level KD fine-tuning, exported artifacts.

  python -m experiments.shakespeare_distill --config=configs/shakespeare_distill.py:quick \
      --workdir=runs/shakespeare_quick

Writes WORKDIR/results.json and report.md (table and samples); prints results.json as the last
line. Rerun the same command to resume after an interruption.
"""

from experiments import cli

CONFIG = cli.define_flags("configs/shakespeare_distill.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.lm_pipeline import train_and_evaluate
  cli.print_json(train_and_evaluate(CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main)
