"""`memory-72b` benchmark: peak private memory per merge worker on checkpoints with Qwen2.5-VL-72B's true tensor
shapes, proof that neither width nor depth raises a worker's memory (it is bounded by the chunk size).

Each checkpoint holds the real 72B embeddings and LM head (152064 x 8192: 2.49 GB in bf16, the largest tensor),
`--layers` decoder layers of the real width (hidden 8192, intermediate 29568, 64 query / 8 KV heads with biases),
`--vision-blocks` vision-tower blocks (1280 wide, MLP 3456), the patch embedding and the real merger (5120 -> 8192).
All shapes are Qwen2.5-VL-72B-Instruct's; only the layer counts are smaller. The merge runs on Ray workers; the
benchmark prints each worker's peak private memory (sampled RssAnon, see bench_common), the driver's, the process
tree's total, and extrapolates the full model's time from the measured per-unit times: LM layers x 80 and vision
blocks x 32, plus the embeddings/head/merger units, divided by the worker count.

    python -m shardmerge.jobs.bench memory-72b [--models 3] [--layers 1] [--vision-blocks 2] [--method ties] [--workers N]
                                    [--chunk-mb 64] [--shrink 1] [--models-dir DIR] [--json FILE]

`--shrink N` divides every width by N: for trying the benchmark quickly, not for the proof.
Disk: about 6.9 GB per checkpoint with one layer (+1.7 GB per extra layer), written to a temp dir and deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shardmerge.jobs.bench_common import dir_bytes, gib, print_machine, run_child, write_checkpoint

FULL_LAYERS, FULL_VISION = 80, 32
TEXT = dict(hidden=8192, intermediate=29568, heads=64, kv_heads=8, head_dim=128, vocab=152064)
VISION = dict(hidden=1280, intermediate=3456, out=8192, merge=2, patch=14, temporal=2)


def qwen25vl_shapes(layers: int, blocks: int, shrink: int = 1) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config.json, tensor shapes) of a Qwen2.5-VL-72B-shaped checkpoint with `layers` LM layers and `blocks`
    vision blocks, in the current transformers naming (model.language_model.*, model.visual.*)."""
    s = max(1, shrink)
    h, inter, vocab = TEXT["hidden"] // s, TEXT["intermediate"] // s, TEXT["vocab"] // s
    q, kv = TEXT["heads"] * TEXT["head_dim"] // s, TEXT["kv_heads"] * TEXT["head_dim"] // s
    vh, vi, merged = VISION["hidden"] // s, VISION["intermediate"] // s, VISION["hidden"] * 4 // s
    lm = "model.language_model."
    shapes: dict[str, tuple[int, ...]] = {lm + "embed_tokens.weight": (vocab, h), lm + "norm.weight": (h,)}
    for i in range(layers):
        p = f"{lm}layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    v = "model.visual."
    shapes[v + "patch_embed.proj.weight"] = (vh, 3, VISION["temporal"], VISION["patch"], VISION["patch"])
    for j in range(blocks):
        p = f"{v}blocks.{j}."
        shapes.update(
            {
                p + "norm1.weight": (vh,),
                p + "norm2.weight": (vh,),
                p + "attn.qkv.weight": (3 * vh, vh),
                p + "attn.qkv.bias": (3 * vh,),
                p + "attn.proj.weight": (vh, vh),
                p + "attn.proj.bias": (vh,),
                p + "mlp.gate_proj.weight": (vi, vh),
                p + "mlp.gate_proj.bias": (vi,),
                p + "mlp.up_proj.weight": (vi, vh),
                p + "mlp.up_proj.bias": (vi,),
                p + "mlp.down_proj.weight": (vh, vi),
                p + "mlp.down_proj.bias": (vh,),
            }
        )
    shapes.update(
        {
            v + "merger.ln_q.weight": (vh,),
            v + "merger.mlp.0.weight": (merged, merged),
            v + "merger.mlp.0.bias": (merged,),
            v + "merger.mlp.2.weight": (h, merged),
            v + "merger.mlp.2.bias": (h,),
            "lm_head.weight": (vocab, h),
        }
    )
    text_cfg = {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": TEXT["heads"] // s or 1,
        "num_key_value_heads": TEXT["kv_heads"] // s or 1,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "tie_word_embeddings": False,
    }
    vision_cfg = {
        "model_type": "qwen2_5_vl",
        "depth": blocks,
        "hidden_size": vh,
        "intermediate_size": vi,
        "num_heads": 16,
        "out_hidden_size": h,
        "patch_size": VISION["patch"],
        "spatial_merge_size": VISION["merge"],
        "temporal_patch_size": VISION["temporal"],
    }
    cfg = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text_cfg,
        "vision_config": vision_cfg,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    return cfg, shapes


def recipe_text(dirs: list[Path], method: str) -> str:
    """float32 compute, bf16 output; ties/task_arithmetic: first dir is the base; linear: all dirs are inputs."""
    head = "dtype: float32\nout_dtype: bfloat16\n"
    if method == "linear":
        return (
            head
            + "merge_method: linear\nmodels:\n"
            + "".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in dirs)
        )
    per = "weight: 0.5, density: 0.5" if method == "ties" else "weight: 0.5"
    return (
        head
        + f"merge_method: {method}\nbase_model: {dirs[0]}\nmodels:\n"
        + "".join(f"  - model: {d}\n    parameters: {{{per}}}\n" for d in dirs[1:])
    )


