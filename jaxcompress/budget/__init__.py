"""Compress to a budget: per-layer sensitivity, exact allocation, device presets, costs.

- :mod:`.presets`: the ``any``, ``mcu``, ``gpu-sparse`` and ``int8-npu`` search spaces;
- :mod:`.cost`: artifact bytes from the export's size code, BOPs from the traced layers;
- :mod:`.sensitivity`: the per-layer scan, one compiled evaluation for the whole grid;
- :mod:`.hessian`: the Hessian-trace proxy (HAWQ) and its rank agreement with the scan;
- :mod:`.refine`: damage measured around a whole reference plan (the allocator's second pass);
- :mod:`.allocate`: the multiple-choice knapsack, solved exactly by dynamic programming;
- :mod:`.plan`: the plan, the uniform recipe at the same budget, their compose specs;
- :mod:`.find`: :func:`find_plan`, all of it in one call for any model.
"""

from jaxcompress.budget.allocate import Allocation, allocate, min_cost
from jaxcompress.budget.cost import (coded_ratio, density, gap_cap, has_kernels, keep_mask,
                                     kernel_keep, kernel_size, layer_costs, layer_macs, option_bops,
                                     option_cost, overhead_bytes, pessimistic_spec,
                                     shared_kernel_bytes, weight_bytes)
from jaxcompress.budget.find import Found, find_plan
from jaxcompress.budget.hessian import hessian_traces, proxy_damage, spearman
from jaxcompress.budget.plan import (LayerPlan, Plan, allocate_plan, global_bits, global_keep,
                                     kernel_window, only_rules, scheduled, threshold_plans,
                                     uniform_size)
from jaxcompress.budget.presets import PRESETS, Option, Preset, get_preset
from jaxcompress.budget.refine import Reference, context_damage, reference_of
from jaxcompress.budget.sensitivity import DAMAGES, Evaluator, Sensitivity, scan

__all__ = [
    "Allocation", "allocate", "min_cost", "coded_ratio", "density", "gap_cap", "has_kernels",
    "keep_mask", "kernel_keep", "kernel_size", "layer_costs", "layer_macs", "option_bops",
    "option_cost", "overhead_bytes", "pessimistic_spec", "shared_kernel_bytes", "weight_bytes",
    "Found", "find_plan", "kernel_window", "hessian_traces", "proxy_damage", "spearman",
    "LayerPlan", "Plan", "allocate_plan", "global_bits", "global_keep", "only_rules", "scheduled",
    "threshold_plans", "uniform_size", "PRESETS", "Option", "Preset", "get_preset", "DAMAGES",
    "Evaluator", "Sensitivity", "scan", "Reference", "context_damage", "reference_of",
]
