"""The merge-method contract.

A merge method is a pure tensor function registered by name: no I/O, no Ray, no device choice inside.
The engine hands it float32 tensors (a row chunk of every input, all on one device) and casts the result.

Two kinds of method:
- chunkwise (classic methods): `merge` is called once per row chunk. A method that needs whole-tensor statistics
  (TIES/breadcrumbs magnitude thresholds, SLERP norms and dot product) declares `prepare`, which receives a
  re-iterable reader over the tensor's chunks and returns small, picklable statistics handed to every `merge` call
  as `stats=`. Statistics must not depend on the chunking (exact selection, per-row partials summed once).
- whole-tensor (SVD family): `chunkwise=False`; `merge` gets the full tensors once; the plan budgets memory for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch


@dataclass(frozen=True)
class TensorInfo:
    """What a method may know about the tensor it merges (for keyed randomness and layer schedules)."""

    name: str  # output tensor name, e.g. "model.layers.3.mlp.up_proj.weight"
    shape: tuple[int, ...]
    layer: Optional[int] = None  # language-model decoder layer index, None for embeddings/head/other
    num_layers: int = 0


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of rows (dim 0) of a tensor; 0-d/1-d tensors are one chunk of all elements."""

    row_start: int
    row_stop: int
    elem_offset: int  # flat index of the first element of this chunk in the whole tensor


# A reader yields, in row order, (chunk, expert tensors (float32), base tensor (float32) or None).
ChunkReader = Callable[[], Iterator[tuple[Chunk, Sequence[torch.Tensor], Optional[torch.Tensor]]]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    merge(tensors, base, *, stats, chunk, info, **params) -> Tensor (float32, same shape as the chunk)
      tensors: the non-base inputs, in recipe order (the base is passed separately as `base`);
      per-model parameters arrive as tuples aligned with `tensors`; global parameters as scalars.
    prepare(read, *, info, **params) -> stats   (only when the method needs whole-tensor statistics)
    merge_batch(inputs, bases, infos, **params) -> list of Tensors   (optional, whole-tensor methods only)
      B same-shape tensors with identical params in one call: inputs[b] / bases[b] / infos[b] are what `merge`
      would get for tensor b; returns the B results in order, equal to B `merge` calls up to float rounding.
      Why: on GPU one batched decomposition of B same-shape matrices (across layers and experts) replaces B
      small launches. The engine batches only when the device is not the CPU or when asked (engine.unit).
    """

    name: str
    merge: Callable[..., torch.Tensor]
    needs_base: bool
    per_model_params: Mapping[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    global_params: Mapping[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    prepare: Optional[Callable[..., Any]] = None
    chunkwise: bool = True
    # linear-style methods treat a listed base model as one more input instead of a reference point
    base_is_input: bool = False
    min_models: int = 1
    max_models: Optional[int] = None
    doc: str = ""
    merge_batch: Optional[Callable[..., list]] = None
