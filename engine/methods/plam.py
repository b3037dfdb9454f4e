"""plam: mix an MLLM's language-model tensors with its base LLM's (PlaM, arXiv 2601.07645).

The engine passes tensors = (W_mllm, W_base) in that order (the base LLM is an input, not a reference point) for the
targeted tensors of the chosen decoder layers only; everything else is copied from the MLLM by the planner, and the
MLLM <-> base name pairing comes from shardmerge.engine.layout.roles.check_lm_pairs.

  alpha form [default, alpha = 0.1]:  W = (1 - alpha) W_mllm + alpha W_base,   0 <= alpha <= 1
  weights form (the authors' later runs used 0.9 / 0.3, unnormalised):  W = a W_mllm + b W_base
     with a = weights_mllm, b = weights_base; give both, and then leave alpha unset.
A per-layer alpha schedule is a recipe gradient, resolved to one number per tensor by the engine before `merge`.
Elementwise, so any row chunking gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, Param, TensorInfo
from shardmerge.engine.methods.common import check_inputs

DEFAULT_ALPHA = 0.1
AUTO = "auto"  # "not set": MethodSpec treats a None default as "required", so optional parameters use this


def _number(name: str, value: Any, info: TensorInfo) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"tensor {info.name!r}: plam parameter {name} must be a finite number, got {value!r}")
    return float(value)


def coefficients(alpha: Any, weights_mllm: Any, weights_base: Any, info: TensorInfo) -> tuple[float, float]:
    """(a, b) with W = a W_mllm + b W_base, from either the alpha form or the unnormalised weights form."""
    given = (weights_mllm != AUTO, weights_base != AUTO)
    if any(given):
        if not all(given):
            missing = "weights_base" if given[0] else "weights_mllm"
            raise ValueError(
                f"tensor {info.name!r}: plam weights form needs both weights_mllm and weights_base; "
                f"{missing} is missing"
            )
        if alpha != AUTO:
            raise ValueError(
                f"tensor {info.name!r}: plam got alpha={alpha!r} and weights_mllm/weights_base; "
                "use one form: alpha (W = (1-alpha) W_mllm + alpha W_base) or the two weights"
            )
        return _number("weights_mllm", weights_mllm, info), _number("weights_base", weights_base, info)
    a = DEFAULT_ALPHA if alpha == AUTO else _number("alpha", alpha, info)
    if not 0.0 <= a <= 1.0:
        raise ValueError(
            f"tensor {info.name!r}: plam alpha must be in [0, 1], got {a!r}; for other mixes give "
            "weights_mllm and weights_base"
        )
    return 1.0 - a, a


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: None,
    chunk: Chunk,
    info: TensorInfo,
    alpha: Any = AUTO,
    weights_mllm: Any = AUTO,
    weights_base: Any = AUTO,
) -> torch.Tensor:
    """a * W_mllm + b * W_base for one chunk (float32)."""
    if base is not None:
        raise ValueError(f"tensor {info.name!r}: plam takes its base LLM as the second input, not as base_model")
    if len(tensors) != 2:
        raise ValueError(f"tensor {info.name!r}: plam takes exactly 2 inputs (W_mllm, W_base), got {len(tensors)}")
    check_inputs(tensors, None, info, needs_base=False)
    a, b = coefficients(alpha, weights_mllm, weights_base, info)
    return tensors[0] * a + tensors[1] * b


SPEC = register(
    MethodSpec(
        name="plam",
        merge=merge,
        needs_base=False,
        params=(
            Param("alpha", default=AUTO, lo=0, hi=1, doc=f"W = (1 - alpha) W_mllm + alpha W_base [{DEFAULT_ALPHA}]"),
            Param("weights_mllm", default=AUTO, doc="a of W = a W_mllm + b W_base (with weights_base)"),
            Param("weights_base", default=AUTO, doc="b of W = a W_mllm + b W_base (with weights_mllm)"),
        ),
        base="unused",
        reference="https://arxiv.org/abs/2601.07645",
        min_models=2,
        max_models=2,
        doc="PlaM: W = (1-alpha) W_mllm + alpha W_base [alpha 0.1], or a W_mllm + b W_base with "
        "weights_mllm/weights_base; inputs (W_mllm, W_base).",
    )
)
