"""Post-training quantization study: one trained model under many quantizers, with no training.

Each row of the study is a *scheme*, written as a short string:

- ``w<b>a<c>[/<calibration>]``: uniform ``b``-bit kernels and ``c``-bit layer inputs, the input
  ranges calibrated on a few hundred training images with ``minmax`` (default), ``ema``,
  ``percentile`` or ``mse`` (:func:`jaxcompress.quantization.calibrate`);
- ``w<b>``: uniform ``b``-bit kernels, inputs in float (weights only);
- ``k<b>``: k-means weight sharing, ``2^b`` centroids per kernel (Han et al. 2016), inputs in float.

Uniform kernels are symmetric, with min-max scales per output channel (or per tensor). The first
conv and the last dense layer are kept at ``first_last_bits`` (their kernels, and their inputs when
the scheme quantizes inputs; for ``k<b>`` they get *uniform* ``first_last_bits`` kernels), or in
float with ``first_last_bits = 0``. The float model is always evaluated first; every row reports
its accuracy, the change against float and the top-1 agreement with the float predictions.

One eval step is compiled per quantizer configuration (schemes that differ only in calibration, or
only in k-means bits, reuse it: only values change).

Example:
  >>> def evaluate(logits_fn, v, desc):  # on 64 images; compiled once per logits_fn
  ...   predicted = jax.jit(logits_fn)(v, x[:64]).argmax(-1)
  ...   return {"accuracy": float((predicted == y[:64]).mean() * 100), "loss": 0.0,
  ...           "predictions": predicted}
  >>> rows = ptq_sweep(model, variables, ["w8a8/minmax", "k4"], [x[:32]], evaluate)
  >>> for r in rows:  # bits of the inner kernels, inputs, first/last layer (32: float)
  ...   print(r["scheme"], r["weight_bits"], r["act_bits"], r["first_last_bits"],
  ...         r["agreement"] >= 90)
  float 32 32 32 True
  w8a8/minmax 8 8 8 True
  k4 4 32 8 True

References:
  Krishnamoorthi. Quantizing deep convolutional networks for efficient inference: A whitepaper.
  arXiv:1806.08342, 2018.
  Han, Mao, Dally. Deep Compression. ICLR 2016.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from jaxcompress import data as data_lib
from jaxcompress import datasets, parallel, quantization
from jaxcompress.data import DataSpec
from jaxcompress.errors import ConfigError, check_range, invalid
from jaxcompress.metrics import prediction_agreement
from jaxcompress.models import create_model
from jaxcompress.models.functional import functional
from jaxcompress.models.weights import check_dataset
from jaxcompress.quantization.kmeans import MAX_ITERS
from jaxcompress.quantization.qparams import BITS_VALID, MAX_BITS, MIN_BITS
from jaxcompress.steps import make_eval_step
from jaxcompress.tables import markdown_table
from jaxcompress.train import evaluate_split

SCHEME_VALID = ("w<bits>a<bits>[/<calibration>] (uniform weights and inputs), w<bits> (uniform "
                "weights only) or k<bits> (k-means weights), bits in [2, 8], calibration one of "
                + ", ".join(quantization.CALIBRATION_METHODS))
_SCHEME = re.compile(r"w(\d+)(?:a(\d+))?(?:/(\w+))?|k(\d+)")
FLOAT_BITS = 32  # what the JSON reports for a float kernel or input

Evaluate = Callable[..., dict]  # (logits_fn, variables, desc=...) -> metrics and predictions


class Scheme(NamedTuple):
  """One quantizer of the study (the layers between the first and the last).

  Attributes:
    name: the string it was parsed from, e.g. ``w4a8/percentile``.
    weight_bits: kernel bits, or ``None`` for float kernels.
    act_bits: input bits, or ``None`` for float inputs.
    kmeans: kernels are k-means codebooks of ``2^weight_bits`` entries, not a uniform grid.
    calibration: input-range calibration method, ``None`` when inputs stay float.
  """
  name: str
  weight_bits: int | None
  act_bits: int | None
  kmeans: bool
  calibration: str | None


def parse_scheme(text: str, field: str = "ptq.schemes") -> Scheme:
  """Parses ``w8a8``, ``w4a8/percentile``, ``w4`` or ``k4`` into a :class:`Scheme`.

  Raises:
    ConfigError: naming ``field`` for anything else, bits outside 2..8, or a calibration method
      on a scheme whose inputs stay float.
  """
  match = _SCHEME.fullmatch(text) if isinstance(text, str) else None
  if match is None:
    raise invalid(field, text, SCHEME_VALID)
  w, a, calibration, k = match.groups()
  bits = [int(b) for b in (w, a, k) if b is not None]
  if any(not MIN_BITS <= b <= MAX_BITS for b in bits):
    raise invalid(field, text, f"a scheme whose bits are each {BITS_VALID}")
  if calibration is not None and a is None:
    raise invalid(field, text, "a calibration only after input bits", f"e.g. w{w}a8/{calibration}")
  if calibration is not None and calibration not in quantization.CALIBRATION_METHODS:
    raise invalid(field, text, SCHEME_VALID)
  if k is not None:
    return Scheme(text, int(k), None, True, None)
  act_bits = None if a is None else int(a)
  return Scheme(text, int(w), act_bits, False, (calibration or "minmax") if act_bits else None)


def quant_rules(scheme: Scheme, first_last_bits: int, per_channel: bool,
                inner: bool = True) -> list | None:
  """The :func:`~jaxcompress.quantization.quantize` rules of a scheme, ``None`` if all float.

  k-means kernels are not uniform-quantized (their layers get no rule of their own); only the
  first and last layer's uniform kernels are, when ``first_last_bits`` is set. ``inner``: the
  model has layers between its first and last (without, no rule for them, which would match
  nothing).
  """
  edge = first_last_bits or None
  act = scheme.act_bits
  edge_cfg = None if edge is None else dict(weight_bits=edge, act_bits=edge if act else None,
                                            per_channel=per_channel)
  weight = None if scheme.kmeans else scheme.weight_bits
  middle = None if not inner or weight is None and act is None else dict(
      weight_bits=weight, act_bits=act, per_channel=per_channel)
  if edge_cfg is None and middle is None:
    return None
  edges = [(quantization.FIRST, edge_cfg), (quantization.LAST, edge_cfg)]
  return edges + [(".*", middle)] if inner else edges


def describe(scheme: Scheme | None, first_last_bits: int, per_channel: bool) -> str:
  """One-phrase description of a row's method, for the table."""
  if scheme is None:
    return "float32 reference"
  if not first_last_bits:
    edge = "first/last float"
  else:
    edge = f"first/last W{first_last_bits}" + (f"A{first_last_bits}" if scheme.act_bits else "")
  grain = "per-channel" if per_channel else "per-tensor"
  if scheme.kmeans:
    edge += f" uniform {grain}" if first_last_bits else ""
    return f"k-means, {2 ** scheme.weight_bits} centroids per kernel; {edge}"
  inputs = f"inputs {scheme.calibration}-calibrated" if scheme.act_bits else "float inputs"
  return f"uniform {grain} min-max weights, {inputs}; {edge}"


