"""The Ray side of the executor: connect (embedded or cluster), start the worker pool, schedule units with
backpressure, replace dead workers and re-queue their units, finalise shards on the workers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def connect(address: Optional[str] = None, *, num_cpus: Optional[int] = None) -> bool:
    """Attach to a cluster (address or RAY_ADDRESS) or start an embedded local instance. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    path = os.environ.get("PYTHONPATH", "")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else "")}},
    )
    return True


def _cpus_per_worker(workers: int, device: str) -> int:
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    return 1 if device == "cuda" else max(1, total // workers)


def _start_worker(drv, opts: dict, device: str, chunk_bytes: int, allow_nonfinite: bool, fault, threads: int):
    import ray

    from engine.worker import MergeWorker

    actor_cls = ray.remote(MergeWorker)
    return actor_cls.options(**opts).remote(str(drv.out), drv.plan.shards, chunk_bytes=chunk_bytes, device=device,
                                            threads=threads, allow_nonfinite=allow_nonfinite, fault=fault)


def run_on_ray(drv, *, workers: int, device: str, chunk_bytes: int, allow_nonfinite: bool, fault: Optional[str],
               address: Optional[str], memory_per_worker: Optional[int]) -> dict:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from engine.executor import MAX_INFLIGHT_PER_WORKER, resource_options

    started = connect(address, num_cpus=max(os.cpu_count() or 1, workers) if not address else None)
    try:
        cpus = _cpus_per_worker(workers, device) if device == "cpu" else 1
        opts = resource_options(device, cpus_per_worker=cpus, memory_bytes=memory_per_worker)

        def spawn():
            return _start_worker(drv, opts, device, chunk_bytes, allow_nonfinite, fault, cpus)

        pool = [spawn() for _ in range(workers)]
        t_ready = time.perf_counter()
        ray.get([a.ready.remote() for a in pool])
        stats = {"pool_start_s": time.perf_counter() - t_ready, "replaced_workers": 0, "units_by_worker": {}}
        inflight: dict = {}  # ObjectRef -> (kind, payload, actor)
        load = {a: 0 for a in pool}
        finalize_q = list(drv.ready_shards())

        def submit() -> None:
            for actor in list(load):
                while load[actor] < MAX_INFLIGHT_PER_WORKER and (finalize_q or drv.pending):
                    if finalize_q:
                        shard = finalize_q.pop(0)
                        inflight[actor.finalize.remote(shard)] = ("shard", shard, actor)
                    else:
                        uid = drv.pending.popleft()
                        ref = actor.run.remote(drv.plan.units[uid], drv.skip(uid))
                        inflight[ref] = ("unit", uid, actor)
                    load[actor] += 1

        submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            kind, payload, actor = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as exc:  # the method/IO raised: a real error, not a lost worker
                cause = exc.as_instanceof_cause()
                raise (cause.cause if getattr(cause, "cause", None) else cause) from None
            except RayActorError:
                _requeue(kind, payload, drv, finalize_q)
                _replace(actor, load, inflight, drv, finalize_q, spawn, stats)
                submit()
                continue
            load[actor] -= 1
            if kind == "unit":
                stats["units_by_worker"][result.worker] = stats["units_by_worker"].get(result.worker, 0) + 1
                finalize_q.extend(drv.unit_finished(result))
            else:
                drv.shard_finished(*result)
            submit()
        ray.get([a.shutdown.remote() for a in load])
        for a in load:
            ray.kill(a)
        return stats
    finally:
        if started:
            ray.shutdown()


def _replace(dead, load: dict, inflight: dict, drv, finalize_q: list, spawn, stats: dict) -> None:
    """A worker died: re-queue everything it held (front of the queue) and start a replacement."""
    import ray

    if dead not in load:
        return
    for ref, (kind, payload, actor) in list(inflight.items()):
        if actor is dead:
            inflight.pop(ref)
            _requeue(kind, payload, drv, finalize_q)
    del load[dead]
    fresh = spawn()
    ray.get(fresh.ready.remote())
    load[fresh] = 0
    stats["replaced_workers"] += 1


def _requeue(kind: str, payload, drv, finalize_q: list) -> None:
    if kind == "shard":
        finalize_q.append(payload)
    else:
        drv.pending.appendleft(payload)
