"""arcee_fusion: keep the other model's changes where they matter most (mergekit `arcee_fusion`).

With a = base and b = the other model: importance = |b - a| * KL(softmax(b) || softmax(a)) (softmaxes and KL per
vector along the last dimension, each softmax + 1e-8, so the KL is a per-row factor); threshold =
median + 1.5 (q3 - q1) of the importance over the whole tensor, the quantiles taken as mergekit takes them (the
sorted values at index int(q (n - 1)) for q = 0.25, 0.5, 0.75); theta = a + (b - a) [importance >= threshold].
The importance of a row depends on that row only (float32 softmax per row, the KL summed by a fixed pairwise
tree, so any row chunking gives the same values); the three order statistics are exact over the whole tensor, found in
`prepare` by the streaming selection of shardmerge.engine.methods.select; `merge` is then elementwise on each chunk.
Difference from mergekit: above 1,000,000 entries mergekit estimates the quantiles from a random sample (a
different one on every run); here they are always exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, TensorInfo
from shardmerge.engine.methods.common import check_inputs, pairwise_rows
from shardmerge.engine.methods.select import kth_largest_abs_streaming

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class FusionStats:
    threshold: float


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|b - a| * KL(softmax(b) + eps || softmax(a) + eps) per last-dimension vector, in float32 as mergekit.

    Why float32 and not float64: the KL of two close rows is a small difference of larger terms, and mergekit's
    float32 value of it is ~1e-3 off the exact one (measured on the tiny test models); which entries cross the
    threshold follows those roundings, so the same float32 operations keep the masks equal to mergekit's. The
    row sum uses the fixed pairwise tree (torch.sum's association can change with the chunk's row count)."""
    shape = b.shape
    rows = (1, -1) if b.dim() <= 1 else (-1, shape[-1])
    a2, b2 = a.reshape(rows), b.reshape(rows)
    p = torch.softmax(b2, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(a2, dim=-1) + SOFTMAX_EPS
    # a KL is >= 0; rounding can make a (near-)identical row's slightly negative: 0 keeps the importance a magnitude
    kl = pairwise_rows(p * torch.log(p / q)).clamp(min=0).unsqueeze(-1)
    return ((b2 - a2).abs() * kl).reshape(shape)


def quantile_ranks(n: int) -> list[int]:
    """k (1 = largest) of mergekit's quantiles: the ascending index int(float32(q) * (n - 1)) from the top."""
    idx = [int(torch.tensor(q, dtype=torch.float32) * (n - 1)) for q in QUANTILES]
    return [n - i for i in idx]


def _pair(tensors, base, info):
    check_inputs(tensors, base, info, needs_base=True)
    if len(tensors) != 1:
        raise ValueError(
            f"tensor {info.name!r}: arcee_fusion merges a base with exactly one other model, got {len(tensors)} others"
        )
    return base, tensors[0]


def prepare(read: ChunkReader, *, info: TensorInfo) -> FusionStats:
    n = math.prod(info.shape)
    if n == 0:
        return FusionStats(threshold=math.inf)
    stream = lambda: ([importance(*_pair(t, b, info))] for _, t, b in read())
    q1, median, q3 = kth_largest_abs_streaming(stream, [quantile_ranks(n)], label=f"tensor {info.name!r}")[0]
    q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in (q1, median, q3))
    return FusionStats(threshold=float(median + 1.5 * (q3 - q1)))  # float32 arithmetic, as mergekit


def merge(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, stats: FusionStats, chunk: Chunk, info: TensorInfo
) -> torch.Tensor:
    a, b = _pair(tensors, base, info)
    mask = (importance(a, b) >= stats.threshold).to(torch.float32)
    return a + (b - a) * mask


SPEC = register(
    MethodSpec(
        name="arcee_fusion",
        merge=merge,
        prepare=prepare,
        needs_base=True,
        min_models=1,
        max_models=1,
        doc="Take the other model's entries whose importance |b - a| * KL(softmax(b) || softmax(a)) is at least "
        "median + 1.5 IQR of the tensor's importance; keep the base elsewhere.",
        whole_tensor_stats="the quartiles of the importance (exact order statistics over all chunks)",
        reference="https://github.com/arcee-ai/mergekit/blob/v0.1.5/mergekit/merge_methods/arcee_fusion.py",
        mergekit_name="arcee_fusion",
    )
)
