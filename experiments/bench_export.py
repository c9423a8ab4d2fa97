"""Inference speed of channel surgery: dense ResNet vs the physically shrunk one, in one process.

  python -m experiments.bench_export                       # pretrained ResNet-20, 50 % inner channels
  python -m experiments.bench_export --eval                # also accuracy on the CIFAR-10 test split
  python -m experiments.bench_export --fraction=0.5 --norm=l1 --rounds=7 --steps=5 --batch_size=128
  python -m experiments.bench_export --eval --finetune_epochs=1   # + accuracy after fine-tuning
  python -m experiments.bench_export --exported=runs/npu/auto/export --eval   # any artifact, slim

With ``--exported`` the artifact in that folder (any model of the registry, named in its spec) is
timed instead, full width against :func:`jaxcompress.export.slim` (every Conv/Dense multiplying
by the output channels it keeps; ``--multiple`` and ``--max_kept`` as there), with the
multiply-accumulates per example of each; ``--eval`` adds both test accuracies on ``--dataset``
(normalised with ``--mean`` and ``--std``, by default :func:`configs.common.normalization`'s
values for the dataset, as the jobs train with; the artifact must take its images) and their
prediction agreement. A flag that the chosen mode does not use, given a value other than its
default, is refused.

The inner channels of every basic block (``conv1`` outputs, ``conv2`` inputs) with the lowest
L1 norm are pruned one-shot (no fine-tuning), then removed physically
(:func:`experiments.resnet_surgery.shrink_channels`). Variants, each a jitted eval-mode forward
pass:

- ``dense``: the original model;
- ``shrunk``: ``get_model(name, inner_widths=...)`` with the surviving channels;
- ``dense_folded``, ``shrunk_folded``: both with BatchNorm folded into the convs, as exported.

They are timed interleaved (round-robin, ``--rounds`` times ``--steps`` batches each, after a
compile-and-warm-up call) so machine noise hits them alike; the table gives median images/s. With
``--eval`` the test-split accuracy of the dense, masked (full width) and shrunk models and the
prediction agreement of shrunk vs masked are added; with ``--finetune_epochs`` the shrunk model
itself (already physically smaller, so it trains faster too) is fine-tuned with the library's train
step (SGD momentum 0.9, cosine from ``--finetune_lr``, weight decay 1e-4, crop + flip) and
evaluated again. The table gives process CPU seconds per wall second beside the speed. The last
line printed is one JSON object.
"""

import time

import numpy as np
from absl import flags

from experiments import cli
from jaxcompress.errors import ConfigError, check_counts, check_range, invalid
from jaxcompress.metrics import prediction_agreement

# The defaults of the flags that only one mode uses (check_flags refuses others in the other mode).
DEFAULTS = dict(weights="resnet20_cifar10", fraction=0.5, norm="l1", finetune_epochs=0.0,
                finetune_lr=0.02, dataset="cifar10", multiple=8, max_kept=0.75, mean="", std="")

_WEIGHTS = flags.DEFINE_string("weights", DEFAULTS["weights"],
                               "Weights name or path of the model ('' = random init).")
_MODEL = flags.DEFINE_string("model", "resnet20", "CIFAR ResNet name; with --exported, the model "
                             "of an artifact that names none (a name or MODULE:FACTORY).")
_FRACTION = flags.DEFINE_float("fraction", DEFAULTS["fraction"],
                               "Fraction of each block's inner channels pruned.")
_NORM = flags.DEFINE_enum("norm", DEFAULTS["norm"], ["l1", "l2"],
                          "Channel norm ranked for pruning.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per forward pass.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed batches per variant per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved rounds; the median is reported.")
_EVAL = flags.DEFINE_bool("eval", False, "Also evaluate accuracy on the CIFAR-10 test split "
                          "(with --exported: on --dataset's).")
_FT_EPOCHS = flags.DEFINE_float("finetune_epochs", DEFAULTS["finetune_epochs"],
                                "With --eval: fine-tune the shrunk model this many epochs, then "
                                "evaluate it again.")
_FT_LR = flags.DEFINE_float("finetune_lr", DEFAULTS["finetune_lr"],
                            "Peak learning rate of the fine-tuning.")
_EXPORTED = flags.DEFINE_string("exported", "", "Artifact folder (WORKDIR/export) to time full "
                                "width against slimmed, instead of the ResNet surgery.")
_DATASET = flags.DEFINE_string("dataset", DEFAULTS["dataset"], "With --exported: the dataset of "
                               "--eval and the class count of the artifact's model.")