def layer_paths(model: Any, variables: Any, sample: Any) -> list[str]:
  """Paths of the model's Conv/Dense layers in call order (what ``<first>``/``<last>`` resolve)."""
  probe = quantization.quantize(model, [(".*", dict(weight_bits=8, act_bits=None))])
  return [layer.path for layer in probe.init(variables, sample).layers]


def check_settings(first_last_bits: int, percentile: float) -> None:
  """Validates the settings shared by every row; one-line :class:`ConfigError` otherwise."""
  if first_last_bits and not MIN_BITS <= first_last_bits <= MAX_BITS:
    raise invalid("ptq.first_last_bits", first_last_bits, f"0 (float) or {BITS_VALID}")
  check_range("ptq.percentile", percentile, 50, 100, lo_closed=False, hi_closed=True)


def ptq_sweep(model: Any, variables: Any, schemes: Sequence[str | Scheme],
              calibration: Sequence[Any], evaluate: Evaluate, *, first_last_bits: int = 8,
              per_channel: bool = True, percentile: float = 99.99,
              kmeans_iters: int = 30) -> list[dict]:
  """Evaluates ``variables`` in float, then post-training quantized by every scheme.

  Args:
    model: a Flax Linen or NNX classifier (any train flag, or none: see
      :mod:`jaxcompress.models.functional`).
    variables: its trained variables (``params``, and e.g. ``batch_stats``).
    schemes: scheme strings (see the module docstring) or parsed :class:`Scheme` rows.
    calibration: normalized input batches (a few hundred training images) for the input ranges.
    evaluate: ``(logits_fn, variables, desc=row name) -> metrics`` with ``accuracy``, ``loss`` and
      ``predictions`` (the predicted class of each example); it is handed the same ``logits_fn``
      object for every row of one quantizer configuration, so it may compile once per object.
    first_last_bits: bits of the first and last layer (0: float).
    per_channel: one kernel scale per output channel, else one per tensor.
    percentile: ``p`` of ``percentile`` calibration.
    kmeans_iters: Lloyd iterations of the k-means rows.

  Returns:
    One dict per row, float first: ``scheme``, ``accuracy``, ``delta`` (points against float),
    ``agreement`` (percent of examples predicted as float predicts them), ``loss``,
    ``weight_bits``, ``act_bits``, ``first_last_bits``, ``per_channel``, ``kmeans``,
    ``calibration``, ``method``, ``seconds``.

  Raises:
    ConfigError: for a bad scheme, ``first_last_bits`` or ``percentile``, no calibration
      batch, or ``first_last_bits=0`` on a model with no layer between its first and last.
  """
  schemes = [s if isinstance(s, Scheme) else parse_scheme(s) for s in schemes]
  check_settings(first_last_bits, percentile)
  if schemes and not len(calibration):
    raise ConfigError("ptq calibration must hold at least one batch of images (input ranges, "
                      "layer discovery); set ptq.calibration_examples > 0")
  sample = np.asarray(calibration[0][:8]) if len(calibration) else None
  fm = functional(model)
  float_fn = lambda v, x: fm.apply(v, x)[0]
  quantizers, codebooks = {}, {}
  inner = layer_paths(model, variables, sample)[1:-1] if schemes else []
  if schemes and not inner and not first_last_bits:  # every row would be the float model
    raise invalid("ptq.first_last_bits", first_last_bits, f"{BITS_VALID} for a model with no "
                  "layer between its first and last", "0 keeps both float: nothing to quantize")

  def row(scheme, evaluated, t0, reference=None):
    preds = np.asarray(evaluated["predictions"])
    agreement = (100.0 if reference is None
                 else round(prediction_agreement(preds, reference) * 100, 2))
    return {"scheme": "float" if scheme is None else scheme.name,
            "accuracy": evaluated["accuracy"], "loss": evaluated["loss"],
            "agreement": agreement,
            "weight_bits": FLOAT_BITS if scheme is None else scheme.weight_bits or FLOAT_BITS,
            "act_bits": FLOAT_BITS if scheme is None else scheme.act_bits or FLOAT_BITS,
            "first_last_bits": FLOAT_BITS if scheme is None else first_last_bits or FLOAT_BITS,
            "per_channel": per_channel, "kmeans": bool(scheme and scheme.kmeans),
            "calibration": scheme and scheme.calibration,
            "method": describe(scheme, first_last_bits, per_channel),
            "seconds": round(time.perf_counter() - t0, 2)}

  t0 = time.perf_counter()
  base = evaluate(float_fn, variables, desc="float")
  reference = np.asarray(base["predictions"])
  rows = [row(None, base, t0)]
  for scheme in schemes:
    t0 = time.perf_counter()
    scheme_vars = variables
    if scheme.kmeans:
      if scheme.weight_bits not in codebooks:
        codebooks[scheme.weight_bits] = quantization.cluster_params(
            variables["params"], [(re.escape(p) + "/kernel", scheme.weight_bits) for p in inner]
            + [(".*", None)], iters=kmeans_iters)
      scheme_vars = {**variables, "params": quantization.decode_params(
          variables["params"], codebooks[scheme.weight_bits])}
    rules = quant_rules(scheme, first_last_bits, per_channel, bool(inner))
    if rules is None:
      evaluated = evaluate(float_fn, scheme_vars, desc=scheme.name)
    else:
      key = repr(rules)
      if key not in quantizers:
        qz = quantization.quantize(model, rules)
        quantizers[key] = (qz, lambda v, x, qz=qz: qz.apply(v["model"], v["quant"], x)[0])
      qz, logits_fn = quantizers[key]
      qstate = qz.init(scheme_vars, sample)
      if scheme.act_bits:
        qstate = quantization.calibrate(qz, scheme_vars, qstate, calibration,
                                        method=scheme.calibration, percentile=percentile)
      evaluated = evaluate(logits_fn, {"model": scheme_vars, "quant": qstate}, desc=scheme.name)
    rows.append(row(scheme, evaluated, t0, reference))
  for r in rows:
    r["delta"] = round(r["accuracy"] - rows[0]["accuracy"], 4)
  return rows


