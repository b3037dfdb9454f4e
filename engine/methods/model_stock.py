"""model_stock: Model Stock (Jang et al., arXiv 2403.19522; mergekit `model_stock`).

With offsets o_k = theta_k - theta_0 of the N >= 2 fine-tuned models, cos = the mean over pairs a < b of
<o_a, o_b> / max(|o_a| |o_b|, 1e-6) (each clamped to [-1, 1]) and t = N cos / (1 + (N - 1) cos) (0 when
|1 + (N - 1) cos| < 1e-6): theta = t mean_k(theta_k) + (1 - t) theta_0.
The cosines are taken over the whole tensor (flattened), or per row with `filter_wise` (vectors along the last
dimension; a 1-D tensor is one vector), as mergekit. Whole tensor: `prepare` computes the offsets' Gram matrix
exactly over all chunks (shardmerge.engine.methods.gram), then `merge` is elementwise. filter_wise: each row's Gram matrix
from its own values, so it streams without a prepare pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import check_inputs
from shardmerge.engine.methods.gram import gram_last_dim, gram_whole

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


@dataclass(frozen=True)
class StockStats:
    t: float | None  # None with filter_wise (t per row, computed in merge)


def stock_t(gram: torch.Tensor) -> torch.Tensor:
    """t of every Gram matrix (..., N, N) of the offsets: N cos / (1 + (N - 1) cos), cos = mean pair cosine."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cos = [
        (gram[..., a, b] / (norms[..., a] * norms[..., b]).clamp(min=NORM_FLOOR)).clamp(-1, 1)
        for a in range(n)
        for b in range(a + 1, n)
    ]
    c = torch.stack(cos).mean(dim=0)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))


def _check(tensors, base, info):
    check_inputs(tensors, base, info, needs_base=True)
    if len(tensors) < 2:
        raise ValueError(
            f"tensor {info.name!r}: model_stock needs a base and at least 2 other models, got {len(tensors)}"
        )


def prepare(read: ChunkReader, *, info: TensorInfo, filter_wise: bool) -> StockStats:
    """Whole-tensor t from the offsets' exact Gram matrix (nothing to prepare with filter_wise)."""
    if filter_wise:
        return StockStats(t=None)

    def offsets(tensors, base):
        _check(tensors, base, info)
        return [x - base for x in tensors]

    gram = gram_whole(read, offsets, f"tensor {info.name!r} model_stock")
    return StockStats(t=float(stock_t(gram)))


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: StockStats,
    chunk: Chunk,
    info: TensorInfo,
    filter_wise: bool,
) -> torch.Tensor:
    """t * mean(theta_k) + (1 - t) * theta_0 (t per row with filter_wise), float32 as mergekit."""
    _check(tensors, base, info)
    average = sum(tensors) / len(tensors)
    if not filter_wise:
        t = stats.t
        return t * average + (1 - t) * base
    rows = base.reshape(1, -1) if base.dim() <= 1 else base
    g = gram_last_dim([(x - base).reshape(rows.shape) for x in tensors])
    t = stock_t(g).to(torch.float32).unsqueeze(-1)
    return (t * average.reshape(rows.shape) + (1 - t) * rows).reshape(base.shape)


SPEC = register(
    MethodSpec(
        name="model_stock",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        params=(
            Param("filter_wise", "bool", False, doc="cosines per row (last-dimension vector) instead of per tensor"),
        ),
        min_models=2,
        doc="Model Stock: interpolate from the base to the models' mean by t = N cos / (1 + (N - 1) cos) of the "
        "offsets' mean pairwise cosine.",
        whole_tensor_stats="the offsets' pairwise inner products and norms (filter_wise: per row, no whole-tensor "
        "statistic)",
        reference="https://arxiv.org/abs/2403.19522",
        mergekit_name="model_stock",
    )
)
