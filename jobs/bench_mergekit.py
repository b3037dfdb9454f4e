"""`vs-mergekit` benchmark: the same recipes through mergekit-yaml and shardmerge on the same checkpoints,
alternating runs, each in a fresh process; prints wall time, shardmerge's fixed Ray cost, sustained time, max RSS,
peak private memory, minor page faults per GB written, the ratios, each method's I/O floor and the load average.

    python -m shardmerge.jobs.bench vs-mergekit [--size-gb 1.1] [--models 3] [--methods linear,ties,dare_ties,slerp]
    (--methods also takes task_arithmetic, della, della_linear, sce, ram, ramplus_tl)
                                     [--repeats 1] [--workers N] [--threads T] [--chunk-mb 64] [--models-dir DIR]
                                     [--json FILE]

Checkpoints: K random Llama-shaped bf16 checkpoints (jobs/bench_common.py; K-1 experts = base + noise), sharded
at 2 GB, generated in a temp dir (or --models-dir, kept) and read once before timing so both tools start from the
page cache. Recipes compute in float32 and write bfloat16 (`dtype: float32`, `out_dtype: bfloat16`) for both tools.
dare_ties: mergekit rescales survivors to the L1 norm; shardmerge is given `rescale_rule: l1` so it does the same
work (one more pass over the tensor); the masks come from different RNGs, as documented in engine/methods/dare.py.

Definitions (per run):
- wall: the whole command, interpreter start to exit (imports, planning, Ray start and stop included);
- fixed: shardmerge's Ray cost that does not depend on the model size: ray.init + time until the first worker
  actor is ready + ray.shutdown (start-up = the first two, the ≤ 6 s target);
- sustained: wall - fixed (mergekit has no fixed cost of this kind: its sustained = its wall);
- max RSS: VmHWM of the process (driver and the largest worker for shardmerge);
- peak private: the sampled peak of RssAnon (anonymous memory; page-cache pages of the inputs are not working
  memory): per process, and summed over the whole process tree (Ray's own processes included);
- faults/GB: minor page faults per GB of output. mergekit: its whole process. shardmerge "merge phase": the driver's
  own count around planning and execution plus the merge workers' (sampled, their start-up included; Ray's other
  processes not counted); "whole driver": the driver process from start to exit (interpreter and imports included);
- floor: reading the inputs the recipe uses from the page cache (at the rate measured once at start) + writing and
  fsyncing one checkpoint's bytes (jobs/bench_floor.py); printed as mergekit wall / floor and shardmerge sustained /
  floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from shardmerge.jobs.bench_common import (
    dir_bytes,
    gib,
    llama_config,
    print_machine,
    read_all,
    run_child,
    shardmerge_cmd,
    write_checkpoint,
)

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
DEFAULT_METHODS = ("linear", "ties", "dare_ties", "slerp")
MORE_METHODS = ("della", "della_linear", "sce", "ram", "ramplus_tl")  # accepted by --methods
HEAD = "dtype: float32\nout_dtype: bfloat16\n"


def recipes(dirs: list[Path], method: str) -> tuple[str, str]:
    """(mergekit recipe, shardmerge recipe) for one method; identical except shardmerge-only parameters."""
    base, experts = dirs[0], dirs[1:]
    if method == "linear":
        w = [round(1.0 / len(dirs), 4)] * len(dirs)
        body = "merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {d}\n    parameters: {{weight: {wi}}}\n" for d, wi in zip(dirs, w)
        )
        return HEAD + body, HEAD + body
    if method == "slerp":
        body = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {experts[0]}\nparameters: {{t: 0.4}}\n"
        return HEAD + body, HEAD + body
    if method in ("sce", "ram", "ramplus_tl"):  # no per-model parameters
        models = "".join(f"  - model: {d}\n" for d in experts)
        glob = {"sce": "parameters: {select_topk: 0.5}\n"}.get(method, "")
        body = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{glob}"
        return HEAD + body, HEAD + body
    w = round(1.0 / len(experts), 4)
    per = {
        "della": f"weight: {w}, density: 0.5",
        "della_linear": f"weight: {w}, density: 0.5",
        "task_arithmetic": f"weight: {w}",
        "ties": f"weight: {w}, density: 0.5",
        "dare_ties": f"weight: {w}, density: 0.5",
    }[method]
    models = "".join(f"  - model: {d}\n    parameters: {{{per}}}\n" for d in experts)
    body = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
    extra = {"ties": "parameters: {normalize: true}\n", "dare_ties": "parameters: {normalize: true}\n"}.get(method, "")
    ours = {"dare_ties": "parameters: {normalize: true, rescale_rule: l1, random_seed: 1}\n"}.get(method, extra)
    return HEAD + body + extra, HEAD + body + ours


def make_models(root: Path, k: int, size_gb: float) -> list[Path]:
    """K checkpoints (base + K-1 experts) under root; reused when already complete there."""
    if k < 2:
        raise ValueError(f"--models must be >= 2 (a base and at least one expert), got {k}")
    cfg, shapes = llama_config(size_gb)
    dirs = []
    for m in range(k):
        d = root / f"llama-{size_gb:g}gb-{m}"
        if not (d / "config.json").exists():
            write_checkpoint(d, shapes, cfg, model=m, noise=0.0 if m == 0 else 0.5)
        dirs.append(d)
    return dirs


def run_mergekit(recipe: Path, out: Path) -> dict:
    r = run_child(["mergekit-yaml", str(recipe), str(out), "--quiet", "--random-seed", "1"])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": r.wall_s,
        "fixed_s": 0.0,
        "startup_s": 0.0,
        "sustained_s": r.wall_s,
        "max_rss": r.mem["driver_max_rss"],
        "private_peak": r.mem["driver_private_peak"],
        "tree_private_peak": r.mem["tree_private_peak"],
        "process_faults": r.mem["process_minflt"],
        "merge_faults": r.mem["process_minflt"],  # no separate merge phase: the whole process
    }


def run_shardmerge(recipe: Path, out: Path, workers: int | None, chunk_mb: float, threads: int | None = None) -> dict:
    r = run_child(shardmerge_cmd(recipe, out, workers=workers, chunk_mb=chunk_mb, threads=threads))
    shutil.rmtree(out, ignore_errors=True)
    t = r.last_json()
    startup = t["ray_up_s"] + t["pool_start_s"]
    fixed = startup + t["ray_down_s"]
    m = r.mem
    return {
        "wall_s": r.wall_s,
        "fixed_s": fixed,
        "startup_s": startup,
        "sustained_s": r.wall_s - fixed,
        "max_rss": max(m["driver_max_rss"], m["worker_max_rss"]),
        "private_peak": max([m["driver_private_peak"]] + m["worker_private_peaks"]),
        "worker_private_peak": max(m["worker_private_peaks"], default=0),
        "driver_private_peak": m["driver_private_peak"],
        "tree_private_peak": m["tree_private_peak"],
        "process_faults": m["process_minflt"],
        # the merge phase: the driver's own count around planning + execution, plus the merge workers' (sampled,
        # their start-up included); Ray's other processes are not counted
        "merge_faults": t.get("merge_minflt", 0) + m.get("worker_minflt", 0),
        "out_bytes": t["bytes"],
        "phases": t,
    }


def _median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def bench_method(
    method: str,
    dirs: list[Path],
    work: Path,
    repeats: int,
    workers: int | None,
    chunk_mb: float,
    threads: int | None = None,
) -> dict:
    """Alternate mergekit and shardmerge runs (order swapped every repeat); medians per tool."""
    mk_text, sm_text = recipes(dirs, method)
    (work / "mk.yaml").write_text(mk_text)
    (work / "sm.yaml").write_text(sm_text)
    mk, sm = [], []
    for i in range(repeats):
        order = ("mk", "sm") if i % 2 == 0 else ("sm", "mk")
        for tool in order:
            if tool == "mk":
                mk.append(run_mergekit(work / "mk.yaml", work / "out-mk"))
            else:
                sm.append(run_shardmerge(work / "sm.yaml", work / "out-sm", workers, chunk_mb, threads))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return {"method": method, "mergekit": _median(mk), "shardmerge": _median(sm), "load": load}


def inputs_read(method: str, n_models: int) -> int:
    """How many of the K checkpoints a method's recipe reads (slerp: the base and one expert)."""
    return 2 if method == "slerp" else n_models


