"""Throughput benchmark: the train step per compression method, in one process.

  python -m experiments.bench                 # all variants, CIFAR-10 shaped random data
  python -m experiments.bench --rounds=5 --steps=10 --variants=plain
  python -m experiments.bench --variants=gpt_plain,gpt_all   # the char GPT pair only
  python -m experiments.bench --variants=plain,kd,all --ops  # count compiled ops, no timing

The ResNet-20 variants (``plain``, ``prune``, ``wquant``, ``waquant``, ``kd``, ``all``) and the
char GPT pair (``gpt_plain``, ``gpt_all``: 2:4 + 4-bit weights + 8-bit inputs + KD) are described
in :mod:`experiments.bench_lib`.

Every step runs on one device (the first), however many the host has. Variants are timed
interleaved (round-robin, ``--rounds`` times ``--steps`` steps each, after a compile-and-warm-up
call) so machine noise hits them alike; the table reports the median images/s with process CPU
time beside wall time. The last line is one JSON object:
``{"images_per_s": {variant: ...}, "ratio_to_plain": {variant: ...}, ...}`` where the ratio is
the step-time ratio to ``plain`` (``gpt_plain`` for the GPT pair; >1 is slower).
"""

import itertools
import time

import numpy as np
from absl import flags

from experiments import cli
from jaxcompress.errors import check_counts, invalid

N_IMAGES = 50_000  # a CIFAR-10-sized training set of random pixels
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to time (default: every variant).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per variant per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the median is reported.")
_OPS = flags.DEFINE_bool("ops", False, "Instead of timing, count what each variant's compiled step "
                         "runs (top-level ops, copies, sorts, conditionals, XLA's bytes).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size of the ResNet-20 variants, all on "
                              "one device (the GPT pair's is 32).")


def time_pipeline(images, labels, batch_size, steps):
  """images/s of the host input pipeline (shuffle, crop, flip, normalise) alone."""
  from configs.common import IMAGENET_MEAN, IMAGENET_STD
  from jaxcompress import data
  it = itertools.chain.from_iterable(
      data.train_batches((images, labels), batch_size, seed=0, epoch=e, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD) for e in itertools.count())
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(it)
  return batch_size * steps / (time.perf_counter() - t0), time.process_time() - c0


def check_flags(*, variants: list[str] | None, steps: int, rounds: int, batch_size: int) -> None:
  """Refuses flag values the benchmark cannot run with, before anything is built or compiled.

  Args:
    variants: ``--variants`` (None or empty: all).
    steps: ``--steps``, timed steps per variant per round.
    rounds: ``--rounds``, interleaved rounds.
    batch_size: ``--batch_size``, the batch of the ResNet-20 variants (on one device).

  Raises:
    ConfigError: naming the flag, for a count below 1, a batch larger than the random training
      set or an unknown variant.
  """
  from experiments import bench_lib
  check_counts({"--steps": steps, "--rounds": rounds, "--batch_size": batch_size})
  if batch_size > N_IMAGES:
    raise invalid("--batch_size", batch_size, f"<= {N_IMAGES}",
                  "the random training set has that many images")
  bench_lib.check_names(variants)


