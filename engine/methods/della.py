"""della / della_linear: DELLA magnitude-ranked drop (arXiv 2406.11617, mergekit `della`, `della_linear`).

For each expert, tau = theta_k - theta_0 is sparsified row by row: within a row (dim 1 of a matrix, the whole vector
of a 1-d tensor: mergekit unsqueezes it to one row), entries are ranked by |tau| ascending, r = 0 .. n-1, and entry
i is kept with probability p_i = (density - epsilon) + 2 * epsilon * r_i / (n - 1): large magnitudes are kept more
often, the mean keep probability is `density`. When `rescale` [true], survivors are multiplied by mergekit's L1
match sum|tau| / sum|tau * mask| over the whole tensor (not DELLA's per-entry 1/p_i; 1 when either is below 1e-7).
Then della elects signs and takes the disjoint weighted mean like TIES (normalize [true]); della_linear sums the
weighted task vectors (normalize [false]); theta = theta_0 + lambda * merged.

Streaming: ranks of a matrix row depend only on that row, and the engine's chunks are whole rows, so the masks are
per chunk; the L1 factors are whole-tensor sums from one chunk-proof pass in `prepare`. A 1-d tensor (one row of
mergekit's) may arrive in several element chunks, so `prepare` ranks the whole vector (its ranks travel in the
stats: a bias or norm vector, small).
Randomness: entry i of expert e is kept iff (philox(stream_key(random_seed, tensor, e), flat index i) >> 8) <
floor(p_i * 2**24 + 1/2), the DARE stream of kernels/philox.py with a per-entry threshold, so the mask never depends
on chunking, workers or device. Magnitude ties are ranked by flat index (mergekit's argsort order is unspecified).
Differences from mergekit: its mask comes from torch.bernoulli (same distribution, other draws); it ranks and
computes p_i in the recipe dtype (bf16 ranks above 256 are rounded), we in float64; a row of one entry gets
p = density (mergekit's 0/0 rank is NaN and torch.bernoulli refuses it).
Parameters are mergekit's (weight required; density [1]; epsilon [0.15]; normalize; rescale [true]; lambda [1];
int8_mask [false], no numeric effect) plus ours: random_seed [0]. density >= 1 keeps tau; density <= 0 drops it;
otherwise density +/- epsilon must lie in (0, 1), as mergekit requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import (
    DENSITY,
    WEIGHT,
    check_inputs,
    combine_deltas,
    gta_params,
    l1_scales,
    masked_deltas,
    per_model,
)
from shardmerge.kernels.philox import philox, stream_key


@dataclass(frozen=True)
class DellaStats:
    """Per expert: Philox key (None = keep all, density >= 1), density, epsilon, L1 multiplier, and for a 1-d tensor
    the ranks of its entries over the whole vector (None for matrices: their rows are whole in every chunk)."""

    keys: tuple[int | None, ...]
    density: tuple[float, ...]
    epsilon: tuple[float, ...]
    scales: tuple[float, ...]
    vector_ranks: tuple[torch.Tensor, ...] | None = None


def _stable_ranks(mag: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based rank of every entry along `dim` by ascending magnitude, ties in index order (int64)."""
    order = torch.argsort(mag, dim=dim, stable=True)
    shape = [1] * mag.dim()
    shape[dim] = mag.shape[dim]
    positions = torch.arange(mag.shape[dim], device=mag.device).reshape(shape).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, positions)


def _thresholds(ranks: torch.Tensor, n: int, density: float, epsilon: float) -> torch.Tensor:
    """Integer keep thresholds for 24-bit uniforms: floor(p * 2**24 + 1/2) with p from the rank, in float64."""
    if n > 1:
        p = (density - epsilon) + ranks.to(torch.float64) / (n - 1) * (2 * epsilon)
    else:
        p = torch.full(ranks.shape, density, dtype=torch.float64, device=ranks.device)
    return torch.floor(p.clamp(0.0, 1.0) * float(1 << 24) + 0.5).to(torch.int64)


