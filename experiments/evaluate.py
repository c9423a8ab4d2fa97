"""Evaluates a model; prints one JSON line with accuracy, loss, examples, precision, recall.

  python -m experiments.evaluate --config=configs/evaluate.py \
      --config.model.name=resnet56 --config.model.weights=resnet56_cifar10
"""

import time

from experiments import cli

CONFIG = cli.define_flags("configs/evaluate.py", workdir=False)


def main(argv):
  del argv
  from experiments.evaluate_job import evaluate_config  # after flag parsing: keeps --help fast
  t0 = time.perf_counter()
  result = evaluate_config(CONFIG.value)
  result["seconds"] = round(time.perf_counter() - t0, 2)
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
