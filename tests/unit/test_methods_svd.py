"""tsv / iso_c / iso_cts / cart against dense float64 oracles written here from the papers' formulas, plus the
truncated-SVD paths (exact / randomized / Gram) of shardmerge.engine.methods.rsvd."""

from __future__ import annotations

import math

import pytest
import torch

from shardmerge.engine import methods
from shardmerge.engine.methods import rsvd, svd
from shardmerge.engine.methods.base import Chunk, TensorInfo

# dtype -> (atol relative to the largest reference entry, rtol); float32 pipelines vs float64 oracles.
TOL = {torch.float32: (2e-5, 1e-4)}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[actual.dtype]
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- oracles (float64, full torch.linalg.svd)


def svd64(A):
    return torch.linalg.svd(A.double(), full_matrices=False)


def polar64(A):
    U, _, Vh = svd64(A)
    return U @ Vh


def ref_tsv(taus):
    K, (m, n) = len(taus), taus[0].shape
    k = min(m, n) // K
    parts = [svd64(t) for t in taus]
    U = torch.cat([u[:, :k] for u, _, _ in parts], 1)
    S = torch.cat([s[:k] for _, s, _ in parts])
    Vh = torch.cat([vh[:k] for _, _, vh in parts], 0)
    return polar64(U) @ torch.diag(S) @ polar64(Vh)


def ref_iso_c(taus):
    U, S, Vh = svd64(sum(t.double() for t in taus))
    return S.mean() * U @ Vh


def ref_iso_cts(taus, frac=0.8):
    K, (m, n) = len(taus), taus[0].shape
    r = min(m, n)
    common = int(r * frac)
    per = round((r - common) / K)
    common = r - K * per
    U, S, Vh = svd64(sum(t.double() for t in taus))
    Uc = U[:, :common]
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = svd64(t.double() - Uc @ Uc.T @ t.double())
        us.append(u[:, :per]), ss.append(s[:per]), vs.append(vh[:per])
    Uall = torch.cat(us + [Uc], 1)
    Sall = torch.cat(ss + [S[:common]])
    Vall = torch.cat(vs + [Vh[:common]], 0)
    return Sall.mean() * polar64(Uall) @ polar64(Vall)


def ref_cart(experts, lam, frac):
    X = torch.stack([t.double() for t in experts])
    mean = X.mean(0)
    k = max(1, int(frac * min(mean.shape)))
    out = mean.clone()
    for x in X:
        U, S, Vh = svd64(x - mean)
        out += lam * (U[:, :k] * S[:k]) @ Vh[:k]
    return out


def make_experts(m, n, K, seed, scale=0.1):
    g = gen(seed)
    base = torch.randn(m, n, generator=g)
    return base, [base + scale * torch.randn(m, n, generator=g) for _ in range(K)]


SHAPES = [(24, 40, 3), (40, 24, 2), (33, 33, 4)]


# ---------------------------------------------------------------- methods vs oracles


@pytest.mark.parametrize("m,n,K", SHAPES)
def test_tsv_matches_dense_formula(m, n, K):
    base, ex = make_experts(m, n, K, seed=1)
    out = svd.merge_tsv(ex, base, alpha=0.7)
    assert_matches(out - base, 0.7 * ref_tsv([e - base for e in ex]))


@pytest.mark.parametrize("m,n,K", SHAPES)
def test_iso_c_matches_dense_formula(m, n, K):
    base, ex = make_experts(m, n, K, seed=2)
    out = svd.merge_iso_c(ex, base, alpha=1.3)
    assert_matches(out - base, 1.3 * ref_iso_c([e - base for e in ex]))


@pytest.mark.parametrize("m,n,K", SHAPES)
def test_iso_cts_matches_dense_formula(m, n, K):
    base, ex = make_experts(m, n, K, seed=3)
    out = svd.merge_iso_cts(ex, base, alpha=1.5)
    assert_matches(out - base, 1.5 * ref_iso_cts([e - base for e in ex]))


@pytest.mark.parametrize("m,n,K", SHAPES)
def test_cart_matches_dense_formula(m, n, K):
    _, ex = make_experts(m, n, K, seed=4)
    out = svd.merge_cart(ex, None, rank_fraction=0.2, **{"lambda": 0.6})
    assert_matches(out, ref_cart(ex, lam=0.6, frac=0.2))


