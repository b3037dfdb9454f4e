"""The merge-worker role: one per GPU (or per CPU slot); pulls work units from the driver and writes shards.

Heavy state (device, thread count, CUDA context) is built once in __init__. The actor is created with
max_restarts=0: a dead worker is replaced by the driver, which re-queues its in-flight units. Re-running a unit is
idempotent (it rewrites the same bytes at the same offsets of the shard's temp file) and so is re-running a shard's
finalisation (temp file + fsync + atomic rename; a rename that already happened is recognised).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from shardmerge.engine.io.stores import is_url, open_store
from shardmerge.engine.run.options import RunOptions
from shardmerge.engine.run.unit import UnitResult, run_unit, tune_allocator

_KINDS = ("crash", "crash-after", "sleep")
FAULT_ENV = "SHARDMERGE_FAULT"


def fault_from_env() -> str | None:
    """The fault-injection spec of this run: the driver's environment variable SHARDMERGE_FAULT (docs/cluster.md
    "Testing hooks"), parsed here so that a malformed spec fails the merge before anything is written or started.
    Tests set it; no public signature carries it."""
    spec = os.environ.get(FAULT_ENV) or None
    FaultInjector(spec)
    return spec


class FaultInjector:
    """Test hook, comma-separated rules (the driver reads them from env SHARDMERGE_FAULT, `fault_from_env`):

    - `crash:<token file>:<k>`: the first worker to reach its k-th unit exits hard (os._exit) before running it,
      once per token file (created atomically), as a crashing process or a lost node would;
    - `crash-after:<token file>:<k>`: the same, but after the k-th unit's bytes are written and fsync'ed and before
      its result reaches the driver (the rerun must be idempotent and the unit still counted once);
    - `sleep:<seconds>`: every unit sleeps first (slow merges for driver-kill and node-loss tests).
    """

    def __init__(self, spec: str | None):
        self.rules: list[tuple[str, Path | None, float]] = []
        for part in filter(None, (spec or "").split(",")):
            kind, _, rest = part.partition(":")
            if kind not in _KINDS or not rest:
                raise ValueError(
                    f"fault spec {part!r}: expected crash:<token file>:<k>, crash-after:<token "
                    "file>:<k> or sleep:<seconds>"
                )
            try:
                if kind == "sleep":
                    self.rules.append((kind, None, float(rest)))
                else:
                    token, _, k = rest.rpartition(":")
                    if not token:
                        raise ValueError
                    self.rules.append((kind, Path(token), int(k)))
            except ValueError:
                raise ValueError(f"fault spec {part!r}: bad number or missing token file") from None

    def _fire(self, kind: str, count: int) -> None:
        for rule, token, k in self.rules:
            if rule != kind or count + 1 < k:
                continue
            try:
                fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            os._exit(17)

    def before_unit(self, count: int) -> None:
        for rule, _, seconds in self.rules:
            if rule == "sleep":
                time.sleep(seconds)
        self._fire("crash", count)

    def after_unit(self, count: int) -> None:
        self._fire("crash-after", count)


def finalize_idempotent(out, shard) -> tuple[str, int]:
    """Publish a shard through the output's store; a shard that a previous attempt (by a worker that died before
    replying) already published is recognised and its (sha256, size) returned."""
    return open_store(out).publish(shard)


class MergeWorker:
    """Ray actor: merges work units into shard temp files and publishes finished shards."""

    def __init__(
        self,
        out: str,
        shards,
        opts: RunOptions,
        *,
        inputs: tuple[str, ...] = (),
        fault: str | None = None,
    ):
        """`opts`: the driver's RunOptions, used as given for every unit; `fault`: the driver's fault-injection
        spec (`fault_from_env`), None outside tests."""
        import torch

        from shardmerge.engine import methods

        methods.names()  # import every method module now, not inside the first unit
        tune_allocator()
        torch.set_num_threads(opts.threads)
        if opts.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"worker on {socket.gethostname()}: --device cuda but no CUDA device is visible")
            torch.cuda.init()
        self.out, self.shards, self.opts, self.inputs = out, shards, opts, tuple(inputs)
        self.fault = FaultInjector(fault)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.count = 0
        self.busy_s = 0.0

    def ready(self) -> dict:
        """Who and where this worker is; fails if this node cannot see the inputs or the output directory."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        where = f"merge worker on host {socket.gethostname()} (node {node[:12]})"
        store = open_store(self.out)
        problem = store.reachable_problem()
        if problem:
            raise RuntimeError(
                f"{where} cannot reach the output {store.url}: {problem}"
                + (
                    ""
                    if not store.local
                    else "; a directory --out must be on storage every node mounts at the same path"
                )
            )
        for path in self.inputs:
            if is_url(path):
                from shardmerge.engine.io.remote import reachable_problem

                problem = reachable_problem(path)
                if problem:
                    raise RuntimeError(f"{where} cannot read the input {path}: {problem}")
            elif not os.path.isdir(path):
                raise RuntimeError(
                    f"{where} cannot see {path}: a directory input must be on storage every node mounts at the "
                    "same path (a shared filesystem), or be read from object storage (s3://...)"
                )
        return {"name": self.name, "node": node, "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, unit, skip_shards: frozenset = frozenset()) -> UnitResult:
        self.fault.before_unit(self.count)
        t0 = time.perf_counter()
        res = run_unit(unit, self.shards, self.out, self.opts, worker=self.name, skip_shards=skip_shards)
        self.busy_s += time.perf_counter() - t0
        self.fault.after_unit(self.count)
        self.count += 1
        return res

    def finalize(self, shard) -> tuple[str, str, int]:
        sha, size = finalize_idempotent(self.out, shard)
        return shard.filename, sha, size

    def stats(self) -> dict:
        """Units run, busy seconds and peak resident memory of this worker process."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"name": self.name, "units": self.count, "busy_s": round(self.busy_s, 3), "peak_rss": peak}

    def shutdown(self) -> None:
        from shardmerge.engine.io.checkpoint import close_cached_files

        close_cached_files()
