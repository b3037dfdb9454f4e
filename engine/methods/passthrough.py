"""passthrough: the single input model's tensor, optionally scaled (mergekit `passthrough`).

theta = theta_1, or scale * theta_1 when the model's `scale` is given. mergekit's contract: exactly one input
(a listed base model counts as that input). Elementwise, so it streams; without `scale` the float32 round trip of
the engine makes the output bit-identical to the input in the input's dtype. The `modules:` form
(`merge_method: passthrough` for one module, copied verbatim from `source`) is a planner copy, not this method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import MERGEKIT_URL, check_inputs

NOT_SET = float("nan")


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: None,
    chunk: Chunk,
    info: TensorInfo,
    scale: tuple,
) -> torch.Tensor:
    """The one input's chunk, times its `scale` when given."""
    check_inputs(tensors, None, info, needs_base=False)
    if len(tensors) != 1 or base is not None:
        raise ValueError(
            f"tensor {info.name!r}: passthrough takes exactly one input model, got "
            f"{len(tensors) + (base is not None)}; list one model (slices: one source)"
        )
    s = float(scale[0])
    if math.isnan(s):
        return tensors[0].clone()
    return tensors[0] * s


SPEC = register(
    MethodSpec(
        name="passthrough",
        merge=merge,
        needs_base=False,
        base="input",
        base_is_input=True,
        params=(Param("scale", default=NOT_SET, per_model=True, doc="multiply the tensor by this factor"),),
        min_models=1,
        max_models=1,
        doc="The one input model's tensor, times `scale` when given; for slices frankenmerges and scaling.",
        reference=MERGEKIT_URL,
        mergekit_name="passthrough",
    )
)
