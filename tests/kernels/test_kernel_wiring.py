"""The classic methods' CUDA branch (one fused `shardmerge.kernels.interpolate` call per chunk) computes their CPU merge.

No GPU is needed to check that: the CUDA branch is forced on CPU tensors by patching the device test the methods
use (`shardmerge.engine.methods.common.use_triton`), so the very same branch code runs and calls `interpolate`, which then
goes to
  - its torch reference (`interpolate_reference`): must equal the eager CPU path bit for bit (same operations in
    the same order, -0.0 included), which proves the arguments (mode, weights, thresholds, windows, DARE keys and
    offsets, scales, lambda, normalize) are the ones the CPU path applies;
  - the Triton kernel (`interpolate_triton`, under TRITON_INTERPRET=1, as in tests/kernels/test_kernels.py): interpreted,
    it performs the same float32 operations in the same order, so its values must be equal (the sign of a zero
    may differ: it zeroes dropped entries with a select where the reference multiplies by the mask); compiled on
    a GPU, within the dtype table below (the compiler may contract `acc + d * w` into a fused multiply-add).
A `gpu`-marked test runs the methods on CUDA tensors and compares with CPU; it is skipped without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: kernels are decorated on first launch

import math

import pytest

from shardmerge.engine.methods import common, get
from shardmerge.engine.methods.common import Window, window_thresholds
from shardmerge.engine.methods.dare import DareStats, kernel_args
from shardmerge.kernels import interpolate as ip
from tests.oracles.methods import run_in_memory

# The one dtype -> (atol, rtol) table for kernel-vs-method comparisons. The engine hands methods float32 and they
# return float32, so only that row is used: float32 results differ only where a compiled kernel contracts
# `acc + d * w` into one FMA (one rounding instead of two: a few ulp of the running sum).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# recipe method -> the interpolate mode its CUDA branch must use
MODES = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
}

# Modes whose torch reference rounds differently from the method's eager CPU code, compared with TOL instead of bit
# for bit: interpolate_reference's linear accumulates with `addcmul_`, which this torch build's CPU kernel evaluates
# as one fused multiply-add (acc + x*w rounded once, measured: 183 of 1000 sums differ from mul-then-add), while
# the method, like mergekit's `(weights * tensors).sum(0)`, rounds the product and the sum separately. They differ
# by <= 1 ulp of the running sum, only where a weight's products are inexact. Every other mode is bit-identical.
REFERENCE_ROUNDS_DIFFERENTLY = frozenset({"linear"})

L = "lambda"
CASES = [
    ("linear", dict(weight=(1.0, -0.5, 2.0), normalize=True)),
    ("linear", dict(weight=(0.3, 0.0, -0.7), normalize=False)),
    ("linear", dict(weight=(0.7,), normalize=True)),
    ("task_arithmetic", dict(weight=(0.5, 0.0, -1.0), **{L: 0.7})),
    ("task_arithmetic", dict(weight=(1.0, -1.0), normalize=True)),  # |sum w| < 1e-8: divisor 1
    ("task_arithmetic", dict(weight=(0.3, 0.9, 0.2), normalize=True, **{L: 1.3})),
    ("ties", dict(weight=(1.0, 0.3, -0.4), density=(0.3, 1.0, 0.0), rescale=True)),
    ("ties", dict(weight=(0.6, 0.6, 0.6), density=0.5, normalize=False, **{L: 1.3})),
    ("ties", dict(weight=(1.0, 0.0, 0.5, 2.0), density=(0.05, 0.9, 0.2, 0.5), rescale=True, **{L: 0.5})),
    ("dare_linear", dict(weight=(1.0, 0.3, 0.4), density=(0.3, 1.0, 0.0))),
    ("dare_linear", dict(weight=(1.0, -0.3, 0.4), density=0.6, rescale=False, normalize=True, **{L: 0.5})),
    ("dare_linear", dict(weight=(0.5, 0.5), density=(0.7, 1.5), rescale_rule="l1", random_seed=11)),
    ("dare_ties", dict(weight=(1.0, 0.3, 0.4), density=(0.6, 0.5, 0.2), rescale_rule="l1", normalize=True)),
    ("dare_ties", dict(weight=(1.0, 0.0, -0.4), density=(0.1, 0.9, 0.5), random_seed=3, **{L: 2.0})),
    ("breadcrumbs", dict(weight=(1.0, 0.3, 0.4), density=(0.5, 0.9, 0.3), gamma=(0.05, 0.2, 0.0))),
    ("breadcrumbs", dict(weight=(1.0, -0.5), density=(0.3, 1.0), gamma=0.1, rescale=True, normalize=True)),
    ("breadcrumbs_ties", dict(weight=(1.0, 0.3, 0.4), density=(0.5, 0.9, 0.3), gamma=(0.05, 0.2, 0.0), rescale=True)),
    ("breadcrumbs_ties", dict(weight=(0.0, 0.8, 0.4), density=(0.0, 0.95, 0.4), gamma=(0.5, 0.1, 0.7), **{L: 0.6})),
]

# (shape, rows per chunk, data): ragged last chunks, chunks spanning several kernel blocks of 1024, 1-D and 3-D;
# "grid" data puts every task-vector entry on a 1/64 grid, so magnitudes tie at the selection bounds.
SHAPES = [
    ((13, 37), 4, "grid"),
    ((40, 70), 17, "smooth"),
    ((1500,), None, "grid"),
    ((5, 4, 3), 2, "smooth"),
]


def _inputs(n: int, shape: tuple, data: str, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n experts and a base; expert 1 equals the base on its first row (zero task vector: ties at 0, -0.0)."""
    g = torch.Generator().manual_seed(seed)
    if data == "grid":
        base = torch.round(torch.randn(shape, generator=g) * 256) / 256
        xs = [base + torch.round(torch.randn(shape, generator=g) * 16) / 64 for _ in range(n)]
    else:
        base = torch.randn(shape, generator=g)
        xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    if n > 1:
        xs[1].reshape(shape[0], -1)[0] = base.reshape(shape[0], -1)[0]
    return xs, base


