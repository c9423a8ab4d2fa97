"""Which layers of a model are compressed: one policy for pruning and quantization.

:func:`trace_layers` runs the model once, abstractly (``jax.eval_shape``: no FLOPs), through
:mod:`jaxcompress.models.functional`, and records every call of a linear-like layer (Conv,
Dense/Linear, DenseGeneral/LinearGeneral, Einsum, Embed; Linen or NNX) in forward order, and each
normalization layer whose input is directly the output of such a layer. From that trace:

- **compressible**: every floating-point weight of rank >= 2 held by a linear-like layer;
- **first and last** compressible layers in forward order (found from the model, never from
  names) stay dense and at 8 bits by default, as they cost the most accuracy per byte;
- **not compressed**: floating-point parameters of rank >= 2 outside such layers (a custom
  ``self.param``); they stay float and are listed, so nothing is silently skipped.

Explicit regex rules override the defaults (see :mod:`jaxcompress.rules`).

Example:
  >>> layers = trace_layers(model, variables, x)
  >>> layers.first, layers.last          # module paths
  ('conv1', 'linear')
  >>> pruning_rules = layers.prune_rules()
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError, first_line, shortened
from jaxcompress.models.functional import (called_shape, contraction_axes, functional, output_axes,
                                           output_axis, stacked_count, weight_name)
from jaxcompress.rules import Rule, flat_paths
from jaxcompress.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Layer:
  """One linear-like layer, as the forward called it first.

  Attributes:
    path: module path (``Dense_0``, ``blocks/0/attn/query``).
    kind: ``linear`` or ``embed``.
    type_name: module class name.
    weight: path of its weight parameter in ``variables['params']`` (``.../kernel`` or
      ``.../embedding``).
    shape: the weight's shape.
    input_shape: the shape of its input at that call.
    norm: path of the normalization layer applied directly to its output, if any.
    reduce_axes: the weight axes its product sums over
      (:func:`~jaxcompress.models.functional.contraction_axes`): where N:M groups run.
    out_axis: the weight axis of its output channels
      (:func:`~jaxcompress.models.functional.output_axis`): what channel pruning removes.
    stacked: leading axes the stored weight has beyond what one call uses (``nn.scan`` or
      ``nn.vmap`` over ``params``: one slice per step); 0 for an ordinary layer.
    window_axes: the weight axes that are neither reduction, output nor step axes: a Conv
      kernel's spatial window (``[*window, in, out]`` -> ``(0, ..., ndim - 3)``), ``()`` for a
      Dense, DenseGeneral, Einsum or Embed. A whole kernel (``prune.structure=kernel``) is the
      window of one index of every other axis.
  """
  path: str
  kind: str
  type_name: str
  weight: str
  shape: tuple[int, ...]
  input_shape: tuple[int, ...]
  norm: str | None = None
  reduce_axes: tuple[int, ...] = ()
  stacked: int = 0
  out_axis: int = -1
  window_axes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelLayers:
  """The traced layers of a model.

  Invariants: ``layers`` are the compressible layers in order of their first call (each once);
  ``last`` is the layer called last (an Embed reused as the output head is both first and last);
  ``norms`` maps a normalization layer's path to the layer it directly follows and
  ``batchnorms`` each such BatchNorm's path to its epsilon (the norms an export folds);
  ``uncovered`` lists parameter paths of floating-point weights of rank >= 2 that no layer holds.
  """
  layers: tuple[Layer, ...]
  norms: dict[str, str]
  uncovered: tuple[str, ...]
  last: str | None = None
  batchnorms: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def first(self) -> str | None:
    return self.layers[0].path if self.layers else None

  def layer(self, path: str) -> Layer:
    return next(l for l in self.layers if l.path == path)

  def edge_weights(self) -> tuple[str, ...]:
    """Weight paths of the first and last layer (one path when they are the same layer)."""
    if not self.layers:
      return ()
    return tuple(dict.fromkeys((self.layers[0].weight, self.layer(self.last).weight)))

  def reduce_axes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{prefix + weight path: reduction axes}`` of every layer (the N:M group axes)."""
    return {prefix + l.weight: l.reduce_axes for l in self.layers}

  def output_axes(self, prefix: str = "") -> dict[str, int]:
    """``{prefix + weight path: output-channel axis}`` of every layer (what channel pruning
    removes)."""
    return {prefix + l.weight: l.out_axis for l in self.layers}

  def window_axes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{prefix + weight path: window axes}`` of every layer (``()``: no window, each entry is
    a kernel of its own under ``prune.structure=kernel``)."""
    return {prefix + l.weight: l.window_axes for l in self.layers}

  def stacked(self, prefix: str = "") -> dict[str, int]:
    """``{prefix + weight path: stacked leading axes}`` of every layer whose weight is stacked by
    a lifted transform (``nn.scan``/``nn.vmap`` over ``params``: one weight per step)."""
    return {prefix + l.weight: l.stacked for l in self.layers if l.stacked}

  def warn_uncovered(self, where: str, consequence: str = "") -> None:
    """Warns (naming ``where``) of the layer weights (``kernel``, ``embedding``) that no traced
    layer holds: they belong to a layer of a type the library does not compress (``nn.ConvLocal``,
    ``nn.OptimizedLSTMCell``, which computes its gates' products itself), or to one the forward
    does not call, so they stay float and dense (``consequence`` adds what else that means to
    the caller)."""
    kernels = [p for p in self.uncovered if p.rpartition("/")[2] in ("kernel", "embedding")]
    if kernels:
      warnings.warn(f"{where}: {shortened(kernels, 4)} belong to no Conv, ConvTranspose, "
                    "Dense/Linear, DenseGeneral/LinearGeneral, Einsum or Embed the forward calls, "
                    "the layer types the library compresses (others, e.g. nn.ConvLocal or "
                    "nn.OptimizedLSTMCell, which computes its gates' products itself, are not): "
                    f"they stay float and dense{consequence}", stacklevel=3)

  def prune_rules(self, *, keep_edges: bool = True) -> list[Rule]:
    """Explicit pruning rules over parameter paths: every compressible weight, edges dense."""
    edges = set(self.edge_weights()) if keep_edges else set()
    rules: list[Rule] = [(re.escape(w), False) for w in sorted(edges)]
    rules += [(re.escape(l.weight), True) for l in self.layers if l.weight not in edges]
    return rules + [(".*", False)]


def _floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                        jnp.floating)


def _normalizes_last_axis(module: Any, ndim: int) -> bool:
  """Whether a normalization layer's statistics run along its input's last axis (a BatchNorm's
  ``axis``, a LayerNorm's ``feature_axes``), the output-channel axis a fold scales."""
  axes = getattr(module, "axis", getattr(module, "feature_axes", -1))
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return len(axes) == 1 and int(axes[0]) % max(ndim, 1) == ndim - 1


def trace_layers(model: Any, variables: dict, *args: Any, field: str = "model",
                 **kwargs: Any) -> ModelLayers:
  """Finds the model's compressible layers, in forward order, by one abstract forward.

  Args:
    model: a Flax Linen or NNX module, or a ``Functional``.
    variables: its variables.
    *args: sample inputs (only shapes and dtypes matter).
    field: the config field that names the model, for messages.
    **kwargs: further keyword arguments of the model.

  Returns:
    The :class:`ModelLayers`.

  Raises:
    ConfigError: if the forward fails on these inputs (the message names the model, the input
      shapes and the error), or returns more than one array.
  """
  fm = functional(model)
  params = variables["params"]
  flat = flat_paths(params)
  stats = flat_paths(variables.get("batch_stats", {}))
  calls: dict[str, Layer] = {}
  outputs: list[tuple[Any, str]] = []  # (output object, layer path): to find norms that follow
  norms: dict[str, str] = {}
  batchnorms: dict[str, float] = {}
  seen: list[str] = []  # every layer called, in call order
  # An NNX variable held by two modules (b.kernel = a.kernel) is in the state once, under the
  # first module's path: {id(variable): weight path} of the layers found, and the calls of a
  # module whose weight is not under its own path.
  held: dict[int, str] = {}
  aliased: list[tuple[str, Any]] = []

  def record(call, run):
    if call.kind == "norm" and getattr(call.module, "axis_name", None) is not None:
      raise ConfigError(f"model: the {call.type_name} {call.path!r} averages its statistics over "
                        f"axis_name={call.module.axis_name!r}, a pmap collective; drop axis_name: "
                        "batches are sharded over a mesh with jit, so its statistics already "
                        "cover the global batch")
    out = run(call.x)
    seen.append(call.path)
    name = weight_name(call.kind)
    if name is not None:
      wpath = f"{call.path}/{name}" if call.path else name
      w = flat.get(wpath)
      var = getattr(call.module, name, None) if fm.kind == "nnx" else None
      if w is not None and var is not None:
        held.setdefault(id(var), wpath)
      elif w is None and var is not None:
        aliased.append((call.path, var))
      stacked = 0 if w is None else stacked_count(jnp.shape(w), called_shape(call, name), wpath)
      if (call.path not in calls and w is not None and jnp.ndim(w) >= 2 and _floating(w)):
        ndim = jnp.ndim(w) - stacked  # one call's weight
        reduce = contraction_axes(call.module, ndim)
        outputs_at = output_axes(call.module, ndim)
        calls[call.path] = Layer(
            call.path, call.kind, call.type_name, wpath, tuple(jnp.shape(w)),
            tuple(jnp.shape(call.x)), reduce_axes=tuple(a + stacked for a in reduce),
            stacked=stacked, out_axis=outputs_at[-1] + stacked,
            window_axes=tuple(a + stacked for a in range(ndim)
                              if a not in reduce and a not in outputs_at))
      # A BatchNorm folds into a weight whose output channels are its last axis, and not into
      # one stacked by a lifted transform (nn.scan: [steps, ...], one slice per call).
      if call.kind == "linear" and (w is None or (
          output_axis(call.module, jnp.ndim(w)) == jnp.ndim(w) - 1 and not stacked)):
        outputs.append((out, call.path))
    elif (call.kind == "norm" and jnp.ndim(stats.get(f"{call.path}/mean", 0.0)) <= 1
          and _normalizes_last_axis(call.module, jnp.ndim(call.x))):
      for obj, path in outputs:
        if obj is call.x:
          norms.setdefault(call.path, path)
          if "BatchNorm" in call.type_name:
            batchnorms.setdefault(call.path, float(call.module.epsilon))
    return out

  check_nonempty(args, field)
  try:
    out, _ = jax.eval_shape(lambda v, a: fm.apply(v, *a, hook=record, **kwargs), variables, args)
  except ConfigError:
    raise
  except Exception as e:  # a user model failing on the data's shape is a user mistake
    shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), args[0] if len(args) == 1 else args)
    raise ConfigError(f"{field}: {fm.name}'s forward fails on inputs of shape {shapes} "
                      f"({first_line(e)}); the "
                      "model must accept the dataset's input batch (several inputs: as one dict or "
                      "tuple argument)") from None
  if not isinstance(out, jax.ShapeDtypeStruct):
    shown = jax.tree.map(lambda a: tuple(a.shape), out)
    raise ConfigError(f"{field}: {fm.name} returns {type(out).__name__} {shown}, not one array; "
                      "the library trains and exports a model of one output (logits, classes "
                      "last): wrap the model in a module that returns the logits alone")
  outputs.clear()
  # A call on another layer's weight (one NNX variable in two modules) is a call of that layer:
  # its weight is the one the product runs on, for the first and last layer as for the rest.
  by_weight = {l.weight: p for p, l in calls.items()}
  resolved = {path: by_weight.get(held.get(id(var)), path) for path, var in aliased}
  order = [resolved.get(p, p) for p in seen]
  for path, var in dict(aliased).items():
    owner = held.get(id(var))
    warnings.warn(f"layer {path!r} shares its weight with {owner!r} (one variable in two "
                  f"modules): the weight is compressed once, under {owner!r}, and the inputs of "
                  f"layer {path!r} are not quantized" if owner else
                  f"layer {path!r}: its weight is not in the parameters under its own path; the "
                  "layer is left out of compression", stacklevel=2)
  aliased.clear()
  owners = set(seen)
  layers = tuple(dataclasses.replace(calls[path], norm=next(
      (n for n, p in norms.items() if p == path), None)) for path in dict.fromkeys(order)
                 if path in calls)
  uncovered = tuple(p for p, w in flat.items()
                    if p.rpartition("/")[0] not in owners and jnp.ndim(w) >= 2 and _floating(w))
  last = next((p for p in reversed(order) if p in calls), None)
  return ModelLayers(layers, norms, uncovered, last, batchnorms)


