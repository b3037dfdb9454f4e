"""`shardmerge demo`: on a fresh machine, build tiny random models locally (no downloads), merge them with TIES on an
embedded local Ray, verify the output, load it with transformers and print a short summary; then the MLLM methods on
tiny MLLMs: PivotMerge of three LLaVA experts' projectors with calibration gains, and the PlaM pipeline.

Everything runs through the same code as a real merge (recipe → plan → Ray workers → verified HF directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """\
# TIES merge of two fine-tunes of a tiny Llama-style base (built locally by the demo)
merge_method: ties
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {e2}
    parameters: {{weight: [0.4, 0.8], density: 0.5}}   # per-layer gradient
parameters: {{normalize: true}}
dtype: bfloat16
"""


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="shardmerge demo", description=__doc__.split("\n")[0])
    options.add_out(p, "models and outputs; default: a new temporary directory", required=False)
    options.add_workers(p, "2, so the demo runs on an embedded local Ray")
    options.add_json(p)
    options.add_verbosity(p)
    return p


def _step(msg: str) -> float:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def run_demo(root: Path, workers: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from shardmerge.engine.tiny_models import build_llm
    from shardmerge.jobs.merge import run_merge

    t0 = _step(f"building tiny models in {root}")
    models = {"base": build_llm(root / "models" / "base", seed=0)}
    for k in (1, 2):
        models[f"e{k}"] = build_llm(root / "models" / f"e{k}", base=models["base"], perturb_seed=k)
    recipe = root / "ties.yaml"
    recipe.write_text(RECIPE.format(**{k: str(v) for k, v in models.items()}))
    _step(f"merging with TIES on an embedded local Ray ({workers} workers): {recipe}")
    summary = run_merge(recipe, root / "merged", workers=workers, shard_size="40KB", overwrite=True)
    _step("loading the merged model with transformers")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged", trust_remote_code=False)
    ids = torch.arange(4, 20).unsqueeze(0)
    with torch.no_grad():
        logits = merged(ids).logits
    result = {
        "merged_dir": str(root / "merged"),
        "shards": summary["shards"],
        "work_units": summary["units"],
        "bytes": summary["bytes"],
        "verified": summary.get("verified", False),
        "dtype": str(merged.dtype),
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result.update(_pivot_part(root, workers))
    result.update(_mllm_part(root, workers))
    return result


PIVOT_RECIPE = """\
# PivotMerge of three tiny LLaVA experts that share the vision tower and LLM and differ in the projector
merge_method: pivot
models: [{a}, {b}, {c}]
calibration: {pairs}        # image-caption pairs: per-layer contrastive alignment gains -> lambda
parameters: {{pivot: mean, energy: 0.9, density: 0.2, temperature: 1.0, contribution: data}}
dtype: float32
"""


def _pivot_part(root: Path, workers: int) -> dict:
    """PivotMerge with a calibration set built on the fly (PNG images + captions in Parquet)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from shardmerge.engine.tiny_models import build_mllm, derive_projector_expert
    from shardmerge.jobs.merge import run_merge

    _step("PivotMerge of three tiny LLaVA experts' projectors, weighted by calibration gains")
    base = root / "pivot"
    init = build_mllm(base / "init", "llava", seed=0, num_layers=2)
    experts = {c: derive_projector_expert(init, base / f"expert_{c}", seed=i) for i, c in enumerate("abc")}
    images = []
    for seed in range(6):
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(seed).rand(48, 56, 3) * 255).astype("uint8")).save(buf, "PNG")
        images.append(buf.getvalue())
    captions = ["a red square", "two birds", "a cat", "a street sign", "blue water", "a tree"]
    pq.write_table(pa.table({"image": images, "caption": captions}), base / "pairs.parquet")
    recipe = base / "pivot.yaml"
    recipe.write_text(PIVOT_RECIPE.format(pairs=base / "pairs.parquet", **experts))
    s = run_merge(recipe, base / "merged", workers=workers, overwrite=True, progress=False)
    AutoModelForImageTextToText.from_pretrained(base / "merged", trust_remote_code=False)
    report = json.loads((base / "merged" / "pivot_report.json").read_text())
    lam = {
        r["tensor"].rsplit(".", 2)[-2]: [round(x, 3) for x in r["lambda"]]
        for r in report["tensors"]
        if r["kind"] == "svd"
    }
    return {
        "pivot_merged_dir": str(base / "merged"),
        "pivot_verified": s.get("verified", False),
        "pivot_lambda_per_layer": lam,
    }


def _mllm_part(root: Path, workers: int) -> dict:
    """The PlaM pipeline on tiny MLLMs, when that part of the engine is installed."""
    try:
        from shardmerge.jobs.plam import demo_pipeline
    except ImportError:
        return {}
    _step("PlaM pipeline on a tiny Qwen2.5-VL: probe -> plateau -> merge -> verify")
    return demo_pipeline(root / "plam", workers=workers)


def main(argv: list[str] | None = None) -> int:
    from shardmerge.jobs import options

    args = build_parser().parse_args(argv)
    options.setup_logging(args)
    workers = options.workers(args, "shardmerge demo")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="shardmerge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        result = run_demo(root, workers=2 if workers is None else workers)
    except (ValueError, RuntimeError) as exc:
        print(f"shardmerge demo: error: {exc}", file=sys.stderr)
        return 2
    ok = result["verified"] and result["logits_finite"] and result.get("pivot_verified", True)
    ok = ok and result.get("plam_verified", True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(human_summary(result, ok, time.monotonic() - t0))
    return 0 if ok else 1


def human_summary(r: dict, ok: bool, seconds: float) -> str:
    lines = [
        f"[demo] {'done' if ok else 'FAILED'} in {seconds:.1f} s",
        f"  TIES merge   {r['merged_dir']}: {r['shards']} shards, verified {r['verified']}, loads in transformers "
        f"({r['dtype']}, finite logits {r['logits_finite']})",
    ]
    if "pivot_merged_dir" in r:
        lines.append(f"  PivotMerge   {r['pivot_merged_dir']}: verified {r['pivot_verified']}")
    if "plam_merged_dir" in r:
        layers = r["plam_layers"]
        lines.append(
            f"  PlaM         {r['plam_merged_dir']}: layers {layers[0]}..{layers[1]}, verified {r['plam_verified']}; "
            f"probe plateau c* = {r['probe_plateau_start']} (plot {r['probe_png']})"
        )
    lines.append("  next         `shardmerge merge your_recipe.yaml --out DIR` on real models (README: Recipes)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
