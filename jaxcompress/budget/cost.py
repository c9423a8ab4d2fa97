"""What a plan costs: artifact bytes (from the export's own size code) and BOPs.

**Bytes.** A layer's weight takes, in the artifact, the smallest of the encodings
:func:`jaxcompress.export.sparse.sizes` lists for its non-zero pattern and bit width: exactly the
function the export calls to choose (:func:`weight_bytes`). A weight trained on another pattern
stores in no more bytes when it keeps no more entries and, where the sized pattern is stored as gap
codes, needs no more codes (:func:`gap_cap`, enforced in training by ``PruneSpec.layer_gap_codes``);
weights that quantize to zero only remove non-zeros, which never makes any encoding larger. A weight
pruned by whole kernels under one threshold shared with other weights is sized by
:func:`shared_kernel_bytes`, a bound on its ``blocks`` storage that holds however training moves the
kept kernels between those weights; ``blocks`` is left out of an unstructured weight's size, whose
kept entries may spread over more kernels than the sized pattern's. Everything else in the artifact
(scales, folded BatchNorms, biases) is measured once on a reference export of the same model at 8
bits, each tensor the plan leaves alone counted at its largest (dense) storage, as fine-tuning may
fill a tensor that is 0 in the reference. The gzipped spec is sized on a pessimistic copy of the
reference's: every tensor given every field a sparse encoding may add, every number that may change
given random digits of its longest length, plus :data:`SPEC_MARGIN` (:func:`overhead_bytes`). So the
artifact's bytes on disk are at most ``overhead + sum of weight bytes`` (its code streams are
Huffman-coded, and its arrays zlib-compressed, only where that is smaller; on ResNet-20 plans at
25x and 40x the artifacts come out 7-9 % under the sized bytes; :func:`coded_ratio` estimates
how much, for a job that sizes with it); the budget tests check it on every plan.

**BOPs** (bit operations, the usual compute proxy): ``MACs x weight bits x input bits`` per layer
and example, the MACs counting multiplications by kept weights: a dense layer's MACs times its
density (unstructured, 2:4) or its kept output channels (channel pruning: a pruned channel outputs
its bias, a constant that needs no multiplication; where the BatchNorm and ReLU after it make that
constant 0, surgery can also remove the next layer's inputs, which only lowers the true count).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from jaxcompress import pruning
from jaxcompress.budget.presets import Option
from jaxcompress.export import sparse
from jaxcompress.export.codec import LayerTensor, code_streams, encode_layer
from jaxcompress.export.files import spec_bytes
from jaxcompress.export.packing import packed_size
from jaxcompress.models.functional import functional, stacked_axes, weight_name
from jaxcompress.quantization import qrange, quantize_int
from jaxcompress.rules import tree_get
from jaxcompress.specs import PruneSpec

KERNEL_NORM = "l2"  # how kernel plans rank kernels (their prune.norm)
SPEC_MARGIN = 32  # bytes added to the pessimistic spec's gzipped size (deflate is not monotone)


def keep_mask(weight: Any, sparsity: float, structure: str = "unstructured",
              layer: Any = None) -> np.ndarray:
  """The kept entries of ``weight`` at ``sparsity``: lowest magnitudes pruned, as training does.

  ``unstructured``: ``round(sparsity * n)`` entries; ``nm``: 2 of every 4 along the reduction axis
  (any ``sparsity > 0``); ``channel``: ``round(sparsity * C)`` whole output channels (L1 norm);
  ``kernel``: ``round(sparsity * K)`` whole kernels (L2 norm per entry, :func:`kernel_keep`).
  ``layer``, the weight's traced :class:`~jaxcompress.selection.Layer`, gives its reduction and
  output axes, as the train step's masks use them (an Einsum's or a transposed ConvTranspose's
  are not the usual ones; a weight stacked by ``nn.scan`` is masked step by step); without it,
  axis -2 and the last axis.
  """
  if sparsity <= 0:
    return np.ones(np.shape(weight), bool)
  spec = PruneSpec(structure=structure, sparsity=float(sparsity), n=2, m=4,
                   norm=KERNEL_NORM if structure == "kernel" else "l1")
  masker = spec.masker() if layer is None else spec.masker(
      {"weight": layer.reduce_axes} if layer.reduce_axes else None,
      {"weight": layer.out_axis}, {"weight": layer.stacked}, {"weight": layer.window_axes})
  return np.asarray(masker(["weight"], [jax.numpy.abs(jax.numpy.asarray(weight))],
                           float(sparsity))[0], bool)


def kernel_keep(weights: Sequence[Any], sparsity: float,
                layers: Sequence[Any]) -> list[np.ndarray]:
  """Whole kernels pruned by one threshold across ``weights``: the ``round(sparsity * K)``
  kernels (of ``K`` in all) with the lowest L2 norm per entry, as ``prune.structure=kernel`` with
  ``prune.norm=l2`` and ``prune.scope=global`` ranks them. ``layers``: each weight's traced
  :class:`~jaxcompress.selection.Layer`. Weights without kernels (:func:`has_kernels`) take no
  part (all kept)."""
  keeps = [np.ones(np.shape(w), bool) for w in weights]
  grid = [i for i, l in enumerate(layers) if has_kernels(l)]
  if sparsity > 0 and grid:
    found = pruning.kernels("global", KERNEL_NORM, {str(i): layers[i].window_axes for i in grid})(
        [str(i) for i in grid], [jax.numpy.abs(jax.numpy.asarray(weights[i])) for i in grid],
        float(sparsity))
    for i, k in zip(grid, found):
      keeps[i] = np.asarray(k, bool)
  return keeps


def kernel_size(layer: Any) -> int:
  """Entries per kernel of a traced layer's weight (a :class:`~jaxcompress.selection.Layer`) as
  kernel plans prune and the export's ``blocks`` encoding stores it: the product of its window
  axes (a Conv's ``kh * kw``, for every step of one stacked by ``nn.scan``); 1 for a layer
  without a window (Dense, DenseGeneral, Einsum, Embed, whatever their rank)."""
  return int(np.prod([layer.shape[a] for a in layer.window_axes]))


def has_kernels(layer: Any) -> bool:
  """Whether a traced layer's weight is pruned and stored by whole kernels in kernel plans (a
  window of more than one entry: a Conv kernel with ``kh * kw > 1``, see :func:`kernel_size`)."""
  return kernel_size(layer) > 1


def _encodings(keep: np.ndarray, bits: int) -> dict[str, int]:
  """The export's sizes of the encodings an unstructured pattern like ``keep`` is held to."""
  found = sparse.sizes(keep, int(bits))
  found.pop("blocks", None)
  return found


