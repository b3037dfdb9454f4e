"""`kernels` benchmark: achieved bandwidth of the Triton kernels, against a device copy and the eager torch reference.

For every kernel case and input size it reports
  GB/s          bytes the op must move (each input read once, the output written once) / median time
  vs copy       that bandwidth / the bandwidth of `torch.clone` moving the same number of bytes on the same device
                (1.0 = as fast as a plain copy, the ceiling for a memory-bound kernel)
  speedup       eager torch reference time / Triton time, same tensors, same device
On a machine without CUDA it times the torch reference path only (the Triton kernels run there only under the slow
TRITON_INTERPRET=1 interpreter, which says nothing about speed) and says that the GPU numbers need CUDA; with
--interpret it also times the interpreted kernels beside the reference (a smoke run of the benchmark itself).

Kernel cases: `interpolate` (linear, ties, dare_ties) and `pivot_filter` (PivotMerge's noise floor / weighted sign election / combine, against the torch
path pivot.py runs without the kernel; the expert_energy case includes the torch reduction of the expert energies).

    python -m shardmerge.jobs.bench kernels [--sizes-mb 64,256] [--experts 3] [--dtype bf16] [--repeats 20] [--json out.json]
                                 [--kernels interpolate,pivot_filter] [--interpret]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from shardmerge.kernels import interpolate as ip
from shardmerge.kernels import philox as ph
from shardmerge.kernels import pivot_filter as sf

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INTERP_MODES = ("linear", "ties", "dare_ties")
KERNELS = ("interpolate", "pivot_filter")
PIVOT_WEIGHTS = ("expert_energy", "count")  # with and without the energy pre-pass


@dataclass(frozen=True)
class Row:
    """One measured (kernel case, size) point; times in milliseconds, None where not measured."""

    kernel: str
    size_mb: float  # per input tensor
    bytes_moved: int
    path: str  # "triton" (CUDA), "interp" (interpreted on CPU, --interpret) or "reference" (CPU)
    ms: float
    gbps: float
    copy_gbps: float
    vs_copy: float
    reference_ms: float | None
    speedup: float | None


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median wall time of fn() in ms after warm-up (CUDA events on GPU so launch queues are timed correctly)."""

    def run(fn: Callable[[], object]) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _copy_gbps(nbytes: int, device: torch.device, timed) -> float:
    """Bandwidth of torch.clone over a buffer of nbytes / 2 (a read plus a write moves nbytes in total)."""
    buf = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    ms = timed(lambda: buf.clone())
    return nbytes / ms / 1e6


def _row(kernel, size_mb, nbytes, device, timed, fast, reference, copy_gbps, interpret=False) -> Row:
    """Time the Triton path on CUDA (or interpreted on CPU with `interpret`) beside the reference; on CPU without
    `interpret` time the reference alone."""
    on_gpu = device.type == "cuda"
    run_fast = on_gpu or interpret
    ms = timed(fast if run_fast else reference)
    ref_ms = timed(reference) if run_fast else None
    gbps = nbytes / ms / 1e6
    sig = lambda x: float(f"{x:.4g}")
    path = "triton" if on_gpu else ("interp" if run_fast else "reference")
    return Row(
        kernel,
        size_mb,
        nbytes,
        path,
        sig(ms),
        sig(gbps),
        sig(copy_gbps),
        sig(gbps / copy_gbps),
        None if ref_ms is None else sig(ref_ms),
        None if ref_ms is None else sig(ref_ms / ms),
    )


def _interp_case(mode: str, k: int, numel: int, dtype, device):
    """Inputs and keyword arguments of one interpolate benchmark case; thresholds as a prepare pass would give."""
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(numel, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(k)]
    base = None if mode == "linear" else torch.randn(numel, generator=g, device=device).to(dtype)
    kw = dict(mode=mode, base=base, normalize=mode != "dare_ties")
    if mode == "ties":
        kw["thresholds"] = [ip.magnitude_threshold(x.float() - base.float(), 0.3) for x in xs]
    if mode == "dare_ties":
        kw.update(dare_keys=[ph.stream_key(0, "bench", i) for i in range(k)], densities=[0.3] * k)
    return xs, kw


def bench_interpolate(sizes_mb, k, dtype, device, timed, interpret=False) -> list[Row]:
    rows = []
    for size_mb in sizes_mb:
        numel = int(size_mb * 2**20) // dtype.itemsize
        for mode in INTERP_MODES:
            xs, kw = _interp_case(mode, k, numel, dtype, device)
            weights = [1.0 / k] * k
            n_read = k + (kw["base"] is not None)
            nbytes = (n_read + 1) * numel * dtype.itemsize
            rows.append(
                _row(
                    f"interpolate:{mode}",
                    size_mb,
                    nbytes,
                    device,
                    timed,
                    lambda: ip.interpolate_triton(xs, weights, **kw),
                    lambda: ip.interpolate_reference(xs, weights, **kw),
                    _copy_gbps(nbytes, device, timed),
                    interpret,
                )
            )
            xs = kw = None  # free before the next size (the lambdas ran already)
    return rows