def add_floor(r: dict, floor: dict, n_models: int) -> dict:
    """The method's floor: reading the inputs its recipe uses (at the measured page-cache rate) + writing and
    fsyncing one checkpoint's bytes; stored in r."""
    share = inputs_read(r["method"], n_models) / n_models
    r["floor_s"] = floor["read_s"] * share + floor["write_fsync_s"]
    return r


def print_row(r: dict) -> None:
    mk, sm = r["mergekit"], r["shardmerge"]
    gb = max(1, sm.get("out_bytes", 0)) / 1e9
    floor = r.get("floor_s")
    print(
        f"{r['method']:<16} mergekit wall {mk['wall_s']:7.1f} s  max RSS {gib(mk['max_rss'])}  "
        f"private {gib(mk['private_peak'])}  faults/GB {mk['process_faults'] / gb:,.0f} | shardmerge wall "
        f"{sm['wall_s']:6.1f} s  fixed {sm['fixed_s']:4.1f} s (start-up {sm['startup_s']:.1f} s)  sustained "
        f"{sm['sustained_s']:6.1f} s  max RSS {gib(sm['max_rss'])}  private worker {gib(sm['worker_private_peak'])} "
        f"driver {gib(sm['driver_private_peak'])} tree {gib(sm['tree_private_peak'])}  faults/GB merge phase "
        f"{sm['merge_faults'] / gb:,.0f}, whole driver {sm['process_faults'] / gb:,.0f}",
        flush=True,
    )
    floor_text = (
        f"  floor {floor:.1f} s: mergekit {mk['wall_s'] / floor:.1f}x floor, shardmerge sustained "
        f"{sm['sustained_s'] / floor:.1f}x floor"
        if floor
        else ""
    )
    print(
        f"{r['method']:<16} ratios (mergekit / shardmerge): end-to-end {mk['wall_s'] / sm['wall_s']:.2f}x  "
        f"sustained {mk['sustained_s'] / sm['sustained_s']:.2f}x  "
        f"peak private (largest process) {mk['private_peak'] / max(1, sm['private_peak']):.2f}x{floor_text}  "
        f"| load average {r.get('load', '?')}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="shardmerge bench vs-mergekit", description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.1, help="size of each checkpoint in GB (default 1.1)")
    p.add_argument("--models", type=int, default=3, help="checkpoints: a base and K-1 experts (default 3)")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated (default {','.join(DEFAULT_METHODS)})"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per tool and method (median reported)")
    options.add_workers(p, "as `shardmerge merge` chooses")
    p.add_argument("--chunk-mb", type=float, default=64, help="shardmerge --chunk-mb (default 64)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per shardmerge worker (default: the CPUs it reserves)"
    )
    p.add_argument("--models-dir", default=None, help="keep generated checkpoints here (default: a temp dir)")
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS) - set(MORE_METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS + MORE_METHODS)}")
    if shutil.which("mergekit-yaml") is None:
        print(
            "vs-mergekit: mergekit-yaml not found; install the bench extra: pip install 'shardmerge[bench]'",
            file=sys.stderr,
        )
        return 2
    machine = print_machine()
    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="sm-bench-"))
    work = Path(tempfile.mkdtemp(prefix="sm-bench-work-"))
    try:
        dirs = make_models(root, args.models, args.size_gb)
        seconds, nbytes = read_all([f for d in dirs for f in sorted(d.glob("*.safetensors"))])
        print(
            f"# inputs: {len(dirs)} x {dir_bytes(dirs[0]) / 1e9:.2f} GB bf16 (read from page cache in "
            f"{seconds:.1f} s); wall/fixed/sustained in seconds, memory in GiB",
            flush=True,
        )
        from shardmerge.jobs.bench_common import floor_seconds

        floor = floor_seconds(dirs, dir_bytes(dirs[0]), work)
        print(
            f"# floor: read {floor['in_bytes'] / 1e9:.2f} GB {floor['read_s']:.2f} s + write+fsync "
            f"{floor['out_bytes'] / 1e9:.2f} GB {floor['write_fsync_s']:.2f} s (per method: the inputs it reads)",
            flush=True,
        )
        results = []
        for method in methods:
            r = bench_method(method, dirs, work, args.repeats, args.workers, args.chunk_mb, args.threads)
            results.append(add_floor(r, floor, len(dirs)))
            print_row(results[-1])
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"machine": machine, "args": vars(args), "floor": floor, "results": results}, indent=1, default=str
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.models_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
