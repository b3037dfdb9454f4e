"""Ray data parallelism for the probe: N actors, each holding one model replica, pulling shards until none are left.

Every shard is accounted exactly once: a shard reported twice, or never, is a RuntimeError. Resource requests come
from `actor_options`, a pure function tested without a cluster. The GPU case asks for one whole GPU per actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from shardmerge.engine.probe.readers import Shard
from shardmerge.engine.probe.worker import ShardProber, ShardResult, WorkerSettings

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str, cluster_gpus: float) -> str:
    """auto -> cuda when the cluster has a GPU, else cpu; cuda without a GPU is a configuration error."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "auto":
        return "cuda" if cluster_gpus >= 1 else "cpu"
    if requested == "cuda" and cluster_gpus < 1:
        raise ValueError("device 'cuda' requested but the Ray cluster reports no GPU; use --device cpu or auto")
    return requested


def actor_options(device: str, *, cpus_per_actor: float = 1.0) -> dict:
    """Ray resource options of one probe actor: one GPU (+ CPUs for tokenising/decoding) or CPUs only."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"actor device must be 'cpu' or 'cuda' (resolve 'auto' first), got {device!r}")
    if cpus_per_actor <= 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
    return {"num_cpus": cpus_per_actor, "num_gpus": 1 if device == "cuda" else 0, "max_restarts": 0}


def num_actors(workers: int, num_shards: int) -> int:
    """No more actors than shards (an idle replica only costs memory)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, min(workers, num_shards))


class _ProbeActor:
    """Ray actor body: one ShardProber (model replica) per actor."""

    def __init__(self, settings: WorkerSettings):
        self.prober = ShardProber(settings)

    def run(self, shard: Shard) -> ShardResult:
        return self.prober.run(shard)

    def shutdown(self) -> None:
        self.prober.shutdown()


def collect(results: Sequence[ShardResult], shards: Sequence[Shard]) -> list[ShardResult]:
    """Results in shard order; a shard missing or reported twice is a RuntimeError."""
    seen: dict[int, ShardResult] = {}
    for r in results:
        if r.index in seen:
            raise RuntimeError(f"probe shard {r.index} reported twice; every shard must be accounted exactly once")
        seen[r.index] = r
    expected = {s.index for s in shards}
    missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
    if missing or extra:
        raise RuntimeError(f"probe shards missing {missing} / unknown {extra}; every shard must be accounted once")
    return [seen[s.index] for s in shards]


def run_local(
    settings: WorkerSettings, shards: Sequence[Shard], progress: Callable[[ShardResult], None] | None = None
) -> list[ShardResult]:
    """All shards in this process, one replica (no Ray)."""
    prober = ShardProber(settings)
    try:
        results = []
        for shard in shards:
            results.append(prober.run(shard))
            if progress:
                progress(results[-1])
        return collect(results, shards)
    finally:
        prober.shutdown()


def run_ray(
    settings: WorkerSettings,
    shards: Sequence[Shard],
    workers: int,
    *,
    cpus_per_actor: float = 1.0,
    progress: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Shards spread over `workers` actors on the connected Ray cluster; each actor pulls its next shard when done."""
    import ray

    actor_cls = ray.remote(_ProbeActor)
    opts = actor_options(settings.device, cpus_per_actor=cpus_per_actor)
    actors = [actor_cls.options(**opts).remote(settings) for _ in range(num_actors(workers, len(shards)))]
    pending, results, queue = {}, [], list(shards)
    try:
        for actor in actors:
            if queue:
                pending[actor.run.remote(queue.pop(0))] = actor
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            results.append(ray.get(done[0]))
            if progress:
                progress(results[-1])
            if queue:
                pending[actor.run.remote(queue.pop(0))] = actor
        return collect(results, shards)
    finally:
        for actor in actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception as exc:  # a dead actor cannot shut down; say so, then let Ray reap it
                log.warning("probe actor shutdown failed: %s", exc)
            ray.kill(actor)
