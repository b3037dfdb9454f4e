"""ties: TIES-merging (mergekit `ties`, arXiv 2306.01708): trim, elect sign, disjoint mean.

Per expert keep the top `density` fraction of |tau_k| over the whole tensor (k = max(1, int(density * numel)),
exact per-tensor threshold from select.py, computed in `prepare` with two streaming passes); elect per element
the sign of sum_k w_k tau_k (mergekit consensus "sum", zero counts as +); average the agreeing weighted entries
(divide by the agreeing weights when `normalize` [true]); theta = theta_0 + lambda * merged.
`rescale` [false] rescales each trimmed tau_k to its original L1 norm (mergekit RescaleNorm.l1; one more pass).
Exactly k entries are kept: ties at the threshold magnitude are broken by flat index (a third pass, only when
the cut falls inside ties): see select.py.
"""

from __future__ import annotations

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import ChunkReader, MethodSpec, TensorInfo
from shardmerge.engine.methods.common import (
    DENSITY,
    WEIGHT,
    SparsifyStats,
    check_fraction,
    gta_params,
    per_model,
    prepare_magnitude,
    windowed_merge,
)


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> SparsifyStats:
    """Per-expert exact magnitude thresholds (and L1 rescale factors when `rescale`) over the whole tensor."""
    n = len(params["weight"])
    density = per_model("density", params["density"], n, info)
    check_fraction("density", density, info)
    return prepare_magnitude(read, info, n, density, None, bool(params["rescale"]))


# Trim with the prepared thresholds, then sign consensus and disjoint (weighted) mean on each chunk.
merge = windowed_merge("ties", consensus=True)


SPEC = register(
    MethodSpec(
        name="ties",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        params=(WEIGHT, DENSITY, *gta_params(normalize=True)),
        whole_tensor_stats="per model: the k-th largest |tau| (k = density * numel); with rescale, L1 norms of tau "
        "and of its kept entries",
        reference="https://arxiv.org/abs/2306.01708",
        mergekit_name="ties",
        doc="TIES: top-density |tau| per expert, sign election by weighted sum, disjoint mean; matches mergekit.",
    )
)
TIES_GLOBALS = dict(SPEC.global_params)  # name -> default, for code written against the dict form
