"""ram / ramplus_tl: Reinforced Agent Merging (arXiv 2601.13572, mergekit `ram`, `ramplus_tl`).

With task vectors tau_k = theta_k - theta_0, an entry of expert k contributes when |tau_k| > `epsilon` [1e-5]. Per
entry, c = the number of contributing experts: where c == 1 (unique) the one contributor's tau is taken whole,
where c > 1 (overlap) the contributors are averaged (sum / c); entries nobody contributes to stay at the base.
ramplus_tl (tensor-local RAM+) also amplifies each expert's unique entries by lambda_k = 1 + r * clamp(rho_k, 0,
alpha), rho_k = (its contributing overlap entries) / max(its unique entries, epsilon), counted over the whole
tensor; r [0.1], alpha [0.2].

Streaming: ram is purely per entry (no statistics, any chunking gives the same bits). ramplus_tl's counts are
integer sums over the whole tensor, taken in one pass in `prepare` (exact whatever the chunking); lambda_k is then
computed in float32 exactly as mergekit does. mergekit computes tau and the averages in the recipe dtype, we in
float32, so bf16 results can differ by bf16 rounding (and an entry whose |tau| is within rounding of epsilon may
count differently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import check_inputs


@dataclass(frozen=True)
class RamStats:
    """ramplus_tl's per-expert multipliers of unique entries (lambda_k, float32 values)."""

    lambdas: tuple[float, ...]


def _number(params: dict, name: str, info: TensorInfo, *, nonneg: bool = True) -> float:
    v = params[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonneg and v < 0):
        raise ValueError(f"tensor {info.name!r}: {name} must be a finite number{' >= 0' if nonneg else ''}, got {v!r}")
    return float(v)


def _contributions(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(tau_k zeroed where |tau_k| <= epsilon, stacked; contributing mask; contributor count per entry)."""
    taus = torch.stack([t - base for t in tensors])
    contributes = taus.abs() > epsilon
    return taus * contributes, contributes, contributes.sum(dim=0)


def prepare_plus(read: ChunkReader, *, info: TensorInfo, **params) -> RamStats:
    """Whole-tensor counts of each expert's contributing overlap and unique entries -> lambda_k (one pass)."""
    epsilon = _number(params, "epsilon", info)
    r, alpha = _number(params, "r", info, nonneg=False), _number(params, "alpha", info, nonneg=False)
    shared: torch.Tensor | None = None
    unique: torch.Tensor | None = None
    for _, tensors, base in read():
        _, contributes, count = _contributions(tensors, base, epsilon)
        dims = tuple(range(1, contributes.dim()))
        s = (contributes & (count > 1)).sum(dim=dims) if dims else (contributes & (count > 1)).long()
        u = (contributes & (count == 1)).sum(dim=dims) if dims else (contributes & (count == 1)).long()
        shared = s.cpu() if shared is None else shared + s.cpu()
        unique = u.cpu() if unique is None else unique + u.cpu()
    if shared is None:
        raise ValueError(f"tensor {info.name!r}: no chunks to merge")
    rho = shared.to(torch.float32) / unique.to(torch.float32).clamp(min=epsilon)
    lambdas = 1 + r * rho.clamp(min=0, max=alpha)
    return RamStats(lambdas=tuple(float(x) for x in lambdas))


def _merge(plus: bool):
    def merge(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        stats: RamStats | None,
        chunk: Chunk,
        info: TensorInfo,
        **params,
    ) -> torch.Tensor:
        """Unique entries whole (ramplus_tl: times lambda_k), overlapping ones averaged over their contributors."""
        check_inputs(tensors, base, info, needs_base=True)
        kept, _, count = _contributions(tensors, base, _number(params, "epsilon", info))
        unique = kept * (count == 1)
        if plus:
            lam = torch.tensor(stats.lambdas, dtype=torch.float32, device=base.device)
            unique = unique * lam.reshape(-1, *[1] * base.dim())
        overlap = kept * (count > 1) / count.clamp(min=1)
        return base + (unique + overlap).sum(dim=0)

    return merge


EPSILON = Param("epsilon", "float", 1e-5, lo=0, doc="an entry contributes where |tau| > epsilon")
REFERENCE = "https://arxiv.org/abs/2601.13572"

register(
    MethodSpec(
        name="ram",
        merge=_merge(False),
        needs_base=True,
        params=(EPSILON,),
        reference=REFERENCE,
        mergekit_name="ram",
        doc="RAM: per entry, the single contributing expert's tau whole, overlapping contributors averaged "
        "(|tau| > epsilon contributes); matches mergekit.",
    )
)
register(
    MethodSpec(
        name="ramplus_tl",
        merge=_merge(True),
        prepare=prepare_plus,
        needs_base=True,
        params=(
            Param("r", "float", 0.1, doc="amplification rate of unique entries"),
            Param("alpha", "float", 0.2, doc="upper clamp of the overlap / unique ratio"),
            EPSILON,
        ),
        whole_tensor_stats="per model: counts of its contributing overlap and unique entries",
        reference=REFERENCE,
        mergekit_name="ramplus_tl",
        doc="RAM+ (tensor-local): RAM with each expert's unique entries amplified by 1 + r * clamp(overlap/unique, "
        "0, alpha) counted over the whole tensor; matches mergekit.",
    )
)
