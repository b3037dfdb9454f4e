"""PivotMerge (our reconstruction): a dense float64 oracle written here from METHODS.md steps 1-5, and the
closed-form identities (identical experts, orthogonal task vectors, planted conflicts, weights summing to 1)."""

from __future__ import annotations

import math

import pytest
import torch

from shardmerge.engine import methods
from shardmerge.engine.methods import pivot as pm
from shardmerge.engine.methods.base import TensorInfo

# dtype -> (atol relative to the largest reference entry, rtol); float32 method vs float64 oracle.
TOL = {torch.float32: (2e-5, 1e-4)}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[actual.dtype]
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def energy_cut(S, rho):
    frac = torch.cumsum(S**2, 0) / (S**2).sum()
    return int((frac < rho - 1e-12).sum()) + 1


def ref_pivot(
    experts,
    base,
    *,
    pivot="mean",
    energy=0.9,
    density=0.2,
    temperature=1.0,
    beta=1.0,
    sign_weight="count",
    standardize=True,
):
    """Steps 1-5 of METHODS.md, in float64 with full SVDs (count or expert-energy sign vote, disjoint-mean
    residuals, softmax of the standardised or raw contributions)."""
    X = torch.stack([e.double() for e in experts])
    P = X.mean(0) if pivot == "mean" else base.double()
    D = X - P
    K, m, n = D.shape
    U, Su, _ = torch.linalg.svd(torch.cat(list(D), dim=1), full_matrices=False)
    _, Sv, Vh = torch.linalg.svd(torch.cat(list(D), dim=0), full_matrices=False)
    Us, Vs = U[:, : energy_cut(Su, energy)], Vh[: energy_cut(Sv, energy)].T
    C = torch.stack([Us.T @ d @ Vs for d in D])
    E = (C**2).sum(dim=(1, 2)) if sign_weight == "expert_energy" else torch.ones(K, dtype=torch.float64)
    elected = sum(E[k] * torch.sign(C[k]) for k in range(K)).sign()
    Cf = torch.where(torch.sign(C) * elected > 0, C, torch.zeros_like(C))
    R = torch.stack([d - Us @ c @ Vs.T for d, c in zip(D, C)])
    keep = int(density * m * n)
    trimmed = []
    for r in R:
        flat = r.flatten().clone()
        order = flat.abs().argsort(descending=True)
        flat[order[keep:]] = 0
        trimmed.append(flat.reshape(m, n))
    T = torch.stack(trimmed)
    Rm = T.sum(0) / (T != 0).sum(0).clamp_min(1)
    a = torch.tensor([float((C[k] ** 2).sum() / (D[k] ** 2).sum()) for k in range(K)], dtype=torch.float64)
    if standardize:  # z = (a - mean) / max(population std, floor)
        a = (a - a.mean()) / max(float(((a - a.mean()) ** 2).mean().sqrt()), pm.SPREAD_FLOOR * float(a.abs().mean()))
    lam = torch.softmax(a / temperature, 0)
    return P + beta * (Us @ (lam[:, None, None] * Cf).sum(0) @ Vs.T + Rm), lam


def random_experts(m, n, K, seed, scale=0.1):
    g = gen(seed)
    base = torch.randn(m, n, generator=g)
    return base, [base + scale * torch.randn(m, n, generator=g) for _ in range(K)]


OLD_DEFAULTS = dict(sign_weight="expert_energy", standardize=False)  # the reconstruction's first defaults


@pytest.mark.parametrize("rules", [{}, OLD_DEFAULTS])
@pytest.mark.parametrize("mode", ["mean", "init"])
@pytest.mark.parametrize("m,n,K", [(20, 30, 3), (32, 24, 4)])
def test_matches_dense_oracle(mode, m, n, K, rules):
    base, ex = random_experts(m, n, K, seed=1)
    params = dict(energy=0.8, density=0.3, temperature=0.5, beta=1.2, **rules)
    merged, report = pm.pivot_merge(ex, base if mode == "init" else None, pivot=mode, **params)
    expected, lam = ref_pivot(ex, base, pivot=mode, **params)
    assert_matches(merged, expected)
    assert_matches(torch.tensor(report["lambda"]), lam)
    assert math.isclose(sum(report["lambda"]), 1.0, rel_tol=1e-6)
    assert 0 < report["rank_u"] <= m and 0 < report["rank_v"] <= n
    assert report["energy_u"] >= 0.8 and report["energy_v"] >= 0.8


def test_identical_experts_give_the_expert():
    base, ex = random_experts(16, 24, 1, seed=2)
    for k in (2, 3, 5):
        merged, _ = pm.pivot_merge([ex[0]] * k)  # pivot = mean = the expert, every Delta = 0
        assert_matches(merged, ex[0].double())
        # init pivot: Delta_k all equal, no conflicts, uniform lambda; density 1 keeps the whole residual
        merged, report = pm.pivot_merge([ex[0]] * k, base, pivot="init", density=1.0)
        assert_matches(merged, ex[0].double())
        assert report["conflict_fraction"] == 0.0


