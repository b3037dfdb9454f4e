"""karcher: the Karcher (Riemannian) mean of the models on the unit hypersphere, rescaled (mergekit `karcher`).

Every input (a listed base model is one more input, as in mergekit) gets weight 1/N. With n_k = |theta_k| and
unit vectors u_k = theta_k / n_k (inputs with n_k <= tol are left out of the mean), start from the normalized
weighted mean of the u_k and repeat up to `max_iter` [10] times: tangent = sum_k a_k (theta_k / sin theta_k)
(u_k - <m, u_k> m) over the inputs at angle theta_k >= tol from m; stop when |tangent| < `tol` [1e-5], else move
m along the geodesic by |tangent| and renormalize. theta = (sum_k n_k / N) m.
The mean stays a linear combination of the inputs, and every quantity of the iteration is an inner product, so
`prepare` runs the whole iteration on the K x K Gram matrix (computed exactly over all chunks) and `merge` is
the elementwise combination: the method streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import check_inputs
from shardmerge.engine.methods.gram import gram_whole


@dataclass(frozen=True)
class KarcherStats:
    coefs: tuple[float, ...]  # theta = sum_k coefs[k] theta_k


def _norm(c: torch.Tensor, gram: torch.Tensor) -> float:
    return math.sqrt(max(0.0, float(c @ gram @ c)))


def karcher_coefs(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients of the rescaled Karcher mean in the inputs, from their Gram matrix (K, K)."""
    k = gram.shape[0]
    alphas = torch.full((k,), 1.0 / k, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(k) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(k, dtype=torch.float64)
    a = {i: float(alphas[i]) / sum(float(alphas[j]) for j in valid) for i in valid}
    unit = {i: torch.nn.functional.one_hot(torch.tensor(i), k).double() / norms[i] for i in valid}
    mean = sum(a[i] * unit[i] for i in valid)
    mean_norm = _norm(mean, gram)
    mean = unit[valid[0]].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(k, dtype=torch.float64)
        for i in valid:
            dot = min(1.0, max(-1.0, float(mean @ gram @ unit[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a[i] * (theta / math.sin(theta)) * (unit[i] - dot * mean)
        t_norm = _norm(tangent, gram)
        if t_norm < tol:
            break
        mean = math.cos(t_norm) * mean + math.sin(t_norm) * (tangent / t_norm)
        u_norm = _norm(mean, gram)
        if u_norm > tol:
            mean = mean / u_norm
    return mean * float((alphas * norms).sum())


def prepare(read: ChunkReader, *, info: TensorInfo, max_iter: int, tol: float) -> KarcherStats:
    def vectors(tensors, base):
        check_inputs(tensors, None, info, needs_base=False)
        return list(tensors)

    gram = gram_whole(read, vectors, f"tensor {info.name!r} karcher")
    if gram.shape[0] == 1:
        return KarcherStats(coefs=(1.0,))
    return KarcherStats(coefs=tuple(karcher_coefs(gram, int(max_iter), float(tol)).tolist()))


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: KarcherStats,
    chunk: Chunk,
    info: TensorInfo,
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    check_inputs(tensors, None, info, needs_base=False)
    if base is not None:
        raise ValueError(f"tensor {info.name!r}: karcher takes a base model as one more input, not as `base`")
    if len(tensors) == 1:
        return tensors[0].clone()
    out = tensors[0] * stats.coefs[0]
    for x, c in zip(tensors[1:], stats.coefs[1:]):
        out = out + x * c
    return out


SPEC = register(
    MethodSpec(
        name="karcher",
        merge=merge,
        prepare=prepare,
        needs_base=False,
        base="input",
        base_is_input=True,
        params=(
            Param("max_iter", "int", 10, lo=0, doc="iterations of the Riemannian mean"),
            Param("tol", default=1e-5, lo=0, doc="convergence and angle tolerance"),
        ),
        min_models=1,
        doc="Karcher mean of the models' directions on the unit sphere, scaled by their mean norm.",
        whole_tensor_stats="the Gram matrix of the inputs (the iteration runs on it)",
        reference="https://arxiv.org/abs/2603.04972",
        mergekit_name="karcher",
    )
)