def _child(argv: list[str]) -> int:
    """Child process: run the merge on Ray, recording every unit's key and worker-side seconds."""
    recipe, out, workers, chunk_mb = argv
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run import executor
    from shardmerge.engine.run.driver import Driver

    plan = build_plan(load_recipe(recipe), shard_size="5GB", source=recipe)
    times: list[tuple[str, float, int]] = []
    original = Driver.unit_finished

    def record(self, res, node=""):  # benchmark-only wrapper; the driver's own accounting is unchanged
        times.append((self.plan.units[res.unit_id].key, res.seconds, res.nbytes))
        return original(self, res, node)

    Driver.unit_finished = record
    t0 = time.perf_counter()
    summary = executor.execute(
        plan, out, workers=int(workers), chunk_bytes=int(float(chunk_mb) * 2**20), progress=False
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "pool_start_s": summary.get("pool_start_s"),
                "units": times,
                "bytes": summary["bytes"],
            }
        )
    )
    return 0


def extrapolate(units: list, layers: int, blocks: int, workers: int) -> dict:
    """Full-depth estimate from per-unit seconds: median LM-layer unit x 80, median vision block x 32, the rest
    as measured; summed and divided by the worker count (units are independent and spread over the workers)."""
    lm = [s for key, s, _ in units if ".layers." in key + "."]
    vis = [s for key, s, _ in units if ".blocks." in key + "."]
    other = sum(s for key, s, _ in units if ".layers." not in key + "." and ".blocks." not in key + ".")
    per_layer = statistics.median(lm) if lm else 0.0
    per_block = statistics.median(vis) if vis else 0.0
    total = other + FULL_LAYERS * per_layer + FULL_VISION * per_block
    return {
        "per_layer_s": per_layer,
        "per_vision_block_s": per_block,
        "other_units_s": other,
        "full_model_worker_s": total,
        "full_model_wall_estimate_s": total / max(1, workers),
    }


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="shardmerge bench memory-72b", description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=3, help="checkpoints (base + experts), 2 or 3 (default 3)")
    p.add_argument("--layers", type=int, default=1, help="LM decoder layers per checkpoint (default 1)")
    p.add_argument("--vision-blocks", type=int, default=2)
    p.add_argument("--method", default="ties", choices=("ties", "task_arithmetic", "linear"))
    options.add_workers(p, "2")
    p.add_argument("--chunk-mb", type=float, default=64)
    p.add_argument("--shrink", type=int, default=1, help="divide every width by N (development only)")
    p.add_argument("--models-dir", default=None)
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.workers = 2 if args.workers is None else args.workers
    if args.models < 2:
        p.error("--models must be >= 2")
    machine = print_machine()
    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="sm-72b-"))
    work = Path(tempfile.mkdtemp(prefix="sm-72b-work-"))
    try:
        cfg, shapes = qwen25vl_shapes(args.layers, args.vision_blocks, args.shrink)
        t0 = time.perf_counter()
        dirs = []
        for m in range(args.models):
            d = root / f"qwen72b-L{args.layers}-V{args.vision_blocks}-s{args.shrink}-{m}"
            if not (d / "config.json").exists():
                write_checkpoint(d, shapes, cfg, model=m, noise=0.0 if m == 0 else 0.5)
            dirs.append(d)
        largest = max(shapes, key=lambda n: _numel(shapes[n]))
        print(
            f"# {args.models} checkpoints x {dir_bytes(dirs[0]) / 1e9:.2f} GB (generated in "
            f"{time.perf_counter() - t0:.0f} s); largest tensor {largest} {shapes[largest]} = "
            f"{_numel(shapes[largest]) * 2 / 1e9:.2f} GB bf16, {_numel(shapes[largest]) * 4 / 1e9:.2f} GB float32",
            flush=True,
        )
        (work / "r.yaml").write_text(recipe_text(dirs, args.method))
        r = run_child(
            [
                sys.executable,
                "-m",
                "shardmerge.jobs.bench_memory72b",
                "child",
                str(work / "r.yaml"),
                str(work / "out"),
                str(args.workers),
                str(args.chunk_mb),
            ],
            env={"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")},
        )
        res = r.last_json()
        est = extrapolate(res["units"], args.layers, args.vision_blocks, args.workers)
        report(args, r, res, est)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": machine,
                        "args": vars(args),
                        "wall_s": r.wall_s,
                        "mem": r.mem,
                        "run": res,
                        "estimate": est,
                    },
                    indent=1,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.models_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def report(args, r, res: dict, est: dict) -> None:
    m = r.mem
    peaks = ", ".join(gib(x) for x in m["worker_private_peaks"])
    print(
        f"{args.method} of {args.models} checkpoints, {args.workers} workers, chunk {args.chunk_mb:g} MiB: wall "
        f"{r.wall_s:.1f} s (merge {res['seconds']:.1f} s, {res['bytes'] / 1e9:.2f} GB written)",
        flush=True,
    )
    print(
        f"peak private memory per worker: {peaks} (target <= 1.5 GB each); driver {gib(m['driver_private_peak'])}; "
        f"Ray's other processes {gib(m['ray_private_peak_sum'])}; whole tree {gib(m['tree_private_peak'])}; "
        f"max RSS of a worker {gib(m['worker_max_rss'])} ({m['samples']} samples)",
        flush=True,
    )
    print(
        f"per LM layer {est['per_layer_s']:.1f} s, per vision block {est['per_vision_block_s']:.2f} s, "
        f"embeddings/head/merger/other {est['other_units_s']:.1f} s (worker seconds) -> full model ({FULL_LAYERS} "
        f"layers, {FULL_VISION} blocks): {est['full_model_worker_s'] / 60:.1f} worker-minutes, about "
        f"{est['full_model_wall_estimate_s'] / 60:.1f} min on {args.workers} workers",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit(main())
