"""The Ray side of the executor: size and place the merge-worker pool (pure resource functions), run it with
backpressure, replace dead workers and re-queue their units, finalise shards on the workers. Connecting is
shardmerge.engine.run.ray_session's; the accounting is the driver's (shardmerge.engine.run.driver), handed in.

Workers are started asynchronously and join the pool when their `ready()` answers, so a worker that cannot be
placed yet (autoscaling, a lost node's replacement) never blocks the others. A worker that dies (actor crash, node
loss) has every unit it held re-queued at the front; the replacement re-runs them idempotently. A unit that kills
MAX_UNIT_ATTEMPTS workers is a poison pill and fails the merge instead of looping.
"""

from __future__ import annotations

import os
import sys
import time

from shardmerge.engine.run.options import RunOptions
from shardmerge.engine.run.ray_session import alive_nodes, connect, unwrap

_unwrap = unwrap  # the name older callers import from this module

MAX_INFLIGHT_PER_WORKER = 2  # one running + one queued keeps a worker busy without hoarding units
MAX_UNIT_ATTEMPTS = 3
POOL_TIMEOUT_S = float(os.environ.get("SHARDMERGE_POOL_TIMEOUT", "600"))  # no live worker for this long: fail
_POLL_S = 1.0


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


class _Pool:
    """Event loop of the driver: pull-based scheduling with at most MAX_INFLIGHT_PER_WORKER calls per worker."""

    def __init__(self, drv, spawn, *, workers: int, opts: dict, max_inflight: int):
        self.drv, self.spawn, self.workers, self.opts = drv, spawn, workers, opts
        self.max_inflight = max_inflight
        self.spawned: list = []  # every actor this pool started (abort stops them all)
        self.starting: dict = {}  # ready() ref -> actor
        self.live: dict = {}  # actor -> {"load": int, "info": dict}
        self.inflight: dict = {}  # ref -> (kind, payload, actor)
        self.finalize_q: list = list(drv.ready_shards())
        self.attempts: dict[int, int] = {}
        self.stats = {"replaced_workers": 0, "units_by_worker": {}, "units_by_node": {}, "pool_start_s": None}
        self.t0 = self.no_worker_since = time.perf_counter()

    # -- scheduling ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        if self.stats["replaced_workers"] > 2 * self.workers + 8:
            raise RuntimeError(
                f"{self.stats['replaced_workers']} merge workers died; giving up (see the worker "
                "logs under the Ray session's logs directory for the cause)"
            )
        actor = self.spawn()
        self.spawned.append(actor)
        self.starting[actor.ready.remote()] = actor

    def submit(self) -> None:
        for actor, slot in self.live.items():
            while slot["load"] < self.max_inflight and (self.finalize_q or self.drv.pending):
                if self.finalize_q:
                    shard = self.finalize_q.pop(0)
                    self.inflight[actor.finalize.remote(shard)] = ("shard", shard, actor)
                else:
                    uid = self.drv.pending.popleft()
                    self.inflight[actor.run.remote(self.drv.plan.units[uid], self.drv.skip(uid))] = ("unit", uid, actor)
                slot["load"] += 1

    def done(self) -> bool:
        return not (self.drv.pending or self.finalize_q or self.inflight)

    def run(self) -> dict:
        import ray

        self.start()
        while not self.done():
            ready, _ = ray.wait(list(self.inflight) + list(self.starting), num_returns=1, timeout=_POLL_S)
            if not ready:
                self._watchdog()
                continue
            ref = ready[0]
            if ref in self.starting:
                self._on_ready(ref, self.starting.pop(ref))
            else:
                self._on_result(ref, *self.inflight.pop(ref))
            if self.live:
                self.no_worker_since = time.perf_counter()
            self.submit()
        return self._shutdown()

    # -- events ----------------------------------------------------------------------------------------------------
    def _on_ready(self, ref, actor) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            info = ray.get(ref)
        except RayTaskError as exc:  # the worker's own check failed (e.g. it cannot see the shared storage)
            raise unwrap(exc) from None
        except RayActorError as exc:
            if exc.actor_init_failed:
                raise RuntimeError(f"a merge worker failed to start: {exc}") from None
            self.stats["replaced_workers"] += 1  # lost while starting (node loss): start another
            self._spawn()
            return
        self.live[actor] = {"load": 0, "info": info}
        if self.stats["pool_start_s"] is None:
            self.stats["pool_start_s"] = time.perf_counter() - self.t0
            self.drv.bar.begin()  # the first worker is up: merging starts, and so does the rate's clock
        self._show()

    def _on_result(self, ref, kind: str, payload, actor) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            result = ray.get(ref)
        except RayTaskError as exc:  # the method/IO raised: a real error, not a lost worker
            raise unwrap(exc) from None
        except RayActorError:
            self._lost(actor, (ref, kind, payload))
            return
        self._accept(kind, result, actor)

    def _accept(self, kind: str, result, actor) -> None:
        slot = self.live[actor]
        slot["load"] -= 1
        if kind == "unit":
            node = slot["info"]["node"]
            by_w, by_n = self.stats["units_by_worker"], self.stats["units_by_node"]
            by_w[result.worker] = by_w.get(result.worker, 0) + 1
            by_n[node] = by_n.get(node, 0) + 1
            self.finalize_q.extend(self.drv.unit_finished(result, node=node))
        else:
            self.drv.shard_finished(*result)

    def _lost(self, dead, failed) -> None:
        """A worker died: keep the results it did deliver, re-queue everything else it held, start a replacement."""
        import ray
        from ray.exceptions import RayError

        if dead not in self.live:
            return
        held = [(r, k, p) for r, (k, p, a) in self.inflight.items() if a is dead]
        for r, _, _ in held:
            self.inflight.pop(r)
        finished, _ = ray.wait([r for r, _, _ in held], num_returns=len(held), timeout=0) if held else ([], [])
        requeue = [failed]
        for r, k, p in held:
            try:
                result = ray.get(r, timeout=0) if r in finished else None
            except RayError:
                result = None
            if result is None:
                requeue.append((r, k, p))
            else:
                self._accept(k, result, dead)
        for _, kind, payload in reversed(requeue):
            self._requeue(kind, payload)
        del self.live[dead]
        ray.kill(dead, no_restart=True)  # a merely unreachable worker must not keep writing
        self.stats["replaced_workers"] += 1
        self._spawn()
        self._show()

    def _requeue(self, kind: str, payload) -> None:
        if kind == "shard":
            self.finalize_q.insert(0, payload)
            return
        n = self.attempts[payload] = self.attempts.get(payload, 0) + 1
        if n >= MAX_UNIT_ATTEMPTS:
            unit = self.drv.plan.units[payload]
            raise RuntimeError(
                f"work unit {payload} ({unit.key}) was running on {n} workers that all died; "
                "it likely exhausts the worker's memory (lower --chunk-mb or raise "
                "--max-memory-per-worker) or crashes the process"
            )
        self.drv.pending.appendleft(payload)

    def _watchdog(self) -> None:
        if self.live:
            self.no_worker_since = time.perf_counter()
            return
        waited = time.perf_counter() - self.no_worker_since
        if waited > POOL_TIMEOUT_S:
            problem = placement_note(self.opts, self.workers) or "the cluster has the resources but none started"
            raise RuntimeError(f"no merge worker has been running for {waited:.0f} s: {problem}")

    def _show(self) -> None:
        nodes = {s["info"]["node"] for s in self.live.values()}
        self.drv.bar.workers(len(self.live), len(nodes), self.stats["replaced_workers"])

    def abort(self) -> None:
        """After an error: stop every worker of this pool, so none keeps writing or holding cluster resources."""
        import ray

        for actor in self.spawned:
            ray.kill(actor, no_restart=True)

    def _shutdown(self) -> dict:
        import ray
        from ray.exceptions import RayError

        for actor in self.starting.values():  # replacements that were never needed (or never placed)
            ray.kill(actor, no_restart=True)
        per_worker = []
        for actor, slot in self.live.items():
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
                per_worker.append(dict(ray.get(actor.stats.remote(), timeout=60), node=slot["info"]["node"]))
            except RayError:
                pass  # died after its last unit: its results are already accounted
            ray.kill(actor, no_restart=True)
        self.stats["worker_stats"] = per_worker
        return self.stats