def weight_bytes(keep: Any, bits: int) -> int:
  """Bytes the export stores for a weight with this non-zero pattern at ``bits`` bits (the
  smallest encoding but ``blocks``, see the module docstring)."""
  return int(min(_encodings(np.asarray(keep, bool), bits).values()))


def shared_kernel_bytes(keep: Any, bits: int, window: int, axes: Any = None) -> int:
  """Bytes that bound a weight whose kernels share one threshold with other weights' kernels.

  Under one kernel threshold across weights at one bit width ``bits``, training moves kept
  kernels between the weights but keeps their total. A weight of ``K`` kernels, ``k`` kept, of
  ``w`` entries each, stores as ``blocks`` in ``ceil(K/8) + ceil(k w bits / 8)`` bytes; this is
  ``ceil(K/8) + ceil(k W bits / 8) + 1`` with ``W >= w`` the largest window of those weights.
  Summed over the weights it bounds their ``blocks`` bytes for any split of the same total:
  ``sum ceil(k'_i w_i b/8) <= sum k'_i W b/8 + n <= sum (ceil(k_i W b/8) + 1)``. ``axes``: the
  weight's window axes (``Layer.window_axes``; default: every axis but the last two).
  """
  marked = sparse.marked_kernels(np.asarray(keep, bool), axes)
  return (sparse.packed_size(marked.size, 1)
          + sparse.value_bytes(int(marked.sum()) * int(window), int(bits)) + 1)