def bench_pivot_filter(sizes_mb, k, device, timed, interpret=False) -> list[Row]:
    """PivotMerge's fused floor/elect/combine on (B, K, r, s) float32 coordinates against the torch path (its
    reference, operation for operation pivot.py's `_sign_filter` + weighted sum); matmuls excluded."""
    rows = []
    for size_mb in sizes_mb:
        b, s = 4, 512  # four same-shape matrices, coords of one expert total size_mb
        r = max(1, int(size_mb * 2**20) // (4 * b * s))
        g = torch.Generator(device=device).manual_seed(0)
        coords = torch.randn(b, k, r, s, generator=g, device=device)
        lam = torch.softmax(torch.randn(b, k, generator=g, device=device), dim=1)
        # pivot.py's floor for a 4096-wide matrix: 10 * 4096 * eps32 * max|C| (about 5e-3 max|C|)
        floor = 10 * 4096 * torch.finfo(torch.float32).eps * coords.abs().amax(dim=(1, 2, 3))
        nbytes = (k + 1) * b * r * s * 4
        for weight in PIVOT_WEIGHTS:
            kw = dict(floor=floor, sign_weight=weight)
            rows.append(
                _row(
                    f"pivot_filter:{weight}",
                    size_mb,
                    nbytes,
                    device,
                    timed,
                    lambda: sf.pivot_filter_coords_triton(coords, lam, **kw),
                    lambda: sf.pivot_filter_coords_reference(coords, lam, **kw),
                    _copy_gbps(nbytes, device, timed),
                    interpret,
                )
            )
        coords = None
    return rows


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="python -m shardmerge.jobs.bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", default=None, help="comma-separated MB per input tensor [CUDA: 16,64,256; CPU: 1,4]")
    p.add_argument("--experts", type=int, default=3, help="K inputs per merge [3]")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="input/output dtype [bf16]")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions, median reported [CUDA 20, CPU 3]")
    options.add_device(p)
    p.add_argument(
        "--kernels",
        default="interpolate,pivot_filter",
        help=f"comma-separated subset of {', '.join(KERNELS)} [interpolate,pivot_filter]",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="CPU only: also time the Triton kernels under TRITON_INTERPRET=1 (checks the benchmark runs; "
        "interpreter times say nothing about GPU speed)",
    )
    p.add_argument(
        "--json-out", dest="json", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    return p


def _parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error(f"--experts must be >= 1, got {args.experts}")
    unknown = set(args.kernels.split(",")) - set(KERNELS)
    if unknown:
        p.error(f"unknown --kernels {sorted(unknown)}; expected {', '.join(KERNELS)}")
    return args


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device; run on a GPU node or use --device cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _print(rows: list[Row], device: torch.device, interpret: bool) -> None:
    head = (
        f"{'kernel':28} {'MB/input':>9} {'path':>9} {'ms':>9} {'GB/s':>8} {'copy GB/s':>10} {'vs copy':>8} "
        f"{'ref ms':>9} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = "-" if r.reference_ms is None else f"{r.reference_ms:9.3f}"
        spd = "-" if r.speedup is None else f"{r.speedup:7.2f}x"
        print(
            f"{r.kernel:28} {r.size_mb:9g} {r.path:>9} {r.ms:9.3f} {r.gbps:8.3g} {r.copy_gbps:10.3g} "
            f"{r.vs_copy:8.3g} {ref:>9} {spd:>8}"
        )
    if device.type != "cuda" and interpret:
        print(
            "\nNo CUDA device: 'interp' rows time the Triton kernels under TRITON_INTERPRET=1 (Python/numpy, "
            "one program at a time) against the torch reference on CPU. These numbers only show that the "
            "benchmark runs; GB/s and speedup of the kernels need a CUDA GPU: rerun this command on one."
        )
    elif device.type != "cuda":
        print(
            "\nNo CUDA device: these are the torch reference (CPU path) numbers. The Triton kernels' GB/s, ratio "
            "to a device copy and speedup over eager torch need a CUDA GPU: rerun this command on one."
        )


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; print a table and optionally write JSON. Returns the process exit code."""
    args = _parse(argv)
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    if args.interpret and on_gpu:
        raise ValueError("--interpret times the interpreted kernels on CPU; drop it on a CUDA device")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first launch: kernels are decorated then
    sizes = [float(x) for x in (args.sizes_mb or ("16,64,256" if on_gpu else "1,4")).split(",")]
    timed = _timer(device, args.repeats or (20 if on_gpu else 3))
    which = args.kernels.split(",")
    rows: list[Row] = []
    if "interpolate" in which:
        rows += bench_interpolate(sizes, args.experts, _DTYPES[args.dtype], device, timed, args.interpret)
    if "pivot_filter" in which:
        rows += bench_pivot_filter(sizes, args.experts, device, timed, args.interpret)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"kernels benchmark on {name}: K={args.experts}, dtype={args.dtype}, torch {torch.__version__}\n")
    _print(rows, device, args.interpret)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "experts": args.experts, "dtype": args.dtype, "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
