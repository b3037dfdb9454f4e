"""`shardmerge probe` / `python -m shardmerge.jobs.probe`: the vision-token-masking probe of an MLLM on benchmarks.

Writes DIR/probe.parquet, DIR/probe.json, DIR/probe.png (and focus.* with --attention). `shardmerge probe --help`
lists every option; docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from shardmerge.jobs import options

# The choices of the engine's probe (tests/unit/test_cli.py checks them against shardmerge.engine.probe), spelt
# here so that building this parser, e.g. for --help, imports neither torch nor the engine.
METRICS = ("accuracy", "kl", "logprob")
PATHS = ("fast", "exact")
DTYPES = ("auto", "bfloat16", "float16", "float32")
FORMATS = ("auto", "ours", "hf", "tsv")
POOLINGS = ("macro", "samples")
SIDES = ("probe", "eval")


def parse_cuts(text: str) -> tuple[int, ...] | None:
    """'all' -> None (every cut); '0,4,8' -> (0, 4, 8); '0:28:2' -> range(0, 28, 2) (0 and L are always added)."""
    text = text.strip()
    if text == "all":
        return None
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            return tuple(range(*parts))
        return tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise ValueError(f"--cuts {text!r}: expected 'all', a list like 0,4,8 or a range start:stop[:step]") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardmerge probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="MLLM directory (Hugging Face layout)")
    add_bench(p)
    options.add_common(
        p,
        out="gets probe.parquet, probe.json (the full result), probe.png",
        workers="1; each worker holds one model replica",
    )
    options.add_local_alias(p)
    add_probe_options(p)
    p.add_argument("--attention", action="store_true", help="also write the attention-focus analysis")
    p.add_argument("--attention-sample", default=None, help="sample id for the focus heat map [the first sample]")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: float32 on cpu, the checkpoint's on cuda [auto]"
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="benchmark format [auto]")
    p.add_argument("--rows-per-shard", type=int, default=16, help="rows per work unit [16]")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens for open answers [8]")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs [1000]")
    p.add_argument("--delta", type=float, default=0.1, help="early stage: p(c) <= delta [0.1]")
    p.add_argument("--epsilon", type=float, default=0.05, help="plateau: p(c') >= 1 - epsilon after c* [0.05]")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="macro",
        help="pooled curve: macro (each benchmark weighs the same) or samples [macro]",
    )
    p.add_argument("--system-prompt", default=None, help="a system turn before the question [none]")
    p.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="Qwen-VL: lower bound of the resized image's pixels [the model's; lmms-eval: 200704]",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="Qwen-VL: upper bound of the resized image's pixels [the model's; lmms-eval: 1605632]",
    )
    p.add_argument(
        "--side",
        choices=SIDES,
        default="probe",
        help="with --holdout: probe the probe side or the held-out side [probe]",
    )
    return p


def add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bench",
        required=True,
        action="append",
        metavar="FILE_OR_DIR",
        help="benchmark .parquet/.tsv file or a directory of them (repeatable)",
    )


def add_probe_options(p: argparse.ArgumentParser) -> None:
    """The probe options plam shares (same names, meanings and defaults)."""
    p.add_argument("--metric", choices=METRICS, default="accuracy", help="probe curve metric [accuracy]")
    p.add_argument(
        "--cuts", default="all", help="probe cut layers: all | 0,4,8 | start:stop[:step]; 0 and L always run [all]"
    )
    p.add_argument(
        "--path",
        choices=PATHS,
        default="fast",
        help="probe path: fast (prefix sharing) or exact (one pass per cut) [fast]",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N rows per benchmark file [all]")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this fraction of question groups (seeded by --seed) [0: none]",
    )
    p.add_argument("--seed", type=int, default=0, help="split and bootstrap seed [0]")


def _split(args: argparse.Namespace) -> tuple:
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    return (args.holdout, args.seed, args.side) if args.holdout > 0 else ()


def job_from_args(args: argparse.Namespace):
    from shardmerge.engine.probe.runner import ProbeJob
    from shardmerge.engine.probe.scoring import ScoreSettings
    from shardmerge.engine.probe.worker import WorkerSettings

    workers = options.workers(args, "shardmerge probe")
    workers = 1 if workers is None else workers
    score = ScoreSettings(cuts=parse_cuts(args.cuts), path=args.path, max_new_tokens=args.max_new_tokens)
    worker = WorkerSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        score=score,
        attention=args.attention,
        attention_sample=args.attention_sample,
        system_prompt=args.system_prompt,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        split=_split(args),
    )
    return ProbeJob(
        benches=tuple(args.bench),
        out=args.out,
        worker=worker,
        workers=max(1, workers),
        metric=args.metric,
        fmt=args.format,
        rows_per_shard=args.rows_per_shard,
        limit=args.limit,
        address=args.address,
        use_ray=workers != 0,
        n_boot=args.bootstrap,
        delta=args.delta,
        epsilon=args.epsilon,
        seed=args.seed,
        pooling=args.pooling,
    )


BRIEF = ("plateau_start", "plateau_start_ci", "stages", "samples", "warnings")


def brief(summary: dict) -> dict:
    """The part of probe.json printed by --json."""
    out = {k: summary.get(k) for k in BRIEF}
    out["bad_rows"] = summary["bad_rows"]["count"]
    return out


def human_summary(args: argparse.Namespace, summary: dict, seconds: float) -> str:
    from pathlib import Path

    from shardmerge.engine.phases import duration

    out = Path(args.out).resolve()
    ci = summary.get("plateau_start_ci")
    c = summary.get("plateau_start")
    plateau = f"c* = {c}" + (f" (interval {ci[0]}..{ci[1]})" if ci else "") if c is not None else "none found"
    lines = [
        f"probed     {args.model}",
        f"benchmarks {', '.join(args.bench)}; {summary.get('samples')} sample(s), {summary['bad_rows']['count']} bad row(s)",
        f"metric     {args.metric}, {args.path} path",
        f"plateau    {plateau}",
        f"time       {duration(seconds)}",
    ]
    lines += [f"warning    {w}" for w in summary.get("warnings") or []]
    lines += [
        f"outputs    {out / 'probe.json'} (full result), {out / 'probe.png'}, {out / 'probe.parquet'}",
        "next       look at probe.png; with a plateau, `shardmerge plam --layers S E` or `shardmerge plam` merges "
        "the base LLM into the plateau layers",
    ]
    return "\n".join(lines)


def rerun_command(args: argparse.Namespace) -> str:
    """The command line that runs this probe again (a probe has no partial state to resume: it starts over)."""
    from shardmerge.jobs.interrupts import rerun_command as rerun

    head = ["shardmerge", "probe", "--model", args.model, "--out", str(args.out)]
    return rerun(
        build_parser(), args, head, skip=("model", "out", "local"), extra=("--workers", "0") if args.local else ()
    )


def main(argv: Sequence[str] | None = None) -> int:
    from shardmerge.jobs.interrupts import run_interruptible

    args = build_parser().parse_args(argv)
    options.setup_logging(args)
    progress = not (args.no_progress or args.quiet)

    def body() -> int:
        import time

        from shardmerge.engine.phases import Phases, phase, reporting

        with reporting(Phases("shardmerge probe", enabled=progress)) as phases:
            t0 = time.monotonic()
            phase("loading", "the probe engine (torch, transformers)")
            from shardmerge.engine.probe.runner import run_probe

            try:
                job = job_from_args(args)
                phase("probing", f"{args.model} on {len(args.bench)} benchmark source(s), {job.workers} worker(s)")
                summary = run_probe(job)
            except ValueError as exc:
                print(f"shardmerge probe: error: {exc}", file=sys.stderr)
                return 2
            phase("done", f"{args.out}")
            del phases
        print(
            json.dumps(brief(summary), indent=2) if args.json else human_summary(args, summary, time.monotonic() - t0)
        )
        return 0

    return run_interruptible(
        "shardmerge probe", body, out=args.out, what="probe (it starts over)", command=lambda: rerun_command(args)
    )


if __name__ == "__main__":
    sys.exit(main())
