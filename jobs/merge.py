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
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (mergekit-compatible subset; see README)")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix (Hugging Face layout)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="merge workers (Ray actors); default: one per GPU with --device cuda, else one per CPU; "
        "0 runs in this process without Ray",
    )
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' for the local cluster)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merge in --out")
    p.add_argument("--shard-size", default="5GB", help="max output shard size (default 5GB)")
    p.add_argument("--chunk-mb", type=float, default=64, help="row-chunk size per input tensor (MiB, default 64)")
    p.add_argument("--max-memory-per-worker", default=None, help="per-worker memory budget for Ray (e.g. 8GB)")
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="torch threads per worker (default 1: streaming merges scale by workers, not threads)",
    )
    p.add_argument(
        "--svd-batch-layers",
        type=int,
        default=None,
        metavar="N",
        help="consecutive decoder layers per work unit for SVD-family recipes, so their same-shape "
        "matrices share batched SVD calls (default 1 with --device cpu, 4 with cuda)",
    )
    p.add_argument(
        "--random-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the keyed randomness of dare_linear/dare_ties/della/della_linear (default: the "
        "recipe's random_seed, else 0); recorded in the plan hash and the model card",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="merge inputs that contain NaN/Inf")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="skip re-verifying the output")


# Without --workers and without a cluster, merges whose output is at most this size run in-process (--workers 0):
# starting the embedded Ray instance and its worker actors costs 6-9 s on a quiet 2-core machine (more under
# load), about what an in-process merge of this size takes, so a pool would not finish sooner.
IN_PROCESS_MAX_BYTES = 512 * 10**6


def default_workers(device: str) -> int:
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)  # one single-threaded worker per CPU slot (see ray_pool.default_worker_count)


def run_merge(
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
    `svd_batch_layers` None: shardmerge.engine.plan.build.SVD_BATCH_LAYERS for the device; `svd_batch` forces batched SVD calls on
    or off (None: on off the CPU; see shardmerge.engine.run.executor.execute). `random_seed` is --random-seed
    (shardmerge.engine.recipe.schema.with_random_seed). Fault injection for tests is the environment variable
    SHARDMERGE_FAULT (shardmerge.engine.run.worker.fault_from_env): it needs Ray workers, so it turns off the
    in-process shortcut for small merges."""
    from shardmerge.engine.io.stores import is_url
    from shardmerge.engine.io.writer import state_dir
    from shardmerge.engine.plan.build import SVD_BATCH_LAYERS, build_plan, parse_size
    from shardmerge.engine.recipe.schema import load_recipe, with_random_seed
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.run.worker import fault_from_env
    from shardmerge.engine.verify import verify_dir

    if chunk_mb <= 0:
        raise ValueError(f"--chunk-mb must be positive, got {chunk_mb}")
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
    if plan.notes:
        summary["notes"] = list(plan.notes)
    if verify:
        problems = verify_dir(out)
        if problems:
            raise RuntimeError(f"verification of {out} failed: {problems[0]}")
        summary["verified"] = True
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardmerge merge", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT (not an Exception: nothing may
    swallow it on the way out)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this merge: the same recipe, --out and options, --resume instead of
    --overwrite."""
    import shlex

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["shardmerge", "merge", str(args.recipe), "--out", str(args.out)]
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", "out", "resume", "overwrite"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        argv += [flag] if action.nargs == 0 else [flag, str(value)]
    return shlex.join(argv + ["--resume"])


def _interrupted(args: argparse.Namespace, name: str, code: int) -> int:
    print(
        f"shardmerge merge: interrupted by {name}; the unfinished merge in {args.out if '://' in str(args.out) else Path(args.out).resolve()} is kept. "
        f"Continue it with: {resume_command(args)}",
        file=sys.stderr,
        flush=True,
    )
    return code


def run_from_args(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments; errors are one line and exit 2. SIGINT / SIGTERM stop the merge
    (workers cancelled, the journal and temp shards left for --resume), print how to continue, and exit 130 /
    143 without a traceback."""
    import logging
    import signal

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import threading

    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        return _run(args)
    except KeyboardInterrupt:
        return _interrupted(args, "SIGINT", 128 + signal.SIGINT)
    except Terminated:
        return _interrupted(args, "SIGTERM", 128 + signal.SIGTERM)
    except SystemExit as exc:  # Ray's driver turns SIGTERM into sys.exit(SIGTERM) once it is initialised
        if exc.code == signal.SIGTERM:
            return _interrupted(args, "SIGTERM", 128 + signal.SIGTERM)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        summary = run_merge(
            args.recipe,
            args.out,
            workers=args.workers,
            device=args.device,
            address=args.address,
            resume=args.resume,
            overwrite=args.overwrite,
            shard_size=args.shard_size,
            chunk_mb=args.chunk_mb,
            max_memory_per_worker=args.max_memory_per_worker,
            allow_nonfinite=args.allow_nonfinite,
            progress=not args.no_progress,
            verify=not args.no_verify,
            threads_per_worker=args.threads_per_worker,
            svd_batch_layers=args.svd_batch_layers,
            random_seed=args.random_seed,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"shardmerge merge: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps({k: v for k, v in summary.items() if k not in ("units_by_worker", "worker_stats")}, sort_keys=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