def _merge(method: str, xs, base, rows, params, monkeypatch, path: str, calls: list) -> torch.Tensor:
    """Run the method chunkwise, as the engine does, along one path: 'eager' (the CPU code), 'reference' or
    'triton' (the CUDA branch forced on CPU tensors, interpolate dispatching to that implementation)."""
    spec = get(method)
    with monkeypatch.context() as m:
        if path != "eager":
            m.setattr(common, "use_triton", lambda tensors: True)
            m.setattr(ip, "use_triton", lambda tensors: path == "triton")
        if path == "triton":
            m.setattr(ip, "interpolate_reference", _no_fallback)

        def spy(tensors, weights, **kw):
            calls.append((len(tensors), kw["mode"], kw["elem_offset"], kw["out_dtype"]))
            return ip.interpolate(tensors, weights, **kw)

        m.setattr(common, "interpolate", spy)
        return run_in_memory(
            spec,
            xs,
            None if method == "linear" else base,
            rows_per_chunk=rows,
            name="model.layers.2.mlp.up_proj.weight",
            **params,
        )


def _no_fallback(*args, **kwargs):
    raise AssertionError("the Triton path fell back to the torch reference")


def _n_models(params: dict) -> int:
    return len(params["weight"])


def _expected_calls(method: str, n: int, shape: tuple, rows) -> list:
    """One interpolate call per chunk, at the chunk's flat offset, float32 out."""
    if len(shape) <= 1 or rows is None:
        return [(n, MODES[method], 0, torch.float32)]
    row_numel = math.prod(shape[1:])
    return [(n, MODES[method], r * row_numel, torch.float32) for r in range(0, shape[0], rows)]


