"""Test-side driver of a merge method over in-memory tensors, in row chunks, the way the engine calls a chunkwise
method: parameters bound with their defaults, `prepare` once over a re-iterable chunk reader, then `merge` chunk by
chunk. The engine itself never rebuilds a tensor; this is how tests compare a method with an oracle."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shardmerge.engine.methods.base import Chunk, MethodSpec, TensorInfo


def bind_params(spec: MethodSpec, n: int, given: Mapping[str, Any], info: TensorInfo) -> dict[str, Any]:
    """Fill defaults as the engine does: per-model values broadcast to n-tuples, missing required ones refused."""
    unknown = set(given) - set(spec.per_model_params) - set(spec.global_params)
    if unknown:
        raise ValueError(f"{spec.name}: unknown parameter(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, default in {**spec.per_model_params, **spec.global_params}.items():
        value = given.get(name, default)
        if value is None:
            raise ValueError(f"tensor {info.name!r}: {spec.name} needs parameter {name!r}")
        if name in spec.per_model_params and not isinstance(value, (tuple, list)):
            value = (value,) * n
        out[name] = tuple(value) if name in spec.per_model_params else value
    return out


def _chunks(shape: tuple[int, ...], rows: int | None) -> list[Chunk]:
    if len(shape) <= 1:
        return [Chunk(0, shape[0] if shape else 1, 0)]
    step = shape[0] if rows is None else rows
    row_numel = math.prod(shape[1:])
    return [Chunk(r, min(r + step, shape[0]), r * row_numel) for r in range(0, shape[0], step)]


def run_in_memory(
    spec: MethodSpec,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    name: str = "t",
    rows_per_chunk: int | None = None,
    layer: int | None = None,
    num_layers: int = 0,
    **params: Any,
) -> torch.Tensor:
    """Merge in-memory float32 tensors with `spec` in chunks of `rows_per_chunk` rows (None = one chunk), the way
    the engine calls a chunkwise method: prepare once over a re-iterable reader, then merge chunk by chunk."""
    shape = tuple(tensors[0].shape)
    info = TensorInfo(name=name, shape=shape, layer=layer, num_layers=num_layers)
    bound = bind_params(spec, len(tensors), params, info)
    chunks = _chunks(shape, rows_per_chunk)

    def part(t: torch.Tensor | None, c: Chunk) -> torch.Tensor | None:
        return None if t is None else (t if t.dim() <= 1 else t[c.row_start : c.row_stop])

    def read():
        return ((c, [part(t, c) for t in tensors], part(base, c)) for c in chunks)

    stats = spec.prepare(read, info=info, **bound) if spec.prepare is not None else None
    outs = [
        spec.merge([part(t, c) for t in tensors], part(base, c), stats=stats, chunk=c, info=info, **bound)
        for c in chunks
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