_MULTIPLE = flags.DEFINE_integer("multiple", DEFAULTS["multiple"], "With --exported: computed "
                                 "channels rounded up to a multiple of this.")
_MEAN = flags.DEFINE_string("mean", DEFAULTS["mean"], "With --exported --eval: the per-channel "
                            "mean of pixel/255 the model was trained with, comma-separated (one "
                            "for all channels or one each; default: the dataset's).")
_STD = flags.DEFINE_string("std", DEFAULTS["std"], "With --exported --eval: the per-channel std, "
                           "as --mean.")
_MAX_KEPT = flags.DEFINE_float("max_kept", DEFAULTS["max_kept"], "With --exported: slim a layer "
                               "only when it computes at most this fraction of its outputs.")


def check_flags(*, model: str, fraction: float, batch_size: int, steps: int, rounds: int,
                finetune_epochs: float, finetune_lr: float, exported: str, multiple: int,
                max_kept: float, weights: str = DEFAULTS["weights"], norm: str = DEFAULTS["norm"],
                eval: bool = False, dataset: str = DEFAULTS["dataset"], mean: str = "",
                std: str = "") -> None:
  """Refuses flag values the benchmark cannot run with, before any weights or data are loaded.

  Args:
    model, fraction, batch_size, steps, rounds, finetune_epochs, finetune_lr, exported, multiple,
      max_kept, weights, norm, eval, dataset, mean, std: the values of the flags of the same
      names.

  Raises:
    ConfigError: naming the flag, for a count below 1, a fraction out of its range, a negative
      fine-tuning length, a learning rate <= 0, an unknown dataset, (without ``--exported``) a
      model that is not a CIFAR ResNet, or a flag the chosen mode does not use given a value other
      than its default (:func:`check_mode`), a normalisation that is not finite numbers (std
      > 0) or that gives one of ``--mean`` and ``--std`` without the other.
  """
  check_counts({"--batch_size": batch_size, "--steps": steps, "--rounds": rounds,
                "--multiple": multiple})
  check_range("--fraction", fraction, 0.0, 1.0)
  if not finetune_epochs >= 0:
    raise invalid("--finetune_epochs", finetune_epochs, ">= 0", "0 skips the fine-tuning")
  if not finetune_lr > 0:
    raise invalid("--finetune_lr", finetune_lr, "> 0")
  check_range("--max_kept", max_kept, 0.0, 1.0, lo_closed=False, hi_closed=True)
  check_mode(dict(weights=weights, fraction=fraction, norm=norm, finetune_epochs=finetune_epochs,
                  finetune_lr=finetune_lr, dataset=dataset, multiple=multiple,
                  max_kept=max_kept, mean=mean, std=std), exported=exported, eval=eval)
  if exported:
    from jaxcompress import datasets
    channels = datasets.dataset_spec(dataset, field="--dataset").image_shape[-1]
    normalization(mean, std, dataset, channels)
  else:
    from jaxcompress.models import CifarResNet, get_model
    if not isinstance(get_model(model, field="--model"), CifarResNet):
      raise invalid("--model", model, "a CIFAR ResNet (resnet20 ... resnet110)",
                    "channel surgery needs one; time any other model's artifact with --exported")


def check_mode(values: dict, *, exported: str, eval: bool) -> None:
  """Refuses a flag of ``{name: value}`` (names of :data:`DEFAULTS`) that the mode chosen by
  ``exported`` and ``eval`` does not use, given a value other than its default."""
  slimmed = "the artifact is slimmed (--multiple, --max_kept), not pruned"
  if exported:
    unused = {"weights": "the artifact holds its weights", "fraction": slimmed, "norm": slimmed,
              "finetune_epochs": "only the ResNet surgery's shrunk model is fine-tuned",
              "finetune_lr": "only the ResNet surgery's shrunk model is fine-tuned"}
    unused = {name: ("with --exported", why) for name, why in unused.items()}
    if not eval:
      unused.update({name: ("without --eval", "only the test images of --eval are normalised")
                     for name in ("mean", "std")})
  else:
    unused = {name: ("without --exported", "only an artifact's benchmark uses it")
              for name in ("dataset", "multiple", "max_kept", "mean", "std")}
    if not eval:
      why = "the fine-tuned model is only evaluated with --eval"
      unused.update({name: ("without --eval", why) for name in ("finetune_epochs", "finetune_lr")})
    elif not values["finetune_epochs"] > 0:
      unused["finetune_lr"] = ("with --finetune_epochs=0", "that skips the fine-tuning")
  for name, (when, why) in unused.items():
    if values[name] != DEFAULTS[name]:
      raise invalid(f"--{name}", values[name], f"left at its default {DEFAULTS[name]!r} {when}",
                    why)


