"""multislerp: barycentric interpolation of N models on a hypersphere (mergekit `multislerp`).

With x_k = theta_k (- theta_0 when a base is given), weights w (divided by their sum with `normalize_weights`
[true]), u_k = x_k / (|x_k| + eps): m = sum_k w_k u_k is projected to the sphere (m / |m|), the weighted tangent
vectors at m are mapped back with the exponential map, and the result is scaled by sum_k w_k |x_k|; plus the base.
Every step is a linear combination of the x_k whose coefficients depend only on the Gram matrix <x_i, x_j>, so
`prepare` computes that matrix exactly over all chunks (shardmerge.engine.methods.gram) and the coefficients once, and `merge`
is elementwise. One model: its tensor unchanged (as mergekit, even with a base). |m| < eps: lerp for two models,
an error for more (antipodal inputs with balancing weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import WEIGHT, check_inputs, per_model
from shardmerge.engine.methods.gram import gram_whole


@dataclass(frozen=True)
class MultiSlerpStats:
    coefs: tuple[float, ...]  # theta = (base +) sum_k coefs[k] x_k


def multislerp_coefs(gram: torch.Tensor, w: torch.Tensor, eps: float, where: str) -> torch.Tensor:
    """Coefficients c with result = sum_k c_k x_k, from the Gram matrix (K, K) and the (normalized) weights."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    scaled = w / (norms + eps)  # mean = sum_k scaled_k x_k
    mean_norm = math.sqrt(max(0.0, float(scaled @ gram @ scaled)))
    if mean_norm < eps:
        if len(w) == 2:
            return w.clone()
        raise ValueError(
            f"{where}: multislerp: the weighted sum of the unit inputs is zero (antipodal inputs "
            "with balancing weights); change the weights"
        )
    m = scaled / mean_norm  # unit mean
    dots = (gram @ m) / (norms + eps)  # <u_k, m>
    tangent = scaled - (w * dots).sum() * m  # sum_k w_k (u_k - <u_k, m> m)
    t_norm = math.sqrt(max(0.0, float(tangent @ gram @ tangent))) + eps
    out = m * math.cos(t_norm) + tangent * (math.sin(t_norm) / t_norm)
    return out * float((norms * w).sum())


def _weights(weight, n: int, normalize: bool, info: TensorInfo) -> torch.Tensor:
    w = torch.tensor(per_model("weight", weight, n, info), dtype=torch.float64)
    return w / w.sum() if normalize else w


def prepare(read: ChunkReader, *, info: TensorInfo, weight, normalize_weights: bool, eps: float) -> MultiSlerpStats:
    n = len(weight)
    if n == 1:
        return MultiSlerpStats(coefs=(1.0,))

    def vectors(tensors, base):
        check_inputs(tensors, None, info, needs_base=False)
        return [x - base for x in tensors] if base is not None else list(tensors)

    gram = gram_whole(read, vectors, f"tensor {info.name!r} multislerp")
    coefs = multislerp_coefs(gram, _weights(weight, n, normalize_weights, info), float(eps), f"tensor {info.name!r}")
    return MultiSlerpStats(coefs=tuple(coefs.tolist()))


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: MultiSlerpStats,
    chunk: Chunk,
    info: TensorInfo,
    weight,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    check_inputs(tensors, base, info, needs_base=False)
    if len(tensors) == 1:
        return tensors[0].clone()
    xs = [x - base for x in tensors] if base is not None else list(tensors)
    out = xs[0] * stats.coefs[0]
    for x, c in zip(xs[1:], stats.coefs[1:]):
        out = out + x * c
    return out if base is None else out + base


SPEC = register(
    MethodSpec(
        name="multislerp",
        merge=merge,
        prepare=prepare,
        needs_base=False,
        params=(
            WEIGHT,
            Param("normalize_weights", "bool", True, doc="divide the weights by their sum"),
            Param("eps", default=1e-8, lo=0, doc="numerical floor of norms"),
        ),
        min_models=1,
        doc="Barycentric spherical interpolation of N models (or of their task vectors around an optional base).",
        whole_tensor_stats="the Gram matrix of the inputs (norms and inner products)",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        mergekit_name="multislerp",
    )
)
