"""PivotMerge's fused sign-election kernel (`shardmerge.kernels.pivot_filter.pivot_filter_coords`) and its wiring in pivot.py.

- The torch reference repeats engine/methods/pivot.py's torch path (`_noise_floor` + `_sign_filter` + the
  lambda-weighted sum) operation for operation: equal bit for bit on random inputs, batched or not.
- The Triton kernel (interpreted on CPU under TRITON_INTERPRET=1, set before any kernel is defined, as in
  tests/kernels/test_kernels.py) equals the reference for every sign_weight on inputs with planted ties, planted conflicts,
  entries at and below the noise floor, B > 1 with different floors, K = 2..4; conflict counts exactly, the merge
  within the dtype table.
- `pivot_merge`'s kernel branch, forced on CPU by patching `pivot._use_kernel`, gives the CPU path's result.
`gpu`-marked tests run the compiled kernel on CUDA; they are skipped without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: kernels are decorated on first launch

import pytest

import shardmerge.engine.methods.pivot as pm
from shardmerge.kernels import pivot_filter as sf

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
WEIGHTS = sf.PIVOT_SIGN_WEIGHTS

# The dtype -> (atol, rtol) table is tests/kernels/test_kernels.py's, keyed by the dtype of the compared (merged) tensor.
# The kernel computes in float32 (half inputs are upcast exactly) and its output is float32, so only that row is
# used: interpreted, it adds the same products in the same expert order as the reference (measured: equal);
# compiled, the GPU may fuse lambda * C into the running sum (one rounding instead of two: a few ulp of the sum).
from test_kernels import TOL, assert_close  # noqa: E402,F401


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planted(b: int, k: int, r: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coords (B, K, r, s), lambdas (B, K) and floors (B,) (one of them 0) with, in every matrix:
    row 0: expert 1 = -expert 0 and every other expert below the floor -> a tie under every sign_weight (expert 1
           is expert 0 with entrywise sign flips, so their energies are equal bit for bit);
    row 1: experts agree except the last, which opposes with a smaller magnitude -> planted conflicts;
    row 2: entries exactly at the floor and at half of it (neither vote nor conflict);
    elsewhere random signs and magnitudes (more conflicts, and ties for K = 2 where expert 1 flips expert 0)."""
    g = gen(seed)
    c = torch.randn(b, k, r, s, generator=g) * torch.rand(b, k, 1, 1, generator=g).add(0.5)
    flips = torch.where(torch.rand(b, 1, r, s, generator=g) < 0.5, -1.0, 1.0)
    flips[:, :, 0] = -1.0
    c[:, 1:2] = flips * c[:, 0:1]
    floors = torch.tensor([0.3, 0.0, 0.05, 0.6][:b])
    f1, f2 = floors[:, None], floors[:, None, None]
    c[:, 2:, 0] = 0.5 * f2 * torch.where(torch.rand(b, k - 2, s, generator=g) < 0.5, -1.0, 1.0)
    if k > 2:
        c[:, 0, 1] = c[:, 0, 1].abs() + 1.0
        c[:, 1 : k - 1, 1] = c[:, 0:1, 1]  # expert 1 agrees here (row 1 flips dropped)
        c[:, k - 1, 1] = -0.5 * c[:, 0, 1]
    c[:, 0, 2, : s // 2] = f1
    c[:, 1:, 2, : s // 2] = -f2
    c[:, :, 2, s // 2 :] = 0.5 * f2
    lam = torch.softmax(torch.randn(b, k, generator=g), dim=1)
    return c, lam, floors


def reference_ties(c: torch.Tensor, floors: torch.Tensor, sign_weight: str) -> int:
    """Entries whose election is a tie with at least one real vote (recomputed here, to prove they are planted)."""
    real = c.abs() > floors[:, None, None, None]
    sign = torch.where(real, c.sign(), torch.zeros_like(c))
    if sign_weight == "expert_energy":
        vote = sign * c.square().sum(dim=(2, 3))[..., None, None]
    else:
        vote = {"entry_energy": sign * c.square(), "magnitude": sign * c.abs(), "count": sign}[sign_weight]
    tie = vote.sum(dim=1).abs() <= pm.TIE_RTOL * vote.abs().sum(dim=1)
    return int((tie & real.any(dim=1)).sum())


def test_pivot_kernel_runs_interpreted_on_cpu():
    """Without CUDA the launcher must really run the Triton kernel, interpreted - not a fallback."""
    sf.pivot_filter_coords_triton(torch.ones(1, 2, 2, 2, device=DEV), [0.5, 0.5], floor=0.0)
    assert type(sf._pivot_kernels()[1]).__name__ == ("JITFunction" if HAS_CUDA else "InterpretedFunction")


@pytest.mark.parametrize("sign_weight", WEIGHTS)
def test_closed_form_election(sign_weight):
    """Hand-computed votes (expert energies 14, 6, 43) for both paths; zeros never vote."""
    C = torch.tensor([[[1.0, -2.0], [0.0, 3.0]], [[2.0, 1.0], [0.0, -1.0]], [[-4.0, 1.0], [5.0, -1.0]]])
    # per entry the experts' signs; the winner by expert energy / C^2 / |C| / count:
    # (0,0) +,+,- : -23 / -11 / -1 / +1   (0,1) -,+,+ : +35 / -2 / 0 tie / +1
    # (1,1) +,-,- : -35 / +7 / +1 / -1
    kept = {
        "expert_energy": [[[0, 0], [0, 0]], [[0, 1], [0, -1]], [[-4, 1], [5, -1]]],
        "entry_energy": [[[0, -2], [0, 3]], [[0, 0], [0, 0]], [[-4, 0], [5, 0]]],
        "magnitude": [[[0, 0], [0, 3]], [[0, 0], [0, 0]], [[-4, 0], [5, 0]]],
        "count": [[[1, 0], [0, 0]], [[2, 1], [0, -1]], [[0, 1], [5, -1]]],
    }[sign_weight]
    kept = torch.tensor(kept, dtype=torch.float32)
    lam = torch.tensor([0.5, 0.25, 0.125])
    want = (lam[:, None, None] * kept).sum(dim=0)
    want_conflicts = int(((kept == 0) & (C != 0)).sum())
    for fn in (sf.pivot_filter_coords_reference, sf.pivot_filter_coords_triton):
        merged, conflicts = fn(C.to(DEV), lam, floor=0.0, sign_weight=sign_weight, tie_rtol=pm.TIE_RTOL)
        assert torch.equal(merged.cpu(), want), (fn.__name__, merged, want)
        assert int(conflicts) == want_conflicts
    # the pivot.py torch path agrees with the hand computation
    C_f, conflict = pm._sign_filter(C, torch.tensor(0.0), sign_weight)
    assert torch.equal(C_f, kept) and int(conflict.sum()) == want_conflicts


def test_tie_and_floor_closed_form():
    """An exact tie zeroes both sides (2 conflicts); an entry at the floor is kept unvoted."""
    C = torch.tensor([[[2.0, 0.5]], [[-2.0, 0.25]]])
    for fn in (sf.pivot_filter_coords_reference, sf.pivot_filter_coords_triton):
        for w in WEIGHTS:
            merged, conflicts = fn(C.to(DEV), [0.5, 0.5], floor=0.5, sign_weight=w)
            # column 0: tie (+2 vs -2 with equal weights: energies 4.25 vs 4.0625 differ, so only the
            # non-energy rules tie there); column 1: both at/below the floor -> kept, no vote
            if w == "expert_energy":
                assert torch.equal(merged.cpu(), torch.tensor([[1.0, 0.375]])) and int(conflicts) == 1
            else:
                assert torch.equal(merged.cpu(), torch.tensor([[0.0, 0.375]])) and int(conflicts) == 2


@pytest.mark.parametrize("sign_weight", WEIGHTS)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(sign_weight, k, dtype):
    """Ragged r x s (several blocks, the last partial), B = 3 matrices with floors 0.3, 0 and 0.05."""
    c, lam, floors = planted(3, k, 9, 23, seed=10 * k + WEIGHTS.index(sign_weight))
    c = c.to(dtype)
    want, want_n = sf.pivot_filter_coords_reference(c, lam, floor=floors, sign_weight=sign_weight)
    got, got_n = sf.pivot_filter_coords_triton(c.to(DEV), lam, floor=floors, sign_weight=sign_weight, block=64)
    assert_close(got, want)
    assert torch.equal(got_n.cpu(), want_n), (got_n, want_n)
    # the planted features are really there: ties, conflicts, kept sub-floor entries
    assert reference_ties(c.float(), floors, sign_weight) >= 1
    assert (want_n > 0).all()
    per_matrix = [
        sf.pivot_filter_coords_reference(c[i], lam[i], floor=floors[i], sign_weight=sign_weight) for i in range(3)
    ]
    assert all(torch.equal(m, want[i]) and int(n) == int(want_n[i]) for i, (m, n) in enumerate(per_matrix))


@pytest.mark.parametrize("sign_weight", WEIGHTS)
def test_floors_differ_per_matrix(sign_weight):
    """The same coordinates in two matrices with different floors merge differently (the floor is per matrix)."""
    c, lam, _ = planted(1, 3, 5, 8, seed=3)
    c2 = torch.cat([c, c])
    lam2 = torch.cat([lam, lam])
    floors = torch.tensor([0.0, float(c.abs().max())])  # everything real vs nothing real
    for fn in (sf.pivot_filter_coords_reference, sf.pivot_filter_coords_triton):
        merged, conflicts = fn(c2.to(DEV), lam2, floor=floors, sign_weight=sign_weight)
        assert int(conflicts[1]) == 0 and int(conflicts[0]) > 0
        assert_close(merged[1], (lam[0][:, None, None] * c[0]).sum(dim=0))
        assert not torch.allclose(merged[0].cpu(), merged[1].cpu())


@pytest.mark.parametrize("sign_weight", WEIGHTS)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_reference_equals_pivot_torch_path(sign_weight, k):
    """The kernel file's reference and pivot.py's `_project_filter` path: bit-identical merge and conflict count."""
    g = gen(100 + k)
    m, n = 20, 31
    deltas = torch.randn(k, m, 4, generator=g) @ torch.randn(k, 4, n, generator=g)
    deltas += 1e-3 * torch.randn(k, m, n, generator=g)
    U_s = torch.linalg.qr(torch.randn(m, 6, generator=g)).Q
    V_s = torch.linalg.qr(torch.randn(n, 5, generator=g)).Q
    C, C_f, conflict = pm._project_filter(deltas, U_s, V_s, sign_weight)
    lam = torch.softmax(torch.randn(k, generator=g), dim=0)
    floor = pm._noise_floor(C, m, n)
    merged, conflicts = sf.pivot_filter_coords_reference(
        C, lam, floor=floor, sign_weight=sign_weight, tie_rtol=pm.TIE_RTOL
    )
    assert torch.equal(merged, (lam[:, None, None] * C_f).sum(dim=0))
    assert int(conflicts) == int(conflict.sum()) > 0
    # batched: three such matrices with their own floors, each equal to its own pivot.py result
    Cs = torch.stack([C, 3.0 * C.flip(-1), -C])
    lams = torch.stack([lam, lam.flip(0), lam])
    floors = torch.stack([pm._noise_floor(x, m, n) for x in Cs])
    merged_b, conflicts_b = sf.pivot_filter_coords_reference(
        Cs, lams, floor=floors, sign_weight=sign_weight, tie_rtol=pm.TIE_RTOL
    )
    for i in range(3):
        want, n_want = pm._filter_combine(Cs[i], lams[i], (m, n), sign_weight)
        assert torch.equal(merged_b[i], want) and int(conflicts_b[i]) == n_want


def experts(k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and k experts sharing part of a low-rank update, so the shared space has agreements and conflicts."""
    g = gen(seed)
    base = torch.randn(16, 24, generator=g)
    common = torch.randn(16, 3, generator=g) @ torch.randn(3, 24, generator=g)
    return base, [
        base + (1 if i % 2 else -0.4) * common + torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g)
        for i in range(k)
    ]


@pytest.mark.parametrize("sign_weight", WEIGHTS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_pivot_merge_kernel_branch_matches_cpu_path(monkeypatch, sign_weight, k):
    """Forcing the kernel branch on CPU: through the reference it is bit-identical to the CPU path, through the
    interpreted Triton kernel equal within the table; the report (conflict fraction, lambda) is unchanged."""
    base, ex = experts(k, seed=k)
    assert not pm._use_kernel(base)  # CPU tensors take the torch path
    want, report = pm.pivot_merge(ex, base, pivot="init", sign_weight=sign_weight)
    assert report["conflict_fraction"] > 0
    calls = []

    def spy(fn):
        def run(*args, **kw):
            calls.append(kw)
            return fn(*args, **kw)

        return run

    monkeypatch.setattr(pm, "_use_kernel", lambda C: True)
    for fn in (sf.pivot_filter_coords_reference, sf.pivot_filter_coords_triton):
        monkeypatch.setattr(pm, "pivot_filter_coords", spy(fn))
        got, got_report = pm.pivot_merge(ex, base, pivot="init", sign_weight=sign_weight)
        if fn is sf.pivot_filter_coords_reference:
            assert torch.equal(got, want)
        else:
            assert_close(got, want)
        assert got_report == report
    assert len(calls) == 2 and all(c["sign_weight"] == sign_weight and c["tie_rtol"] == pm.TIE_RTOL for c in calls)


def test_rejects_bad_input():
    c = torch.randn(2, 3, 4, 5)
    lam = torch.full((2, 3), 1 / 3)
    for fn in (sf.pivot_filter_coords, sf.pivot_filter_coords_reference, sf.pivot_filter_coords_triton):
        with pytest.raises(ValueError, match="sign_weight"):
            fn(c, lam, floor=0.0, sign_weight="energy")
        with pytest.raises(ValueError, match="floor"):
            fn(c, lam, floor=[0.0, -1.0])
        with pytest.raises(ValueError, match="floor"):
            fn(c, lam, floor=[0.0, 0.0, 0.0])
        with pytest.raises(ValueError, match="floor"):
            fn(c, lam, floor=float("nan"))
        with pytest.raises(ValueError, match="lambdas"):
            fn(c, [1.0, float("inf"), 0.0], floor=0.0)
        with pytest.raises(ValueError, match="lambdas"):
            fn(c, [1.0, 1.0], floor=0.0)
        with pytest.raises(ValueError, match="tie_rtol"):
            fn(c, lam, floor=0.0, tie_rtol=-1e-5)
        with pytest.raises(ValueError, match="dims"):
            fn(c[0, 0], [1.0], floor=0.0)
        with pytest.raises(ValueError, match="dtype"):
            fn(c.double(), lam, floor=0.0)


def test_bench_pivot_filter_runs(tmp_path, capsys):
    """`--kernels pivot_filter` times the kernel beside the torch path (interpreted here, compiled on CUDA)."""
    import json

    from shardmerge.jobs import bench_kernels

    out = tmp_path / "bench.json"
    argv = [
        "--kernels",
        "pivot_filter",
        "--sizes-mb",
        "0.0625",
        "--repeats",
        "1",
        "--experts",
        "2",
        "--device",
        DEV,
        "--json-out",
        str(out),
    ] + ([] if HAS_CUDA else ["--interpret"])
    assert bench_kernels.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == [f"pivot_filter:{w}" for w in bench_kernels.PIVOT_WEIGHTS]
    entries = 4 * (int(0.0625 * 2**20) // (4 * 4 * 512)) * 512  # B * r * s
    for r in rows:
        assert r["path"] == ("triton" if HAS_CUDA else "interp")
        assert r["bytes_moved"] == (2 + 1) * entries * 4  # K inputs read, one output written, float32
        assert r["reference_ms"] > 0 and r["speedup"] == pytest.approx(r["reference_ms"] / r["ms"], rel=1e-2)
    assert "need a CUDA GPU" in capsys.readouterr().out or HAS_CUDA


# ------------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("sign_weight", WEIGHTS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_cuda_kernel_matches_reference(sign_weight, k):
    """Compiled on CUDA: the dispatcher picks Triton, equal to the CPU reference (counts exactly); pivot.py
    takes the kernel branch for CUDA coordinates."""
    c, lam, floors = planted(4, k, 33, 130, seed=k)
    want, want_n = sf.pivot_filter_coords_reference(c, lam, floor=floors, sign_weight=sign_weight)
    got, got_n = sf.pivot_filter_coords(c.cuda(), lam.cuda(), floor=floors.cuda(), sign_weight=sign_weight)
    assert got.is_cuda and type(sf._pivot_kernels()[1]).__name__ == "JITFunction"
    assert_close(got, want)
    assert torch.equal(got_n.cpu(), want_n)
    assert pm._use_kernel(c.cuda())
    merged, n = pm._filter_combine(c[0].cuda(), lam[0].cuda(), (64, 64), sign_weight)
    want0, n0 = pm._filter_combine(c[0], lam[0], (64, 64), sign_weight)
    assert_close(merged, want0)
    assert n == n0
