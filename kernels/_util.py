"""Shared helpers for the kernel files: lazy Triton import and input checks.

Triton is imported only when a Triton launcher is first used, so a CPU-only install (and every Ray worker that
merges on CPU) never pays for it. Kernel decoration also happens then: under `TRITON_INTERPRET=1` the decorator
decides at definition time whether the kernel runs compiled or interpreted, so the variable must be set before the
first launch, not merely before the first import of `kernels.*`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# Floating dtypes every kernel accepts as input and output (accumulation is always float32).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def import_triton():
    """Return (triton, triton.language), raising a RuntimeError with the fix when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the Triton kernel path needs the 'triton' package (pip install 'shardmerge[triton]'); "
            f"import failed with: {exc}"
        ) from exc
    return triton, tl


def use_triton(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the dispatcher should launch the Triton kernel: all inputs live on one CUDA device."""
    return bool(tensors) and all(t.is_cuda for t in tensors)


def check_same_shape(name: str, tensors: Sequence[torch.Tensor], what: str = "inputs") -> None:
    """Raise ValueError unless every tensor has the shape and device of the first."""
    if not tensors:
        raise ValueError(f"{name}: got no {what}; expected at least one tensor")
    ref = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != ref.shape:
            raise ValueError(
                f"{name}: {what}[{i}] has shape {tuple(t.shape)}; expected {tuple(ref.shape)} like {what}[0]"
            )
        if t.device != ref.device:
            raise ValueError(f"{name}: {what}[{i}] is on {t.device}; expected {ref.device} like {what}[0]")


def check_float_dtype(name: str, t: torch.Tensor, what: str) -> None:
    """Raise ValueError unless the tensor is float32, float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: {what} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
