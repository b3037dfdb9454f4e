"""nuslerp: spherical interpolation of two models, or of their task vectors around a base (mergekit `nuslerp`).

t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6). With a base, v_k = theta_k - theta_0 and
theta = theta_0 + slerp(t, v_1, v_2); without one, theta = slerp(t, theta_1, theta_2). slerp(t, v_1, v_2) =
(sin((1 - t) a) v_1 + sin(t a) v_2) / sin a with cos a = <v_1/|v_1|, v_2/|v_2|> (norms floored at 1e-7, clamped
to [-1, 1]); lerp when 1 - cos^2 <= 1e-16. The vectors are (as mergekit):
- `nuslerp_flatten` [true]: the whole tensor: `prepare` sums the 2 x 2 Gram matrix over all chunks;
- flatten false, `nuslerp_row_wise` [false]: each row (vectors along the last dimension), no prepare pass;
- flatten false, row_wise true: each column (vectors along dim 0, mergekit's dim=0): `prepare` sums the
  per-column Gram matrices row by row in row order.
The result is c_1 v_1 + c_2 v_2 with coefficients from the Gram matrix, so every path streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import WEIGHT, check_inputs, per_model
from shardmerge.engine.methods.gram import gram_columns, gram_last_dim, gram_whole

NORM_FLOOR = 1e-7
EPS = 1e-8


@dataclass(frozen=True)
class NuslerpStats:
    coefs: torch.Tensor | None  # (..., 2) float64 on CPU: whole tensor (2,), per column (*shape[1:], 2); None per row


def slerp_coefs(gram: torch.Tensor, t: float) -> torch.Tensor:
    """(..., 2) coefficients (c_1, c_2) of slerp(t, v_1, v_2) = c_1 v_1 + c_2 v_2 from Gram matrices (..., 2, 2)."""
    n1 = gram[..., 0, 0].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    n2 = gram[..., 1, 1].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (gram[..., 0, 1] / (n1 * n2)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c1 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    c2 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return torch.stack([c1, c2], dim=-1)


def interpolation_t(weight, info: TensorInfo) -> float:
    """t = w_2 / (w_1 + w_2), 0.5 when the weights sum to (nearly) zero."""
    if len(weight) != 2:
        raise ValueError(f"tensor {info.name!r}: nuslerp merges exactly 2 models besides the base, got {len(weight)}")
    w = per_model("weight", weight, 2, info)
    total = w[0] + w[1]
    return 0.5 if abs(total) < 1e-6 else w[1] / total


def _vectors(info: TensorInfo):
    def vectors(tensors, base):
        check_inputs(tensors, base, info, needs_base=False)
        if len(tensors) != 2:
            raise ValueError(
                f"tensor {info.name!r}: nuslerp merges exactly 2 models besides the base, got {len(tensors)}"
            )
        return [x - base for x in tensors] if base is not None else list(tensors)

    return vectors


def _per_row(info: TensorInfo, flatten: bool, row_wise: bool) -> bool:
    """Vectors along the last dimension (one per row): a 0-D/1-D tensor is one vector whatever the options."""
    return not flatten and (not row_wise or len(info.shape) <= 1)


def prepare(
    read: ChunkReader, *, info: TensorInfo, weight, nuslerp_row_wise: bool, nuslerp_flatten: bool
) -> NuslerpStats:
    t = interpolation_t(weight, info)
    if _per_row(info, nuslerp_flatten, nuslerp_row_wise):
        return NuslerpStats(coefs=None)
    if nuslerp_flatten or len(info.shape) <= 1:
        return NuslerpStats(slerp_coefs(gram_whole(read, _vectors(info), f"tensor {info.name!r} nuslerp"), t))
    return NuslerpStats(slerp_coefs(gram_columns(read, _vectors(info)), t))


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: NuslerpStats,
    chunk: Chunk,
    info: TensorInfo,
    weight,
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> torch.Tensor:
    """(base +) c_1 v_1 + c_2 v_2 on this chunk (float32)."""
    v1, v2 = _vectors(info)(tensors, base)
    if stats.coefs is None:
        shape = v1.shape
        rows = (1, -1) if v1.dim() <= 1 else (-1, v1.shape[-1])
        g = gram_last_dim([v1.reshape(rows), v2.reshape(rows)])
        c = slerp_coefs(g, interpolation_t(weight, info)).to(torch.float32)
        out = (c[:, 0:1] * v1.reshape(rows) + c[:, 1:2] * v2.reshape(rows)).reshape(shape)
    else:
        c = stats.coefs.to(device=v1.device, dtype=torch.float32)
        out = c[..., 0] * v1 + c[..., 1] * v2
    return out if base is None else base + out


SPEC = register(
    MethodSpec(
        name="nuslerp",
        merge=merge,
        prepare=prepare,
        needs_base=False,
        params=(
            WEIGHT,
            Param("nuslerp_row_wise", "bool", False, doc="without flatten: slerp columns (dim 0) instead of rows"),
            Param("nuslerp_flatten", "bool", True, doc="slerp the whole tensor as one vector"),
        ),
        min_models=2,
        max_models=2,
        doc="Spherical interpolation of two models (or their task vectors around an optional base) by "
        "t = w_2 / (w_1 + w_2), per tensor, row or column.",
        whole_tensor_stats="the 2 x 2 Gram matrix of the two vectors (flatten: whole tensor; otherwise per column; "
        "per row needs none)",
        reference="https://github.com/arcee-ai/mergekit/blob/v0.1.5/mergekit/merge_methods/nuslerp.py",
        mergekit_name="nuslerp",
    )
)
