"""`shardmerge merge` / `python -m shardmerge.jobs.merge RECIPE.yaml --out DIR` (the entry point for `ray job submit`).

Without --address (and without RAY_ADDRESS) an embedded local Ray instance is started in-process; with
`--address auto` or a cluster address the same code runs on the cluster. Inputs and --out must be on storage every
node sees (a shared filesystem) when running on more than one node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shardmerge.jobs import options

    p.add_argument("recipe", help="YAML recipe (mergekit-compatible subset; see README)")
    options.add_common(
        p,
        out="Hugging Face layout, a directory or s3://bucket/prefix; also gets shardmerge_summary.json beside it",
        workers="one per GPU with cuda, else one single-threaded worker per CPU; without a cluster, a CPU merge "
        "of at most 512 MB runs in this process",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merge in --out")
    p.add_argument("--shard-size", default="5GB", help="max output shard size [5GB]")
    p.add_argument("--chunk-mb", type=float, default=64, help="row-chunk size per input tensor, in MiB [64]")
    p.add_argument(
        "--max-memory-per-worker", default=None, metavar="SIZE", help="per-worker memory budget for Ray, e.g. 8GB"
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per worker [1: streaming merges scale by workers, not threads]",
    )
    p.add_argument(
        "--svd-batch-layers",
        type=int,
        default=None,
        metavar="N",
        help="consecutive decoder layers per work unit for SVD-family recipes, so their same-shape "
        "matrices share batched SVD calls [1 on cpu, 4 on cuda]",
    )
    p.add_argument(
        "--random-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the keyed randomness of dare_linear/dare_ties/della/della_linear [the "
        "recipe's random_seed, else 0]; recorded in the plan hash and the model card",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="merge inputs that contain NaN/Inf")
    p.add_argument("--no-verify", action="store_true", help="skip re-verifying the output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardmerge merge", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


# Without --workers and without a cluster, merges whose output is at most this size run in-process (--workers 0):
# starting the embedded Ray instance and its worker actors costs several seconds (BENCHMARKS.md, "CPU fast path"), about what an in-process merge of this size takes, so a pool would not finish sooner.
IN_PROCESS_MAX_BYTES = 512 * 10**6


def resolve_device(device: str, address: str | None = None) -> str:
    """--device auto: cuda when this process sees a GPU, or when the Ray cluster named by --address / RAY_ADDRESS
    has GPUs (the driver connects to ask, and stays connected for the merge); else cpu."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if address or os.environ.get("RAY_ADDRESS"):
        import ray

        from shardmerge.engine.run.ray_session import connect

        connect(address)  # a no-op when already connected; execute() reuses the connection
        if ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    return "cpu"


def default_workers(device: str) -> int:
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)  # one single-threaded worker per CPU slot (see ray_pool.default_worker_count)


def _run_merge(
    recipe_path: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    device: str = "cpu",
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: str | int = "5GB",
    chunk_mb: float = 64,
    max_memory_per_worker: str | None = None,
    allow_nonfinite: bool = False,
    progress: bool = True,
    verify: bool = True,
    threads_per_worker: int | None = None,
    svd_batch_layers: int | None = None,
    svd_batch: bool | None = None,
    random_seed: int | None = None,
) -> dict:
    """Plan, execute and verify a merge; returns a summary dict. Raises ValueError/RuntimeError with the cause.
    `device` "auto" is the CLI's default (resolve_device); called as a library, the default stays "cpu".
    `svd_batch_layers` None: shardmerge.engine.plan.build.SVD_BATCH_LAYERS for the device; `svd_batch` forces batched SVD calls on
    or off (None: on off the CPU; see shardmerge.engine.run.executor.execute). `random_seed` is --random-seed
    (shardmerge.engine.recipe.schema.with_random_seed). Fault injection for tests is the environment variable
    SHARDMERGE_FAULT (shardmerge.engine.run.worker.fault_from_env): it needs Ray workers, so it turns off the
    in-process shortcut for small merges."""
    from shardmerge.engine.phases import active, phase

    t0 = time.monotonic()
    phase("planning", f"{recipe_path} (loading the engine and reading the inputs' headers)")
    from shardmerge.engine.io.shard_files import state_dir
    from shardmerge.engine.io.stores import is_url
    from shardmerge.engine.plan.build import SVD_BATCH_LAYERS, build_plan, parse_size
    from shardmerge.engine.recipe.schema import load_recipe, with_random_seed
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.run.worker import fault_from_env
    from shardmerge.engine.verify import verify_dir

    if chunk_mb <= 0:
        raise ValueError(f"--chunk-mb must be positive, got {chunk_mb}")
    device = resolve_device(device, address)
    recipe = with_random_seed(load_recipe(recipe_path), random_seed, str(recipe_path))
    plan = build_plan(
        recipe,
        shard_size=shard_size,
        source=str(recipe_path),
        state=state_dir(Path(out)) if resume and not is_url(out) else None,  # no cached calibration from a bucket
        address=address,
        svd_batch_layers=SVD_BATCH_LAYERS[device] if svd_batch_layers is None else svd_batch_layers,
    )
    if workers is None and not (address or os.environ.get("RAY_ADDRESS")):
        # on a cluster, execute() sizes the pool from the cluster's resources; on this machine a small merge runs
        # in this process, since starting an embedded Ray and its workers costs more than the merge itself
        small = device == "cpu" and fault_from_env() is None and plan.total_bytes <= IN_PROCESS_MAX_BYTES
        workers = 0 if small else default_workers(device)
    summary = execute(
        plan,
        out,
        workers=workers,
        device=device,
        resume=resume,
        overwrite=overwrite,
        chunk_bytes=max(1, int(chunk_mb * 2**20)),
        allow_nonfinite=allow_nonfinite,
        progress=progress,
        address=address,
        threads_per_worker=threads_per_worker,
        svd_batch=svd_batch,
        protect=(recipe_path,),
        memory_per_worker=parse_size(max_memory_per_worker) if max_memory_per_worker else None,
    )
    summary.update(
        out=str(out) if is_url(out) else str(Path(out).resolve()),
        method=recipe.merge_method,
        models=list(plan.inputs),
        device=device,
        recipe=str(Path(recipe_path).resolve()),
    )
    if plan.notes:
        summary["notes"] = list(plan.notes)
    summary["verified"] = False
    if verify:
        phase("verifying", "sizes, sha256, headers, index, manifest")
        problems = verify_dir(out)
        if problems:
            raise RuntimeError(f"verification of {out} failed: {problems[0]}")
        summary["verified"] = True
    reporter = active()  # the whole command's time when one is reporting (imports and Ray start-up included)
    summary["total_seconds"] = reporter.elapsed() if reporter else time.monotonic() - t0
    return summary


