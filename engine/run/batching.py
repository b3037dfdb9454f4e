"""Batch planning for whole-matrix methods: which of a work unit's tensors share one batched `merge_batch` call,
and in what order a unit computes them. Pure functions of the plan (no tensor data), so the memory budget check
(shardmerge.engine.run.memory) and the unit runner (shardmerge.engine.run.unit) read the same schedule.

On GPU, same-shape matrices across layers and experts are batched (docs/svd.md): with batching on, the unit's
whole-matrix tensors of one op, shape, input count and identical params (so per-layer gradients never mix) are
grouped, in plan order, into batches whose summed memory estimate stays within a byte budget; each batch is one
`merge_batch` call, computed when its first member is due and held (on CPU, in the output dtype) until each
member's turn, so every tensor is still written and hashed in plan order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shardmerge.engine import methods
from shardmerge.engine.plan.build import COPY, OutputTensor

# Byte budget of one batched call when none is given (and no worker memory budget bounds it, shardmerge.engine.run.memory):
# the summed whole_tensor_bytes of its members. 8 GiB leaves room for the CUDA context and the caching allocator
# on a 24 GB GPU; a single matrix above it is merged alone, as without batching (not yet measured on a GPU).
DEFAULT_SVD_BATCH_BYTES = 8 << 30


def whole_tensor_bytes(op: str, shape: tuple[int, ...], n_inputs: int, has_base: bool) -> int:
    """Estimated peak working memory of a whole-matrix method on one tensor of K inputs: the method's own
    estimate (`MethodSpec.memory`; the SVD family's in shardmerge.engine.methods.svd.svd_memory, pivot's in
    shardmerge.engine.methods.pivot.pivot_memory), else its data alone (shardmerge.engine.methods.base.whole_data_bytes: the K (+ base)
    float32 inputs, their stack, the task vectors, the result and its output-dtype copy).
    Measured peaks (K = 3, CPU, 500 x 3000 to 1280 x 2048) are 0.43-0.76 of the SVD/pivot estimates
    (docs/pivot_recipe.md, tests/e2e/test_svd_budget.py).
    """
    from shardmerge.engine.methods.base import whole_data_bytes

    spec = methods.get(op)
    estimate = spec.memory or whole_data_bytes
    return estimate(tuple(shape), n_inputs, has_base)


def batching_on(device: str, svd_batch: bool | None) -> bool:
    """Whether a unit's same-shape whole-matrix tensors are merged in batched calls: `svd_batch` when given, else
    only off the CPU (LAPACK loops over a batch on the CPU, so batching there buys nothing: jobs/bench_svd.py)."""
    return device != "cpu" if svd_batch is None else bool(svd_batch)


def batch_key(t: OutputTensor) -> tuple | None:
    """Tensors with equal keys may share one batched call; None for a tensor merged on its own (copies, chunk-wise
    and reporting methods, methods without `merge_batch`, tensors that are not 2-D). The key holds the resolved
    params, so tensors of layers with different gradient values never share a call."""
    if t.op == COPY or len(t.shape) != 2:
        return None
    spec = methods.get(t.op)
    if spec.chunkwise or spec.merge_batch is None or getattr(spec, "merge_with_report", None) is not None:
        return None
    return (t.op, t.shape, repr(t.params), len(t.inputs), t.base is not None)


@dataclass(frozen=True)
class Batch:
    """Tensors of one unit merged by one `merge_batch` call."""

    members: tuple[int, ...]  # positions in the unit's tensor list, in plan order
    nbytes: int  # summed whole_tensor_bytes of the members


def plan_batches(tensors, max_bytes: int) -> list[Batch]:
    """Group `tensors` (a unit's, in plan order) into batches of two or more with equal `batch_key` and a summed
    memory estimate <= max_bytes, filled greedily in plan order; ordered by first member. Tensors in no batch are
    merged alone exactly as without batching (a matrix above the budget is one of them)."""
    if max_bytes <= 0:
        raise ValueError(f"SVD batch budget must be positive, got {max_bytes} bytes")
    done: list[tuple[list[int], int]] = []
    open_: dict[tuple, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        key = batch_key(t)
        if key is None:
            continue
        need = whole_tensor_bytes(t.op, t.shape, len(t.inputs), t.base is not None)
        members, used = open_.get(key, ([], 0))
        if members and used + need > max_bytes:
            done.append((members, used))
            members, used = [], 0
        open_[key] = (members + [i], used + need)
    done.extend(open_.values())
    return sorted((Batch(tuple(m), b) for m, b in done if len(m) > 1), key=lambda b: b.members[0])


def batch_schedule(tensors, max_bytes: int) -> Iterator[tuple[tuple[int, ...], int]]:
    """How `run_unit` computes `tensors` with batching, in order: (members, held) per computation -- a batch when
    its first member is due, or one tensor alone -- where `held` is the output bytes of earlier batches still
    waiting to be written at that moment (shardmerge.engine.run.memory.check_memory_budget adds it to the computation's need)."""
    first = {b.members[0]: b for b in plan_batches(tensors, max_bytes)}
    waiting: dict[int, int] = {}
    for i in range(len(tensors)):
        if i in waiting:
            waiting.pop(i)
            continue
        yield (first[i].members if i in first else (i,)), sum(waiting.values())
        if i in first:
            waiting.update((j, tensors[j].nbytes) for j in first[i].members[1:])
