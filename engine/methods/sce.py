"""sce: Select, Calculate, Erase (arXiv 2408.07990, mergekit `sce`).

With task vectors tau_k = theta_k - theta_0 (k = 1..K, the base excluded):
- Select (only when `select_topk` [1] < 1): the population variance across experts, var = Var_k(tau_k) per entry;
  keep the k = int(nnz(var) * select_topk) entries of largest var over the whole tensor (all of them when k = 0:
  none), zeroing the rest in every tau_k;
- Calculate: per-expert weight w_k = mean(tau_k^2) over the whole tensor, divided by sum_k w_k (uniform 1/K when that
  sum is below 1e-6);
- Erase: keep tau_k where sign(tau_k) equals the elected sign of sum_k tau_k (zero elects +; zeros never agree);
  merged = sum_k w_k tau_k [agree] / max(sum_k w_k [agree], 1e-6); theta = theta_0 + merged.
There is no per-model weight: the weights are the statistic.

Streaming: Select needs the exact k-th largest variance and Calculate whole-tensor sums, so `prepare` reads the
tensor in chunk-proof passes: the nonzero count, the two-pass radix select of select.py (variances are >= 0, so
|var| = var), a count of the entries above the threshold, and one pass that keeps the first tied entries at the
threshold in flat index order (so exactly k are kept, as mergekit's topk does; which tied entries topk keeps is
unspecified) while summing the masked squares (RowSum). Without Select (select_topk >= 1) only the last pass runs. Everything else is per entry. Parameters are mergekit's:
select_topk [1.0], int8_mask [false] (no numeric effect). mergekit computes in the recipe dtype (bf16 variances
tie far more often there), we in float32 with float64 sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import RowSum, check_inputs, numel_of
from shardmerge.engine.methods.select import kth_largest_abs_streaming

WEIGHT_EPS = 1e-6  # mergekit: uniform weights when the summed mean squares are below this; divisor floor


@dataclass(frozen=True)
class SceStats:
    """select: None = keep every entry; else (threshold t, last flat index of a kept entry tied at t, or -1 when
    no tie is kept); drop_all: k = 0. weights: the normalised per-expert weights."""

    select: tuple[float, int] | None
    drop_all: bool
    weights: tuple[float, ...]


def _variance(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Population variance across experts of tau_k = theta_k - theta_0 (float32 taus, as mergekit forms them).

    Two passes in float64, rounded once to float32: the same bits as torch.var(dim=0, unbiased=False), which
    accumulates in float64 on the CPU, at a fifth of its time (torch.var over a non-contiguous dim is slow), with
    one float64 task vector alive at a time;
    prepare and merge both use this function, so their tie tests see identical values."""
    tau = lambda t: (t - base).double()
    mean = tau(tensors[0])
    for t in tensors[1:]:
        mean.add_(tau(t))
    mean.div_(len(tensors))
    acc = tau(tensors[0]).sub_(mean).square_()
    for t in tensors[1:]:
        acc.add_(tau(t).sub_(mean).square_())
    return acc.div_(len(tensors)).float()


def select_mask(stats: SceStats, chunk: Chunk, var: torch.Tensor) -> torch.Tensor | None:
    """Entries kept by Select on one chunk (None = all): var > t, or var == t up to the recorded flat index."""
    if stats.drop_all:
        return torch.zeros_like(var, dtype=torch.bool)
    if stats.select is None:
        return None
    t, last_tie = stats.select
    flat = chunk.elem_offset + torch.arange(var.numel(), device=var.device).reshape(var.shape)
    return (var > t) | ((var == t) & (flat <= last_tie))


def _threshold(read: ChunkReader, info: TensorInfo, topk: float) -> tuple[int | None, float]:
    """k = int(nnz(var) * topk) and the exact k-th largest variance (three passes); k None when k == 0."""
    nnz = sum(int(torch.count_nonzero(_variance(ts, b))) for _, ts, b in read())
    k = int(nnz * topk)
    if k == 0:
        return None, 0.0
    variances = lambda: ([_variance(ts, b)] for _, ts, b in read())
    return k, kth_largest_abs_streaming(variances, [[k]], label=f"tensor {info.name!r}")[0][0]


