"""Run a Plan: a pool of merge-worker actors on Ray (or in-process with workers=0), with backpressure, exactly-once
accounting of work units, replacement of dead workers, shard finalisation, a byte progress bar and resume.

The driver's only state is the journal in <out>/.shardmerge: finished units (with per-shard digests) and published
shards (with sha256). `--resume` trusts nothing it cannot re-hash.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.plan import Plan
from engine.unit import UnitResult, run_unit, unit_digest
from engine.writer import (
    INDEX, MANIFEST, STATE_DIR, Journal, create_partial, finalize_shard, partial_path, sha256_file, state_dir,
    write_metadata,
)

MAX_INFLIGHT_PER_WORKER = 2  # one running + one queued keeps a worker busy without hoarding units


@dataclass
class RunState:
    """What is already done in the output dir (from the journal, re-verified)."""

    units: dict[int, dict] = field(default_factory=dict)  # unit id -> {shard file: digest}
    shards: dict[str, tuple[str, int]] = field(default_factory=dict)  # shard file -> (sha256, size)
    reused_shards: int = 0
    reused_units: int = 0


def resource_options(device: str, *, cpus_per_worker: int = 1, memory_bytes: Optional[int] = None,
                     node_id: Optional[str] = None) -> dict:
    """Ray actor options for one merge worker (pure: unit-tested without a cluster)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    opts: dict = {"num_cpus": max(1, cpus_per_worker), "max_restarts": 0, "max_task_retries": 0}
    if device == "cuda":
        opts["num_gpus"] = 1
    if memory_bytes:
        opts["memory"] = int(memory_bytes)
    if node_id:
        opts["scheduling_strategy"] = _node_affinity(node_id)
    return opts