def _closing_ray(fn):
    """`fn` that shuts down a Ray connection opened during it (e.g. to resolve --device auto on a cluster)."""
    import functools

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        had_ray = ray_up()
        try:
            return fn(*args, **kwargs)
        finally:
            if not had_ray and ray_up():
                sys.modules["ray"].shutdown()

    return wrapper


run_merge = _closing_ray(_run_merge)


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


HIDDEN = ("units_by_worker", "worker_stats", "units_by_node")  # per-worker detail: in the summary file only


def _on_sigterm(signum, frame):
    from shardmerge.jobs.interrupts import on_sigterm

    on_sigterm(signum, frame)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this merge: the same recipe, --out and options, --resume instead of
    --overwrite."""
    from shardmerge.jobs.interrupts import rerun_command

    head = ["shardmerge", "merge", str(args.recipe), "--out", str(args.out)]
    return rerun_command(build_parser(), args, head, skip=("out", "resume", "overwrite"), extra=("--resume",))


def run_from_args(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments; errors are one line and exit 2. SIGINT / SIGTERM stop the merge
    (workers cancelled, the journal and temp shards left for --resume), print how to continue, and exit 130 /
    143 without a traceback."""
    from shardmerge.engine.phases import Phases, reporting
    from shardmerge.jobs import options
    from shardmerge.jobs.interrupts import run_interruptible

    options.setup_logging(args)
    progress = not (args.no_progress or args.quiet)

    def body() -> int:
        with reporting(Phases("shardmerge merge", enabled=progress)):
            return _run(args, progress)

    return run_interruptible(
        "shardmerge merge",
        body,
        out=args.out,
        what="merge",
        command=lambda: resume_command(args),
        handler=_on_sigterm,
    )


def _run(args: argparse.Namespace, progress: bool) -> int:
    from shardmerge.jobs import options

    try:
        summary = run_merge(
            args.recipe,
            args.out,
            workers=options.workers(args, "shardmerge merge"),
            device=args.device,
            address=args.address,
            resume=args.resume,
            overwrite=args.overwrite,
            shard_size=args.shard_size,
            chunk_mb=args.chunk_mb,
            max_memory_per_worker=args.max_memory_per_worker,
            allow_nonfinite=args.allow_nonfinite,
            progress=progress,
            verify=not args.no_verify,
            threads_per_worker=args.threads_per_worker,
            svd_batch_layers=args.svd_batch_layers,
            random_seed=args.random_seed,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"shardmerge merge: error: {exc}", file=sys.stderr)
        return 2
    from shardmerge.engine.io.output_dir import SUMMARY
    from shardmerge.engine.io.stores import is_url, open_store

    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    if is_url(args.out):  # beside the merge in the bucket
        store = open_store(args.out)
        store.write_atomic(SUMMARY, text.encode())
        summary["summary_file"] = f"{store.url}/{SUMMARY}"
    else:
        path = Path(args.out) / SUMMARY
        summary["summary_file"] = str(path.resolve())
        path.write_text(text)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in HIDDEN}, indent=2, sort_keys=True))
    else:
        print(human_summary(summary))
    return 0


def human_summary(s: dict) -> str:
    """A few lines a person reads: where the output is, what was merged, how long it took, what to do next."""
    from shardmerge.engine.phases import duration, rate, size

    models = s.get("models") or []
    names = ", ".join(Path(m).name or m for m in models[:4]) + (
        f" and {len(models) - 4} more" if len(models) > 4 else ""
    )
    ran = s.get("bytes_run", s["bytes"])
    where = "in this process" if s.get("workers") == 0 else f"{s.get('workers')} Ray worker(s)"
    reused = f", {s['reused_units']} reused from the interrupted run" if s.get("reused_units") else ""
    lines = [
        f"merged     {s['out']}",
        f"method     {s['method']} of {len(models)} model(s): {names}",
        f"shards     {s['shards']} shard(s), {size(s['bytes'])}; {s['units']} work units ({s.get('units_run', 0)} run{reused})",
        f"time       {duration(s.get('total_seconds', s['seconds']))} in all; merging {size(ran)} took "
        f"{duration(s.get('merge_seconds', 0.0))} ({rate(ran, s.get('merge_seconds', 0.0))}), {where}, {s['device']}",
        f"verified   {'yes (sizes, sha256, headers, index, manifest)' if s.get('verified') else 'no (--no-verify)'}",
    ]
    lines += [f"note       {n}" for n in s.get("notes", [])]
    lines += [
        f"summary    {s['summary_file']} (JSON; --json prints it here instead)",
        f"next       load it with transformers' from_pretrained({s['out']!r}); re-check it any time with "
        f"`shardmerge verify {s['out']}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
