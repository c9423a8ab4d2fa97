"""Weight and activation quantization of an unmodified Flax Linen model, as pure functions.

``quantize(model, rules)`` intercepts the ``__call__`` of every ``nn.Conv``/``nn.Dense`` with
``flax.linen.intercept_methods``: a selected layer runs on its fake-quantized input and kernel,
and the model's code stays untouched. State is explicit (a :class:`QuantState` threaded through
the step, never globals):

- ``steps[path]['weight' | 'act']``: LSQ step sizes, the only **trainable** leaves;
- ``ranges[path]``: ``[lo, hi]`` moving-average input ranges (``minmax`` layers), updated by
  ``apply(..., train=True)``, frozen with ``train=False``, set by :func:`calibrate`;
- ``layers``: static :class:`QuantLayer` descriptions (which layer got which bits), fixed by
  ``init`` and part of the treedef, so jit caches stay valid.

Example (one jitted QAT step; gradients reach params through the STE and the LSQ steps):

  >>> qz = quantize(model, [("conv1|linear", dict(weight_bits=8, act_bits=8)),
  ...                       (".*", dict(weight_bits=4, act_bits=4, method="lsq"))])
  >>> qstate = qz.init(variables, x0)
  >>> @jax.jit
  ... def train_step(params, batch_stats, qstate, opt_state, x, y):
  ...   def loss_fn(trainable):
  ...     logits, new_state, new_q = qz.apply(
  ...         {"params": trainable["params"], "batch_stats": batch_stats},
  ...         qstate.replace(steps=trainable["qsteps"]), x, train=True)
  ...     return cross_entropy(logits, y).mean(), (new_state, new_q)
  ...   trainable = {"params": params, "qsteps": qstate.steps}
  ...   grads, (new_state, new_q) = jax.grad(loss_fn, has_aux=True)(trainable)
  ...   updates, opt_state = tx.update(grads, opt_state, trainable)
  ...   trainable = optax.apply_updates(trainable, updates)
  ...   return (trainable["params"], new_state["batch_stats"],
  ...           new_q.replace(steps=trainable["qsteps"]), opt_state)

Limitation: a layer must be called directly by the traced model, not inside a lifted transform
(``nn.scan``, ``nn.remat``, ``nn.jit``), since range updates leave through the interceptor.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
  Esser et al. Learned Step Size Quantization. ICLR 2020 (arXiv:1902.08153, 2019).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxcompress.errors import check_range
from jaxcompress.quantization.calibration import ema_range
from jaxcompress.quantization.config import compile_rules, default_rules
from jaxcompress.quantization.layer import (QuantLayer, batch_range, bits_at, init_layer_state,
                                            quantize_input, quantize_kernel)
from jaxcompress.quantization.schedule import BitSchedule
from jaxcompress.quantization.spec import layer_specs
from jaxcompress.rules import Rule

LayerFn = Callable[[str, nn.Module, jax.Array, dict], Any]


@struct.dataclass
class QuantState:
  """The quantization state of a model (a pytree; ``layers`` is static).

  Attributes:
    steps: ``{path: {'weight': s, 'act': s}}`` LSQ step sizes; trainable, give them to the
      optimizer (empty for ``minmax`` layers).
    ranges: ``{path: float32[2]}`` input ranges ``[lo, hi]`` of ``minmax`` layers whose input is
      quantized; not trainable.
    layers: the quantized layers in call order.
  """
  steps: dict[str, dict[str, jax.Array]]
  ranges: dict[str, jax.Array]
  layers: tuple[QuantLayer, ...] = struct.field(pytree_node=False)

  def layer(self, path: str) -> QuantLayer | None:
    """The :class:`QuantLayer` at ``path``, or ``None`` if that layer is not quantized."""
    return next((layer for layer in self.layers if layer.path == path), None)


class Quantizer(NamedTuple):
  """The pure functions returned by :func:`quantize` (see their docstrings in this module)."""
  init: Callable[..., QuantState]
  apply: Callable[..., tuple[Any, dict, QuantState]]
  specs: Callable[..., dict]
  observe: Callable[..., dict]


class _Interceptor:
  """Calls ``fn(path, module, x, params)`` for each quantizable layer call.

  ``fn`` returns ``None`` (run the layer as is) or ``(x, params)`` to run it on instead. The
  replacement runs as an unbound clone of the module, so any Conv/Dense variant works unchanged.
  """

  def __init__(self, layer_types: tuple[type, ...], fn: LayerFn):
    self.layer_types, self.fn, self.inside = layer_types, fn, False

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (self.inside or context.method_name != "__call__" or not args
        or not isinstance(module, self.layer_types)):
      return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    if "kernel" not in params:
      return next_fun(*args, **kwargs)
    replaced = self.fn("/".join(module.path), module, args[0], params)
    if replaced is None:
      return next_fun(*args, **kwargs)
    x, params = replaced
    self.inside = True  # the clone's own __call__ must not be intercepted again
    try:
      return module.clone(parent=None).apply({"params": params}, x, *args[1:], **kwargs)
    finally:
      self.inside = False


def quantize(model: nn.Module, rules: Sequence[Rule] | None = None, *,
             layer_types: tuple[type, ...] = (nn.Conv, nn.Dense),
             bit_schedule: BitSchedule | None = None, act_momentum: float = 0.99,
             train_kwarg: str | None = "train") -> Quantizer:
  """Builds the quantization transform of a Flax Linen model.

  Args:
    model: any Linen module; its code is not modified.
    rules: ordered ``(regex, settings)`` over module paths, settings a dict of
      :class:`~jaxcompress.quantization.config.LayerConfig` fields or ``None`` (float); first full
      match wins; ``"<first>"``/``"<last>"`` match the first/last layer called. Default:
      :func:`~jaxcompress.quantization.config.default_rules` (first and last layer 8/8 bits, the
      rest 4-bit weights and 8-bit inputs).
    layer_types: the module classes that are quantized (they must hold a ``kernel`` param).
    bit_schedule: optional ``step -> bits``; a layer then uses ``max(its bits, schedule(step))``
      bits when ``apply`` gets a ``step`` (traced: no recompiles across phases).
    act_momentum: moving-average momentum of input ranges in training (PyTorch: 0.99).
    train_kwarg: name of the model's train/eval flag, passed through by ``apply``; ``None`` if
      the model takes none.

  Returns:
    A :class:`Quantizer` of pure functions ``init``, ``apply``, ``specs``, ``observe``.

  Raises:
    ConfigError: for malformed rules or settings, or ``act_momentum`` outside ``[0, 1)``.
  """
  rules = default_rules() if rules is None else rules
  compile_rules(rules, None, None)  # validate now, not at the first call
  check_range("act_momentum", act_momentum, 0.0, 1.0)

  def run(variables, args, kwargs, fn, *, train=False, mutable=(), rngs=None):
    if train_kwarg is not None:
      kwargs = {**kwargs, train_kwarg: train}
    with nn.intercept_methods(_Interceptor(layer_types, fn)):
      return model.apply(variables, *args, mutable=list(mutable), rngs=rngs, **kwargs)

  def float_inputs(variables, args, kwargs, fn):
    """``{path: fn(path, module, x, params)}`` at each layer's first call; float model, eval."""
    out = {}

    def record(path, module, x, params):
      if path not in out:
        out[path] = fn(path, module, x, params)

    run(variables, args, kwargs, record)
    return out

  def init(variables: Any, *args: Any, **kwargs: Any) -> QuantState:
    """Decides which layers are quantized and initializes their state from a sample batch.

    Runs the float model once, eagerly (not under ``jit``), in eval mode. Input ranges start at the
    sample's ``[min, max]``; LSQ steps at the paper's ``2 mean|v| / sqrt(Q_P)``. Warns about rules
    that matched no layer.

    Args:
      variables: the model's variables (``params`` and e.g. ``batch_stats``).
      *args: the model's inputs (a sample batch); **kwargs: extra model keyword arguments.

    Returns:
      The :class:`QuantState`.

    Raises:
      ConfigError: for NaN/Inf in a selected kernel or in the sample's layer inputs.
    """
    seen = float_inputs(variables, args, kwargs, lambda path, module, x, params: (
        type(module).__name__, params["kernel"], x))
    paths = list(seen)
    compiled = compile_rules(rules, paths[0] if paths else None, paths[-1] if paths else None)
    layers, steps, ranges = [], {}, {}
    for path in paths:
      cfg = compiled.lookup(path)
      if cfg is None or (cfg.weight_bits is None and cfg.act_bits is None):
        continue
      kind, kernel, x = seen[path]
      layer = QuantLayer(path, kind, cfg, kernel.ndim - 1 if cfg.per_channel else None,
                         bool(jnp.min(x) < 0), int(x[0].size))
      layer_steps, act_range = init_layer_state(layer, kernel, x)
      layers.append(layer)
      if layer_steps:
        steps[path] = layer_steps
      if act_range is not None:
        ranges[path] = act_range
    compiled.report_unused()
    return QuantState(steps=steps, ranges=ranges, layers=tuple(layers))

  def apply(variables: Any, qstate: QuantState, *args: Any, train: bool = False,
            step: Any = None, mutable: Sequence[str] | None = None, rngs: Any = None,
            **kwargs: Any) -> tuple[Any, dict, QuantState]:
    """Runs the model with the quantized layers fake-quantized; ``jit``-able.

    Args:
      variables: the model's variables.
      qstate: from ``init``; pass ``qstate.replace(steps=...)`` to differentiate the LSQ steps.
      *args: the model's inputs.
      train: training mode: forwarded as ``train_kwarg``, makes the non-``params`` collections
        mutable and updates the input ranges (moving average of each batch's min/max) before
        quantizing; ``False`` freezes them.
      step: the train step for ``bit_schedule`` (may be traced); ``None``: the target bits.
      mutable: collections the model may update (default: all but ``params`` when training).
      rngs: forwarded to ``model.apply`` (e.g. dropout).
      **kwargs: extra model keyword arguments.

    Returns:
      ``(output, model_state, new_qstate)``; ``model_state`` holds every non-``params``
      collection of ``variables``, updated where the model mutated it.
    """
    layers = {layer.path: layer for layer in qstate.layers}
    ranges = dict(qstate.ranges)

    def quantize_layer(path, module, x, params):
      layer = layers.get(path)
      if layer is None:
        return None
      cfg, steps = layer.config, qstate.steps.get(path)
      if cfg.act_bits is not None:
        if train and path in ranges:
          ranges[path] = ema_range(ranges[path], batch_range(x), act_momentum)
        x = quantize_input(layer, x, ranges.get(path), steps,
                           bits_at(cfg.act_bits, bit_schedule, step))
      if cfg.weight_bits is not None:
        kernel = quantize_kernel(layer, params["kernel"], steps,
                                 bits_at(cfg.weight_bits, bit_schedule, step))
        params = {**params, "kernel": kernel}
      return x, params

    if mutable is None:
      mutable = [c for c in variables if c != "params"] if train else []
    out, updated = run(variables, args, kwargs, quantize_layer, train=train, mutable=mutable,
                       rngs=rngs)
    model_state = {c: v for c, v in variables.items() if c != "params"}
    model_state.update(updated)
    return out, model_state, qstate.replace(ranges=ranges)

  def observe(variables: Any, qstate: QuantState, *args: Any,
              stat: Callable[[QuantLayer, jax.Array], Any], **kwargs: Any) -> dict[str, Any]:
    """``{path: stat(layer, input)}`` for every layer with a range, running the float model.

    Used by :func:`~jaxcompress.quantization.ptq.calibrate`; ``jit``-able.
    """
    with_range = {layer.path: layer for layer in qstate.layers if layer.path in qstate.ranges}
    stats = float_inputs(variables, args, kwargs, lambda path, module, x, params: (
        stat(with_range[path], x) if path in with_range else None))
    return {path: s for path, s in stats.items() if s is not None}

  return Quantizer(init=init, apply=apply, observe=observe,
                   specs=functools.partial(layer_specs, bit_schedule=bit_schedule))
