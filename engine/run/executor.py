"""Run a Plan: a pool of merge-worker actors on Ray (or in-process with workers=0), with backpressure, exactly-once
accounting of work units, replacement of dead workers, shard finalisation, a byte/unit progress display and resume.

The driver's only state is the journal in <out>/.shardmerge: finished units (with per-shard digests) and published
shards (with sha256). `--resume` trusts nothing it cannot re-hash. One driver at a time may write into an output
directory (an advisory lock in the state dir, released by the kernel when the driver dies).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shardmerge.engine.io.output_dir import check_not_an_input, remove_previous
from shardmerge.engine.io.writer import (
    MANIFEST,
    STATE_DIR,
    Journal,
    WriteFailed,
    atomic_write,
    create_partial,
    finalize_shard,
    partial_path,
    sha256_file,
    state_dir,
    write_metadata,
)
from shardmerge.engine.plan.build import Plan
from shardmerge.engine.run.memory import (  # noqa: F401  (re-exported: the budget check is part of the executor's interface)
    WORKER_BASE_BYTES,
    check_memory_budget,
    svd_batch_budget,
    whole_tensor_bytes,
    worker_memory_floor,
)
from shardmerge.engine.run.unit import UnitResult, run_unit, unit_digest

MAX_INFLIGHT_PER_WORKER = 2  # one running + one queued keeps a worker busy without hoarding units
LOCK_FILE = "driver.lock"


@dataclass
class RunState:
    """What is already done in the output dir (from the journal, re-verified)."""

    units: dict[int, dict] = field(default_factory=dict)  # unit id -> {shard file: digest}
    shards: dict[str, tuple[str, int]] = field(default_factory=dict)  # shard file -> (sha256, size)
    reused_shards: int = 0
    reused_units: int = 0
    lock_fd: int | None = None  # held for the whole run
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


def _unit_done(plan: Plan, state: RunState, uid: int) -> bool:
    unit = plan.units[uid]
    return uid in state.units or all(plan.shards[s].filename in state.shards for s in unit.shards)


# ------------------------------------------------------------------------------------------------------------------
# Progress and accounting
# ------------------------------------------------------------------------------------------------------------------


class Progress:
    """The driver's one progress display (bytes and units, plus live workers/nodes on Ray). A tqdm bar on a
    terminal; on a pipe or log file (`ray job logs`, CI) a plain line when merging begins, every `interval` seconds
    and at the end, because carriage-return redraws are unreadable there.

    Rates and the ETA count only the bytes merged by this run, from the moment merging began (`begin()`: after Ray
    and the first worker are up), so a resumed run does not credit itself with the units an earlier run did, and a
    run that waited for Ray does not report that wait as slow merging."""

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
        clock=time.monotonic,
    ):
        self.total_bytes, self.bytes, self.total_units, self.units = total_bytes, done_bytes, total_units, done_units
        self.done0, self.units0 = done_bytes, done_units
        self.stream = stream or sys.stderr
        self.enabled, self.interval, self.pool, self.clock = enabled, interval, "", clock
        self.t0 = self.last = clock()
        self.begun = False
        self.t_end = None
        self.bar = None

    def begin(self) -> None:
        """Merging starts now (idempotent): the phase line, the clock of the rate, the bar."""
        if self.begun:
            return
        from shardmerge.engine.phases import phase, size

        self.begun = True
        self.t0 = self.last = self.clock()
        todo = self.total_units - self.units0
        kept = f"; {self.units0} already done ({size(self.done0)}), kept" if self.units0 else ""
        phase("merging", f"{todo} work units, {size(self.total_bytes - self.done0)}{kept}")
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total_bytes,
                initial=self.bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="merge",
                mininterval=1.0,
                file=self.stream,
                dynamic_ncols=True,
            )
        self._emit(force=True)

    def merged(self) -> int:
        """Bytes merged by this run."""
        return self.bytes - self.done0

    def seconds(self) -> float:
        """Merging time so far (from begin() to close(), once closed)."""
        if not self.begun:
            return 0.0
        return (self.t_end if self.t_end is not None else self.clock()) - self.t0

    def eta(self) -> str:
        from shardmerge.engine.phases import duration

        done, left = self.merged(), self.total_bytes - self.bytes
        if left <= 0:
            return "0.0 s"
        if done <= 0 or self.seconds() <= 0:
            return "?"
        return duration(left * self.seconds() / done)

    def line(self) -> str:
        from shardmerge.engine.phases import duration, rate

        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"merge: {pct:5.1f}% {self.bytes / 2**20:.2f}/{self.total_bytes / 2**20:.2f} MiB, units "
            f"{self.units}/{self.total_units}{self.pool}, {rate(self.merged(), self.seconds())}, "
            f"{duration(self.seconds())}, ETA {self.eta()}"
        )

    def _emit(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"units {self.units}/{self.total_units}{self.pool}", refresh=False)
            return
        now = self.clock()
        if force or now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def update(self, nbytes: int, units: int = 1) -> None:
        self.begin()
        self.bytes += nbytes
        self.units += units
        if self.bar is not None:
            self.bar.update(nbytes)
        self._emit()

    def workers(self, alive: int, nodes: int, replaced: int) -> None:
        """Ray-aware part of the display: live workers, the nodes they run on, workers replaced so far."""
        self.pool = f", workers {alive} on {nodes} node(s)" + (f", {replaced} replaced" if replaced else "")
        if self.begun:
            self._emit()

    def close(self) -> None:
        self.begin()
        self.t_end = self.clock()
        if self.bar is not None:
            self._emit()
            self.bar.close()
            self.bar = None
        else:
            self._emit(force=True)


class _Driver:
    """Accounting shared by the in-process and Ray paths: every unit of the plan is reported exactly once."""

    def __init__(self, plan: Plan, out: Path, state: RunState, progress: bool):
        self.plan, self.out, self.state = plan, out, state
        self.journal = Journal(out)
        self.pending = deque(u.id for u in plan.units if not _unit_done(plan, state, u.id))
        self.left = {s.index: 0 for s in plan.shards}
        for uid in self.pending:
            for s in plan.units[uid].shards:
                self.left[s] += 1
        self.todo = frozenset(self.pending)
        self.reported: set[int] = set()
        for s in plan.shards:
            if s.filename not in state.shards and not partial_path(out, s.filename).exists():
                create_partial(out, s)
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
        self.journal.append(rec)
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
        self.journal.append({"shard": name, "sha256": sha, "size": size})

    def finish(self) -> None:
        self.bar.close()
        missing = sorted(self.todo - self.reported)
        if missing:
            raise RuntimeError(f"work units {missing[:10]} were never reported; the merge is incomplete")
        unpublished = [s.filename for s in self.plan.shards if s.filename not in self.state.shards]
        if unpublished:
            raise RuntimeError(f"shards {unpublished[:5]} were never finalised; the merge is incomplete")
        from shardmerge.engine.phases import phase

        phase("writing metadata", "index, config, tokenizer, model card, manifest")
        write_metadata(self.plan, self.out, self.state.shards)


def run_in_process(
    drv: _Driver, *, chunk_bytes: int, device: str, allow_nonfinite: bool, svd_batch_bytes: int | None = None
) -> None:
    """Run the pending units here, one after the other; `svd_batch_bytes` None = no batching."""
    drv.bar.begin()
    for shard in drv.ready_shards():  # resume: all of a shard's units were done before the crash
        drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))
    while drv.pending:
        uid = drv.pending.popleft()
        res = run_unit(
            drv.plan.units[uid],
            drv.plan.shards,
            str(drv.out),
            chunk_bytes=chunk_bytes,
            device=device,
            allow_nonfinite=allow_nonfinite,
            skip_shards=drv.skip(uid),
            svd_batch=svd_batch_bytes is not None,
            svd_batch_bytes=svd_batch_bytes,
        )
        for shard in drv.unit_finished(res):
            drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))


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
    out = Path(out).resolve()
    check_not_an_input(plan, out, protect)
    t0 = time.perf_counter()
    in_process = workers is not None and workers <= 0
    batch_bytes = svd_batch_budget(plan, device, svd_batch, svd_batch_bytes, memory_per_worker)
    check_memory_budget(plan, chunk_bytes, memory_per_worker, batch_bytes)
    state = open_output(plan, out, resume=resume, overwrite=overwrite)
    try:
        for name, text in plan.artifacts:  # e.g. PivotMerge's calibration: what --resume must not recompute
            atomic_write(state_dir(out) / name, text.encode())
        drv = _Driver(plan, out, state, progress)
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
