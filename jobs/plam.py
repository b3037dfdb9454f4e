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
import sys
from collections.abc import Sequence
from pathlib import Path

from shardmerge.jobs import options


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs.probe import add_bench, add_probe_options

    p = argparse.ArgumentParser(prog="shardmerge plam", description=__doc__.split("\n")[0])
    p.add_argument("--mllm", required=True, help="the MLLM (dir or hub id)")
    p.add_argument("--base", required=True, help="its base LLM (dir or hub id)")
    add_bench(p)
    options.add_common(
        p,
        out="gets probe/, merged/, plam.yaml, plam_summary.json",
        workers="1 probe worker; merge workers as `shardmerge merge` sizes them",
    )
    p.add_argument("--alpha", type=float, default=0.1, help="W = (1-α)·W_mllm + α·W_base [0.1]")
    p.add_argument(
        "--targets",
        default="qkvo",
        help=f"tensor group merged: {' | '.join(TARGETS)}, or an exact tensor sub name such as "
        "self_attn.q_proj.weight [qkvo]",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs=2,
        metavar=("S", "E"),
        default=None,
        help="merge layers S..E (inclusive) instead of the probe's plateau",
    )
    p.add_argument("--reprobe", action="store_true", help="probe the merged model too (DIR/probe_merged/)")
    add_probe_options(p)
    p.add_argument("--shard-size", default="5GB", help="max output shard size [5GB]")
    p.add_argument("--weights", default=None, help="MLLM,BASE: unnormalised W = a·W_mllm + b·W_base (+ control)")
    p.add_argument("--max-ci-width", type=int, default=4, help="refuse a c* interval wider than this [4 layers]")
    p.add_argument("--force", action="store_true", help="merge even when the probe is uninformative")
    return p


TARGETS = ("qkvo", "attn", "mlp", "norms", "all")  # PlaM's target groups (test_cli checks them against the engine's)


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


