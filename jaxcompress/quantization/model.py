"""Weight and activation quantization of an unmodified Flax Linen or NNX model, as pure functions.

``quantize(model, rules)`` sees the model through :mod:`jaxcompress.models.functional`: selected
weights (the ``kernel`` of Conv/Dense/DenseGeneral/Einsum layers, Linen or NNX, and the
``embedding`` of Embed layers) are fake-quantized on the parameter tree before the forward, and the
inputs of selected layers at each of their calls; the model's code stays untouched. Layers are
found, and ``"<first>"``/``"<last>"`` resolved, by running the model once (``init``): the order is
the forward's call order, whatever the names. State is explicit (a :class:`QuantState` threaded
through the step, never globals):

- ``steps[path]['weight' | 'act']``: LSQ step sizes, the only **trainable** leaves;
- ``ranges[path]``: ``[lo, hi]`` moving-average input ranges (``minmax`` layers), updated by
  ``apply(..., train=True)``, frozen with ``train=False``, set by :func:`calibrate`;
- ``layers``: static :class:`QuantLayer` descriptions (which layer got which bits), fixed by
  ``init`` and part of the treedef, so jit caches stay valid.

Example (one jitted QAT step; gradients reach params through the STE and the LSQ steps):

  >>> qz = quantize(model, [("conv1|linear", dict(weight_bits=8, act_bits=8)),
  ...                       (".*", dict(weight_bits=4, act_bits=4, method="lsq"))])
  >>> qstate = qz.init(variables, x[:8])
  >>> cross_entropy, tx = optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-3)
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
  >>> opt_state = tx.init({"params": variables["params"], "qsteps": qstate.steps})
  >>> params, batch_stats, qstate, opt_state = train_step(
  ...     variables["params"], variables["batch_stats"], qstate, opt_state, *batch)
  >>> sorted(qstate.steps)   # the LSQ layers
  ['conv2']

A layer called several times (a recurrent cell's gate kernel at every time step) has one input
range covering all its calls. A layer called inside a lifted transform (``nn.scan``, ``nn.RNN``,
``nnx.scan``) is quantized like any other, but no value can leave the transform's trace through
the hook: ``init`` and calibration run the model with ``jax.disable_jit()``, which runs a scan as a
Python loop, and in training such a layer keeps the input range it was calibrated with (layers
called directly still track theirs).

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
  Esser et al. Learned Step Size Quantization. ICLR 2020 (arXiv:1902.08153, 2019).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core.tracers import current_trace

from jaxcompress.errors import ConfigError, check_range, check_variables, first_line
from jaxcompress.models.functional import (Hook, called_shape, chain_hooks, functional,
                                           output_axes, stacked_axes, stacked_count, weight_name)
from jaxcompress.precision import cast_floating
from jaxcompress.quantization.calibration import ema_range, union_range
from jaxcompress.quantization.config import compile_rules, default_rules
from jaxcompress.quantization.layer import (QuantLayer, batch_range, bits_at, gained_kernel,
                                            init_layer_state, quantize_input, quantize_kernel)
from jaxcompress.quantization.schedule import BitSchedule
from jaxcompress.quantization.spec import layer_specs, weight_of
from jaxcompress.rules import Rule, tree_get, tree_set
from jaxcompress.selection import check_nonempty


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


def quantize(model: Any, rules: Sequence[Rule] | None = None, *,
             bit_schedule: BitSchedule | None = None, act_momentum: float = 0.99,
             train_kwarg: str | None = "auto") -> Quantizer:
  """Builds the quantization transform of a Flax Linen or NNX model.

  Args:
    model: any Linen module, NNX module, or :class:`~jaxcompress.models.functional.Functional`;
      its code is not modified.
    rules: ordered ``(regex, settings)`` over module paths, settings a dict of
      :class:`~jaxcompress.quantization.config.LayerConfig` fields or ``None`` (float); first full
      match wins; ``"<first>"``/``"<last>"`` match the first/last linear-like layer called in the
      forward. Default: :func:`~jaxcompress.quantization.config.default_rules` (first and last
      layer 8/8 bits, the rest 4-bit weights and 8-bit inputs).
    bit_schedule: optional ``step -> bits``; a layer then uses ``max(its bits, schedule(step))``
      bits when ``apply`` gets a ``step`` (traced: no recompiles across phases).
    act_momentum: moving-average momentum of input ranges in training (PyTorch: 0.99).
    train_kwarg: Linen only: the model's train flag keyword; ``"auto"`` finds it from the
      signature, ``None``: the model takes none (see :func:`~jaxcompress.models.functional`).

  Returns:
    A :class:`Quantizer` of pure functions ``init``, ``apply``, ``specs``, ``observe``.

  Raises:
    ConfigError: for malformed rules or settings, or ``act_momentum`` outside ``[0, 1)``.
  """
  rules = default_rules() if rules is None else rules
  compile_rules(rules, None, None)  # validate now, not at the first call
  check_range("act_momentum", act_momentum, 0.0, 1.0)
  fm = functional(model, train_kwarg=train_kwarg)

  def float_inputs(variables, args, kwargs, fn, order=None):
    """``{path: fn(first call, all inputs)}`` of each weighted layer; float model, eval.

    ``all inputs`` is the input of the layer's only call, or, for a layer called several times
    (a recurrent cell's gates at every time step, a shared layer), the inputs of all its calls
    flattened and concatenated, so ranges cover every input the layer quantizes, not the first
    one (an LSTM's recurrent gates first see the all-zero initial state). ``order``, if given,
    receives ``(path, weight)`` of every weighted layer call, in call order: ``weight`` is an NNX
    layer's weight variable (None for Linen), which another module may hold too.
    """
    calls = {}
    missed = set()  # layers with a call whose input could not be seen: no statistic
    outer = current_trace()
    eager = not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((variables, args)))

    def note(call):
      calls.setdefault(call.path, []).append(call)
      if order is not None:
        held = getattr(call.module, weight_name(call.kind), None) if fm.kind == "nnx" else None
        order.append((call.path, held))

    def record(call, run):
      if call.kind in ("linear", "embed"):
        if current_trace() == outer:
          note(call)
        elif eager:  # inside a lifted transform (nn.remat): its inputs arrive as it runs
          jax.debug.callback(lambda x, call=call: note(call._replace(x=np.asarray(x))), call.x)
        else:  # under jit, an inner trace's values cannot leave it: the layer keeps init's range
          missed.add(call.path)
      return run(call.x)

    with jax.disable_jit():  # a lax.scan over layers (nn.scan, nn.RNN) runs as a Python loop
      fm.apply(variables, *args, hook=record, **kwargs)
    return {path: fn(seen[0], seen[0].x if len(seen) == 1 else jnp.concatenate(
        [jnp.ravel(c.x) for c in seen])) for path, seen in calls.items() if path not in missed}

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
      ConfigError: for variables without a 'params' entry (the params alone), a sample the
        model's forward fails on, or NaN/Inf in a selected kernel or in the sample's layer inputs.
    """
    check_nonempty(args, "quantizer init")
    check_variables(variables)
    params = variables["params"]

    def describe(call, x_all):
      weight = weight_name(call.kind)
      kernel = tree_get(params, f"{call.path}/{weight}")
      return (call.kind, call.type_name, weight, kernel, call.x, x_all, call.module,
              called_shape(call, weight))

    order = []
    try:
      found = float_inputs(variables, args, kwargs, describe, order)
    except ConfigError:
      raise
    except Exception as e:  # a sample the model cannot take is a user mistake: one line
      shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), args[0] if len(args) == 1 else args)
      raise ConfigError(f"quantizer init: {fm.name}'s forward fails on inputs of shape {shapes} "
                        f"({first_line(e)}); give a sample batch shaped like the model's "
                        "inputs") from None
    seen = {p: v for p, v in found.items()
            if v[3] is not None and jnp.ndim(v[3]) >= 2
            and jnp.issubdtype(jnp.asarray(v[3]).dtype, jnp.floating)}
    # A call on another layer's weight (one NNX variable in two modules) counts as that layer's.
    owners = {id(var): path for path, var in order if path in seen and var is not None}
    order = [path if path in seen else owners.get(id(var)) for path, var in order]
    paths = [path for path in dict.fromkeys(order) if path in seen]
    last = next((p for p in reversed(order) if p in seen), None)  # the layer called last
    compiled = compile_rules(rules, paths[0] if paths else None, last)
    layers, steps, ranges = [], {}, {}
    for path in paths:
      cfg = compiled.lookup(path)
      kind, type_name, weight, kernel, x, x_all, module, called = seen[path]
      if cfg is not None and (kind == "embed" or not jnp.issubdtype(x.dtype, jnp.floating)):
        cfg = cfg._replace(act_bits=None)  # token ids are not quantized
      if cfg is None or (cfg.weight_bits is None and cfg.act_bits is None):
        continue
      axis = None
      if cfg.per_channel:  # one scale per output channel of every step of a stacked weight
        stacked = stacked_count(kernel.shape, called, f"{path}/{weight}")
        ndim = kernel.ndim - stacked
        axis = stacked_axes((0,) if kind == "embed" else output_axes(module, ndim), stacked)
        axis = axis[0] if len(axis) == 1 else axis
      layer = QuantLayer(path, type_name, cfg, axis, bool(jnp.min(x_all) < 0), int(x[0].size),
                         weight)
      layer_steps, act_range = init_layer_state(layer, kernel, x_all)
      layers.append(layer)
      if layer_steps:
        steps[path] = layer_steps
      if act_range is not None:
        ranges[path] = act_range
    compiled.report_unused()
    return QuantState(steps=steps, ranges=ranges, layers=tuple(layers))

  def apply(variables: Any, qstate: QuantState, *args: Any, train: bool = False,
            step: Any = None, rngs: Any = None, hook: Hook | None = None,
            hook_paths: Sequence[str] = (), compute_dtype: Any = None,
            weight_gains: Mapping[str, Any] | None = None,
            **kwargs: Any) -> tuple[Any, dict, QuantState]:
    """Runs the model with the quantized layers fake-quantized; ``jit``-able.

    Kernels are fake-quantized on the parameter tree before the forward; inputs at each call of
    a quantized layer.

    Args:
      variables: the model's variables.
      qstate: from ``init``; pass ``qstate.replace(steps=...)`` to differentiate the LSQ steps.
      *args: the model's inputs.
      train: training mode: the model's own train flag, its non-``params`` collections updated,
        and the input ranges updated (moving average of each batch's min/max) before quantizing;
        ``False`` freezes them.
      step: the train step for ``bit_schedule`` (may be traced); ``None``: the target bits.
      rngs: a PRNG key for dropout in training.
      hook: a further layer hook (see :mod:`jaxcompress.models.functional`), run outside the
        quantization: it sees the float input and its ``run`` quantizes.
      hook_paths: further module paths whose calls reach ``hook``.
      compute_dtype: mixed precision (e.g. ``jnp.bfloat16``; None: as given): kernels are
        fake-quantized in float32 and then every floating parameter is cast to it; each input is
        quantized in float32 (ranges and scales float32) and then cast back to its dtype.
      weight_gains: ``{layer path: per-output-channel gain}``, evaluation only: those kernels
        are dequantized with ``scale * gain`` (:func:`.layer.gained_kernel`), a folded
        BatchNorm's gain carried by the weight scales as the export stores it (a float16 gain:
        the product rounded to float16, as an export with float16 scales stores it).
      **kwargs: extra model keyword arguments.

    Returns:
      ``(output, model_state, new_qstate)``; ``model_state`` holds every non-``params``
      collection of ``variables``, updated where the model mutated it.
    """
    check_variables(variables)
    layers = {layer.path: layer for layer in qstate.layers}
    ranges = dict(qstate.ranges)
    params = variables["params"]
    for layer in qstate.layers:
      if layer.config.weight_bits is not None:
        wpath = f"{layer.path}/{layer.weight}"
        bits = bits_at(layer.config.weight_bits, bit_schedule, step)
        kernel = weight_of(params, layer.path, layer.weight)
        if weight_gains and layer.path in weight_gains:
          kernel = gained_kernel(layer, kernel, qstate.steps.get(layer.path), bits,
                                 weight_gains[layer.path])
        else:
          kernel = quantize_kernel(layer, kernel, qstate.steps.get(layer.path), bits)
        params = tree_set(params, wpath, kernel)
    params = cast_floating(params, compute_dtype)

    outer = current_trace()  # a call inside a lifted transform (nn.scan) sees another trace
    frozen = []  # layers whose input ranges cannot follow training (inside such a transform)
    observed = {}  # path: [min, max] over the layer's calls so far in this forward

    def quantize_inputs(call, run):
      layer = layers.get(call.path)
      if layer is None or layer.config.act_bits is None or call.kind != "linear":
        return run(call.x)
      x = call.x if compute_dtype is None else call.x.astype(jnp.float32)
      if train and call.path in ranges and current_trace() == outer:
        # one update a step, with the batch range of all the layer's calls so far this step
        seen = batch_range(x)
        if call.path in observed:
          seen = union_range(observed[call.path], seen)
        observed[call.path] = seen
        ranges[call.path] = ema_range(qstate.ranges[call.path], seen, act_momentum)
      elif train and call.path in ranges and call.path not in frozen:
        frozen.append(call.path)
      return run(quantize_input(layer, x, ranges.get(call.path), qstate.steps.get(call.path),
                                bits_at(layer.config.act_bits, bit_schedule, step)
                                ).astype(call.x.dtype))

    out, updated = fm.apply({**variables, "params": params}, *args, train=train, rngs=rngs,
                            hook=chain_hooks(hook, quantize_inputs), hook_paths=hook_paths,
                            **kwargs)
    for path in frozen:  # a call outside the transform saw only part of the layer's inputs
      ranges[path] = qstate.ranges[path]
    if frozen:  # once per compilation of a jitted step
      warnings.warn(f"quantization: the input ranges of {frozen} stay as calibrated in "
                    "training: these layers run inside a lifted transform (nn.scan, nn.remat, "
                    "nn.vmap, nnx.scan), whose values cannot update them; calibrate on "
                    "representative batches (init_state's calibration=)", stacklevel=2)
    model_state = {c: v for c, v in variables.items() if c != "params"}
    model_state.update(updated)
    return out, model_state, qstate.replace(ranges=ranges)

  def observe(variables: Any, qstate: QuantState, *args: Any,
              stat: Callable[[QuantLayer, jax.Array], Any], **kwargs: Any) -> dict[str, Any]:
    """``{path: stat(layer, inputs)}`` for every layer with a range, running the float model
    (``inputs``: those of all its calls, see ``float_inputs``).

    Used by :func:`~jaxcompress.quantization.ptq.calibrate`; ``jit``-able, but under ``jit`` a
    layer with a call inside a lifted transform that is not run as a loop (``nn.remat``) is left
    out: that call's inputs cannot leave its trace.
    """
    check_variables(variables)
    with_range = {layer.path: layer for layer in qstate.layers if layer.path in qstate.ranges}
    stats = float_inputs(variables, args, kwargs, lambda call, x: (
        stat(with_range[call.path], x) if call.path in with_range else None))
    return {path: s for path, s in stats.items() if s is not None}

  return Quantizer(init=init, apply=apply, observe=observe,
                   specs=functools.partial(layer_specs, bit_schedule=bit_schedule))
