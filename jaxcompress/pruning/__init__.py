"""Pruning as pure pytree transforms.

Data flow: ``select`` (which leaves, by regex rules) -> ``scores`` (how much each weight
matters) -> ``masks`` (which entries survive: unstructured, whole kernels, channel, N:M) ->
``tree`` (masks over a whole parameter tree, ``apply_masks``; ``positions``: masks capped at the
export's gap codes) -> ``schedules`` (sparsity over training steps) ->
``wrapper`` (an optax optimizer that prunes while it trains) -> ``iterative`` (rounds of prune,
fine-tune, validate) ; ``summary`` reports what came out (``sparsity``: the same count, jit-able).
"""

from jaxcompress.pruning.iterative import IterativeResult, Round, iterative_prune
from jaxcompress.pruning.masks import (Masker, channels, kernels, n_of_m, nm_mask, num_pruned,
                                       per_step, topk_mask, unstructured)
from jaxcompress.pruning.schedules import (Schedule, constant_schedule, one_shot_schedule,
                                           polynomial_schedule)
from jaxcompress.pruning.scores import (SCORES, Score, get_score, lamp, magnitude, movement,
                                        random, saliency)
from jaxcompress.pruning.select import DEFAULT_RULES, Selection, select
from jaxcompress.pruning.summary import LeafSummary, Summary, sparsity, summary
from jaxcompress.pruning.tree import (apply_masks, apply_masks_ste, channel_masks, compute_masks,
                                      magnitude_masks, nm_masks)
from jaxcompress.pruning.wrapper import PruneState, current_masks, prune

__all__ = [
    # leaf selection
    "DEFAULT_RULES", "Selection", "select",
    # scores
    "SCORES", "Score", "get_score", "lamp", "magnitude", "movement", "random", "saliency",
    # array masks and maskers
    "Masker", "channels", "kernels", "n_of_m", "nm_mask", "num_pruned", "per_step", "topk_mask",
    "unstructured",
    # masks over parameter trees
    "apply_masks", "apply_masks_ste", "channel_masks", "compute_masks", "magnitude_masks",
    "nm_masks",
    # schedules
    "Schedule", "constant_schedule", "one_shot_schedule", "polynomial_schedule",
    # optax wrapper
    "PruneState", "current_masks", "prune",
    # iterative pruning
    "IterativeResult", "Round", "iterative_prune",
    # reporting
    "LeafSummary", "Summary", "sparsity", "summary",
]
