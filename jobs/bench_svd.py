"""Benchmark of the SVD merge methods against a straightforward per-matrix `torch.linalg.svd` loop.

`python -m shardmerge.jobs.bench_svd` (or `python -m shardmerge.jobs.bench svd`) times tsv, iso_c, iso_cts and cart on K experts of an
up_proj-shaped weight (4096 x 11008 at --scale 1; the default --scale 0.26 = 1065 x 2862; run times in
BENCHMARKS.md) and, for each, the naive implementation the papers' code uses: a Python loop of full
`torch.linalg.svd` calls per matrix, SVD-based polar factors. Prints both times, their ratio and the largest
difference between the two results relative to the largest entry of the naive update.

Synthetic task vectors have a power-law spectrum (sigma_i ~ 1 / i, like fine-tuning updates) plus 1 % white noise;
pure Gaussian updates (flat spectrum) are the worst case for randomized SVD and not what merges see.
With --layers L > 1 the same-shape matrices of L layers are also merged in ONE batched call of the core on the
(L, K, m, n) stack (what the engine does with batching on, shardmerge.engine.run.unit) and timed side by side with our per-matrix
loop (one core call per layer, the engine without batching): columns batched_s, batch_x = ours_s / batched_s and
batch_diff = the largest batched-vs-loop difference relative to the loop's largest entry. On the CPU LAPACK loops
over a batch, so batch_x ~ 1 is expected there; the batch is meant for GPUs (one cuSOLVER/cuBLAS launch instead of L).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import torch

from shardmerge.engine.methods import svd
from shardmerge.jobs.bench_common import print_machine

BASE_SHAPE = (4096, 11008)
METHODS = ("tsv", "iso_c", "iso_cts", "cart")


def synthetic_updates(layers: int, experts: int, m: int, n: int, seed: int) -> torch.Tensor:
    """(layers, experts, m, n) task vectors with sigma_i ~ 1/i spectra plus 1 % white noise (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    out = torch.empty(layers, experts, m, n)
    for i in range(layers):
        for k in range(experts):
            left = torch.randn(m, r, generator=g) * decay
            t = left @ torch.randn(r, n, generator=g)
            t /= t.norm()
            out[i, k] = t + 0.01 * torch.randn(m, n, generator=g) / (m * n) ** 0.5
    return out


# ---------------------------------------------------------------- naive per-matrix implementations


def _svd(A):
    return torch.linalg.svd(A, full_matrices=False)


def _polar(A):
    U, _, Vh = _svd(A)
    return U @ Vh


def naive_tsv(taus: torch.Tensor) -> torch.Tensor:
    K, m, n = taus.shape
    k = min(m, n) // K
    parts = [_svd(t) for t in taus]
    U = torch.cat([u[:, :k] for u, _, _ in parts], 1)
    S = torch.cat([s[:k] for _, s, _ in parts])
    Vh = torch.cat([vh[:k] for _, _, vh in parts], 0)
    return (_polar(U) * S) @ _polar(Vh)


def naive_iso_c(taus: torch.Tensor) -> torch.Tensor:
    U, S, Vh = _svd(taus.sum(0))
    return S.mean() * (U @ Vh)


def naive_iso_cts(taus: torch.Tensor) -> torch.Tensor:
    K, m, n = taus.shape
    common, per = svd.iso_cts_split(min(m, n), K, 0.8)
    U, S, Vh = _svd(taus.sum(0))
    Uc = U[:, :common]
    parts = [_svd(t - Uc @ (Uc.T @ t)) for t in taus]
    Ua = torch.cat([u[:, :per] for u, _, _ in parts] + [Uc], 1)
    Sa = torch.cat([s[:per] for _, s, _ in parts] + [S[:common]])
    Va = torch.cat([vh[:per] for _, _, vh in parts] + [Vh[:common]], 0)
    return Sa.mean() * (_polar(Ua) @ _polar(Va))


def naive_cart(taus: torch.Tensor) -> torch.Tensor:
    mean = taus.mean(0)
    k = max(1, int(0.08 * min(mean.shape)))
    out = mean.clone()
    for t in taus:
        U, S, Vh = _svd(t - mean)
        out += (U[:, :k] * S[:k]) @ Vh[:k]
    return out


NAIVE = {"tsv": naive_tsv, "iso_c": naive_iso_c, "iso_cts": naive_iso_cts, "cart": naive_cart}
OURS = {
    "tsv": svd.tsv_update,
    "iso_c": svd.iso_c_update,
    "iso_cts": svd.iso_cts_update,
    "cart": lambda x: sum(svd.cart_update(x)),
}


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run(method: str, taus: torch.Tensor, float64_reference: bool = False) -> dict:
    """Time one method on (L, K, m, n) task vectors: ours per matrix (one core call per layer), ours batched (one
    call for all L layers, only when L > 1) and the naive per-matrix loop, side by side in this order."""
    warm = taus[:2, :, :8, :12]  # first LAPACK / cuSOLVER calls pay one-off set-up costs: not part of the timing
    OURS[method](warm), OURS[method](warm[0]), NAIVE[method](warm[0])
    ours_s, ours = _timed(lambda: torch.stack([OURS[method](t) for t in taus]), taus.device)
    row = {
        "method": method,
        "layers": taus.shape[0],
        "ours_s": ours_s,
        "batched_s": None,
        "batch_x": None,
        "batch_diff": None,
    }
    if taus.shape[0] > 1:
        batched_s, batched = _timed(lambda: OURS[method](taus), taus.device)
        row.update(batched_s=batched_s, batch_x=ours_s / batched_s, batch_diff=_rel(batched, ours))
    naive_s, naive = _timed(lambda: torch.stack([NAIVE[method](t) for t in taus]), taus.device)
    row.update(naive_s=naive_s, ratio=naive_s / ours_s, rel_diff=_rel(ours, naive), ours_f64=None, naive_f64=None)
    if float64_reference:  # untimed: which of the two float32 results is nearer the same method in float64
        ref = torch.stack([NAIVE[method](t) for t in taus.double()])
        row.update(ours_f64=_rel(ours.double(), ref), naive_f64=_rel(naive.double(), ref))
    return row


def _line(row: dict) -> str:
    def opt(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return (
        f"{row['method']:<8} {row['ours_s']:9.3f} {opt(row['batched_s'], '9.3f'):>9} "
        f"{opt(row['batch_x'], '7.2f'):>7} {row['naive_s']:9.3f} {row['ratio']:7.2f} {row['rel_diff']:9.2e} "
        f"{opt(row['batch_diff'], '10.2e'):>10}"
        + (f" {row['ours_f64']:9.2e} {row['naive_f64']:9.2e}" if row.get("ours_f64") is not None else "")
    )


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="bench svd", description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=0.26, help="fraction of 4096 x 11008 (1.0 = full size)")
    p.add_argument("--rows", type=int, default=None, help="override the row count")
    p.add_argument("--cols", type=int, default=None, help="override the column count")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument(
        "--layers",
        type=int,
        default=1,
        help="same-shape layers: looped per matrix, and (L > 1) decomposed in one batched call",
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    options.add_device(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; 1 = a merge worker's, and steady on a busy machine)",
    )
    p.add_argument(
        "--float64-reference",
        action="store_true",
        help="also run the naive loop in float64 (untimed) and print how far ours and the float32 naive "
        "result are from it (ours_f64, naive_f64): tells approximation error from ill-conditioning",
    )
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if args.scale <= 0 or args.experts < 1 or args.layers < 1 or (args.threads is not None and args.threads < 1):
        p.error("--scale must be > 0 and --experts, --layers, --threads >= 1")
    return args


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device; run on a GPU node or use --device cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one line per method. Returns the process exit code."""
    args = parse_args(argv)
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    m = args.rows or max(1, round(BASE_SHAPE[0] * args.scale))
    n = args.cols or max(1, round(BASE_SHAPE[1] * args.scale))
    machine = print_machine()
    taus = synthetic_updates(args.layers, args.experts, m, n, args.seed).to(device)
    print(
        f"# svd bench: {args.layers} layer(s) x {args.experts} experts of {m} x {n} float32 on {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"{'method':<8} {'ours_s':>9} {'batched_s':>9} {'batch_x':>7} {'naive_s':>9} {'ratio':>7} "
        f"{'rel_diff':>9} {'batch_diff':>10}" + (f" {'ours_f64':>9} {'naive_f64':>9}" if args.float64_reference else "")
    )
    rows = []
    for method in args.methods.split(","):
        row = run(method, taus, args.float64_reference)
        rows.append(row)
        print(_line(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "device": str(device),
                    "shape": [m, n],
                    "experts": args.experts,
                    "layers": args.layers,
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
