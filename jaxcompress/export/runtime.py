"""The exported model: the user's own module, run on the artifact's arrays.

Loading rebuilds two things from the stored tensors:

- ``variables``: a variables dict for the user's module (``params``, ``batch_stats``, ...), every
  weight dequantized (``(q - zp) * scale``, the values fake quantization produced), pruned entries
  exactly 0. A folded BatchNorm gets ``scale = gain`` (1 where the gain is in the weight scales
  before it), ``bias = folded bias``, ``mean = 0`` and ``var = 1 - eps``, so a plain
  ``module.apply(variables, x)`` computes (up to float rounding) the exported model without its
  input quantization. A BatchNorm without a scale takes its gain in ``var = 1 / gain**2 - eps``
  (its gain, ``1 / sqrt(var + eps)``, is positive); one without a bias takes the bias in
  ``mean = -bias / gain``.
- ``arrays``: the input of ``apply_fn(arrays, x)``, **the exported model**: ``variables`` plus the
  folded BatchNorms' ``(gain, bias)`` and each quantized layer's input ``(scale, zero_point)``.
  ``apply_fn`` runs the module through :mod:`jaxcompress.models.functional` with two hooks: each
  folded BatchNorm computes ``x * gain + bias`` and each quantized layer's input is fake-quantized
  with the stored parameters, exactly as the fake-quant model evaluated with
  :meth:`jaxcompress.compose.Compression.eval_variables` does. Scales and zero points pass through
  ``jax.lax.optimization_barrier``, so XLA cannot turn a division by a constant scale into a
  multiplication by its reciprocal (which rounds differently) when the arrays are compiled in as
  constants (the serving function). On CPU the logits agree bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxcompress.errors import ConfigError, first_line
from jaxcompress.export import inputs as io
from jaxcompress.export.codec import LayerTensor, stored_order
from jaxcompress.export.finalize import FOLD, FOLDED_LEAVES, Finalized
from jaxcompress.models.functional import Hook, chain_hooks, fold_hook, functional
from jaxcompress.quantization import fake_quant


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _tensor_value(t: LayerTensor, axes: tuple[int, ...] | None) -> np.ndarray:
  """A stored tensor's real values, its channel axes moved back where they were."""
  value = t.kernel()
  return value if axes is None else np.transpose(value, np.argsort(stored_order(value.ndim,
                                                                                  axes)))