def test_iso_cts_split_fills_rank_exactly():
    for r in range(1, 70):
        for K in range(1, 6):
            common, per = svd.iso_cts_split(r, K, 0.8)
            assert common + K * per == r and common >= 0 and per >= 0
    # r = 100, K = 3: int(80) common, 20 / 3 = 6.67 rounds to 7 per task, common absorbs 100 - 21 = 79
    assert svd.iso_cts_split(100, 3, 0.8) == (79, 7)


# ---------------------------------------------------------------- closed forms and 1-D handling


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_task_vector_methods_average_1d(name):
    g = gen(5)
    base = torch.randn(17, generator=g)
    ex = [base + torch.randn(17, generator=g) for _ in range(3)]
    out = methods.get(name).merge(ex, base, alpha=0.5)
    expected = base.double() + 0.5 * torch.stack([e.double() - base.double() for e in ex]).mean(0)
    assert_matches(out, expected)
    scalar = methods.get(name).merge([torch.tensor(2.0), torch.tensor(4.0)], torch.tensor(1.0), alpha=2.0)
    assert float(scalar) == pytest.approx(1.0 + 2.0 * 2.0)


def test_cart_averages_1d_and_full_rank_is_the_mean():
    g = gen(6)
    ex1 = [torch.randn(9, generator=g) for _ in range(3)]
    assert_matches(svd.merge_cart(ex1, None), torch.stack(ex1).double().mean(0))
    _, ex = make_experts(12, 20, 3, seed=7, scale=1.0)
    # sum_k (theta_k - mean) = 0, so the full-rank CART update vanishes whatever lambda is
    out = svd.merge_cart(ex, None, rank_fraction=1.0, **{"lambda": 3.0})
    assert_matches(out, torch.stack(ex).double().mean(0))


def test_tsv_identical_experts_full_rank_returns_the_expert():
    base, ex = make_experts(16, 24, 1, seed=8)
    K = 3
    # each copy keeps all r triplets; the stacked U's are [U U U] whose (partial-isometry) polar factor is
    # U [I I I] / sqrt(3), so M = U S V^T = tau: the expert itself
    out = svd.merge_tsv([ex[0]] * K, base, rank_fraction=float(K))
    assert_matches(out - base, ex[0].double() - base.double())


def test_iso_c_flattens_the_spectrum():
    base, ex = make_experts(20, 30, 3, seed=9)
    upd = svd.merge_iso_c(ex, base) - base
    s = torch.linalg.svdvals(upd.double())
    s_ref = torch.linalg.svdvals(sum(e.double() - base.double() for e in ex))
    assert_matches(s.float(), torch.full_like(s, float(s_ref.mean())))


@pytest.mark.parametrize("name", ["tsv", "iso_cts", "cart"])
def test_batched_core_equals_per_layer(name):
    g = gen(10)
    x = 0.1 * torch.randn(4, 3, 18, 26, generator=g)  # (layers, experts, m, n)
    core = {
        "tsv": svd.tsv_update,
        "iso_cts": svd.iso_cts_update,
        "cart": lambda t: svd.cart_update(t, rank_fraction=0.25)[1],
    }[name]
    batched = core(x)
    for layer in range(4):
        assert_matches(batched[layer], core(x[layer]).double())


def test_registered_specs():
    for name, needs_base in [("tsv", True), ("iso_c", True), ("iso_cts", True), ("cart", False)]:
        spec = methods.get(name)
        assert spec.chunkwise is False and spec.needs_base is needs_base
    assert methods.get("tsv").global_params["alpha"] == 1.0
    assert methods.get("cart").global_params["lambda"] == 1.0
    assert methods.get("iso_cts").global_params["common_fraction"] == 0.8


def test_registered_merge_accepts_the_engine_call_with_default_params():
    base, ex = make_experts(10, 14, 3, seed=16)
    info = TensorInfo(name="w", shape=(10, 14))
    for name in ("tsv", "iso_c", "iso_cts", "cart", "pivotmerge"):
        spec = methods.get(name)
        per_model = {k: (v,) * len(ex) for k, v in spec.per_model_params.items()}
        out = spec.merge(ex, base, stats=None, chunk=Chunk(0, 10, 0), info=info, **spec.global_params, **per_model)
        assert out.dtype == torch.float32 and out.shape == base.shape and bool(torch.isfinite(out).all())


