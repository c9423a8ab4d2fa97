"""Which leaves of a parameter tree are pruned: ordered regex rules over ``/``-joined paths.

A rule list is ``[(regex, prune), ...]`` with ``prune`` one of ``True``, ``False`` or ``None``
(``None`` reads as ``False``); the first rule whose regex fully matches a leaf's path decides
(see :mod:`jaxcompress.rules`). A leaf matched by no rule is left dense. Without rules, every
floating-point leaf of rank >= 2 is pruned but a ``bias`` or ``scale`` (an attention projection's
``(heads, dim)`` bias): a bare tree has no layers to tell weights from; with a
model, :meth:`jaxcompress.selection.ModelLayers.prune_rules` gives the library's policy (the
weights of linear-like layers, first and last layer in forward order kept dense).

Paths are the tree's keys joined by ``/``: ``layer1_0/conv1/kernel`` for a Flax Linen
``variables['params']`` dict, ``kernel`` for ``nnx.state(nnx.Linear(...), nnx.Param)`` (the
trailing ``value`` attribute of an ``nnx.Variable`` is not part of the path).

Example:
  >>> w0, b0, w1 = jnp.ones((3, 3, 3, 8)), jnp.zeros(8), jnp.ones((8, 10))
  >>> sel = select({"conv1": {"kernel": w0, "bias": b0}, "head": {"w": w1}})
  >>> sel.paths, sel.selected
  (('conv1/bias', 'conv1/kernel', 'head/w'), (False, True, True))
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.errors import invalid
from jaxcompress.rules import Rule, Rules, path_str

# Every leaf, restricted by ``select`` to floating-point leaves of rank >= 2 (weights, not
# vector biases or normalization scales) but those named bias or scale, whatever their rank.
DEFAULT_RULES: tuple[Rule, ...] = ((r"(.*/)?(bias|scale)", False), (".*", True))


class Selection(NamedTuple):
  """A flattened parameter tree and which of its leaves are pruned.

  Invariants: ``paths``, ``leaves`` and ``selected`` are aligned with ``treedef``'s leaf order;
  ``selected`` is static (plain Python bools), so code that branches on it can run under ``jit``.
  """
  treedef: Any
  paths: tuple[str, ...]
  leaves: tuple[Any, ...]
  selected: tuple[bool, ...]

  def pick(self, leaves: Sequence[Any]) -> list[Any]:
    """The entries of a leaf-aligned list that belong to selected leaves."""
    return [x for x, s in zip(leaves, self.selected) if s]

  def flat(self, tree: Any) -> list[Any]:
    """Leaves of ``tree`` (same structure as the selected tree) in this selection's order."""
    return self.treedef.flatten_up_to(tree)

  def masks_tree(self, keep: Sequence[jax.Array]) -> Any:
    """Builds a mask tree: ``keep[i]`` on the i-th selected leaf, ones elsewhere, param dtypes."""
    it = iter(keep)
    masks = [jnp.asarray(next(it), leaf.dtype) if s else jnp.ones_like(leaf)
             for leaf, s in zip(self.leaves, self.selected)]
    return jax.tree_util.tree_unflatten(self.treedef, masks)


def compile_rules(rules: Sequence[Rule] | None) -> Rules:
  """Compiles a rule list (``None``: :data:`DEFAULT_RULES`) and checks its values.

  Raises:
    ConfigError: if a regex does not compile or a value is not ``True``, ``False`` or ``None``.
  """
  compiled = Rules(DEFAULT_RULES if rules is None else rules, field="prune.rules")
  for i, (_, value) in enumerate(compiled.rules):
    if not isinstance(value, (bool, type(None))):
      raise invalid(f"prune.rules[{i}] value", value, "True (prune), False or None (keep dense)")
  return compiled


def select(params: Any, rules: Sequence[Rule] | None = None, *, warn_unused: bool = True
           ) -> Selection:
  """Decides, leaf by leaf, whether ``params`` is pruned there.

  Args:
    params: any pytree of arrays (a Linen ``variables['params']`` dict, an ``nnx.State``, ...).
    rules: ordered ``(regex, prune)`` rules; ``None``: every floating-point leaf of rank >= 2
      but a ``bias`` or ``scale``.
    warn_unused: warn about user rules that matched no path (never about the default rules,
      which name layers a model may not have).

  Returns:
    The flattened tree and the per-leaf decision.

  Raises:
    ConfigError: for a bad rule (see :func:`compile_rules`).
  """
  compiled = compile_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = tuple(path_str(kp) for kp, _ in flat)
  leaves = tuple(leaf for _, leaf in flat)
  selected = tuple(bool(compiled.lookup(p)) and (rules is not None or (
      jnp.ndim(leaf) > 1 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)))
                   for p, leaf in zip(paths, leaves))
  if warn_unused:
    if rules is not None:
      compiled.report_unused()
    if leaves and not any(selected):
      warnings.warn(f"prune.rules: no leaf of the tree is selected for pruning (paths: "
                    f"{list(paths)[:6]}{' ...' if len(paths) > 6 else ''}); nothing will be "
                    "pruned", stacklevel=2)
  return Selection(treedef, paths, leaves, selected)
