"""Run a Plan: open the output directory (fresh, --overwrite or --resume), build the RunOptions once, and run the
pending work units in this process (workers=0) or on a pool of Ray merge workers (shardmerge.engine.run.ray_pool:
backpressure, replacement of dead workers), both with the exactly-once accounting and progress display of
shardmerge.engine.run.driver.

The driver's only state is the journal in <out>/.shardmerge: finished units (with per-shard digests) and published
shards (with sha256). `--resume` trusts nothing it cannot re-hash. One driver at a time may write into an output
directory (an advisory lock in the state dir, released by the kernel when the driver dies).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from shardmerge.engine.io.output_dir import check_not_an_input, remove_previous
from shardmerge.engine.io.writer import (
    MANIFEST,
    STATE_DIR,
    Journal,
    WriteFailed,
    atomic_write,
    finalize_shard,
    partial_path,
    sha256_file,
    state_dir,
)
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
from shardmerge.engine.run.unit import run_unit, unit_digest
from shardmerge.engine.run.worker import fault_from_env

LOCK_FILE = "driver.lock"


# ------------------------------------------------------------------------------------------------------------------
# Output directory: fresh / overwrite / resume
# ------------------------------------------------------------------------------------------------------------------


def _lock(out: Path) -> int:
    """Take the output directory's driver lock (flock: released by the kernel if this process dies)."""
    state_dir(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir(out) / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(
            f"another shardmerge driver is writing into {out} ({state_dir(out) / LOCK_FILE} is "
            "locked); wait for it to finish or stop it, then run again with --resume"
        ) from None
    return fd


def _writable_dir(out: Path) -> None:
    """Create --out if needed and refuse one this process cannot write (read-only mount, permissions)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"output directory {out} cannot be created ({exc.strerror or exc}); choose a writable --out"
        ) from None
    if not os.access(out, os.W_OK):
        raise ValueError(
            f"output directory {out} is not writable (read-only filesystem or permissions); choose a writable --out"
        )


def open_output(plan: Plan, out: Path, *, resume: bool, overwrite: bool) -> RunState:
    """Decide what to do with an existing output dir; on resume, re-verify and return what is reusable."""
    _writable_dir(out)
    manifest, journal = out / MANIFEST, Journal(out)
    removed: list[str] = []
    if overwrite:
        fd = _lock(out) if journal.path.exists() else None  # never delete a live driver's state
        try:
            removed = remove_previous(out)
        finally:
            if fd is not None:
                os.close(fd)
    elif manifest.exists():
        old = _manifest_plan(manifest)
        if old != plan.plan_hash:
            raise ValueError(
                f"output directory {out} holds a finished merge of a different plan ({old[:12] if old else '?'}…, "
                f"this plan {plan.plan_hash[:12]}…); choose another --out or pass --overwrite"
            )
        if not resume:
            raise ValueError(
                f"output directory {out} already holds this finished merge; run `shardmerge verify "
                f"{out}`, pass --resume to re-check and complete it, or --overwrite to redo it"
            )
        return _reopen_finished(plan, out, manifest, journal)
    elif journal.path.exists() and journal.records():
        if not resume:
            raise ValueError(
                f"output directory {out} holds an unfinished merge; pass --resume to continue it or "
                "--overwrite to start over"
            )
        return _locked(out, lambda: _resume_state(plan, out, journal))
    elif any(p.name != STATE_DIR for p in out.iterdir()):  # a state dir without a journal: killed at the start
        raise ValueError(f"output directory {out} is not empty; choose an empty directory or pass --overwrite")
    fd = _lock(out)
    shutil.rmtree(state_dir(out) / "tmp", ignore_errors=True)  # no journal vouches for any leftover temp shard
    journal.start(plan.plan_hash)
    return RunState(lock_fd=fd, removed=removed)


def _manifest_plan(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text()).get("plan_hash")
    except (json.JSONDecodeError, AttributeError):
        return None


def _reopen_finished(plan: Plan, out: Path, manifest: Path, journal: Journal) -> RunState:
    """--resume on a finished merge of this plan (e.g. killed after the manifest, before the state dir was
    removed): the manifest's shards become the journal and the manifest is dropped, so the usual resume re-hashes
    them, redoes any that no longer match and re-writes the metadata (the same bytes)."""

    def reopen() -> RunState:
        try:
            records = [
                {"shard": e["file"], "sha256": e["sha256"], "size": e["size"]}
                for e in json.loads(manifest.read_text())["shards"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{manifest}: damaged manifest ({type(exc).__name__}: {exc}); pass --overwrite to redo the merge"
            ) from None
        journal.start(plan.plan_hash)
        for rec in records:
            journal.append(rec)
        manifest.unlink()
        return _resume_state(plan, out, journal)

    return _locked(out, reopen)


def _locked(out: Path, build) -> RunState:
    """Take the driver lock, then build the run state under it; the lock is released if building fails."""
    fd = _lock(out)
    try:
        state = build()
    except BaseException:
        os.close(fd)
        raise
    state.lock_fd = fd
    return state


def _check_partials(plan: Plan, out: Path) -> None:
    """A temp shard whose size or header is not the plan's cannot be trusted: remove it (its units re-run)."""
    for s in plan.shards:
        p = partial_path(out, s.filename)
        if not p.exists():
            continue
        with open(p, "rb") as f:
            head = f.read(len(s.header))
        if p.stat().st_size != s.size or head != s.header:
            p.unlink()


def _resume_state(plan: Plan, out: Path, journal: Journal) -> RunState:
    recs = journal.records()
    if not recs or recs[0].get("plan_hash") != plan.plan_hash:
        old = recs[0].get("plan_hash", "?") if recs else "?"
        raise ValueError(
            f"--resume refused: {out} was started for plan {old[:12]}…, but this recipe/inputs give plan "
            f"{plan.plan_hash[:12]}… (recipe, shard size or input files changed); use a new --out or --overwrite"
        )
    state = RunState()
    by_name = {s.filename: s for s in plan.shards}
    journaled = {r["shard"]: (r["sha256"], r["size"]) for r in recs if "shard" in r}
    for name, (sha, size) in journaled.items():
        final = out / name
        if final.exists() and final.stat().st_size == size and sha256_file(final) == sha:
            state.shards[name] = (sha, size)
        elif final.exists():
            final.unlink()
    for s in plan.shards:  # published but not journaled (crash between rename and journal): re-check its units
        final = out / s.filename
        if s.filename not in state.shards and final.exists():
            partial_path(out, s.filename).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, partial_path(out, s.filename))
    _check_partials(plan, out)
    for r in recs:
        if "unit" not in r:
            continue
        unit = plan.units[r["unit"]]
        ok = all(
            name in state.shards or unit_digest(unit, by_name[name], str(out)) == d for name, d in r["digests"].items()
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
        drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))
    while drv.pending:
        uid = drv.pending.popleft()
        res = run_unit(drv.plan.units[uid], drv.plan.shards, str(drv.out), opts, skip_shards=drv.skip(uid))
        for shard in drv.unit_finished(res):
            drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))


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
    out = Path(out).resolve()
    check_not_an_input(plan, out, protect)
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
    state = open_output(plan, out, resume=resume, overwrite=overwrite)
    try:
        for name, text in plan.artifacts:  # e.g. PivotMerge's calibration: what --resume must not recompute
            atomic_write(state_dir(out) / name, text.encode())
        drv = Driver(plan, out, state, progress)
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
        if state.lock_fd is not None:
            os.close(state.lock_fd)
    summary["seconds"] = time.perf_counter() - t0
    summary["plan_hash"] = plan.plan_hash
    return summary
