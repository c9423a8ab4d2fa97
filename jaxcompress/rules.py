"""Ordered regex rules that select which leaves or modules a method touches.

A rule list is ``[(regex, value), ...]``. A leaf's path is its keys joined by ``/``
(``layer1_0/conv1/kernel``); the first rule whose regex *fully* matches the path decides the value
for that leaf. A value of ``None`` means "leave this one alone". Rules that matched nothing are
reported, so a typo in a path never silently compresses nothing.

Example:
  >>> rules = Rules([("conv1/kernel", None), (".*/kernel", dict(bits=4)), (".*", None)])
  >>> rules.lookup("layer1_0/conv1/kernel")
  {'bits': 4}
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxcompress.errors import ConfigError

Rule = tuple[str, Any]


def key_name(key: Any) -> str:
  """Returns the string form of one entry of a ``jax.tree_util`` key path."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  """Joins a ``jax.tree_util`` key path into the ``/``-separated form rules match against.

  The trailing ``value`` attribute of an ``nnx.Variable`` leaf is dropped, so a Linen params dict
  and an ``nnx.State`` give the same paths (``.../kernel``).
  """
  if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and (
      keypath[-1].name == "value"):
    keypath = keypath[:-1]
  return "/".join(key_name(k) for k in keypath)


def flat_paths(tree: Any) -> dict[str, Any]:
  """``{path: leaf}`` of any pytree, paths as :func:`path_str` writes them."""
  return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_get(tree: Any, path: str) -> Any:
  """The node at a ``/``-joined path of nested dicts (plain or ``FrozenDict``), or ``None``."""
  node = tree
  for name in path.split("/"):
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
  return node


def tree_set(tree: Mapping, path: str, value: Any) -> dict:
  """A copy of nested dicts ``tree`` with ``value`` at ``path`` (only the path is copied, as
  dicts)."""
  head, _, rest = path.partition("/")
  return {**tree, head: tree_set(tree[head], rest, value) if rest else value}


class Rules:
  """An ordered, compiled rule list.

  Invariants: regexes are compiled at construction (a bad regex raises :class:`ConfigError`
  then, not later); ``hits[i]`` counts the paths rule ``i`` decided since construction.
  """

  def __init__(self, rules: Sequence[Rule], *, field: str = "rules"):
    self.field = field
    if isinstance(rules, (str, bytes)) or not hasattr(rules, "__iter__"):  # not a list of rules
      example = repr(rules) if isinstance(rules, str) else "'.*/kernel'"
      raise ConfigError(f"{field} must be a list of (regex, value) pairs, got {rules!r}; e.g. "
                        f"[({example}, True)]")
    rules = list(rules)
    for i, rule in enumerate(rules):  # one pair, not a list of them, shows as rule 0 a string
      if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
        raise ConfigError(f"{field}[{i}] must be a (regex, value) pair, got {rule!r}; rules is "
                          "a list of pairs, e.g. [('head/.*', False), ('.*', True)]")
    self.rules = [tuple(r) for r in rules]
    self._compiled = []
    for i, rule in enumerate(self.rules):
      try:
        self._compiled.append(re.compile(rule[0]))
      except re.error as e:
        raise ConfigError(
            f"{field}[{i}] regex {rule[0]!r} does not compile: {e}; "
            "use Python `re` syntax, e.g. '.*/kernel'") from None
    self.hits = [0] * len(self.rules)

  def lookup(self, path: str) -> Any:
    """Returns the value of the first rule that fully matches ``path`` (``None`` if none does)."""
    for i, pattern in enumerate(self._compiled):
      if pattern.fullmatch(path):
        self.hits[i] += 1
        return self.rules[i][1]
    return None

  def unused(self) -> list[str]:
    """Regexes of the rules that have not decided any path yet."""
    return [r[0] for r, n in zip(self.rules, self.hits) if n == 0]

  def report_unused(self) -> list[str]:
    """Warns about (and returns) rules that matched nothing."""
    unused = self.unused()
    if unused:
      warnings.warn(f"{self.field}: these rules matched no path: {unused}", stacklevel=2)
    return unused


def resolve(rules: Sequence[Rule] | Rules, tree: Any, *,
            is_leaf: Callable[[Any], bool] | None = None,
            field: str = "rules", warn_unused: bool = True) -> Any:
  """Maps every leaf of ``tree`` to the value of its first matching rule.

  Args:
    rules: the rule list, or an already compiled :class:`Rules`.
    tree: any pytree (a Flax ``params`` dict, an ``nnx.State``, ...).
    is_leaf: forwarded to ``jax.tree_util``.
    field: name used in messages.
    warn_unused: warn about rules that matched no leaf.

  Returns:
    A pytree with the structure of ``tree`` whose leaves are the rule values (``None`` kept as a
    leaf value is not possible in JAX trees, so unselected leaves hold ``False``).
  """
  compiled = rules if isinstance(rules, Rules) else Rules(rules, field=field)

  def pick(keypath, _):
    value = compiled.lookup(path_str(keypath))
    return False if value is None else value

  out = jax.tree_util.tree_map_with_path(pick, tree, is_leaf=is_leaf)
  if warn_unused:
    compiled.report_unused()
  return out