def gap_cap(keep: Any, bits: int) -> tuple[int, int] | None:
  """``(w, codes)`` that keep any subset of this pattern within its :func:`weight_bytes`.

  When the export stores ``keep`` as ``w``-bit gap codes, a pattern with no more kept entries and
  at most ``codes`` such codes stores in no more bytes. ``None`` when it stores densely or as a
  bitmap: those sizes depend only on the number of kept entries.
  """
  keep = np.asarray(keep, bool)
  found = _encodings(keep, bits)
  best = min(found, key=found.get)  # the first of equal sizes, as the export chooses
  if not best.startswith("gaps"):
    return None
  width = int(best[len("gaps"):])
  return width, sparse.num_gap_codes(sparse.gaps_of(keep.reshape(-1)), width)


def per_channel_axes(layer: Any) -> tuple[int, ...]:
  """The axes of a traced :class:`~jaxcompress.selection.Layer`'s weight with one scale each when
  quantized per channel, as the quantized model gives them (``quantization.model``): its output
  axes (the last of a Dense or Conv, an Einsum's kernel letters its output keeps, a
  DenseGeneral's features), an Embed's vocabulary axis 0, and the steps of a stacked weight."""
  steps = layer.stacked
  own = (0,) if layer.kind == "embed" else tuple(
      a - steps for a in range(steps, len(layer.shape))
      if a not in layer.reduce_axes and a not in layer.window_axes)
  return stacked_axes(own, steps)


def coded_ratio(weights: Mapping[str, Any], keeps: Mapping[str, Any], bits: Mapping[str, int],
                layers: Mapping[str, Any] | None = None) -> float:
  """Fixed-width over Huffman-coded bytes of these weights' positions and values, estimated.

  Each weight (``{path: array}``) is pruned to its ``keeps`` entry (none: dense) and quantized at
  its ``bits`` to the symmetric grid with one max-abs scale per output channel
  (:func:`per_channel_axes`), then encoded as the export does (2:4 groups along the reduction axes
  included), each code stream Huffman-coded where smaller
  (:func:`jaxcompress.export.encode_layer`); a coded stream counts at its fixed-width packing on
  the first side of the ratio (:func:`jaxcompress.export.packing.packed_size`). ``layers``:
  each weight's traced :class:`~jaxcompress.selection.Layer` by the same path, which gives its
  output and reduction axes (an Einsum's are not the usual ones); a weight without one has its
  output channels last and is reduced over the other axes. Fine-tuning moves the codes, so the
  ratio of the trained artifact differs a little: a plan sized with it is checked on its export
  (``export.max_bytes``).
  """
  sizes = np.zeros(2, np.int64)  # fixed-width, Huffman-coded
  for path, weight in weights.items():
    w = np.asarray(weight, np.float32)
    if path in keeps:
      w = np.where(np.asarray(keeps[path], bool), w, 0.0)
    b = int(bits[path])
    qmin, qmax = qrange(b, symmetric=True)
    layer = (layers or {}).get(path)
    channels = (w.ndim - 1,) if layer is None else per_channel_axes(layer)
    reduce = tuple(range(w.ndim - 1)) if layer is None else layer.reduce_axes
    top = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a not in channels),
                        keepdims=True)
    scale = np.where(top > 0, top / qmax, 1.0).astype(np.float32)
    codes = np.asarray(quantize_int(w, scale, 0, qmin=qmin, qmax=qmax))
    tensor = LayerTensor(path, "int", codes, b, qmin=qmin, scale=scale, group_axes=reduce)
    meta, segments = encode_layer(tensor, huffman=True)
    streams = code_streams(meta)
    for name in ("positions", "values"):
      coded = segments[name].size
      sizes += (packed_size(streams[name][1], streams[name][0])  # its fixed-width packing
                if name in meta.get("huffman", ()) else coded, coded)
  return float(sizes[0] / max(sizes[1], 1))


