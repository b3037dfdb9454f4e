"""Chunk-proof Gram matrices of task vectors: the whole-tensor statistics of the spherical methods.

nuslerp, multislerp, karcher and model_stock depend on their inputs only through inner products (norms, cosines)
and linear combinations of the inputs. The inner products are computed here in float64 (products of float32 are
exact in float64) so that they do not depend on the chunking:
- `gram_whole`: over the whole tensor, every pair summed with RowSum (per-row partials, summed once);
- `gram_last_dim`: per vector along the last dimension (a row of a 2-D weight), by the fixed pairwise tree;
- `gram_columns`: per vector along dim 0 (a column of a 2-D weight), accumulated one row at a time in row order,
  so the association is the same for any chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shardmerge.engine.methods.base import ChunkReader
from shardmerge.engine.methods.common import RowSum, pairwise_rows

Vectors = Callable[[Sequence[torch.Tensor], "torch.Tensor | None"], list]


def _pairs(k: int):
    return [(i, j) for i in range(k) for j in range(i, k)]


def gram_whole(read: ChunkReader, vectors: Vectors, label: str) -> torch.Tensor:
    """(k, k) float64 Gram matrix <v_i, v_j> over the whole tensor of the k vectors `vectors(tensors, base)`."""
    sums = None
    for _, tensors, base in read():
        vs = [v.to(torch.float64) for v in vectors(tensors, base)]
        if sums is None:
            sums = {p: RowSum(label) for p in _pairs(len(vs))}
        for i, j in sums:
            sums[(i, j)].add(vs[i] * vs[j])
    if sums is None:
        raise ValueError(f"{label}: no data to read")
    k = max(i for i, _ in sums) + 1
    g = torch.zeros(k, k, dtype=torch.float64)
    for (i, j), s in sums.items():
        g[i, j] = g[j, i] = s.value()
    return g


def gram_last_dim(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(..., k, k) float64 Gram matrices of the vectors along the last dimension of each of the k tensors."""
    lead = tuple(vs[0].shape[:-1])
    flat = [v.to(torch.float64).reshape(-1, v.shape[-1] if v.dim() else 1) for v in vs]
    k = len(vs)
    g = torch.zeros(flat[0].shape[0], k, k, dtype=torch.float64, device=flat[0].device)
    for i, j in _pairs(k):
        g[:, i, j] = g[:, j, i] = pairwise_rows(flat[i] * flat[j])
    return g.reshape(lead + (k, k))


def gram_columns(read: ChunkReader, vectors: Vectors) -> torch.Tensor:
    """(*shape[1:], k, k) float64 Gram matrices of the vectors along dim 0 (one per column), row order sums."""
    acc = None
    for _, tensors, base in read():
        vs = [v.to(torch.float64) for v in vectors(tensors, base)]
        k = len(vs)
        prods = torch.stack([torch.stack([vs[i] * vs[j] for j in range(k)], dim=-1) for i in range(k)], dim=-1)
        for row in prods.unbind(0):  # one row at a time: the same association for every chunking
            acc = row.clone() if acc is None else acc.add_(row)
    if acc is None:
        raise ValueError("gram_columns: no data to read")
    return acc.cpu()