def normalization(mean: str, std: str, dataset: str, channels: int
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """``(mean, std)`` of the comma-separated ``--mean`` and ``--std``, both given or neither (then
  the dataset's defaults); one line naming the flag for anything else."""
  from configs import common
  from jaxcompress.data import check_normalization
  if bool(mean) != bool(std):
    given, other = ("--mean", "--std") if mean else ("--std", "--mean")
    raise ConfigError(f"{given} is given without {other}: give both, or neither for the "
                      f"dataset's default normalisation")
  if not mean:
    return common.normalization(dataset)
  values = {}
  for flag, text in (("--mean", mean), ("--std", std)):
    try:
      values[flag] = tuple(float(v) for v in text.split(","))
    except ValueError:
      raise invalid(flag, text, "comma-separated numbers (pixel / 255 units), e.g. "
                    "0.4914,0.4822,0.4465") from None
  check_normalization(values["--mean"], values["--std"], channels, field="--{}")
  return values["--mean"], values["--std"]


def finetune(model, variables, epochs: float, lr: float) -> tuple[dict, float]:
  """Fine-tunes ``model`` on the CIFAR-10 training split; returns (variables, seconds)."""
  import jax
  from configs import common
  from jaxcompress import data as data_lib
  from jaxcompress.optim import OptimizerSpec, make_optimizer
  from jaxcompress.steps import TrainState, make_train_step, supervised_loss

  x, y = data_lib.load_split("cifar10", "train")
  per_epoch = data_lib.steps_per_epoch(len(x), 128)
  total = int(round(epochs * per_epoch))
  opt = make_optimizer(OptimizerSpec(epochs=epochs, learning_rate=lr), per_epoch)  # SGD recipe
  params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
  state = TrainState.create(params, model_state, opt)
  step = make_train_step(supervised_loss(model), opt)
  t0, done, epoch = time.perf_counter(), 0, 0
  while done < total:
    for batch in data_lib.train_batches((x, y), 128, seed=0, epoch=epoch,
                                        mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
      if done >= total:
        break
      state, _ = step(state, batch)
      done += 1
    epoch += 1
  jax.block_until_ready(state)
  return ({"params": state.params, **state.model_state}, time.perf_counter() - t0)


def timed(fn, variables, batches, steps: int) -> tuple[float, float]:
  """``(images/s, process CPU seconds)`` of ``steps`` calls of ``fn(variables, batch)``."""
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(steps):
    out = fn(variables, batches[i % len(batches)])
  out.block_until_ready()
  return steps * batches[0].shape[0] / (time.perf_counter() - t0), time.process_time() - c0


def interleaved(variants: dict, batches: list) -> tuple[dict, dict]:
  """Median images/s and CPU s per wall s of each ``name: (jitted fn, variables)``, timed
  round-robin (``--rounds`` x ``--steps`` batches) after a compile-and-warm-up call. CPU s per
  wall s is the rounds' CPU seconds over the same rounds' wall seconds."""
  for fn, v in variants.values():
    timed(fn, v, batches, 2)
  samples = {k: [] for k in variants}
  cpu, wall = {k: 0.0 for k in variants}, {k: 0.0 for k in variants}
  images = _STEPS.value * batches[0].shape[0]  # per round
  for _ in range(_ROUNDS.value):
    for name, (fn, v) in variants.items():
      ips, cpu_s = timed(fn, v, batches, _STEPS.value)
      samples[name].append(ips)
      cpu[name] += cpu_s
      wall[name] += images / ips  # this round's measured wall seconds
  med = {k: float(np.median(s)) for k, s in samples.items()}
  return med, {k: cpu[k] / wall[k] for k in med}


def main(argv):
  del argv
  check_flags(model=_MODEL.value, fraction=_FRACTION.value, batch_size=_BATCH.value,
              steps=_STEPS.value, rounds=_ROUNDS.value, finetune_epochs=_FT_EPOCHS.value,
              finetune_lr=_FT_LR.value, exported=_EXPORTED.value, multiple=_MULTIPLE.value,
              max_kept=_MAX_KEPT.value, weights=_WEIGHTS.value, norm=_NORM.value,
              eval=_EVAL.value, dataset=_DATASET.value, mean=_MEAN.value, std=_STD.value)
  if _EXPORTED.value:
    return bench_artifact()
  import jax
  from configs import common
  from jaxcompress import data as data_lib
  from experiments import resnet_surgery as surgery
  from jaxcompress.data import DataSpec
  from jaxcompress.models import create_model, get_model
  from jaxcompress.pruning import apply_masks
  from jaxcompress.steps import make_eval_step
  from jaxcompress.tables import markdown_table
  from jaxcompress.train import evaluate_split

  model, variables = create_model(_MODEL.value, num_classes=10, image_shape=(32, 32, 3),
                                  weights=_WEIGHTS.value or None, name_field="--model",
                                  weights_field="--weights")
  masks = surgery.inner_channel_masks(variables["params"], _FRACTION.value, norm=_NORM.value)
  small, small_vars = surgery.shrink_channels(_MODEL.value, variables, masks)
  dense_folded = get_model(_MODEL.value, folded=True)
  folded = get_model(_MODEL.value, folded=True, inner_widths=small.inner_widths)
  folded_vars = surgery.fold_resnet(small_vars)
  masked_vars = {**variables, "params": apply_masks(variables["params"], masks)}
  forward = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))
  variants = {"dense": (forward(model), variables), "shrunk": (forward(small), small_vars),
              "dense_folded": (forward(dense_folded), surgery.fold_resnet(variables)),
              "shrunk_folded": (forward(folded), folded_vars)}
  count = lambda v: sum(int(np.size(a)) for a in jax.tree.leaves(v["params"]))

  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((_BATCH.value, 32, 32, 3)).astype(np.float32) for _ in range(2)]
  med, cpu = interleaved(variants, batches)
  result = {"model": _MODEL.value, "fraction": _FRACTION.value, "norm": _NORM.value,
            "inner_widths": list(small.inner_widths),
            "params": {"dense": count(variables), "shrunk": count(small_vars)},
            "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "speedup": {k: round(v / med["dense"], 3) for k, v in med.items()},
            "cpu_per_wall_s": {k: round(v, 2) for k, v in cpu.items()}}

  if _EVAL.value:
    test = data_lib.load_split("cifar10", "test")
    mean, std = common.normalization("cifar10")
    data = DataSpec(name="cifar10", eval_batch_size=500, mean=mean, std=std)
    evaluated = {**variants, "masked": (forward(model), masked_vars)}
    steps = {name: make_eval_step(fn) for name, (fn, _) in evaluated.items()}
    evaluate = lambda name, v: evaluate_split(steps[name], v, test, data, desc=name,
                                              predictions=True)
    acc, preds = {}, {}
    for name, (_, v) in evaluated.items():
      metrics = evaluate(name, v)
      preds[name] = np.asarray(metrics["predictions"])
      acc[name] = round(metrics["accuracy"], 2)
    result["accuracy"] = acc
    result["agreement_shrunk_vs_masked"] = prediction_agreement(preds["shrunk"], preds["masked"])
    if _FT_EPOCHS.value > 0:
      tuned, seconds = finetune(small, small_vars, _FT_EPOCHS.value, _FT_LR.value)
      acc["shrunk_finetuned"] = round(evaluate("shrunk", tuned)["accuracy"], 2)
      result["finetune"] = {"epochs": _FT_EPOCHS.value, "lr": _FT_LR.value,
                            "seconds": round(seconds, 1)}

  print(f"{jax.devices()[0].device_kind}, batch {_BATCH.value}, {_ROUNDS.value} rounds x "
        f"{_STEPS.value} batches, median; {_MODEL.value} with {_FRACTION.value:.0%} of inner "
        f"channels removed ({_NORM.value}), params {result['params']['dense']:,} -> "
        f"{result['params']['shrunk']:,}")
  rows = [(k, f"{med[k]:.1f}", f"{med[k] / med['dense']:.2f}x", f"{cpu[k]:.2f}") for k in med]
  header = ("variant", "images/s", "speed-up vs dense", "CPU s / wall s")
  if _EVAL.value:
    header += ("accuracy",)
    rows = [(*row, f"{result['accuracy'][row[0]]:.2f}") for row in rows]
    rows.append(("masked (full width)", "", "", "", f"{result['accuracy']['masked']:.2f}"))
    if "shrunk_finetuned" in result["accuracy"]:
      rows.append((f"shrunk, fine-tuned {_FT_EPOCHS.value:g} epoch(s)", "", "", "",
                   f"{result['accuracy']['shrunk_finetuned']:.2f}"))
  print(markdown_table(header, rows, align="lrrrr"[:len(header)]))
  cli.print_json(result)


