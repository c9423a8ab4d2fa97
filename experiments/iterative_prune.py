"""Iterative pruning: prune -> fine-tune -> validate at rising sparsity, then test the chosen model.

  python -m experiments.iterative_prune \
      --config=configs/iterative_prune.py:quick --workdir=runs/iterative_quick

Writes WORKDIR/results.json (every round); prints a markdown table, then results.json as one
JSON line. Rerun the same command to resume after an interruption.
"""

from experiments import cli

CONFIG = cli.define_flags("configs/iterative_prune.py")


def main(argv):
  del argv
  from absl import flags
  from experiments.sensitivity import iterative_search, iterative_table
  result = iterative_search(CONFIG.value, flags.FLAGS.workdir)
  print(iterative_table(result), flush=True)
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