def _model_ref(ref: str) -> str:
    """A local model directory as an absolute path (so the recipe re-runs from any working directory); a hub id
    (no such local path) as it was given."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _recipe(args, probe_json: Path, weights: tuple | None = None) -> dict:
    params: dict = {"targets": args.targets}
    if weights:
        params["weights"] = {"mllm": weights[0], "base": weights[1]}
    else:
        params["alpha"] = args.alpha
    if args.layers:
        params["layers"] = list(args.layers)
    else:
        params["plateau"] = str(Path(probe_json).resolve())
    return {
        "merge_method": "plam",
        "mllm": _model_ref(args.mllm),
        "base_llm": _model_ref(args.base),
        "parameters": params,
    }


def merged_layers(recipe: Path) -> list[int]:
    """The decoder layers the PlaM plan of `recipe` merges (from the plan itself, not from the arguments)."""
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    return sorted({t.layer for t in build_plan(load_recipe(recipe), source=str(recipe)).tensors() if t.op == "plam"})


def layer_range(layers: list[int]) -> list[int] | None:
    """[first, last] of a contiguous run of layers (what PlaM merges); None when there are none."""
    if not layers:
        return None
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise RuntimeError(f"the PlaM plan merges layers {layers}, which are not one contiguous range")
    return [layers[0], layers[-1]]


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


def _merge(args, out: Path, name: str, weights: tuple | None, progress: bool = True) -> dict:
    import yaml

    from shardmerge.engine.phases import phase
    from shardmerge.jobs.merge import run_merge

    recipe = (out / f"{'plam' if name == 'merged' else name}.yaml").resolve()
    recipe.write_text(yaml.safe_dump(_recipe(args, out / "probe" / "probe.json", weights), sort_keys=False))
    phase(f"merging ({name})", str(recipe))
    merge = run_merge(
        recipe,
        out / name,
        workers=options.workers(args, "shardmerge plam"),
        device=args.device,
        address=args.address,
        shard_size=args.shard_size,
        overwrite=True,
        progress=progress,
    )
    return {
        "recipe": str(recipe),
        "dir": str((out / name).resolve()),
        "verified": merge.get("verified", False),
        "shards": merge["shards"],
        "layers": layer_range(merged_layers(recipe)),
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


def run_plam(args: argparse.Namespace, progress: bool = True) -> dict:
    """Run every stage; returns the summary also written to DIR/plam_summary.json. `summary["layers"]` is the
    [first, last] decoder layer the merge changed (read from the plan it ran); `summary["plateau"]` says where the
    plateau was (c* and its interval) and whether it chose those layers or --layers did."""
    from shardmerge.engine.phases import phase

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    weights = _weights(args.weights)
    workers = options.workers(args, "shardmerge plam")
    workers = 1 if workers is None else workers
    started = False
    if workers != 0:
        from shardmerge.engine.run.ray_session import connect

        started = connect(args.address)
    try:
        phase("probing", f"{args.mllm} on {len(args.bench)} benchmark source(s), {max(1, workers)} worker(s)")
        probe = _probe(args.mllm, args, out / "probe", workers)
        forced = _check_probe(args, probe, out)
        merged = _merge(args, out, "merged", weights, progress)
        ci = probe.get("plateau_start_ci")
        summary = {
            "layers": merged["layers"],
            "layers_from": "--layers" if args.layers else "the probe's plateau (c* .. last layer)",
            "plateau": {
                "start": probe.get("plateau_start"),
                "interval": list(ci) if ci else None,
                "probe": str(out / "probe" / "probe.json"),
            },
            "plateau_start": probe.get("plateau_start"),
            "plateau_start_ci": ci,
            "stages": probe.get("stages"),
            "probe_warnings": probe.get("warnings"),
            "forced_past": forced,
            "targets": args.targets,
            "alpha": None if weights else args.alpha,
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
            control = _merge(args, out, "control", (weights[0] + weights[1], 0.0), progress)
            summary["control"] = {**control, "scale": weights[0] + weights[1]}
            models["control"] = control["dir"]
        if args.holdout:
            phase("evaluating", f"{', '.join(models)} on the held-out side")
        summary["evaluation"] = _evaluate(args, out, workers, models) if args.holdout else None
        if args.reprobe:
            phase("re-probing", str(out / "merged"))
            again = _probe(str(out / "merged"), args, out / "probe_merged", workers)
            summary["reprobe_plateau_start"] = again.get("plateau_start")
            summary["reprobe_png"] = str(out / "probe_merged" / "probe.png")
            summary["reprobe_rows"] = summary["probe_rows"] + " (the rows that chose c*)"
    finally:
        if started:
            import ray

            ray.shutdown()
    summary["summary_file"] = str(out / "plam_summary.json")
    (out / "plam_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def human_summary(s: dict, seconds: float) -> str:
    from shardmerge.engine.phases import duration

    p = s["plateau"]
    where = f"c* = {p['start']}" if p["start"] is not None else "no plateau found"
    if p["interval"]:
        where += f", interval {p['interval'][0]}..{p['interval'][1]}"
    layers = f"{s['layers'][0]}..{s['layers'][1]}" if s["layers"] else "none"
    coef = f"alpha {s['alpha']}" if s["alpha"] is not None else f"weights {s['weights'][0]}, {s['weights'][1]}"
    lines = [
        f"merged     {s['merged']}",
        f"layers     {layers} ({s['targets']}, {coef}), chosen by {s['layers_from']}",
        f"plateau    {where} (from {p['probe']}; plot {s['probe_png']})",
        f"shards     {s['shards']}; verified {'yes' if s['verified'] else 'no'}",
        f"time       {duration(seconds)}",
    ]
    lines += [f"warning    {w}" for w in s.get("probe_warnings") or []]
    lines += [f"forced     past: {r}" for r in s.get("forced_past") or []]
    if s.get("evaluation"):
        gains = ", ".join(f"{k} {v:+.4f}" for k, v in s["evaluation"]["gain"].items())
        lines.append(f"held out   gain over the MLLM: {gains}")
    if s.get("reprobe_plateau_start") is not None or "reprobe_png" in s:
        lines.append(f"re-probe   c* = {s.get('reprobe_plateau_start')} ({s['reprobe_png']})")
    lines += [
        f"recipe     {s['recipe']} (absolute paths: `shardmerge merge {s['recipe']} --out DIR` re-runs it anywhere)",
        f"summary    {s['summary_file']} (JSON; --json prints it here instead)",
    ]
    return "\n".join(lines)


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


def rerun_command(args: argparse.Namespace) -> str:
    """The command line that runs this job again (its merges restart; the finished probe is redone too)."""
    from shardmerge.jobs.interrupts import rerun_command as rerun

    head = ["shardmerge", "plam", "--mllm", args.mllm, "--base", args.base, "--out", str(args.out)]
    return rerun(build_parser(), args, head, skip=("mllm", "base", "out"))


def main(argv: Sequence[str] | None = None) -> int:
    import time

    from shardmerge.jobs.interrupts import run_interruptible

    args = build_parser().parse_args(argv)
    options.setup_logging(args)
    progress = not (args.no_progress or args.quiet)

    def body() -> int:
        from shardmerge.engine.phases import Phases, reporting

        t0 = time.monotonic()
        with reporting(Phases("shardmerge plam", enabled=progress)):
            try:
                summary = run_plam(args, progress)
            except (ValueError, RuntimeError, OSError) as exc:
                print(f"shardmerge plam: error: {exc}", file=sys.stderr)
                return 2
        print(json.dumps(summary, indent=2) if args.json else human_summary(summary, time.monotonic() - t0))
        return 0

    return run_interruptible(
        "shardmerge plam", body, out=args.out, what="job (it starts over)", command=lambda: rerun_command(args)
    )


if __name__ == "__main__":
    sys.exit(main())
