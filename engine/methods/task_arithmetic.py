"""task_arithmetic: theta = theta_0 + lambda * sum_k w_k tau_k (mergekit `task_arithmetic`, arXiv 2212.04089).

Parameters and defaults are mergekit's GeneralizedTaskArithmeticMerge ones, so recipes work unchanged:
per model `weight` (required) and `density` [1.0; accepted, no sparsification in this method]; global `normalize`
[false: divide by sum_k w_k, a |sum| < 1e-8 counts as 1], `lambda` [1.0], `rescale` and `int8_mask` [false;
accepted, no effect here, as in mergekit].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, TensorInfo
from shardmerge.engine.methods.common import (
    DENSITY,
    WEIGHT,
    check_fraction,
    check_inputs,
    combine_deltas,
    fused_merge,
    gta_params,
    on_kernel_device,
    per_model,
)


def merge(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, stats: None, chunk: Chunk, info: TensorInfo, **params
) -> torch.Tensor:
    """base + lambda * (normalized) weighted sum of the task vectors of this chunk (CUDA: one fused kernel call)."""
    check_inputs(tensors, base, info, needs_base=True)
    weights = per_model("weight", params["weight"], len(tensors), info)
    check_fraction("density", per_model("density", params["density"], len(tensors), info), info)
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    if on_kernel_device(tensors, base):
        return fused_merge("task_arithmetic", tensors, base, weights, chunk, normalize=normalize, lam=lam)
    deltas = [t - base for t in tensors]
    return combine_deltas(base, deltas, weights, consensus=False, normalize=normalize, lam=lam)


SPEC = register(
    MethodSpec(
        name="task_arithmetic",
        merge=merge,
        needs_base=True,
        params=(WEIGHT, DENSITY, *gta_params(normalize=False)),
        reference="https://arxiv.org/abs/2212.04089",
        mergekit_name="task_arithmetic",
        doc="theta_0 + lambda * sum_k w_k (theta_k - theta_0); matches mergekit task_arithmetic.",
    )
)
GTA_GLOBALS = dict(SPEC.global_params)  # name -> default, for code written against the dict form
