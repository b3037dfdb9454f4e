"""Run a Plan: a pool of merge-worker actors on Ray (or in-process with workers=0), with backpressure, exactly-once
accounting of work units, replacement of dead workers, shard finalisation, a byte/unit progress display and resume.

The driver's only state is the journal in <out>/.shardmerge: finished units (with per-shard digests) and published
shards (with sha256). `--resume` trusts nothing it cannot re-hash. One driver at a time may write into an output
directory (an advisory lock in the state dir, released by the kernel when the driver dies).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shardmerge.engine.io.output_dir import check_not_an_input, remove_previous
from shardmerge.engine.io.stores import ShardStore, is_url, open_store
from shardmerge.engine.io.writer import MANIFEST, STATE_DIR, WriteFailed, write_metadata
from shardmerge.engine.plan.build import Plan
from shardmerge.engine.run.memory import (  # noqa: F401  (re-exported: the budget check is part of the executor's interface)
    WORKER_BASE_BYTES,
    check_memory_budget,
    svd_batch_budget,
    whole_tensor_bytes,
    worker_memory_floor,
)
from shardmerge.engine.run.unit import UnitResult, run_unit

MAX_INFLIGHT_PER_WORKER = 2  # one running + one queued keeps a worker busy without hoarding units


@dataclass
class RunState:
    """What is already done in the output dir (from the journal, re-verified)."""

    units: dict[int, dict] = field(default_factory=dict)  # unit id -> {shard file: digest}
    shards: dict[str, tuple[str, int]] = field(default_factory=dict)  # shard file -> (sha256, size)
    reused_shards: int = 0
    reused_units: int = 0
    lock_fd: int | None = None  # held for the whole run (the store's lock handle)
    removed: list[str] = field(default_factory=list)  # what --overwrite deleted of a previous merge


# ------------------------------------------------------------------------------------------------------------------
# Resource options (pure functions: unit-tested without a cluster)
# ------------------------------------------------------------------------------------------------------------------


def resource_options(
    device: str,
    *,
    cpus_per_worker: int = 1,
    memory_bytes: int | None = None,
    node_id: str | None = None,
    spread: bool = True,
) -> dict:
    """Ray actor options for one merge worker: one GPU each with --device cuda, else `cpus_per_worker` CPUs;
    `memory` reserves the per-worker budget so Ray never packs more workers on a node than its memory holds;
    SPREAD places workers (and therefore the units they pull) across nodes."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if cpus_per_worker < 1:
        raise ValueError(f"cpus per worker must be >= 1, got {cpus_per_worker}")
    if memory_bytes is not None and memory_bytes <= 0:
        raise ValueError(f"--max-memory-per-worker must be positive, got {memory_bytes} bytes")
    opts: dict = {"num_cpus": cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
    if device == "cuda":
        opts["num_gpus"] = 1
    if memory_bytes:
        opts["memory"] = int(memory_bytes)
    if node_id:
        opts["scheduling_strategy"] = _node_affinity(node_id)
    elif spread:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def _node_affinity(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def default_worker_count(device: str, cluster: dict) -> int:
    """One worker per GPU of the cluster with --device cuda; otherwise one per CPU slot.

    Streaming merges are memory-bound elementwise work: single-threaded workers side by side beat fewer workers with
    intra-op threads (measured, 0.1 GB linear: 1 worker x 1 thread 4.2 s vs 1 worker x 2 threads 14.6 s on 2 busy
    cores; see BENCHMARKS.md)."""
    if device == "cuda":
        return max(1, int(cluster.get("GPU", 0)))
    return max(1, int(cluster.get("CPU", 1)))


def worker_cpus(device: str, workers: int, node_cpus: list[float]) -> int:
    """CPUs per worker: the cluster's CPUs shared evenly, but never more than the largest node has (an actor
    lives on one node). GPU workers take one CPU each."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 for a Ray pool, got {workers}")
    if device == "cuda" or not node_cpus:
        return 1
    return max(1, min(int(sum(node_cpus)) // workers, int(max(node_cpus))))


def capacity(opts: dict, nodes: list[dict]) -> int:
    """How many workers with these options fit on the given nodes' total resources (per node, then summed)."""
    need = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0), "memory": opts.get("memory", 0)}
    fit = 0
    for res in nodes:
        per = [int(res.get(k, 0) // v) for k, v in need.items() if v]
        fit += min(per) if per else 0
    return fit


def placement_problem(opts: dict, nodes: list[dict], workers: int) -> str | None:
    """None when all `workers` fit now; else a sentence saying what does not fit and why."""
    fit = capacity(opts, nodes)
    if fit >= workers:
        return None
    asked = {k: opts[k] for k in ("num_cpus", "num_gpus", "memory") if k in opts}
    have = [{k: v for k, v in n.items() if k in ("CPU", "GPU", "memory")} for n in nodes]
    return (
        f"{workers} merge worker(s) asking {asked} each, but the nodes' resources {have} hold {fit}; "
        "lower --workers or --max-memory-per-worker, or add nodes"
    )


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


def _unit_done(plan: Plan, state: RunState, uid: int) -> bool:
    unit = plan.units[uid]
    return uid in state.units or all(plan.shards[s].filename in state.shards for s in unit.shards)


# ------------------------------------------------------------------------------------------------------------------
# Progress and accounting
# ------------------------------------------------------------------------------------------------------------------


class Progress:
    """The driver's one progress display (bytes and units, plus live workers/nodes on Ray). A tqdm bar on a
    terminal; on a pipe or log file (`ray job logs`, CI) a plain line at start, every `interval` seconds and at
    the end, because carriage-return redraws are unreadable there."""

    def __init__(
        self,
        total_bytes: int,
        done_bytes: int,
        total_units: int,
        done_units: int,
        *,
        enabled: bool,
        stream=None,
        interval: float = 10.0,
    ):
        self.total_bytes, self.bytes, self.total_units, self.units = total_bytes, done_bytes, total_units, done_units
        self.stream = stream or sys.stderr
        self.enabled, self.interval, self.pool = enabled, interval, ""
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="merge",
                mininterval=1.0,
                file=self.stream,
                dynamic_ncols=True,
            )
        self._emit(force=True)

    def line(self) -> str:
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        rate = (self.bytes / 2**20) / max(1e-9, time.monotonic() - self.t0)
        return (
            f"merge: {pct:5.1f}% {self.bytes / 2**20:.2f}/{self.total_bytes / 2**20:.2f} MiB, units "
            f"{self.units}/{self.total_units}{self.pool}, {rate:.2f} MiB/s, {time.monotonic() - self.t0:.1f} s"
        )

    def _emit(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"units {self.units}/{self.total_units}{self.pool}", refresh=False)
            return
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def update(self, nbytes: int, units: int = 1) -> None:
        self.bytes += nbytes
        self.units += units
        if self.bar is not None:
            self.bar.update(nbytes)
        self._emit()

    def workers(self, alive: int, nodes: int, replaced: int) -> None:
        """Ray-aware part of the display: live workers, the nodes they run on, workers replaced so far."""
        self.pool = f", workers {alive} on {nodes} node(s)" + (f", {replaced} replaced" if replaced else "")
        self._emit()

    def close(self) -> None:
        if self.bar is not None:
            self._emit()
            self.bar.close()
            self.bar = None
        else:
            self._emit(force=True)


class _Driver:
    """Accounting shared by the in-process and Ray paths: every unit of the plan is reported exactly once."""

    def __init__(self, plan: Plan, out, state: RunState, progress: bool):
        self.store = open_store(out)
        self.plan, self.state = plan, state
        self.out = Path(self.store.root) if self.store.local else self.store.url  # what workers are given
        self.pending = deque(u.id for u in plan.units if not _unit_done(plan, state, u.id))
        self.left = {s.index: 0 for s in plan.shards}
        for uid in self.pending:
            for s in plan.units[uid].shards:
                self.left[s] += 1
        self.todo = frozenset(self.pending)
        self.reported: set[int] = set()
        for s in plan.shards:
            if s.filename not in state.shards and not self.store.has_partial(s):
                self.store.create_shard(s)
        done_bytes = sum(u.nbytes for u in plan.units if u.id not in self.todo)
        self.bar = Progress(
            plan.total_bytes, done_bytes, len(plan.units), len(plan.units) - len(self.todo), enabled=progress
        )

    def skip(self, uid: int) -> frozenset:
        return frozenset(
            self.plan.shards[s].filename
            for s in self.plan.units[uid].shards
            if self.plan.shards[s].filename in self.state.shards
        )

    def ready_shards(self) -> list:
        return [
            self.plan.shards[i]
            for i, n in self.left.items()
            if n == 0 and self.plan.shards[i].filename not in self.state.shards
        ]

    def unit_finished(self, res: UnitResult, node: str = "") -> list:
        """Record a finished unit; returns the shards it completed. A unit not owed or reported twice is an error."""
        unit = self.plan.units[res.unit_id] if 0 <= res.unit_id < len(self.plan.units) else None
        if unit is None or res.unit_id not in self.todo:
            raise RuntimeError(
                f"work unit {res.unit_id} was reported by {res.worker or 'a worker'} but this run "
                f"did not schedule it (plan has {len(self.plan.units)} units)"
            )
        if res.unit_id in self.reported:
            raise RuntimeError(f"work unit {res.unit_id} ({unit.key}) was reported twice (last by {res.worker})")
        self.reported.add(res.unit_id)
        rec = {"unit": res.unit_id, "digests": res.digests}
        if res.worker:
            rec.update(worker=res.worker, node=node)
        self.store.journal_append(rec)
        self.bar.update(res.nbytes)
        ready = []
        for s in unit.shards:
            self.left[s] -= 1
            if self.left[s] == 0 and self.plan.shards[s].filename not in self.state.shards:
                ready.append(self.plan.shards[s])
        return ready

    def shard_finished(self, name: str, sha: str, size: int) -> None:
        if name in self.state.shards:
            raise RuntimeError(f"shard {name} was finalised twice")
        self.state.shards[name] = (sha, size)
        self.store.journal_append({"shard": name, "sha256": sha, "size": size})

    def finish(self) -> None:
        self.bar.close()
        missing = sorted(self.todo - self.reported)
        if missing:
            raise RuntimeError(f"work units {missing[:10]} were never reported; the merge is incomplete")
        unpublished = [s.filename for s in self.plan.shards if s.filename not in self.state.shards]
        if unpublished:
            raise RuntimeError(f"shards {unpublished[:5]} were never finalised; the merge is incomplete")
        write_metadata(self.plan, self.store, self.state.shards)


def run_in_process(
    drv: _Driver, *, chunk_bytes: int, device: str, allow_nonfinite: bool, svd_batch_bytes: int | None = None
) -> None:
    """Run the pending units here, one after the other; `svd_batch_bytes` None = no batching."""
    for shard in drv.ready_shards():  # resume: all of a shard's units were done before the crash
        drv.shard_finished(shard.filename, *drv.store.publish(shard))
    while drv.pending:
        uid = drv.pending.popleft()
        res = run_unit(
            drv.plan.units[uid],
            drv.plan.shards,
            drv.store,
            chunk_bytes=chunk_bytes,
            device=device,
            allow_nonfinite=allow_nonfinite,
            skip_shards=drv.skip(uid),
            svd_batch=svd_batch_bytes is not None,
            svd_batch_bytes=svd_batch_bytes,
        )
        for shard in drv.unit_finished(res):
            drv.shard_finished(shard.filename, *drv.store.publish(shard))


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
    fault: str | None = None,
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
    `out` may not be or overlap an input, nor hold a file the merge reads (`protect`: e.g. the recipe file)."""
    store = open_store(out if isinstance(out, ShardStore) else (out if is_url(out) else Path(out).resolve()))
    check_not_an_input(plan, store, protect)
    t0 = time.perf_counter()
    in_process = workers is not None and workers <= 0
    batch_bytes = svd_batch_budget(plan, device, svd_batch, svd_batch_bytes, memory_per_worker)
    check_memory_budget(plan, chunk_bytes, memory_per_worker, batch_bytes)
    state = open_output(plan, store, resume=resume, overwrite=overwrite)
    try:
        for name, text in plan.artifacts:  # e.g. PivotMerge's calibration: what --resume must not recompute
            store.write_atomic(f"{STATE_DIR}/{name}", text.encode())
        drv = _Driver(plan, store, state, progress)
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
            run_in_process(
                drv,
                chunk_bytes=chunk_bytes,
                device=device,
                allow_nonfinite=allow_nonfinite,
                svd_batch_bytes=batch_bytes,
            )
        else:
            from shardmerge.engine.run.ray_pool import run_on_ray

            summary.update(
                run_on_ray(
                    drv,
                    workers=workers,
                    device=device,
                    chunk_bytes=chunk_bytes,
                    allow_nonfinite=allow_nonfinite,
                    fault=fault,
                    address=address,
                    memory_per_worker=memory_per_worker,
                    threads=threads_per_worker,
                    svd_batch_bytes=batch_bytes,
                )
            )
        drv.finish()
    except WriteFailed as exc:  # disk full: the half-written temp file is not trusted; free its space
        if exc.path:
            Path(exc.path).unlink(missing_ok=True)
        raise
    finally:
        store.unlock(state.lock_fd)
    summary["seconds"] = time.perf_counter() - t0
    summary["plan_hash"] = plan.plan_hash
    return summary
