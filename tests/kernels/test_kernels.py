"""Kernel tests: every Triton kernel against its torch reference, plus closed-form checks of the references.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (set below, before any kernel is
defined: kernels are decorated on first launch). With CUDA they run compiled on the GPU, and the `gpu`-marked tests
also check that the dispatchers pick the Triton path there.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math

import pytest

from shardmerge.kernels import interpolate as ip
from shardmerge.kernels import philox as ph

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# The one dtype -> (atol, rtol) table for every kernel-vs-reference comparison. float32 differences come only from
# summation order inside fused kernels; half-precision outputs may differ by one rounding step (ulp) of the output
# dtype when that order moves a value across a rounding boundary (bf16 ulp <= 2**-7 relative, fp16 <= 2**-10).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol)


def test_triton_runs_interpreted_on_cpu():
    """Without CUDA the launcher must really run the Triton kernel, interpreted - not a fallback."""
    _, kernel = ph._kernels()
    if HAS_CUDA:
        assert type(kernel).__name__ == "JITFunction"
    else:
        assert type(kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------- philox


def _offsets() -> torch.Tensor:
    """Ragged offsets: a non-multiple of the block, both sides of 2**32, and very large ones."""
    return torch.cat(
        [
            torch.arange(0, 1301),
            torch.arange(2**32 - 7, 2**32 + 6),
            torch.tensor([2**40 + 3, 2**62 + 11, 2**63 - 1]),
        ]
    ).long()


def test_philox_known_answer():
    """Random123's published Philox4x32-10 vector: key (0, 0), counter (0, 0, 0, 0) -> word 0 = 0x6627e8d5."""
    assert int(ph.philox_reference(0, torch.tensor([0]))[0]) == 0x6627E8D5


@pytest.mark.parametrize("key", [0, 1, 12345, 2**31 + 5, 2**40 + 17, 2**63 + 99, 2**64 - 1])
@pytest.mark.parametrize("block", [128, 1024])
def test_philox_reference_matches_triton_randint(key, block):
    offs = _offsets()
    ref = ph.philox_reference(key, offs)
    tri = ph.philox_triton(key, offs.to(DEV), block=block).cpu()
    assert ref.min() >= 0 and ref.max() < 2**32
    assert torch.equal(ref, tri)


def test_philox_high_counter_word_matters():
    """Offsets 2**32 apart share c0 and differ only in c1: their outputs must differ (no 32-bit wrap)."""
    lo = ph.philox_reference(7, torch.arange(0, 512))
    hi = ph.philox_reference(7, torch.arange(0, 512) + 2**32)
    assert (lo != hi).float().mean() > 0.99


def test_stream_key_stable_and_distinct():
    k = ph.stream_key(42, "model.layers.0.mlp.up_proj.weight", 1)
    assert k == ph.stream_key(42, "model.layers.0.mlp.up_proj.weight", 1)
    others = {
        ph.stream_key(43, "model.layers.0.mlp.up_proj.weight", 1),
        ph.stream_key(42, "model.layers.1.mlp.up_proj.weight", 1),
        ph.stream_key(42, "model.layers.0.mlp.up_proj.weight", 0),
    }
    assert k not in others and len(others) == 3
    assert 0 <= k < 2**64
    # the documented construction, recomputed here
    import hashlib

    want = hashlib.blake2b(b"42\x00model.layers.0.mlp.up_proj.weight\x001", digest_size=8).digest()
    assert k == int.from_bytes(want, "little")