def bench_artifact():
  """``--exported``: the artifact at full width against slimmed (module docstring)."""
  import jax
  from jaxcompress import data as data_lib
  from jaxcompress import datasets
  from jaxcompress.budget import layer_macs
  from jaxcompress.data import DataSpec
  from jaxcompress.export import load, read_spec
  from jaxcompress.export.inputs import image_shape
  from jaxcompress.export.slim import slim
  from jaxcompress.models import get_model
  from jaxcompress.steps import make_eval_step
  from jaxcompress.tables import markdown_table
  from jaxcompress.train import evaluate_split

  spec = datasets.dataset_spec(_DATASET.value, field="--dataset")
  name = read_spec(_EXPORTED.value, "--exported").get("model", "")
  if not name:  # exported without model_name, as compose's export of a user's model may be
    if not flags.FLAGS["model"].present:
      raise ConfigError(f"--exported={_EXPORTED.value} names no model (it was exported without "
                        "model_name): give it with --model=MODULE:FACTORY")
    name = _MODEL.value
  model = get_model(name, spec.num_classes, field="--exported model")
  loaded = load(_EXPORTED.value, model, field="--exported")
  # --eval feeds it --dataset's test images: refused here, before any timing, unless it takes them
  shape = image_shape(loaded.spec["input"], spec.image_shape if _EVAL.value else None,
                      dataset=_DATASET.value, field="--exported")
  # and --dataset's test split is read before the timing too: a missing one is one line, at once
  test = data_lib.load_split(_DATASET.value, "test", name_field="--dataset") if _EVAL.value \
      else None
  slimmed = slim(loaded, multiple=_MULTIPLE.value, max_kept=_MAX_KEPT.value)
  macs = layer_macs(model, loaded.variables, np.zeros((1, *shape), np.float32))
  kept = {p: macs[p] * k // n for p, (k, n) in slimmed.channels.items()}
  total = {"full": sum(macs.values()), "slim": sum(macs.values()) - sum(macs[p] for p in kept)
           + sum(kept.values())}
  variants = {"full": (loaded.apply_fn, loaded.arrays),
              "slim": (slimmed.loaded.apply_fn, slimmed.loaded.arrays)}

  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((_BATCH.value, *shape)).astype(np.float32) for _ in range(2)]
  med, cpu_per_wall = interleaved({k: (jax.jit(fn), a) for k, (fn, a) in variants.items()},
                                  batches)
  result = {"exported": _EXPORTED.value, "model": name, "batch_size": _BATCH.value,
            "multiple": _MULTIPLE.value, "max_kept": _MAX_KEPT.value,
            "channels": {p: list(c) for p, c in slimmed.channels.items()},
            "full_width": slimmed.full_width, "max_abs_diff": slimmed.max_abs_diff,
            "macs": total, "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "speedup": round(med["slim"] / med["full"], 3),
            "cpu_per_wall_s": {k: round(v, 2) for k, v in cpu_per_wall.items()}}

  if _EVAL.value:
    mean, std = normalization(_MEAN.value, _STD.value, _DATASET.value, shape[-1])
    data = DataSpec(name=_DATASET.value, eval_batch_size=500, mean=mean, std=std)
    preds, acc = {}, {}
    for k, (fn, arrays) in variants.items():
      metrics = evaluate_split(make_eval_step(fn), arrays, test, data, desc=k, predictions=True)
      preds[k], acc[k] = np.asarray(metrics["predictions"]), round(metrics["accuracy"], 2)
    result["accuracy"] = acc
    result["agreement"] = prediction_agreement(preds["slim"], preds["full"])

  print(f"{jax.devices()[0].device_kind}, batch {_BATCH.value}, {_ROUNDS.value} rounds x "
        f"{_STEPS.value} batches, median; {name}: {len(slimmed.channels)} layers slimmed, "
        f"outputs within {slimmed.max_abs_diff:.2g} of the full model's")
  rows = [(k, f"{total[k]:,}", f"{med[k]:.1f}", f"{med[k] / med['full']:.2f}x",
           f"{cpu_per_wall[k]:.2f}") for k in med]
  header = ("variant", "MACs / example", "images/s", "speed-up", "CPU s / wall s")
  if _EVAL.value:
    header += ("test accuracy",)
    rows = [(*row, f"{result['accuracy'][row[0]]:.2f}") for row in rows]
  print(markdown_table(header, rows, align="lrrrrr"[:len(header)]))
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