def orthogonal_updates(m, n, K, block, seed):
    """Delta_k = Q_m[:, block k] S_k Q_n[:, block k]^T: row and column spaces mutually orthogonal."""
    g = gen(seed)
    Qm, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    Qn, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    out = []
    for k in range(K):
        sl = slice(k * block, (k + 1) * block)
        s = torch.linspace(3.0, 1.0, block) * (1.0 + 0.37 * k)  # distinct spectra across experts
        out.append((Qm[:, sl] * s) @ Qn[:, sl].T)
    return out


def test_orthogonal_task_vectors_have_no_conflicts():
    base = torch.randn(30, 40, generator=gen(3))
    deltas = orthogonal_updates(30, 40, 3, block=4, seed=4)
    ex = [base + d for d in deltas]
    for energy in (0.7, 0.9, 1.0):
        _, report = pm.pivot_merge(ex, base, pivot="init", energy=energy)
        assert report["conflict_fraction"] == 0.0
    # everything in the shared space and nothing trimmed: a_k = 1 for all, lambda uniform, W = init + mean Delta
    merged, report = pm.pivot_merge(ex, base, pivot="init", energy=1.0, density=1.0)
    assert_matches(torch.tensor(report["lambda"]), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert_matches(merged, base.double() + sum(d.double() for d in deltas) / 3)


def planted(scale3):
    """Experts base + P, base + P, base + scale3 * P with base = 0 (Delta exact) and P of rank 2."""
    g = gen(5)
    base = torch.zeros(18, 26)
    P = torch.randn(18, 2, generator=g) @ torch.randn(2, 26, generator=g)
    return base, P, [base + P, base + P, base + scale3 * P]


def test_planted_sign_conflict_is_filtered():
    base, P, ex = planted(-0.5)
    merged, report = pm.pivot_merge(ex, base, pivot="init", energy=1.0, **OLD_DEFAULTS)
    # C_3 = -0.5 C exactly: every nonzero entry of expert 3 is outvoted (energy 1 + 1 vs 0.25) and zeroed;
    # a_k = 1 (all in the shared space) -> lambda = 1/3 each -> W = init + (P + P + 0) / 3
    assert_matches(merged, base.double() + 2 / 3 * P.double())
    assert report["rank_u"] == 2 and report["rank_v"] == 2
    # of the 3 * 2 * 2 shared entries, expert 3's 2 diagonal ones (and its rounding-level off-diagonal ones)
    assert 2 / 12 - 1e-12 <= report["conflict_fraction"] <= 4 / 12 + 1e-12
    without_filter = base.double() + (1 + 1 - 0.5) / 3 * P.double()
    assert (merged.double() - without_filter).abs().max() > 0.1 * P.abs().max()


def test_sign_election_closed_form():
    C = torch.tensor([[[1.0, -2.0], [0.0, 3.0]], [[2.0, 1.0], [0.0, -1.0]], [[-4.0, 1.0], [5.0, -1.0]]])
    eye = torch.eye(2)
    # expert energies 14, 6, 43: entry votes -23, +35, +43, -35
    _, kept, conflict = pm._project_filter(C, eye, eye, "expert_energy")
    expected = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]], [[-4.0, 1.0], [5.0, -1.0]]])
    assert torch.equal(kept, expected) and int(conflict.sum()) == 4
    # plain majority: +1, +1, +1, -1 -> conflicts: expert 3 at (0, 0), expert 1 at (0, 1) and (1, 1)
    _, kept, conflict = pm._project_filter(C, eye, eye, "count")
    expected = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [0.0, -1.0]], [[0.0, 1.0], [5.0, -1.0]]])
    assert torch.equal(kept, expected) and int(conflict.sum()) == 3


def test_sign_vote_is_weighted_by_expert_energy():
    base, P, ex = planted(-3.0)  # one strong expert against two weak ones
    by_energy, _ = pm.pivot_merge(ex, base, pivot="init", energy=1.0, **OLD_DEFAULTS)
    by_count, _ = pm.pivot_merge(ex, base, pivot="init", energy=1.0, sign_weight="count", standardize=False)
    assert_matches(by_energy, base.double() - P.double())  # 9 > 1 + 1: expert 3 wins, lambda 1/3
    assert_matches(by_count, base.double() + 2 / 3 * P.double())  # 2 votes > 1