def rebuild(fin: Finalized, expected: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict:
  """``arrays`` of the exported model (see the module docstring).

  Args:
    fin: the stored tensors.
    expected: ``{collection/leaf path: (shape, dtype)}`` of the module's variables.
  """
  flat = {}
  fold = {}
  for path, eps in fin.folded.items():
    rows = fin.tensors[f"{FOLD}/{path}"].kernel()
    # [gain; bias], or [bias] when the gain went into the weight scales before it.
    gain, bias = rows if len(rows) == 2 else (np.ones_like(rows[0]), rows[0])
    fold[path] = (gain, bias)
    mean, var = np.zeros_like(gain), np.full_like(gain, 1 - eps)
    if f"params/{path}/scale" not in expected:
      var = 1 / np.square(gain.astype(np.float64)) - eps
    if f"params/{path}/bias" not in expected:  # a zero gain has a zero bias: no scale or shift
      mean = -np.divide(bias, gain, out=np.zeros_like(bias), where=gain != 0)
    for (collection, leaf), value in zip(FOLDED_LEAVES, (gain, bias, mean, var)):
      flat[f"{collection}/{path}/{leaf}"] = value
  for key, t in fin.tensors.items():
    if not key.startswith(f"{FOLD}/"):
      flat[key] = _tensor_value(t, fin.axes.get(key))
  flat = {k: np.asarray(v.reshape(expected[k][0]), expected[k][1]) for k, v in flat.items()
          if k in expected}
  acts = {p: (np.float32(a["scale"]), np.int32(a["zero_point"])) for p, a in fin.acts.items()}
  return {"variables": _unflatten(flat), "fold": fold, "acts": acts}


def act_hook(arrays_acts: Mapping[str, tuple], grids: Mapping[str, tuple[int, int]]):
  """Fake-quantizes the input of each layer in ``grids`` with its stored scale and zero point."""
  def hook(call, run):
    if call.kind != "linear" or call.path not in grids:
      return run(call.x)
    scale, zero_point = jax.lax.optimization_barrier(arrays_acts[call.path])
    qmin, qmax = grids[call.path]
    return run(fake_quant(call.x, scale, zero_point, qmin=qmin, qmax=qmax))

  return hook


def make_apply_fn(model: Any, acts: Mapping[str, dict],
                  inner: Callable[[dict], Hook] | None = None) -> Callable:
  """``apply_fn(arrays, x) -> output``: the exported model (see the module docstring).

  ``inner(arrays)``, if given, is one more hook, run inside the others at every layer (after the
  input quantization): how :func:`jaxcompress.export.slim.slim` computes kept channels only.
  """
  fm = functional(model)
  grids = {p: (int(a["qmin"]), int(a["qmax"])) for p, a in acts.items()}

  def apply_fn(arrays, *args, **kwargs):
    fold = {p: jax.lax.optimization_barrier(v) for p, v in arrays["fold"].items()}
    hook = chain_hooks(fold_hook(fold), act_hook(arrays["acts"], grids),
                       inner(arrays) if inner is not None else None)
    return fm.apply(arrays["variables"], *args, hook=hook, **kwargs)[0]

  return apply_fn


class LoadedModel:
  """A loaded artifact.

  Attributes:
    model: the user's module (or its ``Functional``) the artifact was loaded for.
    variables: a variables dict for ``model`` (see the module docstring).
    arrays: ``apply_fn``'s input: ``{'variables', 'fold', 'acts'}``.
    apply_fn: ``apply_fn(arrays, x) -> output``: the exported model.
    spec: the artifact's JSON spec.
    finalized: the stored tensors (integer codes, scales, codebooks).
  """

  def __init__(self, model: Any, arrays: dict, apply_fn: Callable, spec: dict,
               finalized: Finalized):
    self.model, self.arrays, self.apply_fn, self.spec = model, arrays, apply_fn, spec
    self.variables = arrays["variables"]
    self.finalized = finalized
    self._jitted = jax.jit(apply_fn)

  def logits(self, x: Any) -> jax.Array:
    """The exported model's output for a batch, jitted.

    Raises:
      ConfigError: when the model fails on a batch unlike the one it was exported for (another
        shape, dtype or structure), naming both.
    """
    try:
      return self._jitted(self.arrays, x)
    except ConfigError:
      raise
    except Exception as e:  # re-raised as is when the input is the one exported for
      try:
        given = io.of_example(x)
      except ConfigError:
        given = None
      if given == self.spec["input"]:
        raise
      shapes = jax.tree.map(lambda a: (tuple(np.shape(a)), np.asarray(a).dtype.name), x)
      raise ConfigError(f"exported model: its forward fails on inputs {shapes} "
                        f"({first_line(e)}); it "
                        f"was exported for a batch of {io.describe(self.spec['input'])}") from None

  def __iter__(self):  # (model, arrays, apply_fn) = load(...)
    return iter((self.model, self.arrays, self.apply_fn))


def check_loaded(loaded: Any, field: str) -> None:
  """One line unless ``loaded`` is a :class:`LoadedModel` (what ``load`` returns), not the module,
  the artifact's folder or a ``slim`` result."""
  if isinstance(loaded, LoadedModel):
    return
  fix = ("pass its .loaded" if isinstance(getattr(loaded, "loaded", None), LoadedModel) else
         "load the artifact first: export.load(DIR/export, model)")
  raise ConfigError(f"{field}: loaded must be the LoadedModel that export.load returns, got a "
                    f"{type(loaded).__name__}; {fix}")

