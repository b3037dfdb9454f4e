"""`floor` benchmark: how close a merge comes to the hardware floor of the same job, measured in the same run.

floor = seconds to read every input byte (page cache; positioned reads, as the engine does) + seconds to write the
output's bytes to a new file and fsync it. A merge cannot be faster than that without skipping work.
For each method it prints the sustained merge time (wall minus Ray's fixed cost, see bench_mergekit) through Ray
workers, the in-process time (workers=0: no Ray at all), and both divided by the floor. Target for linear: ≤ 1.7×.

    python -m shardmerge.jobs.bench floor [--size-gb 1.1] [--models 3] [--methods linear] [--workers N] [--threads T]
                               [--chunk-mb 64] [--models-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from shardmerge.jobs.bench_common import (
    dir_bytes,
    floor_seconds,
    print_machine,
    run_child,
    shardmerge_cmd,
)
from shardmerge.jobs.bench_mergekit import METHODS, make_models, recipes


def merge_seconds(recipe: Path, out: Path, workers: int | None, chunk_mb: float, threads: int | None = None) -> dict:
    """One shardmerge run in a fresh process: sustained seconds (wall - Ray fixed cost) and the output size."""
    r = run_child(shardmerge_cmd(recipe, out, workers=workers, chunk_mb=chunk_mb, threads=threads))
    t = r.last_json()
    out_bytes = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    fixed = t["ray_up_s"] + t["pool_start_s"] + t["ray_down_s"]
    return {
        "wall_s": r.wall_s,
        "fixed_s": fixed,
        "sustained_s": r.wall_s - fixed,
        "merge_s": t["merge_s"],
        "out_bytes": out_bytes,
    }


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="shardmerge bench floor", description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.1)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--methods", default="linear", help=f"comma-separated, from {','.join(METHODS)}")
    options.add_workers(p, "as `shardmerge merge` chooses, for the Ray run")
    p.add_argument("--chunk-mb", type=float, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads per Ray worker (default: its CPUs)")
    p.add_argument("--models-dir", default=None)
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        p.error(f"unknown method(s) {sorted(set(methods) - set(METHODS))}; choose from {', '.join(METHODS)}")
    machine = print_machine()
    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="sm-floor-"))
    work = Path(tempfile.mkdtemp(prefix="sm-floor-work-"))
    results = []
    try:
        dirs = make_models(root, args.models, args.size_gb)
        for method in methods:
            (work / "r.yaml").write_text(recipes(dirs, method)[1])
            ray_run = merge_seconds(work / "r.yaml", work / "out", args.workers, args.chunk_mb, args.threads)
            local = merge_seconds(work / "r.yaml", work / "out", 0, args.chunk_mb)
            fl = floor_seconds(dirs, ray_run["out_bytes"], work)
            results.append({"method": method, "ray": ray_run, "in_process": local, "floor": fl})
            print(
                f"{method:<16} floor {fl['floor_s']:.2f} s (read {fl['in_bytes'] / 1e9:.2f} GB {fl['read_s']:.2f} s"
                f" + write+fsync {fl['out_bytes'] / 1e9:.2f} GB {fl['write_fsync_s']:.2f} s) | Ray: sustained "
                f"{ray_run['sustained_s']:.2f} s = {ray_run['sustained_s'] / fl['floor_s']:.2f}x floor (wall "
                f"{ray_run['wall_s']:.1f} s, fixed {ray_run['fixed_s']:.1f} s) | in-process: wall "
                f"{local['wall_s']:.2f} s, merge {local['merge_s']:.2f} s = {local['merge_s'] / fl['floor_s']:.2f}x "
                "floor",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=1)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.models_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