def check_nonempty(args: Any, field: str) -> None:
  """Raises one line if an input of ``args`` is a list of Python numbers, not an array, or an
  input array has no entries (a sequence of length 0)."""
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
    if len(keypath) > 1 and not hasattr(leaf, "shape"):  # in a list: tree_map splits it up
      raise ConfigError(f"{field}: the model's inputs must be arrays (or a dict or tuple of "
                        f"arrays), got a {type(leaf).__name__} at inputs"
                        f"{jax.tree_util.keystr(keypath[1:])}; pass np.asarray(...) of a list")
  empty = [tuple(jnp.shape(a)) for a in jax.tree.leaves(args) if 0 in jnp.shape(a)]
  if empty:
    raise ConfigError(f"{field}: the model's input of shape {empty[0]} holds no entries (a batch "
                      "or sequence of length 0); pass inputs with at least one entry on every "
                      "axis")


def require_layers(layers: ModelLayers, field: str = "student.name") -> None:
  """Raises one line if the model has no layer to compress."""
  if not layers.layers:
    raise ConfigError(f"{field}: the model has no layer to compress (no Conv, ConvTranspose, "
                      "Dense/Linear, DenseGeneral/LinearGeneral, Einsum or Embed with a "
                      "floating-point weight of rank >= 2)")


def table(layers: ModelLayers, decisions: dict[str, str] | None = None) -> str:
  """A Markdown table of the layers (and of the uncovered weights, marked as not compressed)."""
  decisions = decisions or {}
  rows = [(i, f"`{l.path}`", l.type_name, list(l.shape), list(l.input_shape),
           decisions.get(l.path, "")) for i, l in enumerate(layers.layers)]
  rows += [("", f"`{p}`", "(type not compressed)", "", "", "not compressed")
           for p in layers.uncovered]
  return markdown_table(("#", "layer", "type", "weight shape", "input shape", "decision"), rows)


def paths(layers: ModelLayers) -> Sequence[str]:
  """Module paths of the compressible layers in forward order."""
  return [l.path for l in layers.layers]
