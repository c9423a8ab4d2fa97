"""Post-training quantization, no training: test accuracy of each quantizer against float.

  python -m experiments.ptq --config=configs/ptq.py

Prints a markdown table (accuracy, change against float, agreement with the float predictions,
weight and input bits, method), then one JSON line (every row, model, dataset, split, seconds).
"""

from experiments import cli

CONFIG = cli.define_flags("configs/ptq.py", workdir=False)


def main(argv):
  del argv
  from experiments.ptq_eval import post_training_quantization, ptq_table
  result = post_training_quantization(CONFIG.value)
  print(ptq_table(result), flush=True)
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
