"""Run a Plan: open the output directory (fresh, --overwrite or --resume), build the RunOptions once, and run the
pending work units in this process (workers=0) or on a pool of Ray merge workers (shardmerge.engine.run.ray_pool:
backpressure, replacement of dead workers), both with the exactly-once accounting and progress display of
shardmerge.engine.run.driver.

The driver's only state is the journal in <out>/.shardmerge: finished units (with per-shard digests) and published
shards (with sha256). `--resume` trusts nothing it cannot re-hash. One driver at a time may write into an output
directory (an advisory lock in the state dir, released by the kernel when the driver dies).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from shardmerge.engine.io.output_dir import check_not_an_input, remove_previous
from shardmerge.engine.io.shard_files import STATE_DIR, WriteFailed
from shardmerge.engine.io.stores import ShardStore, is_url, open_store
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.engine.plan.build import Plan
from shardmerge.engine.run.driver import Driver, RunState
from shardmerge.engine.run.memory import (  # noqa: F401  (re-exported: the budget check is part of the executor's interface)
    WORKER_BASE_BYTES,
    check_memory_budget,
    svd_batch_budget,
    whole_tensor_bytes,
    worker_memory_floor,
)
from shardmerge.engine.run.options import RunOptions
from shardmerge.engine.run.unit import run_unit
from shardmerge.engine.run.worker import fault_from_env

# ------------------------------------------------------------------------------------------------------------------
# Output directory: fresh / overwrite / resume
# ------------------------------------------------------------------------------------------------------------------


def open_output(plan: Plan, out, *, resume: bool, overwrite: bool) -> RunState:
    """Decide what to do with an existing output (directory or object-store prefix, `out` a path, URL or shard
    store); on resume, re-verify and return what is reusable."""
    store = open_store(out)
    store.prepare()
    removed: list[str] = []
    if overwrite:
        fd = store.lock() if store.journal_exists() else None  # never delete a live driver's state
        try:
            removed = remove_previous(store)
        finally:
            store.unlock(fd)
    elif store.exists(MANIFEST):
        old = _manifest_plan(store)
        if old != plan.plan_hash:
            raise ValueError(
                f"output directory {store.url} holds a finished merge of a different plan "
                f"({old[:12] if old else '?'}…, this plan {plan.plan_hash[:12]}…); choose another --out or pass "
                "--overwrite"
            )
        if not resume:
            raise ValueError(
                f"output directory {store.url} already holds this finished merge; run `shardmerge verify "
                f"{store.url}`, pass --resume to re-check and complete it, or --overwrite to redo it"
            )
        return _reopen_finished(plan, store)
    elif store.journal_exists() and store.journal_records():
        if not resume:
            raise ValueError(
                f"output directory {store.url} holds an unfinished merge; pass --resume to continue it or "
                "--overwrite to start over"
            )
        return _locked(store, lambda: _resume_state(plan, store))
    elif any(name != STATE_DIR for name in store.listdir()):  # a state dir without a journal: killed at the start
        raise ValueError(f"output directory {store.url} is not empty; choose an empty directory or pass --overwrite")
    fd = store.lock()
    store.clear_temp()  # no journal vouches for any leftover temp shard
    store.journal_start({"plan_hash": plan.plan_hash})
    return RunState(lock_fd=fd, removed=removed)


def _manifest_plan(store: ShardStore) -> str | None:
    try:
        return json.loads(store.read_bytes(MANIFEST)).get("plan_hash")
    except (TypeError, ValueError, AttributeError):
        return None


def _reopen_finished(plan: Plan, store: ShardStore) -> RunState:
    """--resume on a finished merge of this plan (e.g. killed after the manifest, before the state dir was
    removed): the manifest's shards become the journal and the manifest is dropped, so the usual resume re-hashes
    them, redoes any that no longer match and re-writes the metadata (the same bytes)."""

    def reopen() -> RunState:
        try:
            records = [
                {"shard": e["file"], "sha256": e["sha256"], "size": e["size"]}
                for e in json.loads(store.read_bytes(MANIFEST))["shards"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{store.url}/{MANIFEST}: damaged manifest ({type(exc).__name__}: {exc}); pass --overwrite to "
                "redo the merge"
            ) from None
        store.journal_start({"plan_hash": plan.plan_hash})
        for rec in records:
            store.journal_append(rec)
        store.remove(MANIFEST)
        return _resume_state(plan, store)

    return _locked(store, reopen)


def _locked(store: ShardStore, build) -> RunState:
    """Take the driver lock, then build the run state under it; the lock is released if building fails."""
    fd = store.lock()
    try:
        state = build()
    except BaseException:
        store.unlock(fd)
        raise
    state.lock_fd = fd
    return state


def _resume_state(plan: Plan, store: ShardStore) -> RunState:
    recs = store.journal_records()
    if not recs or recs[0].get("plan_hash") != plan.plan_hash:
        old = recs[0].get("plan_hash", "?") if recs else "?"
        raise ValueError(
            f"--resume refused: {store.url} was started for plan {old[:12]}…, but this recipe/inputs give plan "
            f"{plan.plan_hash[:12]}… (recipe, shard size or input files changed); use a new --out or --overwrite"
        )
    store.recover()  # e.g. the multipart upload of a shard the killed run was publishing
    state = RunState()
    by_name = {s.filename: s for s in plan.shards}
    journaled = {r["shard"]: (r["sha256"], r["size"]) for r in recs if "shard" in r}
    for name, (sha, size) in journaled.items():
        if store.exists(name) and store.is_published(name, sha, size):
            state.shards[name] = (sha, size)
        elif store.exists(name):
            store.remove(name)
    for s in plan.shards:  # published but not journaled (crash between publish and journal): re-check its units
        if s.filename not in state.shards and store.exists(s.filename):
            store.unpublish(s)
    for s in plan.shards:  # a temp shard whose size or header is not the plan's cannot be trusted: its units re-run
        store.check_partial(s)
    for r in recs:
        if "unit" not in r:
            continue
        unit = plan.units[r["unit"]]
        ok = all(
            name in state.shards or store.unit_digest(unit, by_name[name]) == d for name, d in r["digests"].items()
        )
        if ok:
            state.units[unit.id] = r["digests"]
    state.reused_shards, state.reused_units = len(state.shards), len(state.units)
    return state


def run_in_process(drv: Driver, opts: RunOptions) -> None:
    """Run the pending units here, one after the other, with the driver's options (`opts.threads` is left to the
    caller: this process's torch setting is not changed)."""
    drv.bar.begin()
    for shard in drv.ready_shards():  # resume: all of a shard's units were done before the crash
        drv.shard_finished(shard.filename, *drv.store.publish(shard))
    while drv.pending:
        uid = drv.pending.popleft()
        res = run_unit(drv.plan.units[uid], drv.plan.shards, drv.store, opts, skip_shards=drv.skip(uid))
        for shard in drv.unit_finished(res):
            drv.shard_finished(shard.filename, *drv.store.publish(shard))


