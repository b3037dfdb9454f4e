"""ties: TIES-merging (mergekit `ties`, arXiv 2306.01708): trim, elect sign, disjoint mean.

Per expert keep the top `density` fraction of |tau_k| over the whole tensor (k = max(1, int(density * numel)),
exact per-tensor threshold from select.py, computed in `prepare` with two streaming passes); elect per element
the sign of sum_k w_k tau_k (mergekit consensus "sum", zero counts as +); average the agreeing weighted entries
(divide by the agreeing weights when `normalize` [true]); theta = theta_0 + lambda * merged.
`rescale` [false] rescales each trimmed tau_k to its original L1 norm (mergekit RescaleNorm.l1; one more pass).
Ties at the threshold magnitude are all kept (mergekit's argsort keeps exactly k): see select.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.methods import register
from engine.methods.base import Chunk, ChunkReader, MethodSpec, TensorInfo
from engine.methods.common import (
    SparsifyStats,
    check_fraction,
    check_inputs,
    combine_deltas,
    fused_merge,
    on_kernel_device,
    per_model,
    prepare_magnitude,
    sparsified_deltas,
    window_thresholds,
)

TIES_GLOBALS = {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> SparsifyStats:
    """Per-expert exact magnitude thresholds (and L1 rescale factors when `rescale`) over the whole tensor."""
    n = len(params["weight"])
    density = per_model("density", params["density"], n, info)
    check_fraction("density", density, info)
    return prepare_magnitude(read, info, n, density, None, bool(params["rescale"]))


def merge(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor], *, stats: SparsifyStats, chunk: Chunk,
          info: TensorInfo, **params) -> torch.Tensor:
    """Trim with the prepared thresholds, then sign consensus and disjoint (weighted) mean on this chunk.
    CUDA chunks: one fused kernel call with the same thresholds and L1 scales."""
    check_inputs(tensors, base, info, needs_base=True)
    weights = per_model("weight", params["weight"], len(tensors), info)
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    if on_kernel_device(tensors, base):
        lo, _ = window_thresholds(stats.windows)
        return fused_merge("ties", tensors, base, weights, chunk, normalize=normalize, lam=lam, thresholds=lo,
                           scales=stats.scales)
    deltas = sparsified_deltas(tensors, base, stats)
    return combine_deltas(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)


SPEC = register(
    MethodSpec(
        name="ties",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        per_model_params={"weight": None, "density": 1.0},
        global_params=dict(TIES_GLOBALS),
        doc="TIES: top-density |tau| per expert, sign election by weighted sum, disjoint mean; matches mergekit.",
    )
)
