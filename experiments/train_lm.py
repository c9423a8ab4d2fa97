"""Trains a character-level language model (transformer or LSTM) on Tiny Shakespeare; prints
results.json (loss in nats and bits per character on validation, test and val111k) as one line.

  python -m experiments.train_lm --config=configs/shakespeare.py:quick --workdir=runs/lm_quick

Rerun the same command to resume after an interruption.
"""

from experiments import cli

CONFIG = cli.define_flags("configs/shakespeare.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.lm_train_job import train_and_evaluate
  cli.print_json(train_and_evaluate(CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main)
