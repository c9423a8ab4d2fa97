"""Compress the pretrained ResNet-20, fine-tune it with a ResNet-56 teacher, evaluate, export.

Default (GPU; 30 epochs): 80 % gradual magnitude pruning, 4-bit per-channel weights, 8-bit
activations (first conv and last dense at 8 bits), Hinton KD at T=4 from ResNet-56. Measured on
one NVIDIA H200: 91.67 % at 18.5x (58,251 bytes on disk with fixed-width codes, before the
export Huffman-coded them), docs/results.md.

  python -m experiments.cifar_distill --config=configs/cifar_distill.py --workdir=runs/distill

Quick (2 CPU cores; 2 epochs, global magnitude pruning, the original ResNet-20 as its own teacher
with logits KD plus a hint at every block's output):

  python -m experiments.cifar_distill --config=configs/cifar_distill.py:quick --workdir=runs/quick

Why that teacher: ResNet-20's forward costs about a third of ResNet-56's, so the same CPU time buys
2 epochs instead of 1.5, and, having the same architecture, it gives feature hints at all 9 blocks
without adapters. Measured (docs/results.md has the commands, docs/distillation.md the
ablations): 90.72 % after fine-tuning at 20.3x (53,228 bytes on disk; 2-core AMD EPYC VM, Zen 5,
6 min 32 s; an earlier version gave 90.83 % in 53,233 bytes), where the ResNet-56 teacher for 1.5
epochs gave 89.71 % in about the same time (6 min 23 s).

Override any field from the command line, e.g. ``--config.prune.sparsity=0.9``.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None for the full run, ``quick`` for the CPU-sized one."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # data order, augmentation, random pruning scores and feature adapters' init

  c.data = common.data_config("cifar10")

  c.weights_dir = ""  # weights looked up by name; "" -> $JAXCOMPRESS_WEIGHTS_DIR, else
  #                     ~/.cache/jaxcompress/weights
  c.teacher = common.model_config("resnet56", "resnet56_cifar10")
  c.student = common.model_config("resnet20", "resnet20_cifar10")
  c.pretrain = common.pretrain_config()

  c.prune = ml_collections.ConfigDict()
  c.prune.method = "magnitude"  # none, magnitude, random, saliency (|w*g|), movement (-w*g sum),
  #                               lamp (layer-adaptive magnitude, with prune.scope=global)
  c.prune.structure = "unstructured"  # unstructured, kernel (whole kh x kw kernels of a conv),
  #                                     nm (N:M), channel (whole output channels)
  c.prune.sparsity = 0.8  # final fraction of pruned weights in the selected kernels
  c.prune.scope = "layer"  # unstructured, kernel: layer (per weight) or global (across weights)
  c.prune.schedule = "gradual"  # gradual (Zhu & Gupta cubic), one_shot, constant
  c.prune.begin = 0.0  # fraction of training where pruning starts
  c.prune.end = 0.5  # fraction of training where the final sparsity is reached (gradual)
  c.prune.update_every = 25  # steps between mask refreshes
  c.prune.n = 2  # N:M: keep n ...
  c.prune.m = 4  # ... of every m consecutive weights
  c.prune.norm = "l1"  # channel, kernel: l1 or l2 norm of each output channel or kernel
  c.prune.rules = ()  # ((regex, True/False), ...) over student param paths; () = every
  #                     layer's weight except the first and last layer in forward order

  c.quant = ml_collections.ConfigDict()
  c.quant.weight_bits = 4  # bits of conv/dense kernels (0: float)
  c.quant.act_bits = 8  # bits of each quantized layer's input (0: float)
  c.quant.first_last_bits = 8  # bits of the first and last layer (0: leave them float)
  c.quant.per_channel = True  # one weight scale per output channel
  c.quant.method = "minmax"  # minmax (ranges from data), lsq (learned steps) or kmeans (codebook)
  c.quant.calibration = "minmax"  # input-range calibration: minmax, ema, percentile, mse
  c.quant.calibration_examples = 512  # training images used to calibrate input ranges
  c.quant.scale_dtype = "float32"  # stored weight scales and folded BatchNorms: float32, or
  #                                  float16 (2 bytes per channel less, exact; docs/export.md)

  c.distill = ml_collections.ConfigDict()
  c.distill.temperature = 4.0  # Hinton KD temperature T (> 0)
  c.distill.alpha = 0.9  # loss = (1 - alpha) * CE + alpha * T^2 KL (0: no teacher)
  c.distill.feature_weight = 0.0  # weight of feature (hint) MSE between the pairs below
  c.distill.feature_pairs = (("layer3_2", "layer3_8"),)  # (student, teacher) module paths

  c.train = common.train_config()
  c.train.epochs = 30.0
  c.train.learning_rate = 0.02  # fine-tuning a pretrained model: smaller than from scratch
  c.train.weight_decay = 1e-4
  c.train.schedule = "cosine"
  c.train.eval_every_epochs = 5

  c.eval = ml_collections.ConfigDict()
  c.eval.teacher = True  # evaluate the teacher too (its row in the report)

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True  # write WORKDIR/export (packed artifact) and WORKDIR/serving
  c.export.serving = True  # also a jax.export StableHLO inference function
  c.export.slim = False  # the serving function skips removed output channels (export.slim)
  c.export.max_bytes = 0  # if > 0, the artifact's bytes on disk at most this: the smallest kept
  #                         weights are zeroed until it fits (export.fit_to_bytes; 0: no cap)

  c.parallel = common.parallel_config()

  if arg == "quick":
    c.teacher = common.model_config("resnet20", "resnet20_cifar10")
    c.pretrain.epochs = 5.0  # only if the weights folder lacks them: about 25 min on 2 CPU cores
    c.distill.feature_weight = 1.0
    c.distill.feature_pairs = tuple((f"layer{s}_{b}",) * 2 for s in (1, 2, 3) for b in range(3))
    c.train.epochs = 2.0
    c.train.eval_every_epochs = 1000  # no mid-run evaluation on CPU
    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = 100
    c.prune.scope = "global"  # at 70-80 % one-shot, global loses far less than layer-wise
    c.prune.end = 0.4
  elif arg:
    raise ValueError(f"configs/cifar_distill.py: unknown variant {arg!r}; valid: quick")
  return c