def test_bad_inputs_raise_value_error_naming_the_tensor():
    info = TensorInfo(name="model.layers.0.mlp.up_proj.weight", shape=(4, 4))
    a = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="up_proj.*base model is required"):
        svd.merge_tsv([a, a], None, info=info)
    with pytest.raises(ValueError, match="up_proj.*expert 1 has shape"):
        svd.merge_iso_c([a, torch.zeros(4, 5)], a, info=info)
    with pytest.raises(ValueError, match="rank_fraction"):
        svd.merge_tsv([a, a], a, info=info, rank_fraction=0.0)
    with pytest.raises(ValueError, match="float32"):
        svd.merge_iso_c([a.double(), a.double()], a.double(), info=info)
    with pytest.raises(ValueError, match="svd_path"):
        svd.merge_cart([a, a], None, info=info, svd_path="fast")


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "cart"])
def test_nd_weights_merge_as_their_out_by_rest_matrix(name):
    """A 4-D conv weight (a vision tower's patch embedding, out x in x kh x kw) is merged as the matrix
    (out, in*kh*kw) and reshaped back, through `merge` and through `merge_batch` alike."""
    spec = methods.get(name)
    shape = (6, 3, 2, 2)
    ex = [torch.randn(shape, generator=gen(40 + k)) for k in range(3)]
    base = torch.randn(shape, generator=gen(49))
    as_mat = [t.reshape(6, 12) for t in ex]
    info = TensorInfo(name="vision_tower.patch_embedding.weight", shape=shape)
    want = spec.merge(as_mat, base.reshape(6, 12), info=TensorInfo(name=info.name, shape=(6, 12)))
    got = spec.merge(ex, base, info=info)
    assert got.shape == shape
    torch.testing.assert_close(got, want.reshape(shape), rtol=0, atol=0)
    assert not torch.allclose(got, base + torch.stack(ex).sub(base).mean(0))  # not the flat average
    batched = spec.merge_batch([ex, ex], [base, base], [info, info])
    for y in batched:
        assert y.shape == shape
        torch.testing.assert_close(y, got, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- truncated SVD paths


def low_rank(m, n, r, seed):
    g = gen(seed)
    return (torch.randn(m, r, generator=g) * torch.linspace(5, 1, r)) @ torch.randn(r, n, generator=g)


def projector(U):
    return U.double() @ U.double().T


@pytest.mark.parametrize("path", ["randomized", "gram"])
@pytest.mark.parametrize("m,n", [(200, 300), (300, 200)])
def test_paths_exact_on_low_rank(path, m, n):
    A = low_rank(m, n, 6, seed=11)
    Ue, Se, Vhe = rsvd.truncated_svd(A, 6, path="exact")
    U, S, Vh = rsvd.truncated_svd(A, 6, path=path)
    # rank(A) <= rank: the randomized bound is 0 -- equal up to float32 rounding
    assert_matches(S, Se.double())
    assert_matches((U * S) @ Vh, A.double())
    assert_matches(projector(U).float(), projector(Ue))
    assert_matches(projector(Vh.T).float(), projector(Vhe.T))


def test_randomized_within_halko_bound_on_general_matrix():
    g = gen(12)
    m, n, k = 200, 300, 10
    U0, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V0, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    A = (U0 * (1.0 / torch.arange(1, m + 1) ** 0.5)) @ V0.T  # slowly decaying spectrum, the hard case
    sigma = torch.linalg.svdvals(A.double())
    for n_iter in (0, 4):
        U, S, Vh = rsvd.truncated_svd(A, k, path="randomized", n_iter=n_iter)
        err = float(torch.linalg.matrix_norm(A.double() - ((U * S) @ Vh).double(), ord=2))
        assert err <= rsvd.halko_bound(m, n, k, n_iter=n_iter) * float(sigma[k])
        # singular values of a projection of A: sigma_j - err <= S_j <= sigma_j (Weyl + interlacing)
        assert bool((S.double() <= sigma[:k] * (1 + 1e-5)).all())
        assert bool((S.double() >= sigma[:k] - err).all())


def test_randomized_is_deterministic_and_batch_consistent():
    g = gen(13)
    A = torch.randn(3, 120, 90, generator=g)
    Ub, Sb, Vhb = rsvd.truncated_svd_batched(A, 8, path="randomized")
    for i in range(3):
        U, S, Vh = rsvd.truncated_svd(A[i], 8, path="randomized")
        assert_matches((Ub[i] * Sb[i]) @ Vhb[i], ((U * S) @ Vh).double())
    again = rsvd.truncated_svd_batched(A, 8, path="randomized")[1]
    assert torch.equal(again, Sb)


def test_methods_randomized_path_equals_exact_on_low_rank_updates():
    g = gen(14)
    base = torch.randn(60, 90, generator=g)
    ex = [base + 0.1 * low_rank(60, 90, 5, seed=20 + k) for k in range(3)]  # rank 5 <= 60 // 3
    for fn in (svd.merge_tsv, svd.merge_iso_cts):
        exact = fn(ex, base, svd_path="exact") - base
        assert_matches(fn(ex, base, svd_path="randomized") - base, exact.double())
        assert_matches(fn(ex, base, svd_path="gram") - base, exact.double())


def test_choose_path_policy():
    assert rsvd.choose_path(1024, 4096, 500) == "exact"
    assert rsvd.choose_path(4096, 11008, 327) == "randomized"  # cart, 8 %: sketch 654 <= 0.25 * 4096
    assert rsvd.choose_path(4096, 11008, 1365) == "gram"  # tsv, K = 3: sketch 2730 > 1024
    assert rsvd.choose_path(11008, 4096, 3276) == "gram"  # iso_cts common space: too many triplets
    with pytest.raises(ValueError, match="rank"):
        rsvd.truncated_svd(torch.zeros(4, 5), 5)


def test_null_triplets_are_zeroed_and_polar_is_partial_isometry():
    A = low_rank(30, 20, 4, seed=15)
    for path in ("exact", "randomized", "gram"):
        U, S, Vh = rsvd.truncated_svd(A, 10, path=path)
        assert torch.count_nonzero(S) == 4 and torch.count_nonzero(U[:, 4:]) == 0
    W, s = rsvd.polar_factor(A)
    assert_matches(torch.linalg.svdvals(W.double()).float(), (torch.arange(20) < 4).double())  # rank 4
    assert_matches(W @ W.T @ W, W.double())  # partial isometry
    U, S, Vh = svd64(A)
    assert_matches(W, U[:, :4] @ Vh[:4])
    assert_matches(s, S)


def test_energy_rank_closed_form():
    S = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rsvd.energy_rank(S, 0.6) == 1  # 9/14 = 0.64
    assert rsvd.energy_rank(S, 0.9) == 2  # 13/14 = 0.93
    assert rsvd.energy_rank(S, 0.95) == 3
    assert rsvd.energy_rank(S, 1.0) == 3
    assert rsvd.energy_rank(torch.zeros(3), 0.9) == 0
    assert math.isclose(rsvd.halko_bound(100, 100, 10, 10, 0), 2 + 11 * math.sqrt(20) * 10)


def test_bench_helper_runs_and_agrees_with_its_naive_loop(capsys):
    from shardmerge.jobs import bench_svd

    assert bench_svd.main(["--rows", "24", "--cols", "40", "--layers", "2", "--device", "cpu"]) == 0
    lines = [l.split() for l in capsys.readouterr().out.splitlines() if l.split()[:1] in (["tsv"], ["cart"])]
    assert len(lines) == 2
    taus = bench_svd.synthetic_updates(2, 3, 24, 40, seed=0)
    for method in bench_svd.METHODS:
        assert bench_svd.run(method, taus)["rel_diff"] < 1e-4
        row = bench_svd.run(method, taus, float64_reference=True)
        assert row["ours_f64"] < 1e-4 and row["naive_f64"] < 1e-4  # float32 vs float64 on a well-posed input
    assert bench_svd.main(["--rows", "24", "--cols", "40", "--methods", "tsv", "--float64-reference"]) == 0
    assert capsys.readouterr().out.splitlines()[-2].split()[-2:] == ["ours_f64", "naive_f64"]