def test_two_experts_mean_pivot_cancel_to_the_mean():
    _, ex = random_experts(12, 16, 2, seed=6, scale=1.0)
    merged, report = pm.pivot_merge(ex, density=1.0)  # Delta_2 = -Delta_1: every shared entry is a tie
    assert_matches(merged, (ex[0].double() + ex[1].double()) / 2)
    # C_k is diagonal in Delta_1's singular basis (off-diagonal entries are rounding noise, which never conflicts):
    # both experts' diagonal entries are ties, i.e. conflicts
    r_u, r_v = report["rank_u"], report["rank_v"]
    assert round(report["conflict_fraction"] * 2 * r_u * r_v) >= 2 * min(r_u, r_v)


def test_layer_weights_sum_to_one_and_follow_gains():
    a = torch.randn(4, 6, generator=gen(7), dtype=torch.float64)
    for T in (0.1, 1.0, 10.0):
        lam = pm.layer_weights(a, T)
        assert_matches(lam.sum(0).float(), torch.ones(6, dtype=torch.float64))
        assert_matches(lam.float(), torch.exp(a / T) / torch.exp(a / T).sum(0))
    base, ex = random_experts(10, 14, 3, seed=8)
    gains = (0.2, -0.1, 0.5)
    _, report = pm.pivot_merge(
        ex, base, pivot="init", contribution="data", gains=gains, temperature=0.5, standardize=False
    )
    g = torch.tensor(gains, dtype=torch.float64)
    assert_matches(torch.tensor(report["lambda"]), torch.softmax(g / 0.5, 0))
    assert report["contribution"] == pytest.approx(list(gains))


def test_alignment_score_and_gains_closed_form():
    x = torch.randn(2, 5, 8, generator=gen(9))
    assert_matches(pm.alignment_score(x, x * 3.0), torch.ones(2, dtype=torch.float64))
    img = torch.zeros(1, 2, 4)
    img[0, :, 0] = 1.0
    cap = torch.zeros(1, 3, 4)
    cap[0, :, 1] = 1.0
    cap[0, 2] = 7.0  # padding token, masked out
    mask = torch.tensor([[True, True, False]])
    assert float(pm.alignment_score(img, cap, caption_mask=mask)[0]) == pytest.approx(0.0, abs=1e-7)
    swapped = torch.tensor([[[0.5, 0.7]], [[0.2, 0.2]]])  # K = 2, L = 1, N = 2
    assert_matches(pm.alignment_gains(swapped, torch.tensor([[0.4, 0.4]])), torch.tensor([[0.2], [-0.2]]))


@pytest.mark.parametrize("mode", ["mean", "init"])
def test_1d_tensors_are_averaged(mode):
    g = gen(10)
    base = torch.randn(11, generator=g)
    ex = [base + torch.randn(11, generator=g) for _ in range(3)]
    merged, report = pm.pivot_merge(ex, base if mode == "init" else None, pivot=mode, beta=0.5)
    pivot = torch.stack(ex).double().mean(0) if mode == "mean" else base.double()
    expected = pivot + 0.5 * (torch.stack(ex).double() - pivot).mean(0)
    assert_matches(merged, expected)
    assert report["kind"] == "averaged"