def run_options(
    plan: Plan,
    *,
    device: str = "cpu",
    chunk_bytes: int = 64 << 20,
    allow_nonfinite: bool = False,
    threads_per_worker: int | None = None,
    svd_batch: bool | None = None,
    svd_batch_bytes: int | None = None,
    memory_per_worker: int | None = None,
) -> RunOptions:
    """The RunOptions of a merge of `plan` from execute's keyword arguments: threads default to 1, and the
    batched-SVD decision and budget are resolved once here (svd_batch_budget) for every worker."""
    return RunOptions(
        chunk_bytes=chunk_bytes,
        device=device,
        allow_nonfinite=bool(allow_nonfinite),
        threads=1 if threads_per_worker is None else threads_per_worker,
        svd_batch_bytes=svd_batch_budget(plan, device, svd_batch, svd_batch_bytes, memory_per_worker),
    )


def execute(
    plan: Plan,
    out: Path | str,
    *,
    workers: int | None = 0,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    chunk_bytes: int = 64 << 20,
    allow_nonfinite: bool = False,
    progress: bool = True,
    memory_per_worker: int | None = None,
    address: str | None = None,
    threads_per_worker: int | None = None,
    svd_batch: bool | None = None,
    svd_batch_bytes: int | None = None,
    protect: tuple = (),
) -> dict:
    """Merge `plan` into `out`. workers=0 runs in this process; workers>=1 uses a Ray actor pool of that size;
    workers=None sizes the pool from the cluster (one per GPU, or one per CPU). A worker runs one torch thread unless
    `threads_per_worker` says otherwise. `svd_batch` forces batched SVD calls on or off (default: on off the CPU)
    and `svd_batch_bytes` sets their budget (svd_batch_budget); in-process and Ray workers use the same budget.
    `out` may not be or overlap an input, nor hold a file the merge reads (`protect`: e.g. the recipe file).
    The unit-level options become one RunOptions (`run_options`), handed whole to whatever runs the units."""
    store = open_store(out if isinstance(out, ShardStore) else (out if is_url(out) else Path(out).resolve()))
    check_not_an_input(plan, store, protect)
    t0 = time.perf_counter()
    in_process = workers is not None and workers <= 0
    opts = run_options(
        plan,
        device=device,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
        threads_per_worker=threads_per_worker,
        svd_batch=svd_batch,
        svd_batch_bytes=svd_batch_bytes,
        memory_per_worker=memory_per_worker,
    )
    check_memory_budget(plan, opts.chunk_bytes, memory_per_worker, opts.svd_batch_bytes)
    fault = None if in_process else fault_from_env()  # test hook: from the environment only, checked before any write
    state = open_output(plan, store, resume=resume, overwrite=overwrite)
    try:
        for name, text in plan.artifacts:  # e.g. PivotMerge's calibration: what --resume must not recompute
            store.write_atomic(f"{STATE_DIR}/{name}", text.encode())
        drv = Driver(plan, store, state, progress)
        summary = {
            "units": len(plan.units),
            "reused_units": state.reused_units,
            "reused_shards": state.reused_shards,
            "units_run": len(drv.todo),
            "shards": len(plan.shards),
            "bytes": plan.total_bytes,
            "workers": workers,
            **({"removed": state.removed} if state.removed else {}),
        }
        if in_process:
            run_in_process(drv, opts)
        else:
            from shardmerge.engine.run.ray_pool import run_on_ray

            pool = run_on_ray(
                drv, opts, workers=workers, address=address, memory_per_worker=memory_per_worker, fault=fault
            )
            summary.update(pool)
        drv.finish()
        summary.update(bytes_run=drv.bar.merged(), merge_seconds=drv.bar.seconds())
    except WriteFailed as exc:  # disk full: the half-written temp file is not trusted; free its space
        if exc.path:
            Path(exc.path).unlink(missing_ok=True)
        raise
    finally:
        store.unlock(state.lock_fd)
    summary["seconds"] = time.perf_counter() - t0
    summary["plan_hash"] = plan.plan_hash
    return summary
