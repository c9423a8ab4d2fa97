"""What a plan costs: artifact bytes (from the export's own size code) and BOPs.

**Bytes.** A layer's weight takes, in the artifact, the smallest of the encodings
:func:`jaxcompress.export.sparse.sizes` lists for its non-zero pattern and bit width: exactly the
function the export calls to choose (:func:`weight_bytes`). Plans prune one-shot from the weights
they were sized on, so the pattern sized is the pattern exported; weights that quantize to zero
only remove non-zeros, which never makes any encoding larger. Everything else in the artifact
(scales, folded BatchNorms, biases, the JSON spec) is measured once on a reference export of the
same model at 8 bits (:func:`overhead_bytes`), plus the few spec characters a sparse encoding or a
different input scale may add (:func:`spec_slack`). So the artifact's bytes on disk are at most
``overhead + sum of weight bytes`` (its arrays are zlib-compressed only when that is smaller).

**BOPs** (bit operations, the usual compute proxy): ``MACs x weight bits x input bits`` per layer
and example, the MACs counting multiplications by kept weights: a dense layer's MACs times its
density (unstructured, 2:4) or its kept output channels (channel pruning; surgery also removes the
next layer's inputs, which only lowers the true count, so the budget holds).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxcompress import pruning
from jaxcompress.budget.presets import Option
from jaxcompress.export import sparse
from jaxcompress.models.functional import functional, weight_name
from jaxcompress.rules import tree_get

# Longest float32 text (str(np.float32)) and zero-point text of an input quantization entry.
_SCALE_TEXT, _ZP_TEXT = 15, 4


def keep_mask(weight: Any, sparsity: float, structure: str = "unstructured") -> np.ndarray:
  """The kept entries of ``weight`` at ``sparsity``: lowest magnitudes pruned, as training does.

  ``unstructured``: ``round(sparsity * n)`` entries; ``nm``: 2 of every 4 along the reduction axis
  (any ``sparsity > 0``); ``channel``: ``round(sparsity * C)`` whole output channels (L1 norm).
  """
  if sparsity <= 0:
    return np.ones(np.shape(weight), bool)
  masker = {"unstructured": pruning.unstructured("layer"), "nm": pruning.n_of_m(2, 4),
            "channel": pruning.channels("l1")}[structure]
  return np.asarray(masker(["weight"], [jax.numpy.abs(jax.numpy.asarray(weight))],
                           float(sparsity))[0], bool)


def weight_bytes(keep: Any, bits: int) -> int:
  """Bytes the export stores for a weight with this non-zero pattern at ``bits`` bits."""
  return int(min(sparse.sizes(np.asarray(keep, bool), int(bits)).values()))


def spec_slack(size: int) -> int:
  """Spec characters a sparse encoding may add to a weight of ``size`` entries (an upper bound).

  The reference export stores it dense; a sparse one adds ``"encoding"``, ``"nnz"``, gap fields
  and a ``"positions"`` segment, each count at most ``size``.
  """
  digits = len(str(int(size)))
  return (len(',"encoding":"bitmap","nnz":') + len(',"gap_bits":8,"codes":')
          + len('"positions":,') + 3 * digits)


def overhead_bytes(spec: Mapping[str, Any], spec_bytes: int, weights: Sequence[str]) -> int:
  """Artifact bytes besides the planned weights' codes, from a reference export's spec.

  Args:
    spec: the reference artifact's parsed ``spec.json`` (``jaxcompress.export.read_spec``), with
      every planned layer quantized at the largest weight and input bits a plan may use.
    spec_bytes: the size of its ``spec.json`` file.
    weights: the planned weights' parameter paths (``layer1_0/conv1/kernel``).

  Returns:
    ``spec bytes + raw array bytes - the planned weights' position and value bytes`` plus the
    text an input scale or zero point may add (:data:`_SCALE_TEXT`) and :func:`spec_slack`.
  """
  planned = {f"params/{w}" for w in weights}
  codes = sum(int(m["segments"].get("positions", 0)) + int(m["segments"].get("values", 0))
              for m in spec["layers"] if m["path"] in planned)
  found = {m["path"] for m in spec["layers"]} & planned
  if found != planned:
    raise ValueError(f"reference export lacks {sorted(planned - found)[:3]}")
  acts = list(spec.get("acts", {}).values()) + [m["act"] for m in spec["layers"] if "act" in m]
  act_slack = sum(max(0, _SCALE_TEXT - len(json.dumps(a["scale"])))
                  + max(0, _ZP_TEXT - len(json.dumps(a["zero_point"]))) for a in acts)
  sizes = {m["path"]: int(np.prod(m["shape"])) for m in spec["layers"]}
  return (int(spec_bytes) + int(spec["arrays"]["raw_bytes"]) - codes + act_slack
          + sum(spec_slack(sizes[p]) for p in planned))


def layer_macs(model: Any, variables: Mapping[str, Any], sample: Any) -> dict[str, int]:
  """Multiply-accumulates per example of every linear-like layer call (Embed: 0), by path.

  ``output positions x weight entries``: ``H' W' x kh kw Cin Cout`` for a conv, ``in x out`` for
  a dense layer; a layer called several times counts every call. Abstract (no FLOPs).
  """
  fm = functional(model)
  macs: dict[str, int] = {}

  def record(call, run):
    out = run(call.x)
    name = weight_name(call.kind)
    if call.kind == "linear" and name is not None:
      w = tree_get(variables["params"], f"{call.path}/{name}" if call.path else name)
      if w is not None and np.ndim(w) >= 2:
        positions = int(np.prod(np.shape(out)[1:-1], dtype=np.int64))
        macs[call.path] = macs.get(call.path, 0) + positions * int(np.prod(np.shape(w)))
    elif call.kind == "embed":
      macs.setdefault(call.path, 0)
    return out

  jax.eval_shape(lambda v, x: fm.apply(v, x, hook=record), dict(variables), sample[:1])
  return macs


def density(keep: np.ndarray, structure: str) -> float:
  """Fraction of a layer's MACs left: kept entries, or kept output channels."""
  if structure == "channel":
    return float(np.mean(np.any(keep.reshape(-1, keep.shape[-1]), axis=0)))
  return float(np.mean(keep))


def option_bops(macs: int, option: Option, dens: float) -> int:
  """``ceil(MACs x density) x weight bits x input bits`` of one layer and example."""
  return int(math.ceil(macs * dens - 1e-9)) * int(option.weight_bits) * int(option.act_bits)