def test_threshold24():
    assert ph.threshold24(0.0) == 0
    assert ph.threshold24(1.0) == 2**24
    assert ph.threshold24(0.5) == 2**23
    assert ph.threshold24(0.3) == math.floor(0.3 * 2**24 + 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ph.threshold24(bad)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_mask_fraction_within_binomial_bound(density):
    n = 40_000
    offs = torch.arange(2**32 - n // 2, 2**32 + n // 2)  # straddles the c1 carry
    kept = int(ph.dare_keep_mask(ph.stream_key(0, "w", 0), offs, density).sum())
    p = ph.threshold24(density) / 2**24
    assert abs(kept - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_dare_mask_edges_and_keys():
    offs = torch.arange(0, 5000)
    assert ph.dare_keep_mask(3, offs, 1.0).all()
    assert not ph.dare_keep_mask(3, offs, 0.0).any()
    a = ph.dare_keep_mask(ph.stream_key(0, "w", 0), offs, 0.5)
    b = ph.dare_keep_mask(ph.stream_key(0, "w", 1), offs, 0.5)
    # independent masks agree on about half the entries
    assert abs((a == b).float().mean().item() - 0.5) < 0.05
    # a mask is a pure function of (key, offset): any subset of offsets gives the same bits
    sub = torch.tensor([4999, 17, 2500, 0])
    assert torch.equal(ph.dare_keep_mask(ph.stream_key(0, "w", 0), sub, 0.5), a[sub])


def test_philox_rejects_bad_input():
    with pytest.raises(ValueError):
        ph.philox_reference(-1, torch.arange(3))
    with pytest.raises(ValueError):
        ph.philox_reference(2**64, torch.arange(3))
    with pytest.raises(ValueError):
        ph.philox_reference(1, torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError):
        ph.philox_reference(1, torch.tensor([-1]))
    with pytest.raises(ValueError):
        ph.stream_key(1, "w", -1)


@gpu
@needs_cuda
def test_philox_dispatcher_uses_triton_on_cuda():
    offs = _offsets()
    out = ph.philox(ph.stream_key(1, "w", 0), offs.cuda())
    assert out.is_cuda
    assert torch.equal(out.cpu(), ph.philox_reference(ph.stream_key(1, "w", 0), offs))


# ------------------------------------------------------------------------------------------------------ interpolate


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHTS = (0.7, -0.3, 1.2)
# ragged cases (shape, K): one element, a non-multiple of every block size with odd K, a 3-d chunk
CASES = (((1,), 1), ((7, 33), 3), ((3, 5, 11), 2))


def _inputs(shape, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    return xs, torch.randn(shape, generator=g).to(dtype)


def _mode_kwargs(mode, xs, base, elem_offset=0):
    """Arguments exercising `mode`, with thresholds computed from the whole tensors as a `prepare` pass would."""
    k = len(xs)
    taus = [x.float() - base.float() for x in xs]
    kw = dict(mode=mode, base=None if mode == "linear" else base, normalize=mode in ("linear", "ties"))
    if mode == "task_arithmetic":
        kw["lam"] = 0.6
    if mode == "ties":
        kw["thresholds"] = [ip.magnitude_threshold(t, d) for t, d in zip(taus, (0.4, 0.7, 1.0)[:k])]
    if mode.startswith("breadcrumbs"):
        bounds = [ip.outlier_thresholds(t, 0.5, 0.1) for t in taus]
        kw["thresholds"], kw["upper_thresholds"] = [b[0] for b in bounds], [b[1] for b in bounds]
    if mode.startswith("dare"):
        kw["dare_keys"] = [ph.stream_key(7, "model.layers.0.w", i) for i in range(k)]
        kw["densities"] = (0.3, 1.0, 0.55)[:k]
        kw["elem_offset"] = elem_offset
        kw["normalize"] = mode == "dare_linear"
    return kw


def test_interpolate_triton_really_runs_the_kernel():
    xs, _ = _inputs((5,), 2, torch.float32)
    ip.interpolate_triton(xs, WEIGHTS[:2])
    kernel = ip._kernels()[2]
    assert type(kernel).__name__ == ("JITFunction" if HAS_CUDA else "InterpretedFunction")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ip.MODES)
def test_interpolate_triton_matches_reference(mode, dtype):
    for shape, k in CASES:
        xs, base = _inputs(shape, k, dtype)
        kw = _mode_kwargs(mode, xs, base, elem_offset=2**32 - 50)
        want = ip.interpolate_reference(xs, WEIGHTS[:k], **kw)
        kw_dev = dict(kw, base=None if kw["base"] is None else kw["base"].to(DEV))
        got = ip.interpolate_triton([x.to(DEV) for x in xs], WEIGHTS[:k], block=64, **kw_dev)
        assert got.shape == want.shape
        assert_close(got, want)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_interpolate_out_dtype_and_cast(out_dtype):
    xs, base = _inputs((4, 9), 3, torch.float32)
    kw = _mode_kwargs("ties", xs, base)
    want = ip.interpolate_reference(xs, WEIGHTS, **kw).to(out_dtype)  # float32 result rounded once
    got = ip.interpolate_triton(
        [x.to(DEV) for x in xs], WEIGHTS, out_dtype=out_dtype, block=32, **dict(kw, base=base.to(DEV))
    )
    assert torch.equal(got.cpu(), want)  # round-to-nearest-even, bit for bit


def test_ties_closed_form():
    """Hand-computed TIES: trim, elect by weighted sum (0 -> +), disjoint weighted mean, lambda."""
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.05, 0.0])
    t2 = torch.tensor([-3.0, 1.0, 0.5, -0.3, 0.0])
    xs, w = [base + t1, base + t2], [1.0, 2.0]
    # thresholds: expert 1 drops |t| < 0.1 (the 0.05), expert 2 keeps everything
    # weighted d1 = [1, -2, .5, 0, 0], d2 = [-6, 2, 1, -.6, 0]; sums [-5, 0, 1.5, -.6, 0] -> signs [-, +, +, -, +]
    # agreeing: [d2], [d2], [d1, d2], [d2], [] ; divisors [2, 2, 3, 2, 0 -> 1]
    merged = torch.tensor([-6 / 2, 2 / 2, 1.5 / 3, -0.6 / 2, 0.0])
    for fn in (ip.interpolate_reference, ip.interpolate_triton):
        out = fn(xs, w, mode="ties", base=base, normalize=True, lam=0.5, thresholds=[0.1, 0.0])
        torch.testing.assert_close(out, base + 0.5 * merged, atol=1e-6, rtol=0)


def test_linear_and_task_arithmetic_closed_form():
    a, b, c = torch.full((3,), 2.0), torch.full((3,), 5.0), torch.full((3,), 1.0)
    lin = ip.interpolate_reference([a, b], [1.0, 3.0], mode="linear", normalize=True)
    torch.testing.assert_close(lin, torch.full((3,), (2 + 15) / 4), atol=0, rtol=0)
    ta = ip.interpolate_triton([a, b], [1.0, 3.0], mode="task_arithmetic", base=c, lam=0.5)
    torch.testing.assert_close(ta, torch.full((3,), 1 + 0.5 * (1 * 1 + 3 * 4)), atol=0, rtol=0)


def test_dare_default_rescale_is_inverse_density():
    base = torch.zeros(4000)
    x = torch.linspace(1, 2, 4000)
    key = ph.stream_key(3, "w", 0)
    for fn in (ip.interpolate_reference, ip.interpolate_triton):
        out = fn([x], [1.0], mode="dare_linear", base=base, dare_keys=[key], densities=[0.3])
        keep = ph.dare_keep_mask(key, torch.arange(4000), 0.3)
        torch.testing.assert_close(out, torch.where(keep, x * (1 / 0.3), 0.0), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["dare_linear", "dare_ties"])
def test_dare_independent_of_block_and_chunking(mode):
    xs, base = _inputs((10, 13), 3, torch.float32, seed=3)
    kw = _mode_kwargs(mode, xs, base)
    whole = ip.interpolate_reference(xs, WEIGHTS, **kw)
    for block in (16, 128):
        got = ip.interpolate_triton([x.to(DEV) for x in xs], WEIGHTS, block=block, **dict(kw, base=base.to(DEV)))
        assert torch.equal(got.cpu(), whole)
    for cuts in ((0, 3, 4, 10), (0, 7, 10)):  # row chunks, each with its flat element offset
        parts = []
        for r0, r1 in zip(cuts, cuts[1:]):
            kc = dict(kw, base=base[r0:r1], elem_offset=r0 * 13)
            parts.append(ip.interpolate_reference([x[r0:r1] for x in xs], WEIGHTS, **kc))
            tri = ip.interpolate_triton(
                [x[r0:r1].to(DEV) for x in xs], WEIGHTS, block=32, **dict(kc, base=base[r0:r1].to(DEV))
            )
            assert torch.equal(tri.cpu(), parts[-1])
        assert torch.equal(torch.cat(parts), whole)


def test_dare_l1_partials_sum_over_chunks():
    xs, base = _inputs((6, 10), 2, torch.float32, seed=5)
    keys, dens = [11, 12], [0.4, 0.8]
    whole = ip.dare_l1_partials(xs, base, keys, dens)
    chunked = ip.dare_l1_partials([x[:4] for x in xs], base[:4], keys, dens) + ip.dare_l1_partials(
        [x[4:] for x in xs], base[4:], keys, dens, elem_offset=40
    )
    torch.testing.assert_close(whole, chunked, atol=1e-12, rtol=1e-12)
    tau = (xs[0] - base).abs().reshape(-1)
    keep = ph.dare_keep_mask(11, torch.arange(60), 0.4)
    torch.testing.assert_close(whole[0], torch.tensor([tau.sum(), (tau * keep).sum()], dtype=torch.float64))
    assert ip.l1_rescale(4.0, 2.0) == 2.0 and ip.l1_rescale(4.0, 0.0) == 1.0


# mergekit 0.1.5 is the oracle for the classic methods (a test dependency in pyproject.toml).
_MK = {
    "task_arithmetic": {"lambda": 0.6},
    "ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "dare_linear": {},
    "dare_ties": {},
}


def _mergekit(name, xs, base, weights, params):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(
        list(xs) + ([base] if base is not None else []), base_index=len(xs) if base is not None else None
    )
    return registry.get(name)([group], parameters=dict(params, weight=list(weights)))[0]


def test_reference_matches_mergekit_linear():
    xs, _ = _inputs((6, 17), 3, torch.float32)
    want = _mergekit("linear", xs, None, WEIGHTS, {})
    assert_close(ip.interpolate_reference(xs, WEIGHTS, mode="linear", normalize=True), want)


@pytest.mark.parametrize("mode", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_reference_matches_mergekit_task_modes(mode):
    xs, base = _inputs((6, 17), 3, torch.float32, seed=1)
    taus = [x - base for x in xs]
    kw = dict(mode=mode, base=base, lam=_MK[mode].get("lambda", 1.0), normalize=mode == "ties")
    if mode == "ties":
        kw["thresholds"] = [ip.magnitude_threshold(t, 0.4) for t in taus]
    if mode.startswith("breadcrumbs"):
        b = [ip.outlier_thresholds(t, 0.5, 0.1) for t in taus]
        kw["thresholds"], kw["upper_thresholds"] = [x[0] for x in b], [x[1] for x in b]
    want = _mergekit(mode, xs, base, WEIGHTS, _MK[mode])
    assert_close(ip.interpolate_reference(xs, WEIGHTS, **kw), want)


@pytest.mark.parametrize("mode", ["dare_linear", "dare_ties"])
def test_reference_matches_mergekit_dare_with_our_masks(mode, monkeypatch):
    """mergekit's DARE (L1 rescale on) with its Bernoulli draws replaced by our Philox masks."""
    xs, base = _inputs((5, 23), 3, torch.float32, seed=2)
    keys, dens = [ph.stream_key(9, "t", i) for i in range(3)], [0.3, 1.0, 0.6]
    offs = torch.arange(base.numel()).reshape(base.shape)
    masks = iter([ph.dare_keep_mask(kk, offs, d).float() for kk, d in zip(keys, dens) if d < 1])
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    want = _mergekit(mode, xs, base, WEIGHTS, {"density": dens})
    assert next(masks, None) is None  # mergekit drew exactly the masks we expected
    parts = ip.dare_l1_partials(xs, base, keys, dens)
    scales = [ip.l1_rescale(float(p[0]), float(p[1])) for p in parts]
    got = ip.interpolate_reference(xs, WEIGHTS, mode=mode, base=base, dare_keys=keys, densities=dens, scales=scales)
    assert_close(got, want)


def test_interpolate_rejects_bad_input():
    xs, base = _inputs((4,), 2, torch.float32)
    bad = [
        dict(mode="nope"),
        dict(mode="ties", base=base),  # thresholds missing
        dict(mode="linear", base=base),  # linear takes no base
        dict(mode="task_arithmetic"),  # base missing
        dict(mode="task_arithmetic", base=base, thresholds=[0.0, 0.0]),  # not applicable
        dict(mode="linear", lam=2.0),
        dict(mode="dare_linear", base=base, dare_keys=[1, 2], densities=[0.5, 1.5]),
        dict(mode="dare_linear", base=base, dare_keys=[1], densities=[0.5, 0.5]),
        dict(mode="task_arithmetic", base=base, elem_offset=-1),
        dict(mode="task_arithmetic", base=base[:3]),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            ip.interpolate(xs, WEIGHTS[:2], **kw)
    with pytest.raises(ValueError):
        ip.interpolate(xs, [1.0, -1.0], mode="linear", normalize=True)  # zero weight sum
    with pytest.raises(ValueError):
        ip.interpolate([xs[0], xs[1].half()], WEIGHTS[:2])
    with pytest.raises(ValueError):
        ip.interpolate([torch.arange(4), torch.arange(4)], WEIGHTS[:2])


def test_interpolate_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton launcher called for CPU tensors")

    monkeypatch.setattr(ip, "interpolate_triton", boom)
    xs, base = _inputs((3, 4), 2, torch.float32)
    out = ip.interpolate(xs, WEIGHTS[:2], mode="task_arithmetic", base=base)
    torch.testing.assert_close(out, base + 0.7 * (xs[0] - base) - 0.3 * (xs[1] - base))


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ip.MODES)
def test_interpolate_dispatcher_cuda_matches_cpu(mode):
    xs, base = _inputs((129, 257), 3, torch.bfloat16)
    kw = _mode_kwargs(mode, xs, base, elem_offset=2**33)
    want = ip.interpolate(xs, WEIGHTS, **kw)
    got = ip.interpolate([x.cuda() for x in xs], WEIGHTS, **dict(kw, base=None if kw["base"] is None else base.cuda()))
    assert got.is_cuda
    assert_close(got, want)


# ------------------------------------------------------------------------------------------------------- benchmark


def test_bench_kernels_runs_and_reports(tmp_path, capsys):
    import json

    from shardmerge.jobs import bench_kernels

    out = tmp_path / "bench.json"
    assert (
        bench_kernels.main(
            [
                "--sizes-mb",
                "0.0625",
                "--repeats",
                "1",
                "--experts",
                "2",
                "--dtype",
                "fp16",
                "--device",
                "cpu",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == [f"interpolate:{m}" for m in bench_kernels.INTERP_MODES] + [
        f"pivot_filter:{w}" for w in bench_kernels.PIVOT_WEIGHTS
    ]
    numel = int(0.0625 * 2**20) // 2
    # bytes each op must move: linear reads K inputs, the task modes also the base; one output write
    assert [r["bytes_moved"] for r in rows[:3]] == [3 * numel * 2, 4 * numel * 2, 4 * numel * 2]
    for r in rows:
        assert r["path"] == "reference" and r["ms"] > 0 and r["speedup"] is None
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["ms"] / 1e6, rel=1e-3)
    assert "need a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_kernels.main(["--kernels", "nope"])