def _node_affinity(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def _our_files(out: Path) -> list[Path]:
    names = {MANIFEST, INDEX, STATE_DIR, "README.md", "config.json"}
    return [p for p in out.iterdir() if p.name in names or (p.name.startswith("model-") and
                                                          p.name.endswith(".safetensors"))]


def open_output(plan: Plan, out: Path, *, resume: bool, overwrite: bool) -> RunState:
    """Decide what to do with an existing output dir; on resume, re-verify and return what is reusable."""
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"output directory {out} is not writable")
    manifest, journal = out / MANIFEST, Journal(out)
    if overwrite:
        for p in _our_files(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif manifest.exists():
        old = json.loads(manifest.read_text()).get("plan_hash")
        if old != plan.plan_hash:
            raise ValueError(
                f"output directory {out} holds a finished merge of a different plan ({old[:12] if old else '?'}…, "
                f"this plan {plan.plan_hash[:12]}…); choose another --out or pass --overwrite"
            )
        raise ValueError(f"output directory {out} already holds this finished merge; run `shardmerge verify {out}`"
                         " or pass --overwrite to redo it")
    elif journal.path.exists():
        if not resume:
            raise ValueError(f"output directory {out} holds an unfinished merge; pass --resume to continue it or "
                             "--overwrite to start over")
        return _resume_state(plan, out, journal)
    elif any(out.iterdir()):
        raise ValueError(f"output directory {out} is not empty; choose an empty directory or pass --overwrite")
    journal.start(plan.plan_hash)
    return RunState()


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
    for r in recs:
        if "unit" not in r:
            continue
        unit = plan.units[r["unit"]]
        ok = all(name in state.shards or unit_digest(unit, by_name[name], str(out)) == d
                 for name, d in r["digests"].items())
        if ok:
            state.units[unit.id] = r["digests"]
    state.reused_shards, state.reused_units = len(state.shards), len(state.units)
    return state


def _unit_done(plan: Plan, state: RunState, uid: int) -> bool:
    unit = plan.units[uid]
    return uid in state.units or all(plan.shards[s].filename in state.shards for s in unit.shards)


class _Driver:
    """Accounting shared by the in-process and Ray paths."""

    def __init__(self, plan: Plan, out: Path, state: RunState, progress: bool):
        self.plan, self.out, self.state = plan, out, state
        self.journal = Journal(out)
        self.pending = deque(u.id for u in plan.units if not _unit_done(plan, state, u.id))
        self.left = {s.index: 0 for s in plan.shards}
        for uid in self.pending:
            for s in plan.units[uid].shards:
                self.left[s] += 1
        self.reported: set[int] = set()
        for s in plan.shards:
            if s.filename not in state.shards and not partial_path(out, s.filename).exists():
                create_partial(out, s)
        done_bytes = sum(plan.units[u].nbytes for u in range(len(plan.units)) if u not in self.pending)
        self.bar = _progress(plan.total_bytes, done_bytes, len(plan.units), progress)
        self.units_done = len(plan.units) - len(self.pending)

    def skip(self, uid: int) -> frozenset:
        return frozenset(self.plan.shards[s].filename for s in self.plan.units[uid].shards
                         if self.plan.shards[s].filename in self.state.shards)

    def ready_shards(self) -> list:
        return [self.plan.shards[i] for i, n in self.left.items()
                if n == 0 and self.plan.shards[i].filename not in self.state.shards]

    def unit_finished(self, res: UnitResult) -> list:
        if res.unit_id in self.reported:
            raise RuntimeError(f"work unit {res.unit_id} ({self.plan.units[res.unit_id].key}) was reported twice")
        self.reported.add(res.unit_id)
        self.journal.append({"unit": res.unit_id, "digests": res.digests})
        self.units_done += 1
        self.bar.set_postfix_str(f"units {self.units_done}/{len(self.plan.units)}", refresh=False)
        self.bar.update(res.nbytes)
        ready = []
        for s in self.plan.units[res.unit_id].shards:
            self.left[s] -= 1
            if self.left[s] == 0 and self.plan.shards[s].filename not in self.state.shards:
                ready.append(self.plan.shards[s])
        return ready

    def shard_finished(self, name: str, sha: str, size: int) -> None:
        self.state.shards[name] = (sha, size)
        self.journal.append({"shard": name, "sha256": sha, "size": size})

    def finish(self) -> None:
        self.bar.close()
        missing = [u.id for u in self.plan.units if u.id not in self.reported and not _unit_done(
            self.plan, self.state, u.id)]
        if missing:
            raise RuntimeError(f"work units {missing[:10]} were never reported; the merge is incomplete")
        unpublished = [s.filename for s in self.plan.shards if s.filename not in self.state.shards]
        if unpublished:
            raise RuntimeError(f"shards {unpublished[:5]} were never finalised; the merge is incomplete")
        write_metadata(self.plan, self.out, self.state.shards)


def _progress(total: int, initial: int, units: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                disable=not enabled, mininterval=1.0, file=sys.stderr, dynamic_ncols=True)


def run_in_process(drv: _Driver, *, chunk_bytes: int, device: str, allow_nonfinite: bool) -> None:
    for shard in drv.ready_shards():  # resume: all of a shard's units were done before the crash
        drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))
    while drv.pending:
        uid = drv.pending.popleft()
        res = run_unit(drv.plan.units[uid], drv.plan.shards, str(drv.out), chunk_bytes=chunk_bytes,
                       device=device, allow_nonfinite=allow_nonfinite, skip_shards=drv.skip(uid))
        for shard in drv.unit_finished(res):
            drv.shard_finished(shard.filename, *finalize_shard(drv.out, shard))


def execute(plan: Plan, out: Path | str, *, workers: int = 0, device: str = "cpu", resume: bool = False,
            overwrite: bool = False, chunk_bytes: int = 64 << 20, allow_nonfinite: bool = False,
            progress: bool = True, fault: Optional[str] = None, memory_per_worker: Optional[int] = None,
            address: Optional[str] = None) -> dict:
    """Merge `plan` into `out`. workers=0 runs in this process; workers>=1 uses a Ray actor pool."""
    out = Path(out).resolve()
    t0 = time.perf_counter()
    state = open_output(plan, out, resume=resume, overwrite=overwrite)
    reused = (state.reused_units, state.reused_shards)
    drv = _Driver(plan, out, state, progress)
    summary = {"units": len(plan.units), "reused_units": reused[0], "reused_shards": reused[1],
               "shards": len(plan.shards), "bytes": plan.total_bytes, "workers": workers}
    if workers <= 0:
        run_in_process(drv, chunk_bytes=chunk_bytes, device=device, allow_nonfinite=allow_nonfinite)
    else:
        from engine.ray_pool import run_on_ray

        summary.update(run_on_ray(drv, workers=workers, device=device, chunk_bytes=chunk_bytes,
                                  allow_nonfinite=allow_nonfinite, fault=fault, address=address,
                                  memory_per_worker=memory_per_worker))
    drv.finish()
    summary["seconds"] = time.perf_counter() - t0
    summary["plan_hash"] = plan.plan_hash
    return summary