def split_evaluator(split: tuple[np.ndarray, np.ndarray], data: DataSpec, *,
                    mesh=None) -> Evaluate:
  """An ``evaluate`` for :func:`ptq_sweep` over every example of ``split``, batched and
  normalised as ``data`` says.

  Compiles one eval step per distinct ``logits_fn``; the metrics are
  :func:`~jaxcompress.train.evaluate_split`'s with the per-example ``predictions`` (an array).
  """
  steps = {}

  def evaluate(logits_fn, variables, desc="eval"):
    if logits_fn not in steps:
      steps[logits_fn] = make_eval_step(logits_fn, mesh=mesh)
    if mesh is not None:
      variables = parallel.replicate(mesh, variables)
    metrics = evaluate_split(steps[logits_fn], variables, split, data, mesh=mesh, desc=desc,
                             predictions=True)
    return {**metrics, "predictions": np.asarray(metrics["predictions"])}

  return evaluate


def calibration_split(name: str, split: str, n: int, *, data_dir: str | None = None) -> str:
  """The TFDS split spec of the first ``n`` examples of ``split`` (``train``, 512:
  ``train[0:512]``; ``test+train``: ``test[0:512]``), or, where the split sizes cannot be read,
  ``split`` with a note of how many of its first examples were taken."""
  return (data_lib.first_examples(name, split, n, data_dir=data_dir)
          or f"{split}, first {n}")


