"""`scaling` benchmark: the same TIES merge run in-process and with 1, 2, ... Ray merge workers on this machine;
prints each wall time, the speedup of N workers over 1 worker, and checks that every output is byte-identical.

Models are built locally (tiny-Llama layout, sizes from the flags), so nothing is downloaded. One local Ray
instance is started first and shared by all runs, so Ray's own start-up is not timed; a run's time does include
starting its worker actors (each imports torch), reported separately as `pool_start_s` (time to the first ready
worker).

    python -m shardmerge.jobs.bench scaling [--worker-counts 1,2] [--layers 8] [--hidden 384] [--experts 2] [--repeats 1]
                                 [--chunk-mb 4] [--threads T] [--models DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_models(root: Path, *, layers: int, hidden: int, experts: int) -> Path:
    """Base + experts (float32) and a TIES recipe under root; reused when already there."""
    from shardmerge.engine.tiny_models import build_llm

    recipe = root / f"ties-L{layers}-H{hidden}-E{experts}.yaml"
    if recipe.exists():
        return recipe
    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=4096,
        tokenizer=False,
    )
    tag = f"L{layers}-H{hidden}"
    base = build_llm(root / f"base-{tag}", seed=0, max_shard_size="200MB", **shape)
    lines = [f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:"]
    for k in range(1, experts + 1):
        e = build_llm(root / f"e{k}-{tag}", base=base, perturb_seed=k, max_shard_size="200MB", tokenizer=False)
        lines.append(f"  - model: {e}\n    parameters: {{weight: {round(1.0 / experts + 0.05 * k, 3)}, density: 0.5}}")
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("model-*.safetensors"))}


def run_once(plan, out: Path, workers: int, chunk_bytes: int, threads: int | None) -> dict:
    import torch

    from shardmerge.engine.run.executor import execute

    before = torch.get_num_threads()
    if workers == 0 and threads:
        torch.set_num_threads(threads)  # the in-process run uses this process's own threads
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        s = execute(plan, out, workers=workers, chunk_bytes=chunk_bytes, progress=False, threads_per_worker=threads)
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - t0
    start = s.get("pool_start_s") or 0.0
    return {
        "workers": workers,
        "wall_s": wall,
        "pool_start_s": start,
        "merge_s": wall - start,
        "cpus_per_worker": s.get("cpus_per_worker"),
        "threads_per_worker": s.get("threads_per_worker"),
        "units": s["units"],
        "bytes": s["bytes"],
    }


def measure(
    recipe: Path, work: Path, counts: list[int], repeats: int, chunk_bytes: int, threads: int | None = None
) -> list[dict]:
    """Median of `repeats` runs per worker count (0 = in-process); every output must equal the first one."""
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    plan = build_plan(load_recipe(recipe), shard_size="50MB", source=str(recipe))
    rows, reference = [], None
    for w in counts:
        runs = [run_once(plan, work / f"out-{w}", w, chunk_bytes, threads) for _ in range(repeats)]
        shards = _shards(work / f"out-{w}")
        if reference is None:
            reference = shards
        elif shards != reference:
            raise RuntimeError(
                f"output with {w} worker(s) differs from the first run's; the merge is not "
                "deterministic across worker counts"
            )
        row = dict(
            runs[0],
            repeats=repeats,
            **{k: statistics.median(r[k] for r in runs) for k in ("wall_s", "pool_start_s", "merge_s")},
        )
        rows.append(row)
        print(f"workers={w}: {row['wall_s']:.2f} s (pool start {row['pool_start_s']:.2f} s)", file=sys.stderr)
    return rows


def report(rows: list[dict]) -> dict:
    by_w = {r["workers"]: r for r in rows}
    one = by_w.get(1)
    speedups = {w: one["wall_s"] / r["wall_s"] for w, r in by_w.items() if one and w > 1}
    merge_speedups = {w: one["merge_s"] / r["merge_s"] for w, r in by_w.items() if one and w > 1}
    return {
        "rows": rows,
        "speedup_vs_1_worker": speedups,
        "merge_speedup_vs_1_worker": merge_speedups,
        "identical_outputs": True,
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "load_avg_1min": os.getloadavg()[0],
    }


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="shardmerge bench scaling", description=__doc__.split("\n")[0])
    p.add_argument(
        "--worker-counts", dest="workers", default="1,2", help="comma-separated worker counts; 0 = in-process [1,2]"
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunk-mb", type=float, default=4.0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker, and of this process for the in-process run (default: the CPUs a "
        "worker reserves: all of them for 1 worker)",
    )
    p.add_argument("--models", default=None, help="directory to build/reuse the models in (default: a temp dir)")
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    if any(c < 0 for c in counts) or args.repeats < 1:
        raise SystemExit("--worker-counts must be >= 0 and --repeats >= 1")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    started = False
    if any(counts):
        from shardmerge.engine.run.ray_session import connect

        started = connect(None, num_cpus=os.cpu_count())
    try:
        models = Path(args.models) if args.models else work / "models"
        models.mkdir(parents=True, exist_ok=True)
        recipe = build_models(models, layers=args.layers, hidden=args.hidden, experts=args.experts)
        result = report(measure(recipe, work, counts, args.repeats, int(args.chunk_mb * 2**20), args.threads))
    finally:
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result["command"] = "python -m shardmerge.jobs.bench scaling " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    for r in result["rows"]:
        print(
            f"workers {r['workers']} ({r['threads_per_worker'] or '-'} torch threads each): {r['wall_s']:.2f} s "
            f"wall, pool start {r['pool_start_s']:.2f} s, merge after start {r['merge_s']:.2f} s, "
            f"{r['bytes'] / 2**20:.1f} MiB out"
        )
    for w, s in result["speedup_vs_1_worker"].items():
        print(
            f"speedup 1 -> {w} workers: {s:.2f}x wall, {result['merge_speedup_vs_1_worker'][w]:.2f}x after pool start"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