def pessimistic_spec(spec: Mapping[str, Any], seed: int = 0) -> dict:
  """A copy of a reference export's spec that no export of a plan can outgrow (see the module).

  Every tensor gets the fields of every sparse encoding (bitmap, gaps, N:M), both code streams
  listed as Huffman-coded, and a ``positions`` segment; its counts, the input scales and zero
  points and the arrays' byte counts get random digits of their longest length (random digits
  compress worst). Tensors the plan leaves alone count too: fine-tuning changes their values, and
  with them their encoding (a bias that is 0 in the reference is stored as no entries at all).
  """
  rng = np.random.default_rng(seed)
  digits = lambda n: int(rng.integers(10 ** (n - 1), 10 ** n))  # noqa: E731
  out = json.loads(json.dumps(spec))
  acts = list(out.get("acts", {}).values())
  for meta in out["layers"]:
    n = len(str(int(np.prod(meta["shape"]))))
    meta.update(encoding="bitmap", nnz=digits(n), gap_bits=8, codes=digits(n), group_n=2,
                group_axes=list(range(len(meta["shape"]) - 1)), huffman=["values", "positions"])
    most = len(str(largest_bytes(meta)))
    meta["segments"] = {"positions": digits(n), "values": digits(most),
                        **{k: digits(max(n, len(str(v)))) for k, v in meta["segments"].items()
                           if k not in ("positions", "values")}}
    if "act" in meta:
      acts.append(meta["act"])
  for act in acts:  # the longest float32 text: 9 significant digits and a two-digit exponent
    act["scale"] = float(f"{digits(9) / 1e8:.8f}e-{rng.integers(10, 40)}")
    act["zero_point"] = -digits(3)
  info = out["arrays"]
  info["bytes"], info["raw_bytes"] = digits(len(str(info["raw_bytes"]))), \
      digits(len(str(info["raw_bytes"])))
  return out


def largest_bytes(meta: Mapping[str, Any]) -> int:
  """The most bytes any values of this spec entry's shape and bits take as positions and values.

  Dense storage, which the export always may choose; weight-shared (``kmeans``) tensors have no
  code for a zero, so every entry kept in a bitmap.
  """
  n = int(np.prod(meta["shape"]))
  dense = sparse.value_bytes(n, int(meta.get("bits", sparse.FLOAT_BITS)))
  return dense + (sparse.value_bytes(n, 1) if meta["kind"] == "kmeans" else 0)


def overhead_bytes(spec: Mapping[str, Any], weights: Sequence[str], *,
                   compress: bool = True) -> int:
  """Artifact bytes besides the planned weights' codes, from a reference export's spec.

  Args:
    spec: the reference artifact's parsed spec (``jaxcompress.export.read_spec``), with every
      planned layer quantized at the largest weight and input bits a plan may use.
    weights: the planned weights' parameter paths (``layer1_0/conv1/kernel``).
    compress: whether the export gzips its spec (``export_model``'s ``compress``).

  Returns:
    The spec file's bytes for :func:`pessimistic_spec` plus :data:`SPEC_MARGIN`, plus the raw
    array bytes besides every tensor's positions and values (scales, biases), plus
    :func:`largest_bytes` of every tensor the plan leaves alone.
  """
  planned = {f"params/{w}" for w in weights}
  found = {m["path"] for m in spec["layers"]} & planned
  if found != planned:
    raise ValueError(f"reference export lacks {sorted(planned - found)[:3]}")
  codes = sum(int(m["segments"].get("positions", 0)) + int(m["segments"].get("values", 0))
              for m in spec["layers"])
  others = sum(largest_bytes(m) for m in spec["layers"] if m["path"] not in planned)
  text = len(spec_bytes(pessimistic_spec(spec), compress))
  return text + SPEC_MARGIN + int(spec["arrays"]["raw_bytes"]) - codes + others