def assert_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical float32 tensors (-0.0 and +0.0 differ here)."""
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    diff = actual.view(torch.int32) != expected.view(torch.int32)
    assert not bool(diff.any()), (
        f"{int(diff.sum())} elements differ, max |diff| {float((actual - expected).abs().max())}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol)


def assert_kernel_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Interpreted kernel: equal values (+0.0 == -0.0); compiled kernel: within TOL (FMA contraction)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected), f"max |diff| {float((actual - expected).abs().max())}"
    else:
        assert_close(actual, expected)


@pytest.mark.parametrize("shape,rows,data", SHAPES, ids=[f"{s}-{r}-{d}" for s, r, d in SHAPES])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}{i}" for i, (m, _) in enumerate(CASES)])
def test_cuda_branch_computes_the_cpu_merge(method, params, shape, rows, data, monkeypatch):
    n = _n_models(params)
    xs, base = _inputs(n, shape, data, seed=len(shape) * 100 + n)
    eager_calls, ref_calls, tri_calls = [], [], []
    eager = _merge(method, xs, base, rows, params, monkeypatch, "eager", eager_calls)
    ref = _merge(method, xs, base, rows, params, monkeypatch, "reference", ref_calls)
    tri = _merge(method, xs, base, rows, params, monkeypatch, "triton", tri_calls)
    assert eager_calls == []  # CPU tensors never take the kernel path
    assert ref_calls == tri_calls == _expected_calls(method, n, shape, rows)
    if method in REFERENCE_ROUNDS_DIFFERENTLY:
        assert_close(ref, eager)
    else:
        assert_bits(ref, eager)
    assert_kernel_equal(tri, eager)
    assert bool((eager != base).any()) or method == "linear"  # a merge that changed nothing would prove little


def test_triton_path_really_runs_the_interpreted_kernel(monkeypatch):
    xs, base = _inputs(2, (3, 50), "smooth", seed=1)
    _merge("ties", xs, base, 1, dict(weight=(1.0, 1.0), density=0.5), monkeypatch, "triton", [])
    _, _, kernel = ip._kernels()
    expected = "JITFunction" if torch.cuda.is_available() else "InterpretedFunction"
    assert type(kernel).__name__ == expected


def test_window_thresholds_closed_form():
    """Inclusive hi becomes the next float32 above it; keep-all and drop-all windows map to (0, inf), (inf, inf)."""
    lo, hi = window_thresholds((Window(), Window(drop_all=True), Window(lo=0.25), Window(lo=0.5, hi=1.0)))
    assert lo == (0.0, math.inf, 0.25, 0.5)
    assert hi == (math.inf, math.inf, math.inf, 1.0 + 2.0**-23)
    # an entry equal to hi is kept and the next float32 above it is not, in the kernel's lo <= |tau| < hi
    tau = torch.tensor([0.5, 1.0, 1.0 + 2.0**-23, 0.4999], dtype=torch.float32)
    got = ip.interpolate_reference(
        [tau], [1.0], mode="breadcrumbs", base=torch.zeros(4), thresholds=[0.5], upper_thresholds=[hi[3]]
    )
    assert got.tolist() == [0.5, 1.0, 0.0, 0.0]


def test_dare_kernel_args_keep_all_expert():
    """density >= 1 (no stream key) becomes density 1 with a dummy key: threshold 2**24 keeps every element."""
    stats = DareStats(keys=(None, 123), density=(1.5, 0.25), scales=(1.0, 4.0))
    assert kernel_args(stats) == dict(dare_keys=(0, 123), densities=(1.0, 0.25), scales=(1.0, 4.0))


@pytest.mark.gpu
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}{i}" for i, (m, _) in enumerate(CASES)])
def test_methods_on_cuda_match_cpu(method, params, monkeypatch):
    """On a GPU the methods take the fused kernel (one call per chunk) and agree with their CPU merge."""
    n = _n_models(params)
    shape, rows = (257, 129), 64
    xs, base = _inputs(n, shape, "smooth", seed=9)
    want = _merge(method, xs, base, rows, params, monkeypatch, "eager", [])
    calls = []
    spec = get(method)
    with monkeypatch.context() as m:
        m.setattr(common, "interpolate", lambda t, w, **kw: calls.append(kw["mode"]) or ip.interpolate(t, w, **kw))
        got = run_in_memory(
            spec,
            [x.cuda() for x in xs],
            None if method == "linear" else base.cuda(),
            rows_per_chunk=rows,
            name="model.layers.2.mlp.up_proj.weight",
            **params,
        )
    assert got.is_cuda and calls == [MODES[method]] * len(range(0, shape[0], rows))
    assert_close(got.cpu(), want)
