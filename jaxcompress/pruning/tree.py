"""Masks over whole parameter pytrees: select leaves, score them, mask them, apply the masks.

A mask tree has the structure of the parameter tree (a Linen ``params`` dict gives a dict, an
``nnx.State`` gives an ``nnx.State``). Mask leaves have the dtype of their parameter and hold
exactly ``0`` (pruned) or ``1`` (kept); leaves the rules do not select are all ones. Everything
here is jnp and runs under ``jax.jit`` (a traced ``sparsity`` included).

Example:
  >>> masks = magnitude_masks(variables["params"], 0.7, scope="global")
  >>> pruned = apply_masks(variables["params"], masks)
  >>> sum(int((m == 0).sum()) for m in jax.tree.leaves(masks))   # round(0.7 * 1528 kernel entries)
  1070
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError, first_line
from jaxcompress.pruning.masks import (Masker, Sparsity, channels, check_masker, check_sparsity,
                                       n_of_m, unstructured)
from jaxcompress.pruning.scores import Score, get_score, leaf_scores
from jaxcompress.pruning.select import Selection, select
from jaxcompress.rules import Rule, path_str


def grads_like(sel: Selection, grads: Any, field: str = "grads") -> list[Any]:
  """The leaves of ``grads`` in ``sel``'s order, checked to be a tree of ``sel``'s shapes.

  Raises:
    ConfigError: ``grads`` is not a tree like the parameters (e.g. the gradient of a whole
      ``variables`` dict, ``{'params': ...}``), or a leaf's shape is not its parameter's.
  """
  try:
    leaves = sel.flat(grads)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{field} must be a tree like params (jax.grad of the loss with respect "
                      f"to params), got another: {first_line(e)}") from None
  for path, w, g in zip(sel.paths, sel.leaves, leaves):
    if jnp.shape(g) != jnp.shape(w):
      raise ConfigError(f"{field}[{path!r}] has shape {jnp.shape(g)}, its parameter "
                        f"{jnp.shape(w)}; {field} must be a tree like params")
  return leaves


def compute_masks(params: Any, sparsity: Sparsity, *, score: str | Score = "magnitude",
                  structure: Masker | None = None, rules: Sequence[Rule] | None = None,
                  grads: Any = None, key: jax.Array | None = None) -> Any:
  """Masks for ``params``: score the selected leaves, then prune the lowest scores.

  Args:
    params: a pytree of arrays.
    sparsity: fraction pruned, in [0, 1); a Python number or a traced scalar.
    score: a name in :data:`~jaxcompress.pruning.scores.SCORES` or a
      :class:`~jaxcompress.pruning.scores.Score`.
    structure: a masker from :mod:`jaxcompress.pruning.masks`; default ``unstructured("layer")``.
    rules: ordered ``(regex, prune)`` rules choosing the leaves; default
      :data:`~jaxcompress.pruning.select.DEFAULT_RULES`.
    grads: gradients with the structure of ``params``, for gradient-based scores.
    key: PRNG key, for the random score.

  Returns:
    The mask tree.

  Raises:
    ConfigError: for a sparsity outside [0, 1), an unknown score, a bad rule, missing grads or key,
      or grads that are not a tree like params.
  """
  check_sparsity(sparsity)
  score = get_score(score)
  sel = select(params, rules)
  grad_leaves = None if grads is None else sel.pick(grads_like(sel, grads))
  scores = leaf_scores(score, sel.pick(sel.leaves), grad_leaves, key)
  keep = check_masker(structure)(sel.pick(sel.paths), scores, sparsity)
  return sel.masks_tree(keep)


def magnitude_masks(params: Any, sparsity: Sparsity, *, scope: str = "layer",
                    rules: Sequence[Rule] | None = None) -> Any:
  """Unstructured magnitude masks, the entries ``torch.nn.utils.prune`` would remove.

  In each selected leaf (``scope="layer"``, like ``l1_unstructured``) or across all selected
  leaves together (``scope="global"``, like ``global_unstructured`` with ``L1Unstructured``),
  exactly ``round(sparsity * n)`` entries with the smallest ``|w|`` are 0 and the rest 1. Among
  equal ``|w|`` the lower flat index is pruned first.

  Args:
    params: a pytree of arrays.
    sparsity: fraction pruned, in [0, 1).
    scope: ``"layer"`` or ``"global"``.
    rules: leaf selection, as in :func:`compute_masks`.

  Returns:
    The mask tree (param dtypes, values 0 and 1).

  Raises:
    ConfigError: for a sparsity outside [0, 1), an unknown scope or a bad rule.
  """
  return compute_masks(params, sparsity, structure=unstructured(scope), rules=rules)


def nm_masks(params: Any, n: int, m: int, *, axis: int | None = None,
             rules: Sequence[Rule] | None = None) -> Any:
  """N:M masks: the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``axis``.

  Ties within a group: the later entry is kept. The sparsity is ``1 - n / m`` on every selected
  leaf. By default groups run along the reduction (input-channel) axis, ``-2`` of a Flax ``Dense``
  or ``Conv`` kernel, as NVIDIA 2:4 sparse tensor cores need.

  Args:
    params: a pytree of arrays.
    n: entries kept per group, ``1 <= n <= m``.
    m: group size; must divide every selected leaf's length along ``axis``.
    axis: the axis the groups run along; ``None``: the reduction axis (``-2``; ``-1`` for 1-D).
    rules: leaf selection, as in :func:`compute_masks`.

  Returns:
    The mask tree.

  Raises:
    ConfigError: if not ``1 <= n <= m``, ``axis`` is out of range for a selected leaf, or ``m``
      does not divide its length along ``axis``.
  """
  structure = n_of_m(n, m, axis)  # checks n and m first: 1 - n / m divides by m
  return compute_masks(params, 1 - n / m, structure=structure, rules=rules)


def channel_masks(params: Any, sparsity: Sparsity, *, norm: str = "l1",
                  rules: Sequence[Rule] | None = None) -> Any:
  """Masks zeroing whole output channels (last axis) of each selected kernel.

  In each selected leaf with ``c`` output channels, the ``round(sparsity * c)`` channels with the
  smallest L1 or L2 weight norm are zeroed (Li et al. 2017); ties prune the lower channel index.

  Args:
    params: a pytree of arrays.
    sparsity: fraction of channels pruned, in [0, 1).
    norm: ``"l1"`` or ``"l2"``.
    rules: leaf selection, as in :func:`compute_masks`.

  Returns:
    The mask tree.

  Raises:
    ConfigError: for a sparsity outside [0, 1), an unknown norm or a bad rule.

  References:
    Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017.
  """
  return compute_masks(params, sparsity, structure=channels(norm), rules=rules)


def apply_masks(params: Any, masks: Any) -> Any:
  """Zeroes the pruned entries: ``params`` where ``masks != 0``, exactly ``0`` elsewhere.

  Works with float (0/1) or boolean masks and any pytree whose leaves have the paths of
  ``params`` (dict, ``nnx.State``): the masks ``nnx.Optimizer`` keeps in its state,
  ``current_masks(opt.opt_state)``, are ``OptVariable`` nodes where the parameters are
  ``nnx.Param``.

  Raises:
    ConfigError: ``masks`` is not a tree like ``params``, or a mask's shape is not its leaf's.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in flat]
  mask_flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  mask_paths = [path_str(kp) for kp, _ in mask_flat]
  if mask_paths != paths:
    i = next((i for i, (a, b) in enumerate(zip(paths, mask_paths)) if a != b),
             min(len(paths), len(mask_paths)))
    leaf = lambda names: repr(names[i]) if i < len(names) else "no leaf"
    raise ConfigError("masks must be a tree like params (from compute_masks), got another: "
                      f"leaf {i} is {leaf(paths)} in params, {leaf(mask_paths)} in masks")
  out = []
  for path, (_, p), (_, m) in zip(paths, flat, mask_flat):
    if jnp.shape(m) != jnp.shape(p):  # a broadcast mask would prune what it does not say
      raise ConfigError(f"masks[{path!r}] has shape {jnp.shape(m)}, its parameter "
                        f"{jnp.shape(p)}; a mask has its parameter's shape")
    out.append(jnp.where(m != 0, p, jnp.zeros_like(p)))
  return jax.tree_util.tree_unflatten(treedef, out)


def apply_masks_ste(params: Any, masks: Any) -> Any:
  """Masked weights in the forward pass, identity gradient to the dense weights (straight-through).

  The value equals :func:`apply_masks` exactly; ``jax.grad`` through it reaches pruned weights as
  if no mask were there, so they keep training and can come back when masks are recomputed.

  References:
    Lin, Stich, Barba, Dmitriev, Jaggi. Dynamic Model Pruning with Feedback. ICLR 2020.
  """
  masked = apply_masks(params, masks)
  return jax.tree.map(lambda p, q: p + jax.lax.stop_gradient(q - p), params, masked)
