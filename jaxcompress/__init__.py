"""jaxcompress: model compression as pure JAX/Flax transforms composed into jitted optax steps.

Data flow, one module each (``import jaxcompress.<name>``); the configs (``configs/*.py``,
ml_collections) are validated by these modules:

  datasets      the image datasets known (shapes, label names) and their one-time preparation
  data          TF-free TFDS input pipeline (DataSpec): decode once, crop/flip, deterministic
                batches
  text          character-level text: splits, vocabulary, training and evaluation windows
  models        any Linen/NNX module as pure functions; registry, MODULE:FACTORY names;
                weights from .npz, .msgpack, orbax; CIFAR ResNets, CNNs, MLP
  selection     which layers a model has, from its traced forward; first/last; folded norms
  pruning       scores, masks (unstructured, N:M, channel), schedules, optax wrapper, iterative
  quantization  fake-quant (STE), calibration, LSQ, k-means, rules over unmodified Flax models
  distillation  per-example KD and hint losses
  specs         the typed specs of what to prune, quantize and distill (checked when built)
  compose       one jitted train step for any subset of prune / quantize / distill, for any
                Linen or NNX model; its export
  budget        compress to a byte or BOPs budget: per-layer sensitivity, exact allocation
  steps, optim, parallel, train, checkpoint
                train/eval steps, optimizers (OptimizerSpec), data parallelism, the resumable
                loop (fit with DataSpec and LoopSpec, evaluate_split, load_data)
  metrics       accuracy, per-class precision/recall
  export        finalize, pack, save/load the artifact of any model, jax.export serving
  tables        the Markdown table writer

Jobs that wire these together and write files live in ``experiments/``, not here: the main job
(``pipeline``, ``report``), supervised training (``train_job``), evaluation (``evaluate_job``),
the pruning and PTQ studies (``sensitivity``, ``ptq_eval``), ResNet channel surgery
(``resnet_surgery``) and the benchmarks (``bench_lib``).
"""

from jaxcompress import (compose, data, datasets, distillation, models, pruning, quantization,
                         rules, selection, specs)
from jaxcompress.errors import ConfigError
from jaxcompress.models.functional import Functional, functional, set_variables, variables_of

__version__ = "0.1.0"

__all__ = ["ConfigError", "Functional", "compose", "data", "datasets", "distillation",
           "functional", "models", "pruning", "quantization", "rules", "selection",
           "set_variables", "specs", "variables_of"]
