"""linear: weighted average of the inputs (mergekit `linear`, arXiv 2203.05482 "model soups").

theta = sum_k w_k theta_k / sum_k w_k when `normalize` [true], else sum_k w_k theta_k. A base model listed in the
recipe is one more weighted input (mergekit ignores the base role for linear), hence `base_is_input`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.methods import register
from engine.methods.base import Chunk, MethodSpec, TensorInfo
from engine.methods.common import check_inputs, per_model


def merge(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor], *, stats: None, chunk: Chunk,
          info: TensorInfo, weight: tuple, normalize: bool) -> torch.Tensor:
    """Elementwise weighted sum in input order (mergekit: zeros, then addcmul per input), then the division."""
    if base is not None:
        raise ValueError(
            f"tensor {info.name!r}: linear treats a base model as one more input (base_is_input); it must come "
            "among `tensors` with its own weight, not as `base`"
        )
    check_inputs(tensors, None, info, needs_base=False)
    w = per_model("weight", weight, len(tensors), info)
    weights = torch.tensor(w, dtype=torch.float32)  # on CPU: the same float32 sum on every device
    out = torch.zeros_like(tensors[0])
    for t, c in zip(tensors, weights.tolist()):
        out = out + t * c
    if normalize:
        total = float(weights.sum())
        if total == 0.0:
            raise ValueError(
                f"tensor {info.name!r}: linear with normalize: true needs weights with a non-zero sum, got {w}; "
                "change the weights or set normalize: false"
            )
        out = out / total
    return out


SPEC = register(
    MethodSpec(
        name="linear",
        merge=merge,
        needs_base=False,
        per_model_params={"weight": None},
        global_params={"normalize": True},
        base_is_input=True,
        min_models=1,
        doc="Weighted average sum_k w_k theta_k / sum_k w_k (normalize) of all inputs; matches mergekit linear.",
    )
)
