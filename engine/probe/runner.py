"""The probe job: benchmark shards -> probe workers (in-process or Ray actors) -> probe.parquet, probe.json,
probe.png (+ focus.parquet / focus.json / focus_<id>.png with attention analysis).

probe.parquet has one row per (sample, cut), sorted by benchmark, row, cut, so that the file does not depend on the
number of workers or on which worker probed which shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shardmerge.engine.probe import actors, plateau, plots, readers
from shardmerge.engine.probe.worker import ShardResult, WorkerSettings

log = logging.getLogger(__name__)
METRICS = {"accuracy": "correct", "logprob": "gold_logprob", "kl": "kl"}
COLUMNS = (
    "benchmark",
    "row",
    "id",
    "group",
    "category",
    "kind",
    "cut",
    "num_layers",
    "seq_len",
    "n_image_tokens",
    "pred",
    "gold",
    "correct",
    "gold_logprob",
    "kl",
    "kl_vocab",
)


@dataclass(frozen=True)
class ProbeJob:
    """A whole probe run (what `shardmerge probe` parses its arguments into)."""

    benches: tuple
    out: str
    worker: WorkerSettings
    workers: int = 1
    metric: str = "accuracy"
    fmt: str = "auto"
    rows_per_shard: int = 16
    limit: int | None = None  # at most this many rows per benchmark file
    address: str | None = None  # Ray address; None: RAY_ADDRESS or a local Ray (workers > 0)
    use_ray: bool = True  # False: everything in this process
    cpus_per_actor: float = 1.0
    n_boot: int = 1000
    delta: float = 0.1
    epsilon: float = 0.05
    seed: int = 0
    pooling: str = "macro"  # macro: each benchmark weighs the same; samples: each sample does

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.pooling not in plateau.POOLINGS:
            raise ValueError(f"pooling must be one of {plateau.POOLINGS}, got {self.pooling!r}")


def _start_ray(job: ProbeJob) -> bool:
    """Connect the way a merge does (shardmerge.engine.run.ray_session.connect): --address, RAY_ADDRESS, else a fresh local Ray
    (never a stale or running `ray start` cluster of this machine); True when this call started it."""
    from shardmerge.engine.run.ray_session import connect

    return connect(job.address, num_cpus=max(1, int(job.workers * job.cpus_per_actor)))


def run_shards(job: ProbeJob, shards: list) -> tuple[list[ShardResult], str]:
    """Probe every shard; returns the results in shard order and the device used."""

    def progress(r: ShardResult) -> None:
        log.info("probe shard %d: %d rows, %d bad, %.1fs", r.index, len(r.rows), len(r.bad), r.seconds)

    if not job.use_ray:
        device = actors.resolve_device(job.worker.device, 1 if _local_gpu() else 0)
        settings = _with_device(job.worker, device)
        return actors.run_local(settings, shards, progress), device
    import ray

    started = _start_ray(job)
    try:
        device = actors.resolve_device(job.worker.device, ray.cluster_resources().get("GPU", 0))
        settings = _with_device(job.worker, device)
        return actors.run_ray(
            settings, shards, job.workers, cpus_per_actor=job.cpus_per_actor, progress=progress
        ), device
    finally:
        if started:
            ray.shutdown()


def _local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _with_device(settings: WorkerSettings, device: str) -> WorkerSettings:
    return dataclasses.replace(settings, device=device)


def rows_table(results: list[ShardResult]):
    """All per-(sample, cut) rows as one Arrow table in canonical order."""
    import pyarrow as pa

    rows = sorted((r for res in results for r in res.rows), key=lambda r: (r["benchmark"], r["row"], r["cut"]))
    schema = pa.schema(
        [
            ("benchmark", pa.string()),
            ("row", pa.int64()),
            ("id", pa.string()),
            ("group", pa.string()),
            ("category", pa.string()),
            ("kind", pa.string()),
            ("cut", pa.int64()),
            ("num_layers", pa.int64()),
            ("seq_len", pa.int64()),
            ("n_image_tokens", pa.int64()),
            ("pred", pa.string()),
            ("gold", pa.string()),
            ("correct", pa.bool_()),
            ("gold_logprob", pa.float64()),
            ("kl", pa.float64()),
            ("kl_vocab", pa.float64()),
        ]
    )
    return pa.table({c: [r[c] for r in rows] for c in COLUMNS}, schema=schema)


def metric_matrix(table, metric: str, benchmark: str | None = None) -> tuple[np.ndarray, list]:
    """(n_samples, n_cuts) metric values and the cut list, for one benchmark or all pooled."""
    values, cuts, _, _ = sample_matrix(table, metric, benchmark)
    return values, cuts


def sample_matrix(table, metric: str, benchmark: str | None = None):
    """Metric values (n_samples, n_cuts), the cuts, and each sample's resampling group and benchmark."""
    col = METRICS[metric]
    data = table.to_pydict()
    group_col = data.get("group") or data["id"]
    cells: dict = {}
    labels: dict = {}
    for b, r, g, c, v in zip(data["benchmark"], data["row"], group_col, data["cut"], data[col]):
        if benchmark is None or b == benchmark:
            cells.setdefault((b, r), {})[c] = float(v)
            labels[(b, r)] = g
    if not cells:
        raise ValueError(f"no probe rows{' for benchmark ' + repr(benchmark) if benchmark else ''}; nothing to fit")
    cuts = sorted({c for per in cells.values() for c in per})
    incomplete = [k for k, per in cells.items() if len(per) != len(cuts)]
    if incomplete:
        raise RuntimeError(f"samples {incomplete[:5]} lack some of the cuts {cuts}; every sample needs every cut")
    keys = sorted(cells)
    values = np.array([[cells[k][c] for c in cuts] for k in keys])
    return values, cuts, [f"{k[0]}/{labels[k]}" for k in keys], [k[0] for k in keys]


