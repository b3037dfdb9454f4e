"""`shardmerge plam` / `python -m shardmerge.jobs.plam`: probe → plateau → PlaM merge → verify → (optional) re-probe, as one job.

shardmerge plam --mllm M --base B --bench FILE_OR_DIR --out DIR [--alpha A] [--targets qkvo|attn|mlp|norms|all]
                [--layers S E] [--workers N] [--device auto|cpu|cuda] [--address ADDR] [--reprobe] [--limit N]
                [--metric accuracy|logprob|kl] [--cuts all|...] [--path fast|exact] [--shard-size 5GB]
                [--weights MLLM,BASE] [--holdout F] [--seed S] [--max-ci-width W] [--force]

The probe (DIR/probe/) finds the plateau start c*; the merge (DIR/merged/) injects the base LLM into MLLM layers
c*..L-1 with W = (1-α)·W_mllm + α·W_base on the target groups; the recipe it ran is kept as DIR/plam.yaml. One Ray
instance (embedded, or the cluster given by --address / RAY_ADDRESS) serves every stage. --layers overrides the
plateau (the probe still runs and is reported); without it, a probe that finds no plateau is an error.

An uninformative probe stops the job before any merge unless --force: the pooled curve warns that the benchmark
does not need vision, or the c* interval is wider than --max-ci-width layers. --holdout F probes on one side of a
seeded split by question group and evaluates the MLLM and the merged model (accuracy of the unmasked model, m(L))
on the held-out side, so the reported gain is not measured on the rows that chose c*. --weights A,B merges
W = A·W_mllm + B·W_base (the authors' unnormalised form, e.g. 0.9,0.3) and also writes a control that only rescales
the MLLM's chosen tensors by A + B (DIR/control/), since the rescaling alone changes q·k logits by (A+B)² in models
without q/k norms; the control is evaluated beside the merge.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardmerge plam", description=__doc__.split("\n")[0])
    p.add_argument("--mllm", required=True, help="the MLLM (dir or hub id)")
    p.add_argument("--base", required=True, help="its base LLM (dir or hub id)")
    p.add_argument("--bench", required=True, action="append", help="benchmark file or directory (repeatable)")
    p.add_argument("--out", required=True, help="output directory (probe/, merged/, plam.yaml, plam_summary.json)")
    p.add_argument("--alpha", type=float, default=0.1, help="W = (1-α)·W_mllm + α·W_base [0.1]")
    p.add_argument("--targets", default="qkvo", help="qkvo | attn | mlp | norms | all [qkvo]")
    p.add_argument(
        "--layers",
        type=int,
        nargs=2,
        metavar=("S", "E"),
        default=None,
        help="merge layers S..E (inclusive) instead of the probe's plateau",
    )
    p.add_argument("--workers", type=int, default=None, help="probe actors and merge workers [auto]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    p.add_argument("--reprobe", action="store_true", help="probe the merged model too (DIR/probe_merged/)")
    p.add_argument("--limit", type=int, default=None, help="at most N rows per benchmark file")
    p.add_argument("--metric", default="accuracy", help="probe curve metric [accuracy]")
    p.add_argument("--cuts", default="all", help="probe cut layers [all]")
    p.add_argument("--path", default="fast", help="probe path: fast | exact [fast]")
    p.add_argument("--shard-size", default="5GB", help="merged shard size [5GB]")
    p.add_argument("--weights", default=None, help="MLLM,BASE: unnormalised W = a·W_mllm + b·W_base (+ control)")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of question groups held out for the before/after evaluation [0: none]",
    )
    p.add_argument("--seed", type=int, default=0, help="split and bootstrap seed [0]")
    p.add_argument("--max-ci-width", type=int, default=4, help="refuse a c* interval wider than this [4 layers]")
    p.add_argument("--force", action="store_true", help="merge even when the probe is uninformative")
    return p


def _weights(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected two numbers MLLM,BASE such as 0.9,0.3") from None
    return a, b


def informative(probe: dict, max_ci_width: int) -> list[str]:
    """Why the pooled probe result cannot choose merge layers (empty: it can)."""
    reasons = []
    pooled = probe.get("pooled") or {}
    if pooled.get("warning"):
        reasons.append(pooled["warning"])
    ci = probe.get("plateau_start_ci")
    if ci is not None and ci[1] - ci[0] > max_ci_width:
        reasons.append(f"the c* interval [{ci[0]}, {ci[1]}] is wider than --max-ci-width {max_ci_width} layers")
    return reasons


def _probe(model: str, args, out: Path, workers: int, side: str = "probe", cuts: str | None = None) -> dict:
    from shardmerge.engine.probe.runner import run_probe
    from shardmerge.jobs.probe import build_parser as probe_parser
    from shardmerge.jobs.probe import job_from_args

    argv = [
        "--model",
        model,
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--metric",
        args.metric,
        "--cuts",
        cuts or args.cuts,
        "--path",
        args.path,
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    if args.holdout:
        argv += ["--holdout", str(args.holdout), "--side", side]
    for b in args.bench:
        argv += ["--bench", b]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    return run_probe(job_from_args(probe_parser().parse_args(argv)))


def _recipe(args, probe_json: Path, weights: tuple | None = None) -> dict:
    params: dict = {"targets": args.targets}
    if weights:
        params["weights"] = {"mllm": weights[0], "base": weights[1]}
    else:
        params["alpha"] = args.alpha
    if args.layers:
        params["layers"] = list(args.layers)
    else:
        params["plateau"] = str(probe_json)
    return {"merge_method": "plam", "mllm": args.mllm, "base_llm": args.base, "parameters": params}


def _check_probe(args, probe: dict, out: Path) -> list[str]:
    """Stop before any merge when the probe cannot choose layers; returns the reasons overridden by --force."""
    if not args.layers and probe.get("plateau_start") is None:
        raise ValueError(
            f"the probe of {args.mllm} found no plateau ({'; '.join(probe.get('warnings') or []) or 'no c*'}); "
            f"see {out / 'probe' / 'probe.png'} and pass --layers S E to choose the layers yourself"
        )
    reasons = informative(probe, args.max_ci_width)
    if reasons and not args.force:
        raise ValueError(
            f"the probe of {args.mllm} is not informative, no merge: {'; '.join(reasons)}; see "
            f"{out / 'probe' / 'probe.png'}; use more or other benchmark rows, or --force to merge anyway"
        )
    return reasons


def _merge(args, out: Path, name: str, weights: tuple | None) -> dict:
    from shardmerge.jobs.merge import run_merge

    recipe = out / f"{'plam' if name == 'merged' else name}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(args, out / "probe" / "probe.json", weights), sort_keys=False))
    device = "cuda" if args.device == "cuda" else "cpu"
    merge = run_merge(
        recipe,
        out / name,
        workers=args.workers,
        device=device,
        address=args.address,
        shard_size=args.shard_size,
        overwrite=True,
    )
    return {
        "recipe": str(recipe),
        "dir": str(out / name),
        "verified": merge.get("verified", False),
        "shards": merge["shards"],
    }


def _evaluate(args, out: Path, workers: int, models: dict) -> dict:
    """m(L) (unmasked accuracy / metric) of each model on the held-out side of the split, per benchmark."""
    result = {
        "side": "eval",
        "holdout": args.holdout,
        "seed": args.seed,
        "split": "seeded, by question group",
        "metric": args.metric,
        "models": {},
    }
    for name, model in models.items():
        probe = _probe(model, args, out / f"eval_{name}", workers, side="eval", cuts="0")
        result["models"][name] = {
            "pooled": probe["pooled"]["curve"][-1],
            "samples": probe["samples"],
            "benchmarks": {b: v["curve"][-1] for b, v in probe["benchmarks"].items()},
        }
    base = result["models"]["mllm"]["pooled"]
    result["gain"] = {k: v["pooled"] - base for k, v in result["models"].items() if k != "mllm"}
    return result


def run_plam(args: argparse.Namespace) -> dict:
    """Run every stage; returns the summary also written to DIR/plam_summary.json."""
    from shardmerge.engine.run.ray_session import connect

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = _weights(args.weights)
    workers = args.workers if args.workers is not None else 1
    started = connect(args.address)
    try:
        probe = _probe(args.mllm, args, out / "probe", workers)
        forced = _check_probe(args, probe, out)
        merged = _merge(args, out, "merged", weights)
        summary = {
            "plateau_start": probe.get("plateau_start"),
            "plateau_start_ci": probe.get("plateau_start_ci"),
            "stages": probe.get("stages"),
            "probe_warnings": probe.get("warnings"),
            "forced_past": forced,
            "layers": list(args.layers) if args.layers else None,
            "recipe": merged["recipe"],
            "merged": merged["dir"],
            "verified": merged["verified"],
            "shards": merged["shards"],
            "probe_png": str(out / "probe" / "probe.png"),
            "weights": list(weights) if weights else None,
            "probe_rows": "the probe side of the split" if args.holdout else "every row",
        }
        models = {"mllm": args.mllm, "merged": merged["dir"]}
        if weights:
            control = _merge(args, out, "control", (weights[0] + weights[1], 0.0))
            summary["control"] = {**control, "scale": weights[0] + weights[1]}
            models["control"] = control["dir"]
        summary["evaluation"] = _evaluate(args, out, workers, models) if args.holdout else None
        if args.reprobe:
            again = _probe(str(out / "merged"), args, out / "probe_merged", workers)
            summary["reprobe_plateau_start"] = again.get("plateau_start")
            summary["reprobe_png"] = str(out / "probe_merged" / "probe.png")
            summary["reprobe_rows"] = summary["probe_rows"] + " (the rows that chose c*)"
    finally:
        if started:
            import ray

            ray.shutdown()
    (out / "plam_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def demo_pipeline(root: Path, workers: int = 2) -> dict:
    """The demo's MLLM part: tiny Qwen2.5-VL + its tiny base LLM + a tiny benchmark, through `run_plam`.

    Random tiny weights do not use the image, so their probe finds no plateau (the probe says so); the demo therefore
    passes --layers for the merge and reports the probe's verdict alongside."""
    from shardmerge.engine.probe.fixtures import bench_rows, write_ours
    from shardmerge.engine.tiny_models import build_base_llm, build_mllm

    root.mkdir(parents=True, exist_ok=True)
    mllm = build_mllm(root / "qwen2_5_vl", "qwen2_5_vl", seed=0, num_layers=4)
    base = build_base_llm(root / "qwen2_base", "qwen2_5_vl", seed=1, from_mllm=mllm)
    bench = write_ours(root / "bench.parquet", bench_rows(8, seed=0, kinds=("choice", "yesno")))
    args = build_parser().parse_args(
        [
            "--mllm",
            str(mllm),
            "--base",
            str(base),
            "--bench",
            str(bench),
            "--out",
            str(root / "out"),
            "--layers",
            "2",
            "3",
            "--workers",
            str(workers),
            "--device",
            "cpu",
            "--shard-size",
            "200KB",
            "--force",
        ]
    )
    s = run_plam(args)
    return {
        "plam_merged_dir": s["merged"],
        "plam_verified": s["verified"],
        "plam_layers": s["layers"],
        "probe_plateau_start": s["plateau_start"],
        "probe_png": s["probe_png"],
        "probe_warnings": s["probe_warnings"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_plam(args)
    except (ValueError, RuntimeError) as exc:
        print(f"shardmerge plam: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
