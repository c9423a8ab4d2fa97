"""A second-order sensitivity proxy (HAWQ): Hessian traces instead of measured damage.

For a layer with weight ``W`` (``n`` entries) compressed to ``C(W)`` (pruned and fake-quantized as
the scan does it), the second-order Taylor expansion of the loss around the trained weights, whose
gradient is about zero, gives ``damage ~ 1/2 (W - C(W))^T H (W - C(W))``. HAWQ-v2 approximates the
quadratic form by the mean eigenvalue: ``1/2 tr(H)/n ||W - C(W)||^2``. :func:`hessian_traces`
estimates ``tr(H)/n`` of every layer by Hutchinson's method (``E[v^T H v]`` with random +-1
vectors ``v``, one Hessian-vector product each, never the Hessian itself); :func:`proxy_damage`
turns that into a damage for every option of a scan; :func:`spearman` says how well the proxy
ranks what the scan measured.

References:
  Dong, Yao, Arfeen, Gholami, Mahoney, Keutzer. HAWQ-V2: Hessian Aware trace-Weighted
  Quantization of Neural Networks. NeurIPS 2020.
  Hutchinson. A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines. 1990.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import quantization
from jaxcompress.budget.cost import keep_mask
from jaxcompress.budget.presets import Option
from jaxcompress.models.functional import functional
from jaxcompress.quantization.layer import quantize_kernel
from jaxcompress.rules import tree_get, tree_set
from jaxcompress.selection import trace_layers
from jaxcompress.steps import cross_entropy, per_label, weighted_mean


def hessian_traces(model: Any, variables: Mapping[str, Any], batches: Sequence[Any],
                   paths: Sequence[str], *, samples: int = 8, seed: int = 0) -> dict[str, float]:
  """``tr(H)/n`` of the mean held-out cross-entropy w.r.t. each layer's weight (Hutchinson).

  Args:
    model: a Flax Linen or NNX module.
    variables: its trained variables (evaluated in eval mode).
    batches: :class:`jaxcompress.data.Batch` es (image, label, weight), all of one shape.
    paths: the layers (paths as ``trace_layers`` names them).
    samples: random vectors per batch; the estimate's error falls as ``1/sqrt(samples)``.
    seed: of the random vectors.

  Returns:
    ``{path: mean Hessian diagonal}`` (the trace divided by the weight's size), the batches'
    estimates weighted by their example weights. One compilation for every batch and sample.
  """
  layers = {l.path: l for l in trace_layers(model, dict(variables), batches[0].image).layers}
  names = [layers[p].weight for p in paths]
  fm = functional(model)
  params = variables["params"]

  def loss(ws, batch):
    p = params
    for name, w in zip(names, ws):
      p = tree_set(p, name, w)
    logits, _ = fm.apply({**variables, "params": p}, batch.image)
    return weighted_mean(cross_entropy(logits, batch.label), batch.weight)

  @jax.jit
  def quadratic_forms(ws, batch, key):  # v^T H v for one +-1 vector per layer
    vs = [jax.random.rademacher(k, w.shape, jnp.float32)
          for k, w in zip(jax.random.split(key, len(ws)), ws)]
    _, hv = jax.jvp(lambda w: jax.grad(loss)(w, batch), (ws,), (vs,))
    return jnp.stack([jnp.sum(v * h) for v, h in zip(vs, hv)])

  ws = [jnp.asarray(tree_get(params, n), jnp.float32) for n in names]
  key = jax.random.key(seed)
  total, weight = np.zeros(len(ws)), 0.0
  for batch in batches:
    w = float(np.sum(per_label(batch.weight, batch.label)))
    for _ in range(samples):
      key, sub = jax.random.split(key)
      total += w * np.asarray(quadratic_forms(ws, batch, sub), np.float64) / samples
    weight += w
  return {p: float(t / weight / w.size) for p, t, w in zip(paths, total, ws)}


def proxy_damage(model: Any, variables: Mapping[str, Any], sample: Any,
                 traces: Mapping[str, float], options: Mapping[str, Sequence[Option]], *,
                 structure: str = "unstructured",
                 per_channel: bool = True) -> dict[str, np.ndarray]:
  """``1/2 tr(H)/n ||W - C(W)||^2`` of every option of every layer in ``traces``.

  ``C`` prunes the lowest magnitudes (``structure``) and fake-quantizes per channel, min-max, as
  :func:`jaxcompress.budget.scan` does; 0 weight bits: pruned only.
  """
  fm = functional(model)
  qz = quantization.quantize(fm, [(".*", dict(weight_bits=8, act_bits=8,
                                                per_channel=per_channel))])
  qlayers = {l.path: l for l in qz.init(dict(variables), sample).layers}
  layers = {l.path: l for l in trace_layers(model, dict(variables), sample).layers}
  out = {}
  for path, trace in traces.items():
    w = np.asarray(tree_get(variables["params"], layers[path].weight), np.float32)
    row = []
    for o in options[path]:
      c = w * keep_mask(w, o.sparsity, structure, layers[path])
      if o.weight_bits:
        c = np.asarray(quantize_kernel(qlayers[path], jnp.asarray(c), None, o.weight_bits))
      row.append(0.5 * trace * float(np.sum((w.astype(np.float64) - c) ** 2)))
    out[path] = np.asarray(row)
  return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation of two equally long sequences (ties ranked by position)."""
  ra = np.argsort(np.argsort(np.asarray(a, np.float64)))
  rb = np.argsort(np.argsort(np.asarray(b, np.float64)))
  return float(np.corrcoef(ra, rb)[0, 1])