def test_registered_merge_returns_the_tensor_and_validates():
    spec = methods.get("pivotmerge")
    assert spec.chunkwise is False and spec.needs_base is False and math.isnan(spec.per_model_params["gain"])
    base, ex = random_experts(10, 12, 3, seed=11)
    nan = (pm.NO_GAIN,) * 3
    out = spec.merge(ex, base, info=TensorInfo("mm_projector.0.weight", (10, 12)), gain=nan, pivot="model:a")
    assert torch.equal(out, pm.pivot_merge(ex, base, pivot="model:a")[0])
    info = TensorInfo("mm_projector.2.weight", (10, 12))
    with pytest.raises(ValueError, match="mm_projector.2.weight.*passed as base"):
        spec.merge(ex, None, info=info, pivot="init")
    with pytest.raises(ValueError, match="contribution 'data' needs"):
        spec.merge(ex, base, info=info, gain=nan, pivot="init", contribution="data")
    with pytest.raises(ValueError, match="contribution is 'shared'"):
        spec.merge(ex, base, info=info, gain=(1.0, 2.0, 3.0), pivot="init")
    for bad in (
        {"pivot": "median"},
        {"energy": 0.0},
        {"density": 1.5},
        {"temperature": 0.0},
        {"sign_weight": "vote"},
        {"rank": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            spec.merge(ex, base, info=info, **bad)


def test_fixed_rank():
    base, ex = random_experts(12, 12, 3, seed=12)
    _, report = pm.pivot_merge(ex, base, pivot="init", rank=3)
    assert (report["rank_u"], report["rank_v"]) == (3, 3)


def planted_consensus(K, dissenter, m=24, n=32, seed=0, noise=0.05):
    """K experts around W0: all but one at W0 + P (the consensus), `dissenter` at W0 - P, each plus small noise."""
    g = gen(seed)
    W0, P = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    eps = noise * float(P.norm()) / math.sqrt(m * n)
    ex = [W0 + (-P if k == dissenter else P) + eps * torch.randn(m, n, generator=g) for k in range(K)]
    return W0, P, ex


@pytest.mark.parametrize("K", range(2, 9))
def test_defaults_keep_the_consensus(K):
    """With the default (majority) vote, the merge lands closer to the agreeing experts than their plain average,
    for every dissenter position, around a mean pivot and around the shared init; with K = 2 there is no majority
    and the mean pivot reduces to the plain average (documented)."""
    for pos in range(K):
        W0, P, ex = planted_consensus(K, pos, seed=K * 10 + pos)
        consensus, avg = W0 + P, torch.stack(ex).mean(0)
        d_avg = float((avg - consensus).norm() / P.norm())
        d_mean = float((pm.pivot_merge(ex)[0] - consensus).norm() / P.norm())
        d_init = float((pm.pivot_merge(ex, W0, pivot="init")[0] - consensus).norm() / P.norm())
        if K == 2:
            assert d_mean == pytest.approx(d_avg, rel=1e-5)
            continue
        assert d_mean < 0.7 * d_avg and d_init < d_avg, (K, pos, d_mean, d_init, d_avg)
        # the old defaults (expert-energy vote, raw softmax) land on the dissenter's side of the average
        old = float((pm.pivot_merge(ex, **OLD_DEFAULTS)[0] - consensus).norm() / P.norm())
        assert old > d_avg


def test_lambda_follows_planted_contributions():
    base, ex = random_experts(10, 14, 3, seed=8)
    for gains in ((0.010, 0.012, 0.011), (0.2, -0.1, 0.5), (1e-3, 3e-3, 2e-3)):
        _, rep = pm.pivot_merge(ex, base, pivot="init", contribution="data", gains=gains)
        g = torch.tensor(gains, dtype=torch.float64)
        z = (g - g.mean()) / g.std(unbiased=False)
        assert_matches(torch.tensor(rep["lambda"]), torch.softmax(z, 0))  # T = 1 on z: scale-free
        assert max(rep["lambda"]) > 0.5 and rep["lambda"].index(max(rep["lambda"])) == int(g.argmax())
        _, raw = pm.pivot_merge(ex, base, pivot="init", contribution="data", gains=gains, standardize=False)
        assert max(raw["lambda"]) - min(raw["lambda"]) < max(rep["lambda"]) - min(rep["lambda"])
    # equal contributions (up to rounding) keep lambda uniform
    _, rep = pm.pivot_merge(ex, base, pivot="init", contribution="data", gains=(0.3, 0.3 + 1e-9, 0.3))
    assert_matches(torch.tensor(rep["lambda"]), torch.full((3,), 1 / 3, dtype=torch.float64))
    for bad in ({"spread_floor": 0.0}, {"standardize": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pm.pivot_merge(ex, base, pivot="init", **bad)


@pytest.mark.parametrize("mode", ["mean", "init"])
def test_bias_follows_its_weight_lambda(mode):
    g = gen(13)
    w0, b0 = torch.randn(12, 9, generator=g), torch.randn(12, generator=g)
    ws = [w0 + s * torch.randn(12, 9, generator=g) for s in (0.1, 0.3, 1.0)]  # unequal shared shares
    bs = [b0 + torch.randn(12, generator=g) for _ in range(3)]
    base_w, base_b = (w0, b0) if mode == "init" else (None, None)
    _, wrep = pm.pivot_merge(ws, base_w, pivot=mode)
    stack = torch.stack(ws)
    pivot_w = stack.mean(0) if mode == "mean" else w0
    merged, brep = pm.pivot_merge(bs, base_b, pivot=mode, layer_weight=(stack, pivot_w))
    lam = torch.tensor(wrep["lambda"], dtype=torch.float64)
    pb = torch.stack(bs).double().mean(0) if mode == "mean" else b0.double()
    assert brep["kind"] == "bias" and brep["lambda"] == pytest.approx(wrep["lambda"], abs=1e-7)
    assert_matches(merged, pb + (lam[:, None] * (torch.stack(bs).double() - pb)).sum(0))
    assert float(lam.max() - lam.min()) > 0.05  # not the plain mean
    # the registered entry splits the trailing weight inputs off the same way (the plan's layout)
    spec = methods.get("pivot")
    extra = ws + ([w0] if mode == "init" else [])
    out = spec.merge(
        bs + extra,
        base_b,
        info=TensorInfo("multi_modal_projector.linear_1.bias", (12,)),
        gain=(pm.NO_GAIN,) * 3,
        pivot=mode,
        weight_inputs=len(extra),
    )
    assert torch.equal(out, merged)
