"""One-shot magnitude pruning, no fine-tuning: test accuracy at each sparsity and scope.

  python -m experiments.prune_sensitivity \
      --config=configs/prune_sensitivity.py

Prints a markdown table, then one JSON line (dense and per-point accuracy, loss, achieved
sparsity, seconds).
"""

from experiments import cli

CONFIG = cli.define_flags("configs/prune_sensitivity.py", workdir=False)


def main(argv):
  del argv
  from experiments.sensitivity import one_shot_sensitivity, one_shot_table
  result = one_shot_sensitivity(CONFIG.value)
  print(one_shot_table(result), flush=True)
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