def placement_note(opts: dict, workers: int) -> str | None:
    return placement_problem(opts, alive_nodes(), workers)


def _start_worker(drv, actor_opts: dict, run_opts: RunOptions, fault: str | None):
    import ray

    from shardmerge.engine.run.worker import MergeWorker

    actor_cls = ray.remote(MergeWorker)
    return actor_cls.options(**actor_opts).remote(
        str(drv.out), drv.plan.shards, run_opts, inputs=drv.plan.inputs, fault=fault
    )


def _python_sigterm() -> None:
    """Give SIGTERM back to Python's handler (Ray's native crash handler takes it over at init and aborts the
    process after it), so the driver stops like on Ctrl-C: workers cancelled, state kept for --resume."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def run_on_ray(
    drv,
    opts: RunOptions,
    *,
    workers: int | None,
    address: str | None,
    memory_per_worker: int | None,
    fault: str | None = None,
) -> dict:
    """Run the pending units of `drv` (a shardmerge.engine.run.driver.Driver) on a Ray worker pool, every worker
    with the same `opts`; returns pool
    statistics for the summary. `fault`: the test hook the executor read from SHARDMERGE_FAULT
    (shardmerge.engine.run.worker.fault_from_env), handed to every worker started."""
    import ray

    from shardmerge.engine.phases import phase

    embedded = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    started = connect(address, num_cpus=max(os.cpu_count() or 1, workers or 1) if embedded else None)
    _python_sigterm()
    try:
        nodes = alive_nodes()
        if workers is None:
            workers = default_worker_count(opts.device, ray.cluster_resources())
        cpus = worker_cpus(opts.device, workers, [n.get("CPU", 0) for n in nodes])
        actor_opts = resource_options(opts.device, cpus_per_worker=cpus, memory_bytes=memory_per_worker)
        problem = placement_problem(actor_opts, nodes, workers)
        if problem and embedded:
            raise ValueError(problem)
        if problem:  # a cluster may grow (autoscaling); the pool starts with whatever fits
            print(f"shardmerge: warning: {problem}; waiting for resources", file=sys.stderr, flush=True)

        def spawn():
            return _start_worker(drv, actor_opts, opts, fault)

        phase("starting workers", f"{workers} on {len(nodes)} node(s), {opts.device}")
        pool = _Pool(drv, spawn, workers=workers, opts=actor_opts, max_inflight=MAX_INFLIGHT_PER_WORKER)
        try:
            stats = pool.run()
        except BaseException:
            pool.abort()
            raise
        stats.update(workers=workers, cpus_per_worker=cpus, threads_per_worker=opts.threads, nodes=len(nodes))
        return stats
    finally:
        if started:
            ray.shutdown()