def main(argv):
  del argv
  check_flags(variants=_VARIANTS.value, steps=_STEPS.value, rounds=_ROUNDS.value,
              batch_size=_BATCH.value)
  import jax
  from experiments import bench_lib
  from jaxcompress.data import train_batches
  from jaxcompress.tables import markdown_table
  from configs.common import IMAGENET_MEAN, IMAGENET_STD

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, N_IMAGES).astype(np.int32)
  batches = list(itertools.islice(train_batches((images, labels), _BATCH.value, seed=0,
                                                epoch=0, mean=IMAGENET_MEAN,
                                                std=IMAGENET_STD), 4))
  gpt_batches = bench_lib.gpt_batches()
  variants, teacher_fwd = bench_lib.build_variants(_VARIANTS.value, batches[0].image,
                                                   gpt_batches[0].image)
  data = {k: gpt_batches if k in bench_lib.GPT_VARIANTS else batches for k in variants}
  if _OPS.value:
    ops = {k: bench_lib.step_ops(v, data[k][0]) for k, v in variants.items()}
    columns = list(next(iter(ops.values())))
    print(f"{jax.devices()[0].device_kind}: the compiled step of each variant")
    print(markdown_table(("variant", *columns), [(k, *row.values()) for k, row in ops.items()],
                         align="l" + "r" * len(columns)))
    cli.print_json({"ops": ops})
    return
  for k, v in variants.items():  # compile and warm up outside the timed rounds
    v.run(data[k], 2)
  if teacher_fwd is not None:
    jax.block_until_ready(teacher_fwd(batches[0]))
  samples = {name: [] for name in variants}
  cpu = {name: 0.0 for name in variants}
  wall = {name: 0.0 for name in variants}
  pipe, fwd = [], []
  for _ in range(_ROUNDS.value):
    if teacher_fwd is not None:
      pipe.append(time_pipeline(images, labels, _BATCH.value, 4 * _STEPS.value)[0])
      t0 = time.perf_counter()
      for i in range(_STEPS.value):
        out = teacher_fwd(batches[i % len(batches)])
      jax.block_until_ready(out)
      fwd.append(_STEPS.value * _BATCH.value / (time.perf_counter() - t0))
    for name, v in variants.items():
      ips, cpu_s = v.run(data[name], _STEPS.value)
      samples[name].append(ips)
      cpu[name] += cpu_s
      wall[name] += _STEPS.value * data[name][0].image.shape[0] / ips
  med = {k: float(np.median(s)) for k, s in samples.items()}
  base_of = lambda k: "gpt_plain" if k in bench_lib.GPT_VARIANTS else "plain"
  ratio = {k: (med[base_of(k)] / v if base_of(k) in med else None) for k, v in med.items()}
  cpu_per_wall = {k: cpu[k] / wall[k] for k in med}
  # The steps are jitted without a mesh: they run on the first device, whatever the count.
  print(f"one {jax.devices()[0].device_kind} device (of {jax.device_count()}), {_ROUNDS.value} "
        f"rounds x {_STEPS.value} steps, median")
  result = {"ratio_to_plain": {k: (round(v, 4) if v else None) for k, v in ratio.items()},
            "cpu_per_wall_s": {k: round(v, 2) for k, v in cpu_per_wall.items()}}
  if teacher_fwd is not None:
    base = med.get("plain")
    fwd_ips = float(np.median(fwd))
    rows = [(k, f"{med[k]:.1f}", f"{ratio[k]:.3f}" if ratio[k] else "-",
             f"{cpu_per_wall[k]:.2f}") for k in med if k in bench_lib.VARIANTS]
    kd_target = 1 + base / fwd_ips + 0.05 if base else None
    rows.append(("teacher forward alone (ResNet-56, eval)", f"{fwd_ips:.1f}",
                 f"{base / fwd_ips:.3f}" if base else "-", ""))
    rows.append(("input pipeline (host)", f"{np.median(pipe):.0f}", "", ""))
    print(f"ResNet-20, batch {_BATCH.value}")
    print(markdown_table(("variant", "images/s", "step-time ratio to plain", "CPU s / wall s"),
                         rows, align="lrrr"))
    kd = f"{kd_target:.3f}" if kd_target else "- (time plain too)"
    print(f"targets: prune <= 1.03, wquant <= 1.05, waquant <= 1.15, kd <= {kd} (1 + teacher "
          "forward / plain step + 0.05)")
    result.update({"images_per_s": {k: round(v, 2) for k, v in med.items()
                                    if k in bench_lib.VARIANTS},
                   "teacher_forward_images_per_s": round(fwd_ips, 2),
                   "kd_target_ratio": round(kd_target, 4) if kd_target else None,
                   "pipeline_images_per_s": round(float(np.median(pipe)), 1)})
  gpt = [k for k in med if k in bench_lib.GPT_VARIANTS]
  if gpt:
    context = bench_lib.GPT["context"]
    print(f"char GPT (context {context}, width {bench_lib.GPT['width']}, "
          f"{bench_lib.GPT['depth']} layers), batch {bench_lib.GPT_BATCH}")
    rows = [(k, f"{med[k]:.1f}", f"{med[k] * context:,.0f}",
             f"{ratio[k]:.3f}" if ratio[k] else "-", f"{cpu_per_wall[k]:.2f}") for k in gpt]
    print(markdown_table(("variant", "sequences/s", "tokens/s", "step-time ratio to gpt_plain",
                          "CPU s / wall s"), rows, align="lrrrr"))
    result["gpt_sequences_per_s"] = {k: round(med[k], 2) for k in gpt}
  cli.print_json(result)


if __name__ == "__main__":
  cli.run(main)
