"""Per-layer quantization settings and the rules that assign them to module paths.

A rule list is ``[(regex, settings), ...]`` over ``/``-joined module paths (``layer1_0/conv1``);
the first rule whose regex fully matches decides, ``None`` leaves the layer in float. Settings are
a dict of :class:`LayerConfig` fields (or a ``LayerConfig``). Two pseudo-regexes stand for
positions rather than names: ``"<first>"`` and ``"<last>"`` match the first and the last
quantizable layer the model calls, which is how :func:`default_rules` keeps the first conv and the
last dense at 8 bits in any model.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

from jaxcompress.errors import ConfigError, invalid, unknown
from jaxcompress.quantization.qparams import check_bits
from jaxcompress.rules import Rule, Rules

# The pseudo-regexes matching the first and the last quantizable layer called (module docstring).
FIRST, LAST = "<first>", "<last>"
WEIGHT_METHODS = ("minmax", "lsq")


class LayerConfig(NamedTuple):
  """How one Conv/Dense layer is quantized.

  Attributes:
    weight_bits: kernel code width (2..8), or ``None`` to keep the kernel in float.
    act_bits: input code width (2..8), or ``None`` to keep the layer's input in float.
    per_channel: one weight scale per output channel (the kernel's last axis) or one per tensor.
    symmetric: signed weight grid with ``zero_point = 0`` (required for ``lsq``).
    act_symmetric: signed input grid; the default asymmetric grid suits post-ReLU inputs >= 0.
    method: ``minmax`` (weight scales from the current kernel's min/max, input ranges a moving
      average) or ``lsq`` (learned step sizes for the kernel and the input, Esser et al. 2019).
  """
  weight_bits: int | None = 8
  act_bits: int | None = 8
  per_channel: bool = True
  symmetric: bool = True
  act_symmetric: bool = False
  method: str = "minmax"


def layer_config(value: Any, field: str) -> LayerConfig | None:
  """Validates one rule's settings into a :class:`LayerConfig` (``None`` stays ``None``).

  Raises:
    ConfigError: naming ``field`` for an unknown key, bad bits, unknown method or ``lsq`` with an
      asymmetric weight grid.
  """
  if value is None:
    return None
  if isinstance(value, LayerConfig):
    cfg = value
  elif isinstance(value, dict):
    extra = set(value) - set(LayerConfig._fields)
    if extra:
      raise unknown(f"{field} key", sorted(extra)[0], LayerConfig._fields)
    cfg = LayerConfig(**value)
  else:
    raise invalid(field, value, "None, a dict of LayerConfig fields or a LayerConfig",
                  "e.g. dict(weight_bits=4, act_bits=8)")
  for name in ("weight_bits", "act_bits"):
    bits = getattr(cfg, name)
    if bits is not None:
      check_bits(bits, f"{field}.{name}")
  if cfg.method not in WEIGHT_METHODS:
    raise unknown(f"{field}.method", cfg.method, WEIGHT_METHODS)
  if cfg.method == "lsq" and not cfg.symmetric:
    raise invalid(f"{field}.symmetric", cfg.symmetric, "True with method='lsq'",
                  "LSQ learns a signed weight grid with zero_point 0")
  for name in ("per_channel", "symmetric", "act_symmetric"):
    if not isinstance(getattr(cfg, name), bool):
      raise invalid(f"{field}.{name}", getattr(cfg, name), "True or False")
  return cfg


def default_rules(weight_bits: int = 4, act_bits: int | None = 8,
                  method: str = "minmax") -> list[Rule]:
  """First and last layer at 8/8 bits, every other Conv/Dense at ``weight_bits``/``act_bits``.

  Example:
    >>> default_rules(4)[-1]
    ('.*', {'weight_bits': 4, 'act_bits': 8, 'method': 'minmax'})
  """
  eight = dict(weight_bits=8, act_bits=8, method=method)
  return [(FIRST, eight), (LAST, eight),
          (".*", dict(weight_bits=weight_bits, act_bits=act_bits, method=method))]


def compile_rules(rules: Sequence[Rule], first: str | None, last: str | None) -> Rules:
  """Validates ``rules`` and compiles them, resolving ``<first>``/``<last>`` to escaped paths.

  Args:
    rules: the user's ``(regex, settings)`` list.
    first: path of the first quantizable layer called (``None`` if there is none).
    last: path of the last one.

  Returns:
    :class:`~jaxcompress.rules.Rules` whose values are ``LayerConfig`` or ``None``.

  Raises:
    ConfigError: for a malformed rule, a regex that does not compile or bad settings.
  """
  if isinstance(rules, (str, dict)) or not isinstance(rules, Sequence):
    raise invalid("quantization.rules", rules, "a list of (regex, settings) pairs",
                  "e.g. [('.*', dict(weight_bits=8, act_bits=8))]")
  compiled, has_first = [], False
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"quantization.rules[{i}] must be a (regex, settings) pair, got {rule!r}")
    regex = rule[0]
    if regex in (FIRST, LAST):
      path = first if regex == FIRST else last
      if regex == LAST and has_first and last == first:
        continue  # one layer is both first and last: the <first> rule already decides it
      has_first |= regex == FIRST
      regex = re.escape(path) if path is not None else "(?!)"  # (?!) never matches
    compiled.append((regex, layer_config(rule[1], f"quantization.rules[{i}]")))
  return Rules(compiled, field="quantization.rules")
