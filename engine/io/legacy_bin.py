"""Legacy `pytorch_model*.bin` checkpoints, read only through `torch.load(weights_only=True, mmap=True)`.

weights_only refuses arbitrary pickled objects (no code runs on load); mmap keeps tensor data on disk until a row
range is sliced, so metadata costs no tensor reads.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from shardmerge.engine.io.dtypes import TORCH_TO_CODE, TensorMeta
from shardmerge.engine.io.paths import confine


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        # one line, and never torch's advice to retry with weights_only=False (that runs the pickle's code)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (
            f"it references {found.group(1)}, which is not a tensor type"
            if found
            else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        )
        raise ValueError(
            f"{path}: cannot be loaded safely with torch.load(weights_only=True) ({why}); nothing in it was run; "
            "convert it to safetensors"
        ) from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def open_bin_tensors(root: Path) -> dict[str, TensorMeta]:
    """Metadata for every tensor of the .bin checkpoint in `root` (empty when there is none)."""
    index = root / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(root.glob("pytorch_model*.bin"))]
    metas: dict[str, TensorMeta] = {}
    for fname in files:
        path = confine(root, fname, str(root))  # inside the model dir (or the HF cache's blobs/)
        if not path.exists():
            raise ValueError(f"{root}: legacy shard {fname!r} is missing")
        for name, t in _load(str(path)).items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            if t.dtype not in TORCH_TO_CODE:
                raise ValueError(f"{path}: tensor {name!r}: dtype {t.dtype} is not supported")
            nbytes = t.numel() * t.element_size()
            metas[name] = TensorMeta(name, str(path), TORCH_TO_CODE[t.dtype], tuple(t.shape), 0, nbytes)
    return metas


def read_bin_rows(meta: TensorMeta, row_start: int, row_stop: int) -> torch.Tensor:
    t = _load(meta.file)[meta.name]
    if not meta.shape:
        return t.clone()
    return t[row_start:row_stop].clone()
