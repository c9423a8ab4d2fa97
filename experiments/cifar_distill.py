"""The main job: compress, fine-tune with a teacher, evaluate, export, report.

  python -m experiments.cifar_distill --config=configs/cifar_distill.py:quick --workdir=runs/quick

Writes WORKDIR/results.json, report.md, curves.png, accuracy_vs_size.png, export/ and serving/;
prints results.json as the last line. Rerun the same command to resume after an interruption.
"""

from experiments import cli

CONFIG = cli.define_flags("configs/cifar_distill.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.pipeline import train_and_evaluate
  cli.print_json(train_and_evaluate(CONFIG.value, flags.FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main)
