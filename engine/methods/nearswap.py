"""nearswap: take the other model's value where it is near the base's (mergekit `nearswap`).

Per element, with a = base, b = the other model: w = clamp(t / max(|a - b|, 1e-6), 0, 1), theta = w b + (1 - w) a.
Entries closer than t move fully to b; distant ones stay near a. Elementwise: streams, no whole-tensor statistic.
mergekit's contract: a base and exactly one other model; `t` is required.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import check_inputs

MIN_DIFF = 1e-6


def merge(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, stats: None, chunk: Chunk, info: TensorInfo, t: float
) -> torch.Tensor:
    """w b + (1 - w) a with w = clamp(t / |a - b|, 0, 1), in mergekit's operation order (float32)."""
    check_inputs(tensors, base, info, needs_base=True)
    if len(tensors) != 1:
        raise ValueError(
            f"tensor {info.name!r}: nearswap merges a base with exactly one other model, got {len(tensors)} others"
        )
    a, b = base, tensors[0]
    weight = (float(t) / (a - b).abs().clamp(min=MIN_DIFF)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


SPEC = register(
    MethodSpec(
        name="nearswap",
        merge=merge,
        needs_base=True,
        params=(Param("t", doc="distance below which an entry takes the other model's value"),),
        min_models=1,
        max_models=1,
        doc="Per entry, move from the base to the other model by clamp(t / |a - b|, 0, 1).",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        mergekit_name="nearswap",
    )
)
