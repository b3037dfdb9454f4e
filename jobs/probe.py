"""`shardmerge probe` / `python -m shardmerge.jobs.probe`: the vision-token-masking probe of an MLLM on benchmarks.

shardmerge probe --model M --bench FILE_OR_DIR --out DIR [--workers N] [--metric accuracy|logprob|kl]
                 [--cuts all|0,4,8|0:28:2] [--path fast|exact] [--attention [--attention-sample ID]]
                 [--device auto|cpu|cuda] [--address ADDR] [--dtype auto|float32|bfloat16|float16]
                 [--limit N] [--format auto|ours|hf|tsv] [--rows-per-shard N] [--max-new-tokens N]
                 [--bootstrap N] [--delta D] [--epsilon E] [--seed S] [--pooling macro|samples]
                 [--system-prompt TEXT] [--min-pixels N] [--max-pixels N] [--holdout F [--side probe|eval]]
                 [--score labels|generate] [--masking clean|reference-qwen25|reference-qwen3] [--local]
Writes DIR/probe.parquet, DIR/probe.json, DIR/probe.png (and focus.* with --attention).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from shardmerge.engine.probe import attention, readers
from shardmerge.engine.probe.actors import DEVICES
from shardmerge.engine.probe.runner import METRICS, ProbeJob, run_probe
from shardmerge.engine.probe.scoring import PATHS, SCORES, ScoreSettings
from shardmerge.engine.probe.worker import DTYPES, WorkerSettings


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
    p.add_argument(
        "--bench",
        required=True,
        action="append",
        help="benchmark .parquet/.tsv file or a directory of them (repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="probe actors, one model replica each [1]")
    p.add_argument("--metric", choices=sorted(METRICS), default="accuracy", help="curve metric [accuracy]")
    p.add_argument("--cuts", default="all", help="cut layers: all | 0,4,8 | start:stop[:step]; 0 and L always run")
    p.add_argument(
        "--path",
        choices=PATHS,
        default=None,
        help="fast (prefix sharing) or exact (one pass per cut) [fast; exact with a reference --masking]",
    )
    p.add_argument(
        "--score",
        choices=SCORES,
        default="labels",
        help="labels: answer-label log-probs; generate: greedy answers with lmms-eval's prompts and extraction [labels]",
    )
    p.add_argument(
        "--masking",
        choices=attention.MODES,
        default="clean",
        help="clean, or a reference implementation's alignment after dropping image K/V (docs/probe.md) [clean]",
    )
    p.add_argument("--attention", action="store_true", help="also write the attention-focus analysis")
    p.add_argument("--attention-sample", default=None, help="sample id for the focus heat map [first sample]")
    p.add_argument(
        "--merged-layers",
        type=int,
        nargs=2,
        metavar=("S", "E"),
        default=None,
        help="with --attention: report the focus over layers S..E (a merge's range) separately",
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when Ray sees a GPU [auto]")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="auto: float32 on CPU, the checkpoint's dtype on GPU",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N rows per benchmark file")
    p.add_argument("--format", choices=readers.FORMATS, default="auto", help="benchmark format [auto]")
    p.add_argument("--rows-per-shard", type=int, default=16, help="rows per work unit [16]")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens for open answers [8]")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs [1000]")
    p.add_argument("--delta", type=float, default=0.1, help="early stage: p(c) <= delta [0.1]")
    p.add_argument("--epsilon", type=float, default=0.05, help="plateau: p(c') >= 1 - epsilon after c* [0.05]")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed [0]")
    p.add_argument(
        "--pooling",
        choices=("macro", "samples"),
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
        "--holdout",
        type=float,
        default=0.0,
        help="hold out this fraction of question groups (seeded by --seed) [0: probe every row]",
    )
    p.add_argument(
        "--side",
        choices=("probe", "eval"),
        default="probe",
        help="with --holdout: probe the probe side or the held-out side [probe]",
    )
    p.add_argument("--local", action="store_true", help="no Ray: one replica in this process")
    return p


def _split(args: argparse.Namespace) -> tuple:
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    return (args.holdout, args.seed, args.side) if args.holdout > 0 else ()


def job_from_args(args: argparse.Namespace) -> ProbeJob:
    path = args.path or ("fast" if args.masking == "clean" else "exact")
    score = ScoreSettings(
        cuts=parse_cuts(args.cuts),
        path=path,
        max_new_tokens=args.max_new_tokens,
        score=args.score,
        masking=args.masking,
    )
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
        workers=args.workers,
        metric=args.metric,
        fmt=args.format,
        rows_per_shard=args.rows_per_shard,
        limit=args.limit,
        address=args.address,
        use_ray=not args.local,
        n_boot=args.bootstrap,
        delta=args.delta,
        epsilon=args.epsilon,
        seed=args.seed,
        pooling=args.pooling,
        merged_layers=tuple(args.merged_layers) if args.merged_layers else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_probe(job_from_args(args))
    except ValueError as exc:
        print(f"shardmerge probe: error: {exc}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("plateau_start", "plateau_start_ci", "stages", "samples", "warnings")}
    brief["bad_rows"] = summary["bad_rows"]["count"]
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