def post_training_quantization(config) -> dict:
  """Runs the study of a ``configs/ptq.py`` config on ``data.eval_split``.

  Calibration uses the first ``ptq.calibration_examples`` images of ``data.train_split`` (TFDS
  record order is shuffled), unaugmented, in batches of ``ptq.calibration_batch_size``.

  Returns:
    ``{'model', 'dataset', 'split', 'examples', 'calibration_split', 'calibration_examples',
    'rows': [...], 'seconds'}``, rows as in :func:`ptq_sweep`.

  Raises:
    ConfigError: for any invalid field, before data or weights are read.
  """
  t0 = time.perf_counter()
  p = config.ptq
  if isinstance(p.schemes, str) or not p.schemes:
    raise invalid("ptq.schemes", p.schemes, "a non-empty tuple of schemes",
                  "e.g. ('w8a8', 'w4', 'k4')")
  schemes = [parse_scheme(s) for s in p.schemes]
  first, same = {}, []  # quantizer -> the first scheme naming it; (that one, a later one)
  for scheme in schemes:  # compared parsed: 'w8a8' and 'w8a8/minmax' are one quantizer
    if scheme[1:] in first:
      same.append((first[scheme[1:]], scheme.name))
    first.setdefault(scheme[1:], scheme.name)
  if same:
    aliases = "; ".join(f"{b!r} is the same quantizer as {a!r}" for a, b in same if a != b)
    raise invalid("ptq.schemes", tuple(p.schemes),
                  f"distinct schemes ({sorted({a for a, _ in same})} repeated)", aliases or None)
  check_settings(p.first_last_bits, p.percentile)
  for field in ("calibration_examples", "calibration_batch_size", "kmeans_iters"):
    if p[field] <= 0:
      raise invalid(f"ptq.{field}", p[field], "> 0")
  if p.kmeans_iters > MAX_ITERS:
    raise invalid("ptq.kmeans_iters", p.kmeans_iters, f"at most {MAX_ITERS} (the Lloyd loop "
                  "counts in int32)", "a few dozen iterations converge")
  data = DataSpec.from_mapping(config.data)  # checked before anything is read
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
  spec = datasets.dataset_spec(config.data.name)
  check_dataset(config.model.weights, data.name)
  model, variables = create_model(config.model.name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, weights=config.model.weights)
  # The first examples of the split as given (a slice of it is a split too: train[40000:]).
  source = data_lib.open_split(config.data.name, config.data.train_split,
                               data_dir=config.data.data_dir, field="data.train_split")
  calib_x, _ = source.read(np.arange(min(p.calibration_examples, len(source))))
  calib_split = calibration_split(config.data.name, config.data.train_split, len(calib_x),
                                  data_dir=config.data.data_dir)
  test = data_lib.load_split(config.data.name, config.data.eval_split,
                             data_dir=config.data.data_dir, field="data.eval_split")
  bs = p.calibration_batch_size
  calibration = [data_lib.normalize(calib_x[i:i + bs], data.mean, data.std)
                 for i in range(0, len(calib_x), bs)]
  rows = ptq_sweep(model, variables, schemes, calibration,
                   split_evaluator(test, data, mesh=mesh),
                   first_last_bits=p.first_last_bits, per_channel=p.per_channel,
                   percentile=p.percentile, kmeans_iters=p.kmeans_iters)
  return {"model": config.model.name, "dataset": config.data.name,
          "split": config.data.eval_split, "examples": int(len(test[0])),
          "calibration_split": calib_split, "calibration_examples": int(len(calib_x)),
          "rows": rows, "seconds": round(time.perf_counter() - t0, 2)}


def ptq_table(result: dict) -> str:
  """The study as a markdown table: one row per scheme, float first."""
  bits = lambda b: "float" if b == FLOAT_BITS else str(b)
  rows = [(r["scheme"], f"{r['accuracy']:.2f}", f"{r['delta']:+.2f}", f"{r['agreement']:.2f}",
           bits(r["weight_bits"]), bits(r["act_bits"]), r["method"]) for r in result["rows"]]
  return markdown_table(("scheme", "accuracy %", "Δ vs float (points)", "agreement with float %",
                         "weight bits", "act bits", "method"), rows, align="lrrrrrl")