def analyse(table, job: ProbeJob) -> tuple[plateau.Plateau, dict]:
    """Pooled (macro or sample pooling) and per-benchmark stages/plateau, resampling by question group/image."""
    kw = dict(delta=job.delta, epsilon=job.epsilon, n_boot=job.n_boot, seed=job.seed)
    values, cuts, groups, strata = sample_matrix(table, job.metric)
    pooled = plateau.find_plateau(values, cuts, groups=groups, strata=strata, pooling=job.pooling, **kw)
    per = {}
    for b in sorted(set(strata)):
        v, c, g, _ = sample_matrix(table, job.metric, b)
        per[b] = plateau.find_plateau(v, c, groups=g, **kw)
    return pooled, per


def run_probe(job: ProbeJob) -> dict:
    """Run the probe and write its outputs into job.out; returns the probe.json content."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = readers.plan_shards(job.benches, job.fmt, job.rows_per_shard, job.limit)
    if not shards:
        raise ValueError(f"benchmarks {list(job.benches)} hold no rows")
    results, device = run_shards(job, shards)
    table = rows_table(results)
    bad = sorted((b for r in results for b in r.bad), key=lambda b: (b["benchmark"], b["row"]))
    if table.num_rows == 0:
        raise RuntimeError(f"every sample was a bad row ({len(bad)}); first reasons: {bad[:3]}")
    pq.write_table(table, out / "probe.parquet")
    pooled, per = analyse(table, job)
    plots.plot_curve(out / "probe.png", pooled, per, metric=job.metric, model=job.worker.model)
    summary = _summary(job, device, table, bad, pooled, per, time.perf_counter() - t0)
    if job.worker.attention:
        summary["attention"] = _write_focus(out, results, job.worker.attention_sample, model=job.worker.model)
    for warning in [pooled.warning] + [p.warning for p in per.values()]:
        if warning:
            log.warning("probe: %s", warning)
    (out / "probe.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(job, device, table, bad, pooled, per, seconds) -> dict:
    n_samples = len({(b, r) for b, r in zip(table.column("benchmark").to_pylist(), table.column("row").to_pylist())})
    worker = asdict(job.worker)
    return {
        "model": job.worker.model,
        "metric": job.metric,
        "num_layers": int(table.column("num_layers")[0].as_py()),
        "cuts": list(pooled.cuts),
        "plateau_start": pooled.plateau_start,
        "plateau_start_ci": pooled.plateau_start_ci,
        "stages": {"early": pooled.early, "mid": pooled.mid, "late": pooled.late},
        "pooled": pooled.to_json(),
        "benchmarks": {b: p.to_json() for b, p in per.items()},
        "warnings": [w for w in [pooled.warning] + [f"{b}: {p.warning}" for b, p in per.items() if p.warning] if w],
        "samples": n_samples,
        "bad_rows": {"count": len(bad), "rows": bad},
        "settings": {
            "benches": [str(b) for b in job.benches],
            "workers": job.workers,
            "device": device,
            "format": job.fmt,
            "rows_per_shard": job.rows_per_shard,
            "limit": job.limit,
            "bootstrap": job.n_boot,
            "pooling": job.pooling,
            "delta": job.delta,
            "epsilon": job.epsilon,
            "seed": job.seed,
            "ci_level": plateau.CI_LEVEL,
            "worker": worker,
        },
        "seconds": round(seconds, 3),
    }


def _write_focus(out: Path, results: list[ShardResult], wanted: str | None, model: str | None = None) -> dict:
    """focus.parquet (per sample x layer), per-benchmark mean mass/entropy per layer, and one heat map."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted((r for res in results for r in res.focus_rows), key=lambda r: (r["benchmark"], r["row"], r["layer"]))
    if not rows:
        return {"samples": 0}
    pq.write_table(pa.Table.from_pylist(rows), out / "focus.parquet")
    means: dict = {}
    for r in rows:
        means.setdefault(r["benchmark"], {}).setdefault(r["layer"], []).append((r["mass"], r["entropy"]))
    summary = {
        b: {
            "mass": [float(np.mean([v[0] for v in per[k]])) for k in sorted(per)],
            "entropy": [float(np.mean([v[1] for v in per[k]])) for k in sorted(per)],
        }
        for b, per in means.items()
    }
    heats = [res.heatmap for res in results if res.heatmap is not None]
    info = {"samples": len({(r["benchmark"], r["row"]) for r in rows}), "per_benchmark": summary, "heatmap": None}
    if not heats:
        info["warning"] = f"no heat map: sample {wanted!r} was not probed (unknown id, or a bad row)"
        log.warning("probe attention: %s", info["warning"])
    else:
        h = min(heats, key=lambda x: (x["benchmark"], x["row"]))
        png = out / f"focus_{_safe(h['id'])}.png"
        plots.plot_focus(
            png,
            h["image"],
            h["per_token"],
            h["grid"],
            h["mass"],
            h["entropy"],
            sample=h["id"],
            model=model,
            benchmark=h["benchmark"],
        )
        info["heatmap"] = {"sample": h["id"], "benchmark": h["benchmark"], "file": png.name, "grid": list(h["grid"])}
    (out / "focus.json").write_text(json.dumps(info, indent=2))
    return info


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:64]
