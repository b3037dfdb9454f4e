"""dare_linear / dare_ties: DARE drop-and-rescale (arXiv 2311.03099), then a linear sum or TIES consensus.

Each entry of tau_k = theta_k - theta_0 is kept with probability `density` (dropped with 1 - density) by a
counter-based Philox RNG keyed by (random_seed, tensor name, expert index in recipe order) and indexed by the
element's flat index in the whole tensor (kernels/philox.py), so the mask never depends on chunking, worker count,
placement or device. Survivors are rescaled when `rescale` [true] by the rule `rescale_rule`:
- "inverse_density" [default, the DARE paper]: multiply by 1/density. Purely elementwise, no extra pass.
- "l1" (mergekit's semantics, RescaleNorm.l1): multiply by sum|tau_k| / sum|tau_k * mask| over the whole tensor,
  1 when either is below 1e-7; computed in `prepare` with one chunk-proof pass (RowSum).
Only "l1" matches mergekit's formula; mergekit draws its mask from torch.bernoulli, so no rule can match it bit for
bit: both agree with it in distribution (E[sum|tau * mask|] = density * sum|tau|). density >= 1 keeps tau unchanged
(no rescale), as mergekit. Then dare_linear sums like task_arithmetic and dare_ties adds TIES sign consensus.
Defaults are mergekit's (weight required; density [1.0]; normalize [false]; rescale [true]; lambda [1.0];
int8_mask [false], no numeric effect) plus ours: random_seed [0], rescale_rule ["inverse_density"].
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
    check_fraction,
    check_inputs,
    combine_deltas,
    fused_merge,
    gta_params,
    l1_scales,
    masked_deltas,
    on_kernel_device,
    per_model,
)
from shardmerge.kernels.philox import dare_keep_mask, stream_key

RESCALE_RULES = ("inverse_density", "l1")


@dataclass(frozen=True)
class DareStats:
    """Per expert: Philox stream key (None = density >= 1, keep all), keep probability and survivor multiplier."""

    keys: tuple[int | None, ...]
    density: tuple[float, ...]
    scales: tuple[float, ...]


def keep_mask(stats: DareStats, expert: int, chunk: Chunk, like: torch.Tensor) -> torch.Tensor | None:
    """The expert's keep mask for one chunk (None = keep all): element i of the chunk is flat index offset + i."""
    key = stats.keys[expert]
    if key is None:
        return None
    offsets = chunk.elem_offset + torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    return dare_keep_mask(key, offsets, stats.density[expert]).reshape(like.shape)


def _check_globals(params: dict, info: TensorInfo) -> None:
    seed = params["random_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"tensor {info.name!r}: random_seed must be an int, got {seed!r}")
    if params["rescale_rule"] not in RESCALE_RULES:
        raise ValueError(
            f"tensor {info.name!r}: rescale_rule must be one of {RESCALE_RULES}, got {params['rescale_rule']!r}"
        )


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> DareStats:
    """Stream keys and rescale multipliers; reads the tensor only for rescale_rule "l1" (one pass)."""
    _check_globals(params, info)
    n = len(params["weight"])
    density = per_model("density", params["density"], n, info)
    check_fraction("density", density, info)
    keys = tuple(None if d >= 1 else stream_key(params["random_seed"], info.name, e) for e, d in enumerate(density))
    stats = DareStats(keys=keys, density=density, scales=(1.0,) * n)
    if not params["rescale"] or all(k is None for k in keys):
        return stats
    if params["rescale_rule"] == "l1":
        scales = l1_scales(read, lambda e, c, tau: keep_mask(stats, e, c, tau), n, info)
    else:
        scales = tuple(1.0 if k is None or d <= 0 else 1.0 / d for k, d in zip(keys, density))
    return DareStats(keys=keys, density=density, scales=scales)


def kernel_args(stats: DareStats) -> dict:
    """The stats as interpolate's DARE arguments: the same Philox keys and survivor scales; an expert that keeps
    everything (key None, density >= 1) gets density 1 (threshold 2**24: every element kept) and a dummy key 0."""
    return dict(
        dare_keys=tuple(0 if k is None else k for k in stats.keys),
        densities=tuple(min(float(d), 1.0) for d in stats.density),
        scales=stats.scales,
    )


def _merge(consensus: bool):
    mode = "dare_ties" if consensus else "dare_linear"

    def merge(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        stats: DareStats,
        chunk: Chunk,
        info: TensorInfo,
        **params,
    ) -> torch.Tensor:
        """Drop with the keyed masks, rescale, then sum (or TIES-combine) the weighted task vectors.
        CUDA chunks: one fused kernel call drawing the same Philox masks at the chunk's element offsets."""
        check_inputs(tensors, base, info, needs_base=True)
        weights = per_model("weight", params["weight"], len(tensors), info)
        normalize, lam = bool(params["normalize"]), float(params["lambda"])
        if on_kernel_device(tensors, base):
            return fused_merge(mode, tensors, base, weights, chunk, normalize=normalize, lam=lam, **kernel_args(stats))
        deltas = masked_deltas(tensors, base, chunk, lambda e, c, tau: keep_mask(stats, e, c, tau), stats.scales)
        return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lam=lam)

    return merge


for _name, _consensus in (("dare_linear", False), ("dare_ties", True)):
    _spec = register(
        MethodSpec(
            name=_name,
            merge=_merge(_consensus),
            prepare=prepare,
            needs_base=True,
            params=(
                WEIGHT,
                DENSITY,
                *gta_params(normalize=False, rescale=True),
                Param("random_seed", "int", 0, doc="key of the random drop masks (with tensor and model)"),
                Param(
                    "rescale_rule",
                    "str",
                    "inverse_density",
                    choices=RESCALE_RULES,
                    doc="1/density (DARE paper) or mergekit's L1-norm ratio",
                ),
            ),
            whole_tensor_stats="with rescale_rule l1: L1 norms of tau and of its kept entries (else none: the "
            "masks are keyed by flat index)",
            reference="https://arxiv.org/abs/2311.03099",
            mergekit_name=_name,
            doc=f"DARE: keyed random drop of tau entries (keep prob. density), rescale, then "
            f"{'TIES sign consensus' if _consensus else 'weighted sum'}; mergekit parameters.",
        )
    )
DARE_GLOBALS = dict(_spec.global_params)  # name -> default, for code written against the dict form
