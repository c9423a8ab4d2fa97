"""Export round trip on real data: prune + quantize a pretrained ResNet (no fine-tuning), export,
reload, and compare the artifact with the fake-quant model on the CIFAR-10 test split.

  python -m experiments.export_check --workdir=runs/export_check
  python -m experiments.export_check --workdir=runs/export_check --sparsity=0.8 --weight_bits=4 \
      --act_bits=8 --calibration_images=512

Steps: layer-wise magnitude pruning of every kernel but the first conv and the classifier
(``jaxcompress.pruning.magnitude_masks``); post-training quantization with the quantization
package's default rules (first and last layer 8/8 bits, the rest ``--weight_bits`` per-channel
symmetric weights and ``--act_bits`` inputs), input ranges calibrated (min-max) on training images;
``export_model`` to ``WORKDIR/export`` (BatchNorms that follow a conv, found by tracing the forward,
folded) and ``save_serving`` to ``WORKDIR/serving``; then the float
pruned model, the fake-quant model, the loaded artifact and the serving function are evaluated on
the test split. Prints the per-layer size table and, last, one JSON line with bytes on disk, the
ratio to float32, accuracies and the prediction agreement of artifact vs fake-quant model.
"""

import os
import time

import numpy as np
from absl import flags

from experiments import cli
from jaxcompress.errors import check_range, invalid
from jaxcompress.metrics import prediction_agreement

CIFAR10_TRAIN = 50_000  # images in the CIFAR-10 training split, the calibration source
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for export/ and serving/.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", "resnet20_cifar10",
                               "PyTorch-layout .npz of the model.")
