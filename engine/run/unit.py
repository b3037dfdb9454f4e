"""Execute one work unit: stream every output tensor row-chunk by row-chunk through its method into the shard files.

This is the only code that touches tensor data on the write side; Ray workers and the in-process path both call
`run_unit` with the driver's RunOptions (shardmerge.engine.run.options), so local and cluster runs share one code
path. Memory is bounded by the chunk size, never by the tensor (whole-matrix methods: by the matrix, see
shardmerge.engine.run.batching.whole_tensor_bytes). With a batched-SVD budget, same-shape whole matrices are merged
in the batches that shardmerge.engine.run.batching plans, and still written and hashed in plan order.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import DTYPES, TensorMeta, read_rows
from shardmerge.engine.io.stores import open_store
from shardmerge.engine.io.writer import write_unit_report
from shardmerge.engine.methods.base import Chunk, TensorInfo
from shardmerge.engine.plan.build import COPY, OutputTensor, WorkUnit
from shardmerge.engine.run.batching import Batch, plan_batches
from shardmerge.engine.run.options import RunOptions
from shardmerge.kernels import cpu_fused

_FP32 = 4


@dataclass(frozen=True)
class UnitResult:
    unit_id: int
    digests: dict  # shard filename -> sha256 of this unit's bytes in that shard, tensor by tensor in unit order
    nbytes: int
    seconds: float
    worker: str = ""


_ALLOCATOR_TUNED: bool | None = None  # None: not tried yet in this process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator() -> bool:
    """Make freed chunk buffers reusable instead of returned to the OS (once per process; glibc only).

    Why: glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
    mmap and unmaps it on free, so each chunk's float32 buffers were page-faulted in anew: measured (BENCHMARKS.md, "CPU fast
    path"), a 3-input linear chunk loop over 16M-float chunks took 68 s wall (12 s system time, 2.7M minor
    faults per GB of output) against 13 s (0.1 s, 41k faults/GB) with both thresholds raised to 1 GiB. Freed
    memory then stays in the heap for the next chunk instead of being handed back to the OS between chunks.
    SHARDMERGE_MALLOC=default, or glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment
    (the user's choice wins), leave glibc's settings alone."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if os.environ.get("SHARDMERGE_MALLOC") == "default" or any(
        v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok


def rows_per_chunk(t: OutputTensor, chunk_bytes: int) -> int:
    """Rows such that one float32 input chunk stays within chunk_bytes (at least one row)."""
    row_numel = 1
    for d in t.shape[1:]:
        row_numel *= d
    return max(1, chunk_bytes // max(1, row_numel * _FP32))


def chunks(t: OutputTensor, chunk_bytes: int) -> Iterator[Chunk]:
    rows = t.shape[0] if t.shape else 1
    row_numel = 1
    for d in t.shape[1:]:
        row_numel *= d
    step = rows_per_chunk(t, chunk_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Chunk(start, stop, start * row_numel)


def all_finite(x: torch.Tensor) -> bool:
    """True when x holds no NaN/Inf. The sum is NaN/Inf whenever an element is, so a finite sum proves the tensor
    finite with one cheap reduction; only a non-finite sum (a bad element, or an overflowing sum of finite ones)
    pays for the exact elementwise test. Measured on 16M float32 (2 threads): isfinite().all() 138 ms CPU, sum
    10 ms; it was half the time of an in-process linear merge."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _load(meta: TensorMeta, c: Chunk, device: str, check_finite: bool) -> torch.Tensor:
    return _finish(meta, c, read_rows(meta, c.row_start, c.row_stop), device, check_finite)


def _finish(meta: TensorMeta, c: Chunk, raw: torch.Tensor, device: str, check_finite: bool) -> torch.Tensor:
    x = raw.to(device=device, dtype=torch.float32)
    if check_finite and not all_finite(x):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(
            f"{meta.file}: tensor {meta.name!r} holds NaN/Inf (first at row {c.row_start + bad[0] if bad else 0}); "
            "pass --allow-nonfinite to merge it anyway"
        )
    return x


_FETCH_THREADS = 4  # ranged GETs in flight per worker process (all inputs of a chunk, and the next chunk's)
_fetch_pool = None


def _fetcher():
    global _fetch_pool
    if _fetch_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _fetch_pool = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="shardmerge-fetch")
    return _fetch_pool


def _reader(t: OutputTensor, chunk_bytes: int, device: str, check_finite: bool):
    """The tensor's (chunk, inputs, base) in row order. When an input is on object storage or the hub, every input
    of a chunk is fetched concurrently and the next chunk's ranged GETs run while the current chunk is merged: at
    most two chunks of raw input bytes are held (the bounded buffer); local inputs are read as they are needed."""
    metas = [*t.inputs, *([t.base] if t.base is not None else [])]
    remote = any("://" in m.file for m in metas)

    def read():
        for c in chunks(t, chunk_bytes):
            xs = [_load(m, c, device, check_finite) for m in t.inputs]
            base = _load(t.base, c, device, check_finite) if t.base is not None else None
            yield c, xs, base

    def read_ahead():
        pool = _fetcher()
        fetch = lambda c: [pool.submit(read_rows, m, c.row_start, c.row_stop) for m in metas]
        it = iter(chunks(t, chunk_bytes))
        c = next(it, None)
        pending = fetch(c) if c is not None else []
        while c is not None:
            nxt = next(it, None)
            ahead = fetch(nxt) if nxt is not None else []
            xs = [_finish(m, c, f.result(), device, check_finite) for m, f in zip(metas, pending)]
            base = xs.pop() if t.base is not None else None
            yield c, xs, base
            c, pending = nxt, ahead

    return read_ahead if remote else read


class _Batched:
    """A unit's batched results: a batch is computed when its first member is due; its outputs wait (on CPU, in
    the output dtype) until each member's turn to be written."""

    def __init__(self, tensors, opts: RunOptions):
        self.tensors, self.opts = tensors, opts
        self.of = {i: b for b in plan_batches(tensors, opts.svd_batch_bytes) for i in b.members}
        self.held: dict[int, torch.Tensor] = {}

    def has(self, i: int) -> bool:
        return i in self.of

    def take(self, i: int) -> list[torch.Tensor]:
        """Tensor i's output (one whole part, like a whole-matrix method's `_merge_tensor`)."""
        if i not in self.held:
            self._compute(self.of[i])
        return [self.held.pop(i)]

    def _compute(self, batch: Batch) -> None:
        ts = [self.tensors[i] for i in batch.members]
        spec, check, device = methods.get(ts[0].op), not self.opts.allow_nonfinite, self.opts.device
        wholes = [Chunk(0, t.shape[0], 0) for t in ts]
        inputs = [[_load(m, c, device, check) for m in t.inputs] for t, c in zip(ts, wholes)]
        bases = [_load(t.base, c, device, check) if t.base is not None else None for t, c in zip(ts, wholes)]
        infos = [TensorInfo(t.name, t.shape, t.layer, t.num_layers) for t in ts]
        ys = spec.merge_batch(inputs, bases, infos, **dict(ts[0].params))
        del inputs, bases
        if len(ys) != len(ts):
            raise RuntimeError(
                f"merge_method {ts[0].op!r}: merge_batch returned {len(ys)} tensors for a batch of "
                f"{len(ts)} ({ts[0].name!r} .. {ts[-1].name!r}); expected one per tensor"
            )
        for i, t, c, y in zip(batch.members, ts, wholes, ys):
            _check_result(t, y, c, self.opts, None)
            out = y.to(DTYPES[t.dtype][0]).cpu()
            # a view of the batch's result would keep all of it alive while one member waits
            self.held[i] = out.clone() if out._base is not None else out


def _check_result(t: OutputTensor, y: torch.Tensor, c: Chunk, opts: RunOptions, allowed: bool | None) -> bool | None:
    """Refuse a non-finite result from finite inputs (RuntimeError naming the tensor and rows). `allowed` caches,
    per tensor, whether --allow-nonfinite inputs hold NaN/Inf (None: not checked yet); returns it."""
    if all_finite(y):
        return allowed
    if allowed is None:
        allowed = opts.allow_nonfinite and _inputs_nonfinite(_reader(t, opts.chunk_bytes, opts.device, False))
    if not allowed:
        raise RuntimeError(
            f"merge_method {t.op!r} produced NaN/Inf for tensor {t.name!r} (rows {c.row_start}.."
            f"{c.row_stop}) from finite inputs; check the method's parameters (e.g. weights summing to zero) "
            "and the inputs' magnitudes (float32 overflow)"
        )
    return allowed


def _merge_tensor(t: OutputTensor, opts: RunOptions, reports: list | None = None) -> Iterator[torch.Tensor]:
    """Yield the output tensor's row chunks, already cast to the output dtype, on CPU. A whole-tensor method with
    a `merge_with_report` (e.g. pivot) also appends its per-tensor report to `reports`."""
    out_dtype = DTYPES[t.dtype][0]
    chunk_bytes, device, check = opts.chunk_bytes, opts.device, not opts.allow_nonfinite
    if t.op == COPY:
        src = t.inputs[0]
        for c in chunks(t, chunk_bytes):
            x = read_rows(src, c.row_start, c.row_stop)
            yield x if x.dtype == out_dtype else x.to(out_dtype)
        return
    spec = methods.get(t.op)
    params = dict(t.params)
    info = TensorInfo(t.name, t.shape, t.layer, t.num_layers)
    fused = cpu_fused.plan_for(t, device)  # linear-family on CPU: one compiled pass per chunk, same bytes
    if fused is not None:
        yield from cpu_fused.run(fused, chunks(t, chunk_bytes), lambda c: _merge_chunk(t, c, opts))
        return
    read = _reader(t, chunk_bytes, device, check)
    stats = spec.prepare(read, info=info, **params) if spec.prepare else None
    if not spec.chunkwise:
        whole = Chunk(0, t.shape[0] if t.shape else 1, 0)
        xs = [_load(m, whole, device, check) for m in t.inputs]
        base = _load(t.base, whole, device, check) if t.base is not None else None
        parts = [(whole, xs, base)]
    else:
        parts = read()
    allowed = None  # with allow_nonfinite: whether this tensor's inputs hold NaN/Inf (checked only when needed)
    reporter = getattr(spec, "merge_with_report", None) if reports is not None and not spec.chunkwise else None
    for c, xs, base in parts:
        if reporter is not None:
            y, rep = reporter(xs, base, stats=stats, chunk=c, info=info, **params)
            reports.append(_report_entry(t, spec, rep))
        else:
            y = spec.merge(xs, base, stats=stats, chunk=c, info=info, **params)
        allowed = _check_result(t, y, c, opts, allowed)
        yield y.to(out_dtype).cpu()


def _merge_chunk(t: OutputTensor, c: Chunk, opts: RunOptions) -> torch.Tensor:
    """One chunk of a chunkwise method without whole-tensor statistics, the eager way (cast, on CPU)."""
    spec, check = methods.get(t.op), not opts.allow_nonfinite
    xs = [_load(m, c, opts.device, check) for m in t.inputs]
    base = _load(t.base, c, opts.device, check) if t.base is not None else None
    info = TensorInfo(t.name, t.shape, t.layer, t.num_layers)
    y = spec.merge(xs, base, stats=None, chunk=c, info=info, **dict(t.params))
    _check_result(t, y, c, opts, None)
    return y.to(DTYPES[t.dtype][0]).cpu()


def _report_entry(t: OutputTensor, spec, rep: dict) -> dict:
    """One tensor's report as the writer gathers it: which report file, the tensor, its layout layer."""
    from shardmerge.engine.layout.roles import classify

    role = classify(t.name)
    return {
        "report": getattr(spec, "report", "") or spec.name,
        "op": t.op,
        "tensor": t.name,
        "module": role.module if role else None,
        "layer": role.layer if role else t.layer,
        **rep,
    }


def _inputs_nonfinite(read) -> bool:
    """Whether any input chunk of a tensor holds NaN/Inf: with --allow-nonfinite a non-finite result is then the
    inputs' NaN/Inf flowing through (accepted); from finite inputs it is the method's own failure (an error)."""
    return any(not all_finite(x) for _, xs, base in read() for x in (*xs, base) if x is not None)


def _write_and_hash(writer, data: memoryview, offset: int, h, label: str) -> None:
    writer.write(data, offset, label)
    h.update(data)


class _Sink:
    """Writes and hashes output chunks on one background thread, one chunk behind the merge: pwrite and sha256
    release the GIL, so both overlap the next chunk's compute instead of following it. One chunk in flight at
    most (its output-dtype bytes are the only extra memory); the order of writes and hash updates is the order
    of `put`, so digests are unchanged; an error of the background step is raised by the next put/drain."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardmerge-write")
        self._pending = None

    def put(self, fn, *args) -> None:
        self.drain()
        self._pending = self._pool.submit(fn, *args)

    def drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Wait for the step in flight (before its file is closed); its error, if any, was or is superseded by
        the one being raised (drain reports it on the success path)."""
        self._pool.shutdown(wait=True)


def run_unit(
    unit: WorkUnit,
    plan_shards,
    out: str,
    opts: RunOptions,
    *,
    worker: str = "",
    skip_shards: frozenset = frozenset(),
) -> UnitResult:
    """Merge and write every tensor of `unit` into its shards' temp state through the output's shard store (`out`:
    a directory, URL or store, shardmerge.engine.io.stores); durable (fsync'ed, or uploaded) before returning.
    Tensors in `skip_shards` (already finalised and verified, on resume) are not recomputed. Per-tensor reports of
    reporting methods go to the state dir (shardmerge.engine.io.writer.write_unit_report), the results stay as they were.
    With `opts.svd_batch_bytes` set, same-shape whole matrices are merged in batched calls of at most that many
    estimated bytes; the bytes written are the same up to float rounding, the write order and hashing are
    unchanged."""
    t0 = time.perf_counter()
    tune_allocator()
    store = open_store(out)
    writers: dict[int, object] = {}
    hashes: dict[int, hashlib._Hash] = {}
    reports: list[dict] = []
    sink = _Sink()
    todo = [t for t in unit.tensors if plan_shards[t.shard].filename not in skip_shards]
    batched = _Batched(todo, opts) if opts.batching else None
    try:
        for i, t in enumerate(todo):
            h = hashes.setdefault(t.shard, hashlib.sha256())
            writer = writers.get(t.shard)
            if writer is None:
                writer = writers[t.shard] = store.shard_writer(plan_shards[t.shard], unit.id)
            offset = t.offset
            parts = batched.take(i) if batched is not None and batched.has(i) else _merge_tensor(t, opts, reports)
            label = f"{plan_shards[t.shard].filename} tensor {t.name!r}"
            for y in parts:
                data = (
                    memoryview(y.contiguous().reshape(-1).view(torch.uint8).numpy()) if y.numel() else memoryview(b"")
                )
                sink.put(_write_and_hash, writer, data, offset, h, label)
                offset += len(data)
            if offset != t.offset + t.nbytes:
                raise RuntimeError(f"tensor {t.name!r}: wrote {offset - t.offset} bytes, planned {t.nbytes}")
        sink.drain()
        for writer in writers.values():
            writer.commit()
        if reports:  # next to the shards' temp files: the driver's writer gathers them (survives --resume)
            write_unit_report(store, unit.id, reports)
    finally:
        sink.close()
        for writer in writers.values():
            writer.close()
    digests = {plan_shards[s].filename: h.hexdigest() for s, h in hashes.items()}
    return UnitResult(unit.id, digests, unit.nbytes, time.perf_counter() - t0, worker)


def unit_digest(unit: WorkUnit, shard, out) -> str | None:
    """Re-hash a unit's bytes in one shard's temp state (resume check); None if missing or short."""
    return open_store(out).unit_digest(unit, shard)
