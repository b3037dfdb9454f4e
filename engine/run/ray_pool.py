"""The Ray side of the executor: connect (embedded or cluster), run the merge-worker pool with backpressure,
replace dead workers and re-queue their units, finalise shards on the workers.

Workers are started asynchronously and join the pool when their `ready()` answers, so a worker that cannot be
placed yet (autoscaling, a lost node's replacement) never blocks the others. A worker that dies (actor crash, node
loss) has every unit it held re-queued at the front; the replacement re-runs them idempotently. A unit that kills
MAX_UNIT_ATTEMPTS workers is a poison pill and fails the merge instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

MAX_UNIT_ATTEMPTS = 3
POOL_TIMEOUT_S = float(os.environ.get("SHARDMERGE_POOL_TIMEOUT", "600"))  # no live worker for this long: fail
_POLL_S = 1.0


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Attach to a cluster (address or RAY_ADDRESS) or start an embedded local instance. True if we started it.
    An already initialised Ray (a test's, a notebook's, a job driver's) is reused and left running."""
    import ray

    if ray.is_initialized():
        return False
    with _keep_sigterm_handler():
        try:
            return _connect(address, num_cpus)
        except (ValueError, RuntimeError, ConnectionError):
            raise
        except (
            Exception
        ) as exc:  # Ray raises a bare Exception when its node does not come up (e.g. an overloaded machine)
            raise RuntimeError(f"could not start or reach Ray ({address or 'embedded'}): {exc}") from exc


def _connect(address: str | None, num_cpus: int | None) -> bool:
    import ray

    from shardmerge.engine.phases import phase

    address = address or os.environ.get("RAY_ADDRESS")
    phase(
        "starting Ray",
        f"connecting to {address}" if address else f"a private local instance, {num_cpus or os.cpu_count()} CPUs",
    )
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=_runtime_env(embedded=False))
        return True
    # The embedded instance is private to this merge: Ray's metrics exporter threads (whose crashes at exit printed
    # SIGSEGV/SIGABRT dumps after successful merges) are off, and its notice that token auth was enabled by default
    # (auth stays on) is not printed.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(
            address="local",  # a fresh instance: never attach to some other `ray start` cluster on this machine
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=True,
            runtime_env=_runtime_env(embedded=True),
            _system_config={"enable_metrics_collection": False},
        )
    finally:
        auth_log.setLevel(level)
    return True


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the driver's SIGTERM handler with its own `sys.exit(15)`; a SystemExit raised while the
    driver waits in `ray.wait`/`ray.get` comes out of Ray's native code as SystemExit(1), so a command's own
    handler (the CLI's: stop cleanly, say how to resume, exit 143) is put back once Ray is connected."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _runtime_env(*, embedded: bool) -> dict:
    """What the workers need to import this very `shardmerge`.

    Run from a source checkout that is not installed (`python -m jobs.merge`, e.g. under `ray job submit
    --working-dir .`), the checkout's package is copied once into a temporary `shardmerge/` folder and shipped as a
    Ray `py_modules` entry, so workers on nodes without shardmerge installed import the same code. Otherwise the
    workers import the installed package; an embedded instance also hands them the driver's PYTHONPATH."""
    import shardmerge

    checkout = getattr(shardmerge, "CHECKOUT", None)
    if checkout:
        return {"py_modules": [_stage_checkout(Path(checkout))]}
    path = os.environ.get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": path}} if embedded and path else {}


def _stage_checkout(root: Path) -> str:
    import shutil
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="shardmerge-src-")) / "shardmerge"
    dest.mkdir()
    shutil.copy2(root / "__init__.py", dest / "__init__.py")
    for sub in ("engine", "kernels", "jobs"):
        shutil.copytree(root / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


def alive_nodes() -> list[dict]:
    """Total resources of every live node."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _unwrap(exc):
    """The user-level exception inside a RayTaskError (ValueError/RuntimeError from the unit, with its message)."""
    cause = exc.as_instanceof_cause()
    return cause.cause if getattr(cause, "cause", None) else cause


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
            raise _unwrap(exc) from None
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
            raise _unwrap(exc) from None
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
    from shardmerge.engine.run.executor import placement_problem

    return placement_problem(opts, alive_nodes(), workers)


def _start_worker(
    drv,
    opts: dict,
    device: str,
    chunk_bytes: int,
    allow_nonfinite: bool,
    fault,
    threads: int,
    svd_batch_bytes: int | None = None,
):
    import ray

    from shardmerge.engine.run.worker import MergeWorker

    actor_cls = ray.remote(MergeWorker)
    return actor_cls.options(**opts).remote(
        str(drv.out),
        drv.plan.shards,
        chunk_bytes=chunk_bytes,
        device=device,
        threads=threads,
        allow_nonfinite=allow_nonfinite,
        fault=fault,
        inputs=drv.plan.inputs,
        svd_batch_bytes=svd_batch_bytes,
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
    *,
    workers: int | None,
    device: str,
    chunk_bytes: int,
    allow_nonfinite: bool,
    fault: str | None,
    address: str | None,
    memory_per_worker: int | None,
    threads: int | None = None,
    svd_batch_bytes: int | None = None,
) -> dict:
    """Run the driver's pending units on a Ray worker pool; returns pool statistics for the summary.
    `svd_batch_bytes`: the batched-SVD budget every worker uses (None: no batching; shardmerge.engine.run.memory.svd_batch_budget)."""
    import ray

    from shardmerge.engine.phases import phase
    from shardmerge.engine.run.executor import (
        MAX_INFLIGHT_PER_WORKER,
        default_worker_count,
        placement_problem,
        resource_options,
        worker_cpus,
    )

    embedded = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    started = connect(address, num_cpus=max(os.cpu_count() or 1, workers or 1) if embedded else None)
    _python_sigterm()
    try:
        nodes = alive_nodes()
        if workers is None:
            workers = default_worker_count(device, ray.cluster_resources())
        cpus = worker_cpus(device, workers, [n.get("CPU", 0) for n in nodes])
        opts = resource_options(device, cpus_per_worker=cpus, memory_bytes=memory_per_worker)
        problem = placement_problem(opts, nodes, workers)
        if problem and embedded:
            raise ValueError(problem)
        if problem:  # a cluster may grow (autoscaling); the pool starts with whatever fits
            print(f"shardmerge: warning: {problem}; waiting for resources", file=sys.stderr, flush=True)

        def spawn():
            return _start_worker(drv, opts, device, chunk_bytes, allow_nonfinite, fault, threads or 1, svd_batch_bytes)

        phase("starting workers", f"{workers} on {len(nodes)} node(s), {device}")
        pool = _Pool(drv, spawn, workers=workers, opts=opts, max_inflight=MAX_INFLIGHT_PER_WORKER)
        try:
            stats = pool.run()
        except BaseException:
            pool.abort()
            raise
        stats.update(workers=workers, cpus_per_worker=cpus, threads_per_worker=threads or 1, nodes=len(nodes))
        return stats
    finally:
        if started:
            ray.shutdown()