def layer_macs(model: Any, variables: Mapping[str, Any], sample: Any) -> dict[str, int]:
  """Multiply-accumulates per example of every linear-like layer, by path.

  Counted on the model's jaxpr (one abstract trace, no FLOPs): every ``dot_general`` and
  convolution a layer's call runs, ``output entries x summed entries`` (``H' W' x kh kw Cin Cout``
  for a conv, ``in x out`` for a dense layer, ``T x vocab x features`` for an ``Embed`` used as
  the output head, ``attend``; a lookup is 0; a transposed conv, whose input is dilated, counts
  its input positions, ``H W x kh kw Cin Cout``, not the zeros between them; a Conv with an
  ``input_dilation`` and strides, each input entry times the kernel entries the stride lines up
  with it), times the length of
  every scan around it: a layer called several times counts every call, and a layer inside
  ``nn.scan``, ``nn.RNN`` or ``jax.lax.scan`` counts every step, whether its weight is stacked
  per step or shared by them. Of the branches of a ``cond`` (``nn.cond``, ``nn.switch``) the
  costliest counts. A while loop's trip count is unknown: its condition and body count once,
  with a warning naming the layers in them.
  """
  fm = functional(model)
  paths: list[str] = []  # the layer path of each marked call, in call order

  def record(call, run):
    name = "embedding" if call.kind == "embed" else weight_name(call.kind)
    if call.kind not in ("linear", "embed") or name is None:
      return run(call.x)
    w = tree_get(variables["params"], f"{call.path}/{name}" if call.path else name)
    if w is None or np.ndim(w) < 2 or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      return run(call.x)  # not a layer the library compresses (selection.trace_layers)
    paths.append(call.path)
    with jax.named_scope(f"{_MARK}{len(paths) - 1}"):
      return run(call.x)

  closed = jax.make_jaxpr(lambda v, x: fm.apply(v, x, hook=record))(
      dict(variables), jax.tree.map(lambda a: a[:1], sample))  # one example of each input
  looped: set[str] = set()
  counts = _jaxpr_macs(closed.jaxpr, "", paths, looped)
  if looped:
    warnings.warn(f"layer_macs: {', '.join(sorted(looped))} run inside a while loop, whose trip "
                  "count is unknown: their MACs count one iteration", stacklevel=2)
  return {p: counts.get(p, 0) for p in dict.fromkeys(paths)}


_MARK = "jaxcompress_macs_"
_MARK_RE = re.compile(rf"{_MARK}(\d+)")


def _jaxpr_macs(jaxpr: Any, scope: str, paths: Sequence[str], looped: set[str]) -> dict[str, int]:
  """MACs of the products in ``jaxpr`` by the layer whose marked call they run in (the innermost
  mark of ``scope`` plus the equation's own name stack), scans multiplied by their length."""
  out: dict[str, int] = {}

  def add(counts: Mapping[str, int], times: int = 1) -> None:
    for path, n in counts.items():
      out[path] = out.get(path, 0) + times * n

  for eqn in jaxpr.eqns:
    name = f"{scope}/{eqn.source_info.name_stack}"
    prim = eqn.primitive.name
    if prim in ("dot_general", "conv_general_dilated"):
      marks = _MARK_RE.findall(name)
      if marks:
        add({paths[int(marks[-1])]: _product_macs(eqn)})
    elif prim == "scan":
      add(_jaxpr_macs(eqn.params["jaxpr"].jaxpr, name, paths, looped), int(eqn.params["length"]))
    elif prim == "while":
      for part in ("cond_jaxpr", "body_jaxpr"):
        counts = _jaxpr_macs(eqn.params[part].jaxpr, name, paths, looped)
        looped.update(counts)
        add(counts)
    elif prim == "cond":
      branches = [_jaxpr_macs(b.jaxpr, name, paths, looped) for b in eqn.params["branches"]]
      add(max(branches, key=lambda b: sum(b.values())))
    else:
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            sub = sub.jaxpr
          if isinstance(sub, jax.extend.core.Jaxpr):
            add(_jaxpr_macs(sub, name, paths, looped))
  return out