_MODEL = flags.DEFINE_string("model", "resnet20", "Model name.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "Layer-wise unstructured magnitude sparsity.")
_WBITS = flags.DEFINE_integer("weight_bits", 4, "Weight bits of the inner layers.")
_ABITS = flags.DEFINE_integer("act_bits", 8, "Input bits of the inner layers.")
_CALIB = flags.DEFINE_integer("calibration_images", 512, "Training images for input ranges.")


def check_flags(*, model: str, sparsity: float, weight_bits: int, act_bits: int,
                calibration_images: int) -> None:
  """Refuses flag values the round trip cannot run with, before any weights or data are loaded.

  Args:
    model, sparsity, weight_bits, act_bits, calibration_images: the values of the flags of
      the same names.

  Raises:
    ConfigError: naming the flag, for a model the registry does not know, a sparsity outside
      [0, 1), bits outside the quantization package's range or a calibration count outside
      1..50000 (the CIFAR-10 training split).
  """
  from jaxcompress.models import get_model
  from jaxcompress.quantization.qparams import check_bits
  get_model(model, field="--model")
  check_range("--sparsity", sparsity, 0.0, 1.0)
  check_bits(weight_bits, "--weight_bits")
  check_bits(act_bits, "--act_bits")
  if calibration_images < 1:
    raise invalid("--calibration_images", calibration_images, ">= 1")
  if calibration_images > CIFAR10_TRAIN:
    raise invalid("--calibration_images", calibration_images, f"<= {CIFAR10_TRAIN}",
                  "the CIFAR-10 training split has that many images")


def main(argv):
  del argv
  check_flags(model=_MODEL.value, sparsity=_SPARSITY.value, weight_bits=_WBITS.value,
              act_bits=_ABITS.value, calibration_images=_CALIB.value)
  from configs import common
  from jaxcompress import data as data_lib
  from jaxcompress import export
  from jaxcompress.models.batchnorm import fold_arrays
  from jaxcompress.data import Batch, DataSpec
  from jaxcompress.models import create_model
  from jaxcompress.models.functional import fold_hook
  from jaxcompress.pruning import apply_masks, magnitude_masks
  from jaxcompress.quantization import calibrate, default_rules, quantize
  from jaxcompress.selection import trace_layers
  from jaxcompress.steps import evaluate, make_eval_step
  from jaxcompress.train import evaluate_split

  mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD
  model, variables = create_model(_MODEL.value, num_classes=10, image_shape=(32, 32, 3),
                                  weights=_WEIGHTS.value, name_field="--model",
                                  weights_field="--weights")
  # Every kernel but the first conv's and the classifier's (the docstring's recipe).
  rules = [("conv1/kernel", False), ("linear/kernel", False), (".*/kernel", True), (".*", False)]
  masks = magnitude_masks(variables["params"], _SPARSITY.value, rules=rules)
  pruned = {**variables, "params": apply_masks(variables["params"], masks)}
  train_x, _ = data_lib.load_split("cifar10", f"train[:{_CALIB.value}]")
  calib = [data_lib.normalize(train_x[i:i + 128], mean, std) for i in range(0, len(train_x), 128)]
  qz = quantize(model, default_rules(_WBITS.value, _ABITS.value))
  qstate = calibrate(qz, pruned, qz.init(pruned, calib[0]), calib, method="minmax")
  specs = qz.specs(pruned, qstate)
  fold = trace_layers(model, pruned, calib[0]).batchnorms

  t0 = time.perf_counter()
  out = os.path.join(_WORKDIR.value, "export")
  report = export.export_model(out, model_name=_MODEL.value, variables=pruned, masks=masks,
                               specs=specs, fold=fold, input_shape=(32, 32, 3))
  loaded = export.load(out, model)
  export.save_serving(os.path.join(_WORKDIR.value, "serving"), loaded, mean=mean, std=std)
  serve = export.load_serving(os.path.join(_WORKDIR.value, "serving"))
  export_s = time.perf_counter() - t0

  test_x, test_y = data_lib.load_split("cifar10", "test")
  data = DataSpec(name="cifar10", eval_batch_size=500, mean=mean, std=std)
  # Variables and quantization state are inputs of the compiled functions, as in an eval step;
  # the fake-quant model runs its BatchNorms in the folded form the artifact stores.
  gains = fold_arrays(pruned["params"], pruned["batch_stats"], fold)
  fns = {
      "pruned_float": (lambda v, x: model.apply(v, x, train=False), pruned),
      "fake_quant": (lambda v, x: qz.apply(v[0], v[1], x, hook=fold_hook(v[2]))[0],
                     (pruned, qstate, gains)),
      "artifact": (loaded.apply_fn, loaded.arrays),
  }
  metrics = {name: evaluate_split(make_eval_step(fn), v, (test_x, test_y), data, desc=name,
                                  predictions=True) for name, (fn, v) in fns.items()}
  # The serving function takes the uint8 images and normalises them itself.
  raw = (Batch(test_x[i:i + 500], test_y[i:i + 500], np.ones(len(test_y[i:i + 500]), np.float32))
         for i in range(0, len(test_x), 500))
  metrics["serving"] = evaluate(make_eval_step(lambda _, x: serve(x)), None, raw,
                                num_classes=data.num_classes, desc="serving", predictions=True)
  acc = {k: round(m["accuracy"], 2) for k, m in metrics.items()}
  preds = {k: np.asarray(m["predictions"]) for k, m in metrics.items()}
  print(export.format_report(report))
  cli.print_json({
      "model": _MODEL.value, "sparsity": _SPARSITY.value, "weight_bits": _WBITS.value,
      "act_bits": _ABITS.value, "size_bytes": report["total_bytes"],
      "float32_bytes": report["float32_bytes"], "ratio": report["ratio"],
      "spec_bytes": report["spec_bytes"], "arrays_bytes": report["arrays_bytes"],
      "accuracy": acc,
      "agreement_artifact_vs_fake_quant": prediction_agreement(preds["artifact"],
                                                               preds["fake_quant"]),
      "agreement_serving_vs_artifact": prediction_agreement(preds["serving"], preds["artifact"]),
      "export_seconds": round(export_s, 2)})


if __name__ == "__main__":
  cli.run(main)
