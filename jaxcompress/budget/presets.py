"""Device presets: the search space a budget plan may use, and the hardware each stands for.

A plan chooses, per layer, one :class:`Option` (sparsity, weight bits, input bits). A
:class:`Preset` says which options a layer may take and which budgets make sense on the device:

- ``any``: size only, everything allowed: unstructured sparsity from the grid, any weight bit
  width of the grid, on every layer including the first and the last; inputs at 8 bits (lower
  input bits are searched only under a BOPs budget). A model file stored as small as possible.
- ``mcu``: a microcontroller running integer kernels (CMSIS-NN, TFLite Micro): integer everywhere
  including the first and last layer, 8-bit inputs, per-channel weights, a flash (size) budget;
  sparse weights are decoded to dense int8 at load time.
- ``gpu-sparse``: NVIDIA Ampere or newer sparse tensor cores: each layer dense or 2:4 sparse along
  the reduction (input-channel) axis, int8 or int4 weights, int8 inputs; a size or a BOPs budget.
  Layers whose reduction axis is not a multiple of 4 stay dense.
- ``int8-npu``: an int8 neural accelerator (Edge TPU, Hexagon, Ethos-U): int8 weights and inputs
  everywhere, no sparse kernels, so compute falls only by removing whole output channels (channel
  surgery); the budget is in BOPs (``MACs x 8 x 8``). The last layer keeps all its outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

from jaxcompress.errors import unknown
from jaxcompress.pruning.masks import num_pruned


class Option(NamedTuple):
  """One choice for one layer: fraction of weights pruned, weight bits, input bits."""
  sparsity: float
  weight_bits: int
  act_bits: int


@dataclasses.dataclass(frozen=True)
class Preset:
  """A device's search space.

  Attributes:
    name: the preset's name (``budget.device``).
    hardware: what it stands for, in one sentence.
    budgets: the budget kinds it accepts: ``size`` (bytes or ratio) and/or ``bops``.
    structure: how a layer is pruned: ``unstructured``, ``nm`` (2:4) or ``channel``.
    sparsities: the sparsities it allows (``None``: the scan's grid).
    weight_bits: the weight bit widths it allows (``None``: the scan's grid).
    act_bits: fixed input bits (``None``: the scan's input grid under a BOPs budget, else 8).
    per_channel: weights must be quantized per output channel (``quant.per_channel``).
  """
  name: str
  hardware: str
  budgets: tuple[str, ...]
  structure: str
  sparsities: tuple[float, ...] | None = None
  weight_bits: tuple[int, ...] | None = None
  act_bits: tuple[int, ...] | None = (8,)
  per_channel: bool = False

  def options(self, *, shape: Sequence[int], last: bool, sparsities: Sequence[float],
              weight_bits: Sequence[int], act_bits: Sequence[int], kind: str = "size",
              reduce_axes: Sequence[int] = (), float_inputs: bool = False) -> list[Option]:
    """Every option a layer with this weight ``shape`` may take.

    Args:
      shape: the layer's weight shape.
      last: the layer is the model's last (its outputs are the model's outputs).
      sparsities: the scan's sparsity grid.
      weight_bits: the scan's weight bit grid.
      act_bits: the scan's input bit grid (used under a BOPs budget when the preset leaves
        inputs open).
      kind: the budget kind, ``size`` or ``bops``.
      reduce_axes: the axes the layer's product sums over (``Layer.reduce_axes``), where 2:4
        groups run; empty: axis ``-2``.
      float_inputs: the layer's inputs are never quantized (an ``Embed``: token ids to look up,
        or the float features its ``attend`` head multiplies): its options have
        ``act_bits=0``, costed at 32 bits, and it stays dense under 2:4 (a lookup sums over
        nothing; ``attend`` sums over the features, not the axis the table's groups run along).
    """
    sp = tuple(sorted({0.0, *(self.sparsities if self.sparsities is not None else sparsities)}))
    reduced = (math.prod(shape[a] for a in reduce_axes) if reduce_axes
               else shape[-2] if len(shape) >= 2 else 0)
    if self.structure == "nm" and (float_inputs or len(shape) < 2 or reduced % 4):
      sp = (0.0,)
    if self.structure == "channel" and last:
      sp = (0.0,)
    wb = self.weight_bits if self.weight_bits is not None else tuple(weight_bits)
    ab = self.act_bits if self.act_bits is not None else (
        tuple(act_bits) if kind == "bops" else (8,))
    if float_inputs:
      ab = (0,)
    return [Option(float(s), int(w), int(a)) for s in sp for w in sorted(wb) for a in sorted(ab)]

  def layer_options(self, layer: Any, *, last: bool, sparsities: Sequence[float],
                    weight_bits: Sequence[int], act_bits: Sequence[int],
                    kind: str = "size") -> list[Option]:
    """:meth:`options` of a traced :class:`~jaxcompress.selection.Layer`: its weight shape,
    reduction axes, and float inputs for an ``Embed``. Unstructured sparsities that would prune
    every weight of the layer (of each step of one stacked by ``nn.scan``: ``round(s * n) = n``)
    are left out: a layer without weights cuts the network."""
    options = self.options(shape=layer.shape, last=last, sparsities=sparsities,
                           weight_bits=weight_bits, act_bits=act_bits, kind=kind,
                           reduce_axes=layer.reduce_axes, float_inputs=layer.kind == "embed")
    if self.structure == "unstructured":
      n = math.prod(layer.shape[layer.stacked:])
      options = [o for o in options if num_pruned(o.sparsity, n) < n]
    return options

  def allows(self, option: Option, *, shape: Sequence[int], last: bool,
             sparsities: Sequence[float], weight_bits: Sequence[int],
             act_bits: Sequence[int], kind: str = "size", reduce_axes: Sequence[int] = (),
             float_inputs: bool = False) -> bool:
    """Whether ``option`` lies in this preset's space for such a layer."""
    return option in self.options(shape=shape, last=last, sparsities=sparsities,
                                  weight_bits=weight_bits, act_bits=act_bits, kind=kind,
                                  reduce_axes=reduce_axes, float_inputs=float_inputs)


# The presets by name (``budget.device``): which options each kind of device runs.
PRESETS = {p.name: p for p in (
    Preset("any", "no particular device: the smallest file, every option allowed",
           ("size", "bops"), "unstructured", act_bits=None),
    Preset("mcu", "a microcontroller with integer kernels (CMSIS-NN, TFLite Micro): integer "
           "everywhere including the first and last layer, 8-bit inputs, per-channel weights, "
           "a flash budget", ("size",), "unstructured", per_channel=True),
    Preset("gpu-sparse", "NVIDIA sparse tensor cores (Ampere and newer): dense or 2:4 along the "
           "reduction axis, int8 or int4 weights, int8 inputs", ("size", "bops"), "nm",
           sparsities=(0.5,), weight_bits=(4, 8)),
    Preset("int8-npu", "an int8 accelerator (Edge TPU, Hexagon, Ethos-U): int8 weights and "
           "inputs, compute falls only through channel pruning", ("bops",), "channel",
           weight_bits=(8,)),
)}


def get_preset(name: str, field: str = "budget.device") -> Preset:
  """The preset called ``name``; one-line error for an unknown one."""
  if not isinstance(name, str) or name not in PRESETS:
    raise unknown(field, name, PRESETS)
  return PRESETS[name]
