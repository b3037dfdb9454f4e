"""slerp: spherical linear interpolation from the base (t = 0) to the other model (t = 1) (mergekit `slerp`).

Whole-tensor geometry, as mergekit: with a = base, b = other, dot = <a/|a|, b/|b|> clamped to [-1, 1]
(a norm <= 1e-8 counts as 1); when |dot| > 0.9995 (DOT_THRESHOLD) fall back to lerp (1 - t) a + t b, else
theta = acos(dot), result = sin((1 - t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
The norms and the dot product need the whole tensor: `prepare` accumulates sum a^2, sum b^2, sum ab in float64
(products of float32 are exact in float64) with RowSum, so the coefficients are bit-identical for every chunking;
`merge` is then elementwise. `t` is global (per-layer gradients are resolved to a scalar by the engine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import RowSum, check_inputs

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpStats:
    """Interpolation coefficients of the base (coef_a) and of the other model (coef_b); lerp tells which branch."""

    coef_a: float
    coef_b: float
    lerp: bool


def coefficients(t: float, sum_aa: float, sum_bb: float, sum_ab: float) -> SlerpStats:
    """mergekit's slerp coefficients from the three whole-tensor sums (float64 arithmetic)."""
    norm_a = math.sqrt(sum_aa)
    norm_b = math.sqrt(sum_bb)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, sum_ab / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:
        return SlerpStats(coef_a=1.0 - t, coef_b=t, lerp=True)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return SlerpStats(math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta, lerp=False)


def _check_t(t, info: TensorInfo) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"tensor {info.name!r}: slerp parameter t must be a finite number, got {t!r}")
    return float(t)


def prepare(read: ChunkReader, *, info: TensorInfo, t: float) -> SlerpStats:
    """One pass: sum a^2, sum b^2 and sum ab over the whole tensor, then the coefficients."""
    t = _check_t(t, info)
    label = f"tensor {info.name!r} slerp"
    aa, bb, ab = RowSum(label), RowSum(label), RowSum(label)
    for _, tensors, base in read():
        if base is None or len(tensors) != 1:
            raise ValueError(f"tensor {info.name!r}: slerp needs a base and exactly one other model")
        a = base.to(torch.float64)
        b = tensors[0].to(torch.float64)
        aa.add(a * a)
        bb.add(b * b)
        ab.add(a * b)
    if math.prod(info.shape) == 0:
        return SlerpStats(coef_a=1.0 - t, coef_b=t, lerp=True)
    return coefficients(t, aa.value(), bb.value(), ab.value())


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: SlerpStats,
    chunk: Chunk,
    info: TensorInfo,
    t: float,
) -> torch.Tensor:
    """coef_a * base + coef_b * other on this chunk (float32)."""
    check_inputs(tensors, base, info, needs_base=True)
    if len(tensors) != 1:
        raise ValueError(
            f"tensor {info.name!r}: slerp merges a base with exactly one other model, got {len(tensors)} others"
        )
    return stats.coef_a * base + stats.coef_b * tensors[0]


SPEC = register(
    MethodSpec(
        name="slerp",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        params=(Param("t", lo=0, hi=1, doc="interpolation factor: 0 = base, 1 = the other model"),),
        min_models=1,
        max_models=1,
        whole_tensor_stats="the norms of base and other and their dot product",
        reference="https://en.wikipedia.org/wiki/Slerp",
        mergekit_name="slerp",
        doc="Spherical interpolation base -> other by t over the whole tensor, lerp when nearly colinear; "
        "matches mergekit slerp.",
    )
)
