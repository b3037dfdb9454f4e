"""Tensor dtype codes and per-tensor metadata, shared by every checkpoint reader (safetensors and legacy .bin) and
the planner. Nothing here touches the disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_CODE = {v[0]: k for k, v in DTYPES.items()}
NAME_TO_CODE = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "half": "F16",
    "float": "F32",
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: file, absolute byte range [begin, end), dtype code and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def rows(self) -> int:
        """Rows along dim 0 (a 0-d tensor is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.end - self.begin