def _kept_squares(read: ChunkReader, n: int, k: int | None, t: float, info: TensorInfo):
    """sum(tau_k^2) over the entries Select keeps, and the flat index of the last kept tie at t (-1: none).

    With a threshold, one counting pass first gives need = k - count(var > t) >= 1; the summing pass then keeps the
    first `need` entries equal to t in flat order (chunks arrive in row order), so exactly k survive."""
    sums = [RowSum(f"tensor {info.name!r} mean square of expert {e}") for e in range(n)]
    need = 0 if k is None else k - sum(int((_variance(ts, b) > t).sum()) for _, ts, b in read())
    seen, last_tie = 0, -1
    for chunk, tensors, base in read():
        keep = None
        if k is not None:
            var = _variance(tensors, base)
            keep = var > t
            if seen < need:
                tied = (var == t).reshape(-1).nonzero().reshape(-1)[: need - seen]
                if tied.numel():
                    keep.reshape(-1)[tied] = True
                    last_tie = chunk.elem_offset + int(tied[-1])
                    seen += int(tied.numel())
        for e in range(n):
            tau = (tensors[e] - base).double()
            sums[e].add((tau if keep is None else tau * keep).square())
    return last_tie, sums


def prepare(read: ChunkReader, *, info: TensorInfo, **params) -> SceStats:
    """Exact Select threshold (with its tie cutoff) and the normalised mean-square weights over the whole tensor."""
    topk = params["select_topk"]
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise ValueError(f"tensor {info.name!r}: select_topk must be a number, got {topk!r}")
    n = None
    for _, tensors, _b in read():
        n = len(tensors)
        break
    if n is None:
        raise ValueError(f"tensor {info.name!r}: no chunks to merge")
    if topk <= 0:
        return SceStats(select=None, drop_all=True, weights=(1.0 / n,) * n)
    k, t = _threshold(read, info, float(topk)) if topk < 1 else (None, 0.0)
    if topk < 1 and k is None:
        return SceStats(select=None, drop_all=True, weights=(1.0 / n,) * n)
    last_tie, sums = _kept_squares(read, n, k, t, info)
    numel = max(1, numel_of(info))
    means = torch.tensor([s.value() / numel for s in sums], dtype=torch.float64)
    total = float(means.sum())
    weights = (1.0 / n,) * n if abs(total) < WEIGHT_EPS else tuple(float(m) / total for m in means)
    return SceStats(select=None if k is None else (t, last_tie), drop_all=False, weights=weights)


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: SceStats,
    chunk: Chunk,
    info: TensorInfo,
    **params,
) -> torch.Tensor:
    """Select with the prepared threshold, erase disagreeing signs, weighted mean of the survivors, add to base."""
    check_inputs(tensors, base, info, needs_base=True)
    taus = torch.stack([t - base for t in tensors])
    keep = select_mask(stats, chunk, _variance(tensors, base)) if stats.select is not None or stats.drop_all else None
    if keep is not None:
        taus = taus * keep
    majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    w = torch.tensor(stats.weights, dtype=torch.float32, device=taus.device).reshape(-1, *[1] * base.dim())
    erased = w * (torch.sign(taus) == majority)
    merged = (taus * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=WEIGHT_EPS)
    return base + merged


SPEC = register(
    MethodSpec(
        name="sce",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        params=(
            Param(
                "select_topk",
                "float",
                1.0,
                doc="fraction of the entries with the largest variance across "
                "models kept (>= 1: all, <= 0: none, the base is returned)",
            ),
            Param("int8_mask", "bool", False, doc="accepted for mergekit recipes; no numeric effect"),
        ),
        whole_tensor_stats="the count of nonzero variances and the exact k-th largest one (k = select_topk * "
        "count, ties cut by flat index); per model, the mean square of the selected tau",
        reference="https://arxiv.org/abs/2408.07990",
        mergekit_name="sce",
        doc="SCE: keep the top select_topk fraction of entries by variance across experts, weight experts by mean "
        "square, erase minority signs, weighted mean; matches mergekit.",
    )
)
