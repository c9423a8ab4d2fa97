"""Supervised training; writes WORKDIR/results.json (the final evaluation, and the held-out
slice's with data.val_examples > 0) and prints it as one JSON line; a rerun of a finished run
prints it again without training (docs/training.md).

  python -m experiments.train --config=configs/train.py:quick --workdir=runs/train_quick
"""

from experiments import cli

CONFIG = cli.define_flags("configs/train.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.train_job import train_and_evaluate
  cli.print_json(train_and_evaluate(CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main)
