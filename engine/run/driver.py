"""The driver's accounting, shared by the in-process loop (shardmerge.engine.run.executor) and the Ray pool
(shardmerge.engine.run.ray_pool): which units are still owed, how many units each shard still waits for, the
journal records of finished units and published shards, and the one progress display.

Every unit of the plan is reported exactly once: a unit that was not scheduled, or is reported twice, is an error,
and `finish` refuses a run with an unreported unit or an unpublished shard before writing the metadata.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shardmerge.engine.io.stores import open_store
from shardmerge.engine.io.writer import write_metadata
from shardmerge.engine.plan.build import Plan
from shardmerge.engine.run.unit import UnitResult


@dataclass
class RunState:
    """What is already done in the output dir (from the journal, re-verified)."""

    units: dict[int, dict] = field(default_factory=dict)  # unit id -> {shard file: digest}
    shards: dict[str, tuple[str, int]] = field(default_factory=dict)  # shard file -> (sha256, size)
    reused_shards: int = 0
    reused_units: int = 0
    lock_fd: int | None = None  # held for the whole run (the output store's lock handle)
    removed: list[str] = field(default_factory=list)  # what --overwrite deleted of a previous merge


def _unit_done(plan: Plan, state: RunState, uid: int) -> bool:
    unit = plan.units[uid]
    return uid in state.units or all(plan.shards[s].filename in state.shards for s in unit.shards)


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


class Driver:
    """Accounting shared by the in-process and Ray paths: every unit of the plan is reported exactly once."""

    def __init__(self, plan: Plan, out, state: RunState, progress: bool):
        self.store = open_store(out)  # `out`: a directory, URL or shard store (shardmerge.engine.io.stores)
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
        from shardmerge.engine.phases import phase

        phase("writing metadata", "index, config, tokenizer, model card, manifest")
        write_metadata(self.plan, self.store, self.state.shards)
