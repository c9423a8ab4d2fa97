"""Compress to a budget: sensitivity scan, per-layer plan, KD fine-tuning, evaluation, export.

The main job's config (``configs/cifar_distill.py``: data, models, distillation and training
recipe) plus three sections: ``budget`` (what the compressed model must fit), ``scan`` (the
per-layer sensitivity grid) and ``uniform`` (the uniform recipe at the same budget, fine-tuned
identically for comparison). Give exactly one budget: ``size_bytes``, ``ratio`` or ``bops``, or a
``sweep`` of ratios.

Quick (2 CPU cores; 2 epochs per plan, ResNet-20 as its own teacher, as the main job's ``:quick``):

  python -m experiments.autocompress --config=configs/autocompress.py:quick --workdir=runs/auto25 \
      --config.budget.ratio=25

Both plans are fine-tuned on the main job's pruning schedule (``prune.schedule``: gradual over the
first 40 % of the steps in ``:quick``), each weight capped at the bytes of its sized pattern.

Measured (docs/autocompress.md; 2-core AMD EPYC VM; about 20 min for a plan, two at a time,
scan reused): at 25x the plan reached 90.05 % in 42,802 bytes against the uniform recipe's
89.99 % in 42,615 (seed 0), 90.39 % against 90.01 % (seed 1) and 90.29 % against 90.15 %
(seed 2); at 40x 86.98 % in 26,600 against 86.58 % in 26,509 (seed 0), 86.65 % against
86.80 % (seed 1) and 87.27 % against 87.05 % (seed 2). Sized with
fixed-width codes (budget.sizing=fixed; bytes as then exported, before Huffman coding): at 25x
the plan reached 89.55 % in 42,127 bytes against the uniform recipe's 89.34 % in
41,889 (seed 0), 89.65 % against 89.34 % (seed 1), 89.87 % against 89.54 % (seed 2) and
89.69 % against 89.81 % (seed 3); at 40x 85.73 % in 26,166 bytes against 85.93 % in 26,138
(seed 0), 85.70 % against 85.80 % (seed 1), 85.82 % against 85.70 % (seed 2) and 86.12 % against
86.15 % (seed 3).

Full (GPU; 30 epochs per plan, ResNet-56 teacher, every (sparsity, bits) pair measured; on one
NVIDIA H200 the scan took 41 s and, with float32 scales and fixed-width sizing, the 25x plan
reached 90.92 % in 41,821 bytes against the uniform recipe's 90.61 % in 41,759):

  python -m experiments.autocompress --config=configs/autocompress.py --workdir=runs/auto \
      --config.budget.ratio=25
"""

import ml_collections

from configs import cifar_distill


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None for the full run, ``quick`` for the CPU-sized one."""
  if arg not in (None, "quick"):
    raise ValueError(f"configs/autocompress.py: unknown variant {arg!r}; valid: quick")
  c = cifar_distill.get_config(arg)
  c.quant.scale_dtype = "float16"  # scales and folded BatchNorms in 2 bytes: in a ResNet-20
  #                                  budget 2,759 bytes more for weights (docs/autocompress.md)
  c.data.val_examples = 5000  # the held-out slice of data.train_split the scan measures on
  #                             (also left out of fine-tuning); never the evaluation split

  c.budget = ml_collections.ConfigDict()
  c.budget.size_bytes = 0  # artifact bytes on disk at most this (0: not this budget)
  c.budget.ratio = 0.0  # ... or float32 size / ratio (0: not this budget)
  c.budget.bops = 0.0  # ... or BOPs per example (MACs x weight bits x input bits) at most this
  c.budget.sweep = ()  # or ratios, e.g. (15, 25, 40): one budget point each, from one scan
  c.budget.device = "any"  # any, mcu, gpu-sparse, int8-npu (docs/autocompress.md)
  c.budget.sizing = "coded"  # coded: plans sized with the Huffman coding the export applies,
  #                            estimated on the pretrained weights, less budget.coded_margin (size
  #                            budgets; the export zeroes the smallest weights should the trained
  #                            codes still take more, export.max_bytes); fixed: with fixed-width
  #                            codes, a bound the export never exceeds (7-9 % of a ResNet-20
  #                            budget left unused; docs/autocompress.md)
  c.budget.coded_margin = 0.02  # budget.sizing=coded: the fraction left spare of the budget's
  #                               share for the planned weights (all but the fixed part)
  c.budget.sparsity = "auto"  # layer: each layer's sparsity from scan.sparsities, allocated with
  #                             its bits; global: one magnitude threshold for all layers, each
  #                             layer's bits allocated (size budgets, unstructured devices; it
  #                             trained best from 10x to 40x, docs/autocompress.md); lamp: the
  #                             same on LAMP scores; kernel: one threshold on whole conv
  #                             kernels (RMS of each kh x kw window), one shared width for the
  #                             convs, kept kernels stored one bit each; auto: global and lamp
  #                             where allowed (the less damaged whole is trained), else layer
  c.budget.fixed_edges = False  # global-threshold plans: keep the first and last layer dense
  #                               at 8 bits (as the uniform recipe does) instead of planning them
  #                               (3 seeds at 25x and 40x: better in 5 of 6 pairs, 0.53 worse in
  #                               one; as much seed as plan, docs/autocompress.md)
  c.budget.weight_bits = (3, 4, 8)  # weight bit widths plans may use, of scan.weight_bits (empty:
  #                                   all); 2-bit layers lost codes to zero in fine-tuning and
  #                                   trained worse at 25x and 40x (docs/autocompress.md)

  c.scan = ml_collections.ConfigDict()
  c.scan.sparsities = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)  # grid (0 always included)
  c.scan.weight_bits = (2, 3, 4, 8)  # weight bit widths
  c.scan.act_bits = (4, 8)  # input bit widths, searched only under a BOPs budget
  c.scan.batch_size = 500  # held-out examples per evaluation batch
  c.scan.joint = True  # measure every (sparsity, bits) pair; False: sum of the two alone
  c.scan.damage = "kl"  # kl: KL divergence from the float model's predictions; ce: cross-entropy
  c.scan.adapt_norms = True  # evaluate with each held-out batch's own BatchNorm statistics
  c.scan.refine_rounds = 0  # rounds of allocation over damage measured around the uniform recipe,
  #                           then around each new plan; the least whole-plan damage is trained
  #                           (off: one round trained worse at 25x and 40x, docs/autocompress.md)
  c.scan.hessian_samples = 8  # Hutchinson vectors per batch for the Hessian-trace proxy's
  #                             ranking against the scan (reported only; 0: skip)

  c.uniform = ml_collections.ConfigDict()
  c.uniform.enabled = True  # also fine-tune the uniform recipe at the same budget
  c.uniform.only = False  # fine-tune the uniform recipe alone (the plan is found, not trained);
  #                        with a run of uniform.enabled=False in another workdir (its
  #                        scan.json copied here), the two fine-tunings run in parallel

  if arg == "quick":  # ResNet-20: 201 evaluations of 1,000 images, 5.2 min on 2 cores
    c.data.val_examples = 1000
    c.scan.joint = False  # joint (3, 4, 8 bits): 421 evaluations, 9.6 min, a point over 30 min;
    #                       its plans led by 0.24 at 25x, 0.09 at 40x (summed: 0.28, -0.06;
    #                       seeds 0-2, docs/autocompress.md)
    c.scan.sparsities = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
  return c
