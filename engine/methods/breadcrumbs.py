"""breadcrumbs / breadcrumbs_ties: Model Breadcrumbs (mergekit, arXiv 2312.06795).

Per expert, over the whole tensor: drop the int(gamma * numel) largest |tau_k| (outliers) and keep the next
int(density * numel) (mergekit `magnitude_outliers`: when gamma + density > 1 fewer outliers are dropped so the
target count is kept; density >= 1 keeps everything, gamma included). The window [lo, hi] of kept magnitudes is
found exactly in `prepare` (two streaming passes, select.py); exactly the asked ranks are kept, ties
at a bound broken by flat index (select.py).
Then `breadcrumbs` sums like task_arithmetic and `breadcrumbs_ties` adds TIES sign consensus.
Defaults are mergekit's: weight (required), density [1.0], gamma [0.01] per model; normalize [false],
rescale [false], lambda [1.0], int8_mask [false] (no numeric effect, as in mergekit).
"""

from __future__ import annotations

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import ChunkReader, MethodSpec, Param, TensorInfo
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

GAMMA = Param(
    "gamma",
    default=0.01,
    per_model=True,
    lo=0,
    hi=1,
    hi_open=True,
    doc="fraction of the largest |tau| entries dropped as outliers",
)


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> SparsifyStats:
    """Per-expert exact [lo, hi] magnitude windows (and L1 rescale factors when `rescale`)."""
    n = len(params["weight"])
    density = per_model("density", params["density"], n, info)
    gamma = per_model("gamma", params["gamma"], n, info)
    check_fraction("density", density, info)
    check_fraction("gamma", gamma, info, upper=1.0)
    return prepare_magnitude(read, info, n, density, gamma, bool(params["rescale"]))


for _name, _consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    _spec = register(
        MethodSpec(
            name=_name,
            merge=windowed_merge(_name, consensus=_consensus),
            prepare=prepare,
            needs_base=True,
            params=(WEIGHT, DENSITY, GAMMA, *gta_params(normalize=False)),
            whole_tensor_stats="per model: the |tau| window bounds (ranks gamma * numel and (gamma + density) * "
            "numel from the top); with rescale, L1 norms of tau and of its kept entries",
            reference="https://arxiv.org/abs/2312.06795",
            mergekit_name=_name,
            doc=f"Model Breadcrumbs{' with TIES sign consensus' if _consensus else ''}: drop the gamma largest "
            "and keep the next density fraction of |tau| per expert; matches mergekit.",
        )
    )
BREADCRUMBS_GLOBALS = dict(_spec.global_params)  # name -> default, for code written against the dict form