def keep_mask(stats: DellaStats, expert: int, chunk: Chunk, tau: torch.Tensor) -> torch.Tensor | None:
    """The expert's DELLA keep mask on one chunk (None = keep all); rows are ranked along dim 1."""
    key = stats.keys[expert]
    if key is None:
        return None
    d, eps = stats.density[expert], stats.epsilon[expert]
    if d <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    if stats.vector_ranks is not None:
        ranks = stats.vector_ranks[expert].to(tau.device)[chunk.elem_offset : chunk.elem_offset + tau.numel()]
        n = stats.vector_ranks[expert].numel()
    else:
        ranks, n = _stable_ranks(tau.abs(), 1), tau.shape[1]
    thr = _thresholds(ranks, n, d, eps).reshape(tau.shape)
    offsets = chunk.elem_offset + torch.arange(tau.numel(), dtype=torch.int64, device=tau.device)
    return (philox(key, offsets).reshape(tau.shape) >> 8) < thr


def _check(params: dict, info: TensorInfo, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    seed = params["random_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"tensor {info.name!r}: random_seed must be an int, got {seed!r}")
    density = per_model("density", params["density"], n, info)
    epsilon = per_model("epsilon", params["epsilon"], n, info)
    for e, (d, eps) in enumerate(zip(density, epsilon)):
        if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
            raise ValueError(
                f"tensor {info.name!r}: non-base model {e + 1} (models order): density {d!r} +/- epsilon {eps!r} must lie in (0, 1); "
                f"lower epsilon below min(density, 1 - density)"
            )
    return density, epsilon


def _vector_ranks(read: ChunkReader, n: int) -> tuple[torch.Tensor, ...]:
    """Ranks over the whole vector of a 0-d/1-d tensor, per expert (its element chunks joined in order)."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for _, tensors, base in read():
        for e in range(n):
            parts[e].append((tensors[e] - base).reshape(-1).cpu())
    return tuple(_stable_ranks(torch.cat(p).abs(), 0) for p in parts)


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> DellaStats:
    """Stream keys, the whole-vector ranks of a 1-d tensor, and the L1 multipliers (one more pass) when rescaling."""
    n = len(params["weight"])
    density, epsilon = _check(params, info, n)
    keys = tuple(None if d >= 1 else stream_key(params["random_seed"], info.name, e) for e, d in enumerate(density))
    ranks = _vector_ranks(read, n) if len(info.shape) <= 1 and any(k is not None for k in keys) else None
    stats = DellaStats(keys, density, epsilon, (1.0,) * n, ranks)
    if not params["rescale"] or all(k is None for k in keys):
        return stats
    scales = l1_scales(read, lambda e, c, tau: keep_mask(stats, e, c, tau), n, info)
    return DellaStats(keys, density, epsilon, scales, ranks)


def _merge(consensus: bool):
    def merge(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        stats: DellaStats,
        chunk: Chunk,
        info: TensorInfo,
        **params,
    ) -> torch.Tensor:
        """Drop by the keyed rank-dependent masks, rescale, then sum (or TIES-combine) the weighted deltas."""
        check_inputs(tensors, base, info, needs_base=True)
        weights = per_model("weight", params["weight"], len(tensors), info)
        deltas = masked_deltas(tensors, base, chunk, lambda e, c, tau: keep_mask(stats, e, c, tau), stats.scales)
        return combine_deltas(
            base, deltas, weights, consensus=consensus, normalize=bool(params["normalize"]), lam=float(params["lambda"])
        )

    return merge


EPSILON = Param(
    "epsilon",
    default=0.15,
    per_model=True,
    doc="half-width of the keep probabilities around density (density +/- epsilon within (0, 1))",
)

for _name, _consensus in (("della", True), ("della_linear", False)):
    register(
        MethodSpec(
            name=_name,
            merge=_merge(_consensus),
            prepare=prepare,
            needs_base=True,
            params=(
                WEIGHT,
                DENSITY,
                EPSILON,
                *gta_params(normalize=_consensus, rescale=True),
                Param("random_seed", "int", 0, doc="key of the random drop masks (with tensor and model)"),
            ),
            whole_tensor_stats="per model: with rescale, L1 norms of tau and of its kept entries; a 1-d tensor's "
            "magnitude ranks (matrix rows are ranked inside each chunk; masks are keyed by flat index)",
            reference="https://arxiv.org/abs/2406.11617",
            mergekit_name=_name,
            doc=f"DELLA: keyed random drop with keep probability rising with |tau|'s rank in its row, L1 rescale, "
            f"then {'TIES sign consensus' if _consensus else 'weighted sum'}; mergekit parameters.",
        )
    )
