"""`python -m shardmerge.jobs.bench probe`: what a whole cut-layer sweep of the probe costs, in unmasked passes.

For the same samples it times (1) one unmasked forward, (2) the fast path over every cut (one traced pass plus
batched text-only suffixes), (3) the exact path (one masked forward per cut, the reference cost). The target is a
fast sweep <= 3 unmasked passes. The models are random in-memory MLLMs whose shape is chosen on the command line
(nothing is downloaded). What decides the ratio is the share of the prompt that the suffixes recompute (the text
after the image: text before it is shared), so it is reported with the ratio that counting token-layers alone
predicts: 1 + (suffix share) * sum_c (L - c) / L.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from shardmerge.engine.probe import core, fixtures, paths


def _time(fn, repeats: int, sync) -> float:
    """Best wall time of `fn` over `repeats` runs after one warm-up run (the minimum: the machine may be shared,
    and interference only ever adds time)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def predicted_ratio(num_layers: int, cuts: Sequence[int], suffix_share: float) -> float:
    """Token-layer count of a fast sweep over that of one unmasked pass (vision tower and overheads ignored)."""
    return 1.0 + suffix_share * sum(num_layers - c for c in cuts if c < num_layers) / num_layers


def bench(
    family: str,
    layers: int,
    hidden: int,
    heads: int,
    grid: tuple,
    before: int,
    after: int,
    samples: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    exact: bool = True,
) -> dict:
    """Timings and ratios for one model shape (see the module docstring)."""
    side = grid[0]
    model = fixtures.tiny_model(family, layers, seed=0, dtype=dtype, hidden=hidden, heads=heads, llava_side=side).to(
        device
    )
    parts = core.install(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cuts = list(range(layers + 1))
    rows = []
    for s in range(samples):
        kw = fixtures.tiny_inputs(family, seed=s, before=before, after=after, grid=grid, llava_side=side)
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        kw["pixel_values"] = kw["pixel_values"].to(dtype)
        inputs = core.make_inputs(kw, parts.image_token_id)
        with torch.no_grad():
            t_full = _time(lambda: model(**inputs.model_kwargs, use_cache=False), repeats, sync)
            t_fast = _time(lambda: paths.fast_logits(model, parts, inputs, cuts), repeats, sync)
            t_exact = None
            if exact:
                t_exact = _time(lambda: [paths.exact_logits(model, inputs, c) for c in cuts], repeats, sync)
        first_image = int(torch.nonzero(inputs.image_mask)[0])
        suffix = int((~inputs.image_mask[first_image:]).sum())
        share = suffix / inputs.seq_len
        rows.append(
            dict(
                sample=s,
                seq_len=inputs.seq_len,
                image_tokens=int(inputs.image_mask.sum()),
                text_before_image=first_image,
                suffix_tokens=suffix,
                suffix_share=share,
                unmasked_s=t_full,
                fast_sweep_s=t_fast,
                exact_sweep_s=t_exact,
                fast_ratio=t_fast / t_full,
                exact_ratio=(t_exact / t_full) if exact else None,
                predicted_fast_ratio=predicted_ratio(layers, cuts, share),
            )
        )
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    return dict(
        family=family,
        layers=layers,
        hidden=hidden,
        heads=heads,
        grid=list(grid),
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        cuts=len(cuts),
        samples=rows,
        fast_ratio=mean("fast_ratio"),
        exact_ratio=mean("exact_ratio") if exact else None,
        predicted_fast_ratio=mean("predicted_fast_ratio"),
        target_fast_ratio=3.0,
        meets_target=mean("fast_ratio") <= 3.0,
    )


def _grid(text: str) -> tuple:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected HxW patches, e.g. 32x32") from None
    if h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: both sides must be even (2x2 patch merge)")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="python -m shardmerge.jobs.bench probe", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=fixtures.FAMILIES, default="qwen2_5_vl")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--grid",
        type=_grid,
        default=(32, 32),
        help="image patches HxW (Qwen: HW/4 image tokens; LLaVA: H*H tokens) [32x32]",
    )
    p.add_argument("--before", type=int, default=16, help="text tokens before the image [16]")
    p.add_argument("--after", type=int, default=40, help="text tokens after the image [40]")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    options.add_device(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-exact", action="store_true", help="skip the (slow) exact-path reference sweep")
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        print(
            f"bench probe: error: hidden {args.hidden} must split into {args.heads} heads of even size", file=sys.stderr
        )
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench(
        args.family,
        args.layers,
        args.hidden,
        args.heads,
        args.grid,
        args.before,
        args.after,
        args.samples,
        args.repeats,
        args.device,
        getattr(torch, args.dtype),
        exact=not args.no_exact,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
