"""Per-worker memory estimates and the budget check (--max-memory-per-worker), before anything runs.

A worker holds, per tensor, every input chunk in float32, the float32 result and its output-dtype copy; whole-matrix
methods (SVD family, pivot) hold their matrices whole (`whole_tensor_bytes`, shardmerge.engine.run.batching), and
batched SVD calls hold a batch of them plus the outputs waiting to be written (`svd_batch_budget`). `check_memory_budget` refuses, naming the tensor
or batch, a budget that cannot hold the largest of these; the estimates are checked against measured peaks in
tests/e2e/test_svd_budget.py and tests/e2e/test_memory_bound.py.
"""

from __future__ import annotations

from shardmerge.engine.plan.build import COPY, Plan
from shardmerge.engine.run.batching import DEFAULT_SVD_BATCH_BYTES, batch_schedule, batching_on, whole_tensor_bytes
from shardmerge.engine.run.unit import rows_per_chunk

# Resident memory of an idle merge worker (Python + torch + Ray core worker): 0.36-0.42 GB measured on the test
# machine (torch 2.13 CPU); rounded up so a budget that passes the check is not exhausted by the process itself.
WORKER_BASE_BYTES = 512 << 20


def _tensor_need(t, chunk_bytes: int) -> tuple[int, bool]:
    """(estimated bytes one worker holds for tensor t, whether it is merged as a whole matrix)."""
    from shardmerge.engine import methods

    rows = t.shape[0] if t.shape else 1
    row_numel = t.nbytes // max(1, rows) // max(1, _itemsize(t.dtype))
    if t.op != COPY and not methods.get(t.op).chunkwise:
        return whole_tensor_bytes(t.op, t.shape, len(t.inputs), t.base is not None), True
    step = min(rows, rows_per_chunk(t, chunk_bytes))
    buffers = 2 if t.op == COPY else len(t.inputs) + (1 if t.base is not None else 0) + 2
    return step * row_numel * 4 * buffers, False


def worker_memory_floor(plan: Plan, chunk_bytes: int, svd_batch_bytes: int | None = None) -> tuple[int, str]:
    """Estimated peak memory of one worker (idle process + the largest tensor's buffers: for chunk-wise methods
    every input chunk in float32, the float32 result and its output-dtype copy; for whole-matrix methods
    `whole_tensor_bytes`), and the tensor that sets it. With batching (`svd_batch_bytes`, see svd_batch_budget)
    a batch needs the sum of its members' estimates plus the outputs of earlier batches still waiting to be
    written (shardmerge.engine.run.batching.batch_schedule); its first member names it."""
    peak, members, _ = _peak(plan, chunk_bytes, svd_batch_bytes)
    return WORKER_BASE_BYTES + peak, members[0].name if members else ""


def _peak(plan: Plan, chunk_bytes: int, batch_bytes: int | None = None) -> tuple[int, tuple, bool]:
    """(peak bytes, the tensors computed together at the peak, whether merged as whole matrices)."""
    peak, where, whole = 0, (), False
    if batch_bytes is None:
        for t in plan.tensors():
            need, is_whole = _tensor_need(t, chunk_bytes)
            if need > peak:
                peak, where, whole = need, (t,), is_whole
        return peak, where, whole
    for u in plan.units:
        for members, held in batch_schedule(u.tensors, batch_bytes):
            ts = tuple(u.tensors[i] for i in members)
            if len(ts) > 1:
                need, is_whole = (
                    sum(whole_tensor_bytes(t.op, t.shape, len(t.inputs), t.base is not None) for t in ts),
                    True,
                )
            else:
                need, is_whole = _tensor_need(ts[0], chunk_bytes)
            if need + held > peak:
                peak, where, whole = need + held, ts, is_whole
    return peak, where, whole


def svd_batch_budget(
    plan: Plan, device: str, svd_batch: bool | None, svd_batch_bytes: int | None, memory_per_worker: int | None
) -> int | None:
    """Byte budget of one batched SVD call (shardmerge.engine.run.batching), None when batching is off (`batching_on`).

    An explicit `svd_batch_bytes` is taken as given (check_memory_budget refuses a worker budget that cannot hold
    its batches); otherwise DEFAULT_SVD_BATCH_BYTES, capped by what a worker budget leaves after the process and
    the largest unit's outputs (the most a unit can hold back while batching), so a batch with the outputs held
    beside it always fits the budget (a large matrix merged alone while outputs wait can still set the peak; the
    check then names that matrix)."""
    if not batching_on(device, svd_batch):
        return None
    if svd_batch_bytes is not None:
        if svd_batch_bytes <= 0:
            raise ValueError(f"svd_batch_bytes must be positive, got {svd_batch_bytes}")
        return int(svd_batch_bytes)
    if not memory_per_worker:
        return DEFAULT_SVD_BATCH_BYTES
    held = max((u.nbytes for u in plan.units), default=0)
    return max(1, min(DEFAULT_SVD_BATCH_BYTES, memory_per_worker - WORKER_BASE_BYTES - held))


def _itemsize(code: str) -> int:
    from shardmerge.engine.io.checkpoint import DTYPES

    return DTYPES[code][1]


def check_memory_budget(
    plan: Plan, chunk_bytes: int, memory_per_worker: int | None, svd_batch_bytes: int | None = None
) -> None:
    """Refuse a per-worker budget that cannot hold even one worker's buffers (it would be OOM-killed): the
    largest chunk, the largest matrix a whole-matrix method (SVD family, pivot) must hold at once, or with
    batching (`svd_batch_bytes`) the largest batch of matrices decomposed in one call."""
    if not memory_per_worker:
        return
    peak, members, whole = _peak(plan, chunk_bytes, svd_batch_bytes)
    floor = WORKER_BASE_BYTES + peak
    if memory_per_worker >= floor:
        return
    where = members[0].name if members else ""
    if len(members) > 1:
        t = members[0]
        raise ValueError(
            f"--max-memory-per-worker {memory_per_worker / 1e9:.2f} GB cannot hold the batch of {len(members)} "
            f"same-shape matrices {where!r} .. {members[-1].name!r} ({' x '.join(map(str, t.shape))}, "
            f"{len(t.inputs)} inputs{' + base' if t.base else ''} each), which merge_method {t.op!r} decomposes in "
            f"one batched call (SVD batch budget {svd_batch_bytes / 1e9:.2f} GB): it needs an estimated "
            f"{floor / 1e9:.2f} GB ({floor} bytes, worker process and outputs waiting to be written included). "
            f"Raise the budget to at least {floor / 1e9:.2f} GB, or lower the SVD batch budget (svd_batch_bytes) "
            "or turn batching off (svd_batch=False)"
        )
    if whole:
        t = members[0]
        raise ValueError(
            f"--max-memory-per-worker {memory_per_worker / 1e9:.2f} GB cannot hold tensor {where!r} "
            f"({' x '.join(map(str, t.shape))}, {len(t.inputs)} inputs{' + base' if t.base else ''}), which "
            f"merge_method {t.op!r} decomposes as a whole matrix: it needs an estimated {floor / 1e9:.2f} GB "
            f"({floor} bytes, worker process included); --chunk-mb does not change this. Raise the budget to at "
            f"least {floor / 1e9:.2f} GB, or merge that tensor with a chunk-wise method (modules:/filters)"
        )
    raise ValueError(
        f"--max-memory-per-worker {memory_per_worker / 1e9:.2f} GB is below one worker's estimated peak "
        f"{floor / 1e9:.2f} GB at --chunk-mb {chunk_bytes / 2**20:g} (tensor {where!r}); raise the budget or "
        "lower --chunk-mb"
    )