def _product_macs(eqn: Any) -> int:
  """``output entries x summed entries`` of one ``dot_general`` or convolution; of a convolution
  with a dilated input (a transposed conv), ``input entries x kernel entries`` each meets (all of
  them at stride 1, a transposed conv's windows)."""
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in contract)
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"]
  params = eqn.params
  if any(d != 1 for d in params["lhs_dilation"]):
    # Each input entry meets the kernel entries that the windows' stride lines up with it: all
    # of them for a transposed conv (windows at every position), some for strided windows.
    taps = 1
    for a, k, dil, rdil, stride, (lo, _) in zip(
        spec.lhs_spec[2:], spec.rhs_spec[2:], params["lhs_dilation"], params["rhs_dilation"],
        params["window_strides"], params["padding"]):
      taps *= sum((i * dil + lo - t * rdil) % stride == 0 for i in range(lhs[a])
                  for t in range(rhs[k]))
    batch = lhs[spec.lhs_spec[0]] // params["batch_group_count"]
    return batch * taps * rhs[spec.rhs_spec[0]] * rhs[spec.rhs_spec[1]]
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[spec.rhs_spec[0]]


def density(keep: np.ndarray, structure: str, out_axis: int = -1, stacked: int = 0) -> float:
  """Fraction of a layer's MACs left: kept entries, or kept output channels (along
  ``out_axis``, the layer's ``Layer.out_axis``; of each step of a weight with ``stacked``
  leading axes, ``Layer.stacked``)."""
  if structure == "channel":
    keep = np.moveaxis(keep, out_axis, -1)
    steps = keep.reshape(math.prod(keep.shape[:stacked]), -1, keep.shape[-1])
    return float(np.mean(np.any(steps, axis=1)))
  return float(np.mean(keep))


def option_bops(macs: int, option: Option, dens: float) -> int:
  """``ceil(MACs x density) x weight bits x input bits`` of one layer and example; inputs of 0
  bits (float, never quantized) count 32."""
  return (int(math.ceil(macs * dens - 1e-9)) * int(option.weight_bits)
          * (int(option.act_bits) or 32))


def option_cost(keep: np.ndarray, option: Option, macs: int, structure: str,
                out_axis: int = -1, stacked: int = 0) -> tuple[int, int]:
  """``(bytes, BOPs)`` of one layer's option, given the entries its sparsity keeps: the weight's
  fixed-width codes in the artifact (:func:`weight_bytes`) and its BOPs per example."""
  return (weight_bytes(keep, option.weight_bits),
          option_bops(macs, option, density(keep, structure, out_axis, stacked)))


def layer_costs(weight: Any, layer: Any, options: Sequence[Option], macs: int, structure: str,
                keep: Callable[[float], np.ndarray] | None = None) -> list[tuple[int, int]]:
  """``(bytes, BOPs)`` of each option of a traced :class:`~jaxcompress.selection.Layer` whose
  weight is ``weight``: pruned as training prunes it (:func:`keep_mask`, or ``keep(sparsity)``
  where the caller keeps the masks), one mask per sparsity."""
  keep = keep or (lambda s: keep_mask(weight, s, structure, layer))
  keeps = {s: keep(s) for s in {o.sparsity for o in options}}
  return [option_cost(keeps[o.sparsity], o, macs, structure, layer.out_axis, layer.stacked)
          for o in options]
