"""Classic merge methods: exact selection, chunk-proof sums, closed-form values, chunk invariance, DARE statistics."""

from __future__ import annotations

import math

import pytest
import torch

import shardmerge.engine.methods as methods
from shardmerge.engine.methods.common import RowSum, pairwise_rows
from shardmerge.engine.methods.select import kth_largest_abs, kth_largest_abs_streaming
from shardmerge.kernels.philox import stream_key
from tests.oracles.methods import run_in_memory

# dtype -> (atol, rtol) for values computed along different float paths; every other check here is exact.
TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12)}
CLASSIC = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs", "breadcrumbs_ties")


def close(actual: torch.Tensor, expected, dtype=torch.float32) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def chunked_reader(x: torch.Tensor, rows: int):
    return lambda: ([x[r : r + rows]] for r in range(0, x.shape[0], rows))


# ------------------------------------------------------------------------------------------ exact selection
def kth_ref(x: torch.Tensor, k: int) -> float:
    flat = x.abs().reshape(-1)
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


@pytest.mark.parametrize("shape", [(37, 23), (5,), (1, 1), (3, 4, 5), (200, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_matches_kthvalue_for_every_chunking(shape, seed):
    x = randn(*shape, seed=seed) * torch.exp(randn(*shape, seed=seed + 7) * 3)  # wide dynamic range
    n = x.numel()
    for k in sorted({1, min(2, n), n // 3 or 1, n // 2 or 1, n - 1 or 1, n}):
        ref = kth_ref(x, k)
        for rows in (None, 1, 3):
            assert kth_largest_abs(x, k, chunk_rows=rows) == ref, (shape, k, rows)


def test_select_ties_zeros_and_all_equal():
    x = torch.tensor([[0.0, -0.0, 2.0], [-2.0, 2.0, 1.0], [0.0, 5.0, -1.0]])
    # |x| sorted descending: 5 2 2 2 1 1 0 0 0
    expected = [5.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    for k, want in enumerate(expected, start=1):
        for rows in (1, 2, 3):
            assert kth_largest_abs(x, k, chunk_rows=rows) == want
            assert kth_ref(x, k) == want
    same = torch.full((4, 6), -0.375)
    assert [kth_largest_abs(same, k, chunk_rows=1) for k in (1, 12, 24)] == [0.375] * 3
    zeros = torch.zeros(3, 3)
    assert kth_largest_abs(zeros, 5) == 0.0


def test_select_tiny_and_extremes():
    assert kth_largest_abs(torch.tensor(-3.5), 1) == 3.5  # 0-d
    assert kth_largest_abs(torch.tensor([7.0]), 1) == 7.0
    tiny = torch.tensor([1e-45, -1e-44, 3.0e38, float("inf")])  # subnormals and inf keep their order
    assert [kth_largest_abs(tiny, k) for k in (1, 2, 3, 4)] == tiny.abs()[[3, 2, 1, 0]].tolist()


def test_select_several_streams_and_ks_in_two_passes():
    a, b = randn(30, 11, seed=3), randn(30, 11, seed=4)
    passes = []

    def read():
        passes.append(1)
        return ([a[r : r + 4], b[r : r + 4]] for r in range(0, 30, 4))

    got = kth_largest_abs_streaming(read, [[1, 100, 330], [5]])
    assert got == [[kth_ref(a, 1), kth_ref(a, 100), kth_ref(a, 330)], [kth_ref(b, 5)]]
    assert len(passes) == 2


def test_select_refuses_bad_k_and_nan():
    x = randn(4, 4)
    for k in (0, 17, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            kth_largest_abs(x, k)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kth_largest_abs(x, 3)


# ------------------------------------------------------------------------------------------ chunk-proof sums
def test_rowsum_bit_identical_across_chunkings_and_accurate():
    x = (randn(13, 70001, seed=5) * torch.exp(randn(13, 70001, seed=6) * 4)).double()  # rows > torch's grain
    totals = []
    for rows in (1, 3, 13):
        acc = RowSum()
        for r in range(0, 13, rows):
            acc.add(x[r : r + rows])
        totals.append(acc.value())
    assert totals[0] == totals[1] == totals[2]
    exact = math.fsum(x.reshape(-1).tolist())  # correctly rounded exact sum
    assert abs(totals[0] - exact) <= 1e-12 * float(x.abs().sum())


def test_pairwise_rows_small_cases():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    assert pairwise_rows(x).tolist() == [6.0, 15.0]
    assert pairwise_rows(torch.zeros(2, 0, dtype=torch.float64)).tolist() == [0.0, 0.0]
    acc = RowSum("probe")
    acc.add(torch.tensor([1.0, float("inf")], dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        acc.value()


# ------------------------------------------------------------------------------------------ closed forms
def merge(name, tensors, base, **params):
    return run_in_memory(methods.get(name), tensors, base, **params)


def test_linear_closed_form():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    close(merge("linear", [a, b], None, weight=(1.0, 3.0)), [[2.5, 3.5]])
    close(merge("linear", [a, b], None, weight=(1.0, 3.0), normalize=False), [[10.0, 14.0]])
    with pytest.raises(ValueError, match="non-zero sum"):
        merge("linear", [a, b], None, weight=(1.0, -1.0))


def test_task_arithmetic_closed_form():
    base = torch.tensor([1.0, 1.0])
    x1, x2 = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])  # tau1 = [1, -1], tau2 = [0, 2]
    close(merge("task_arithmetic", [x1, x2], base, weight=(0.5, 1.0)), [1.5, 2.5])
    close(merge("task_arithmetic", [x1, x2], base, weight=(0.5, 1.0), **{"lambda": 2.0}), [2.0, 4.0])
    close(merge("task_arithmetic", [x1, x2], base, weight=(0.5, 1.0), normalize=True), [1 + 0.5 / 1.5, 1 + 1.5 / 1.5])


def test_ties_closed_form():
    base = torch.ones(2, 3)
    tau1 = torch.tensor([[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]])  # top 3 |.|: 4, 3, 2
    tau2 = torch.tensor([[-2.0, 1.0, 1.0], [1.0, 2.0, -3.0]])  # top 3 |.|: 3, 2, 2
    # trimmed & weighted (w = 1, 2): [[3,0,2],[0,-4,0]] and [[-4,0,0],[0,4,-6]]; sum [[-1,0,2],[0,0,-6]]
    # elected sign [[-,+,+],[+,+,-]]; agreeing sums [[-4,0,2],[0,4,-6]]; agreeing weights [[2,0,1],[0,2,2]] (0 -> 1)
    out = merge("ties", [base + tau1, base + tau2], base, weight=(1.0, 2.0), density=(0.5, 0.5))
    close(out, base + torch.tensor([[-2.0, 0.0, 2.0], [0.0, 2.0, -3.0]]))
    raw = merge(
        "ties",
        [base + tau1, base + tau2],
        base,
        weight=(1.0, 2.0),
        density=(0.5, 0.5),
        normalize=False,
        **{"lambda": 0.5},
    )
    close(raw, base + 0.5 * torch.tensor([[-4.0, 0.0, 2.0], [0.0, 4.0, -6.0]]))


def test_ties_rescale_matches_l1():
    base = torch.zeros(1, 4)
    tau = torch.tensor([[4.0, -3.0, 2.0, 1.0]])  # keep top 2 (density .5): [4,-3,0,0], L1 10 -> 7, scale 10/7
    out = merge("ties", [tau], base, weight=(1.0,), density=(0.5,), rescale=True)
    close(out, torch.tensor([[4.0, -3.0, 0.0, 0.0]]) * (10.0 / 7.0))


def test_breadcrumbs_closed_form():
    base = torch.zeros(2, 5)
    tau = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0], [-6.0, 7.0, -8.0, 9.0, -10.0]])
    # n=10, target int(.5*10)=5, n_top int(.2*10)=2, n_bot 3: keep magnitudes 4..8
    keep = tau.abs().ge(4) & tau.abs().le(8)
    out = merge("breadcrumbs", [tau], base, weight=(1.0,), density=(0.5,), gamma=(0.2,))
    close(out, tau * keep)
    # density .9, gamma .2: n_top shrinks to 1 so 9 survive: only the largest (10) goes
    close(merge("breadcrumbs", [tau], base, weight=(1.0,), density=(0.9,), gamma=(0.2,)), tau * tau.abs().lt(10))
    # density >= 1 keeps everything, gamma ignored (mergekit)
    close(merge("breadcrumbs", [tau], base, weight=(2.0,), density=(1.0,), gamma=(0.5,)), 2 * tau)
    # density small enough that target_n = 0 keeps nothing
    close(merge("breadcrumbs", [tau], base, weight=(1.0,), density=(0.05,), gamma=(0.0,)), torch.zeros(2, 5))


def test_breadcrumbs_ties_closed_form():
    base = torch.zeros(1, 4)
    tau1 = torch.tensor([[10.0, 1.0, -2.0, 3.0]])  # gamma .25 drops 10, density .5 keeps 3 and -2
    tau2 = torch.tensor([[1.0, -5.0, 4.0, -2.0]])  # drops -5, keeps 4 and -2
    # kept: [0,0,-2,3], [0,0,4,-2]; sum [0,0,2,1] -> signs [+,+,+,+]; agreeing: [0,0,4,3]
    out = merge("breadcrumbs_ties", [tau1, tau2], base, weight=(1.0, 1.0), density=(0.5, 0.5), gamma=(0.25, 0.25))
    close(out, [[0.0, 0.0, 4.0, 3.0]])
    out = merge(
        "breadcrumbs_ties",
        [tau1, tau2],
        base,
        weight=(1.0, 1.0),
        density=(0.5, 0.5),
        gamma=(0.25, 0.25),
        normalize=True,
    )
    close(out, [[0.0, 0.0, 4.0, 3.0]])  # one agreeing expert per non-zero entry: divisor 1


def test_slerp_closed_form():
    base = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    other = torch.tensor([[0.0, 3.0], [0.0, 0.0]])  # orthogonal: theta = pi/2
    t = 0.3
    expected = math.sin((1 - t) * math.pi / 2) * base + math.sin(t * math.pi / 2) * other
    close(merge("slerp", [other], base, t=t), expected)
    colinear = 2.5 * base  # |dot| = 1 > 0.9995: lerp
    close(merge("slerp", [colinear], base, t=t), (1 - t) * base + t * colinear)
    close(merge("slerp", [other], base, t=0.0), base)
    # either side of mergekit's DOT_THRESHOLD 0.9995: unit vectors at angle acos(0.9994) slerp, acos(0.9996) lerp
    for cos_phi, spherical in ((0.9994, True), (0.9996, False)):
        phi = math.acos(cos_phi)
        a = torch.tensor([1.0, 0.0])
        b = torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float32)
        phi = math.acos(float(b[0]))  # the angle of the float32 vector actually merged
        slerped = (math.sin(0.5 * phi) * a + math.sin(0.5 * phi) * b) / math.sin(phi)
        lerped = 0.5 * a + 0.5 * b
        assert float((slerped - lerped).abs().max()) > 10 * TOL[torch.float32][0]  # the branches differ
        close(merge("slerp", [b], a, t=0.5), slerped if spherical else lerped)
    close(merge("slerp", [other], base, t=1.0), other)


# ------------------------------------------------------------------------------------------ chunk invariance
def params_for(name: str, n: int) -> dict:
    w = tuple(0.3 + 0.2 * i for i in range(n))
    return {
        "linear": dict(weight=w),
        "task_arithmetic": dict(weight=w, **{"lambda": 0.7}),
        "ties": dict(weight=w, density=tuple(0.2 + 0.3 * i for i in range(n)), rescale=True),
        "dare_linear": dict(weight=w, density=(0.5, 0.3, 0.8)[:n], random_seed=3),
        "dare_ties": dict(weight=w, density=(0.5, 0.3, 0.8)[:n], rescale_rule="l1"),
        "slerp": dict(t=0.35),
        "breadcrumbs": dict(weight=w, density=(0.4, 0.6, 0.9)[:n], gamma=(0.05, 0.1, 0.2)[:n], rescale=True),
        "breadcrumbs_ties": dict(weight=w, density=(0.4, 0.6, 0.9)[:n], gamma=(0.05, 0.1, 0.2)[:n]),
    }[name]


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("shape", [(10, 6), (7, 2, 3), (9,)])
def test_chunk_invariance_bit_identical(name, shape):
    spec = methods.get(name)
    n = 1 if name == "slerp" else 3
    base = randn(*shape, seed=11)
    tensors = [base + randn(*shape, seed=20 + i, scale=0.1) for i in range(n)]
    if name == "linear":
        tensors, base = [base] + tensors[:2], None
    params = params_for(name, len(tensors))
    outs = [
        run_in_memory(spec, tensors, base, name="model.layers.0.w", rows_per_chunk=r, **params) for r in (1, 3, None)
    ]
    assert outs[0].shape == torch.Size(shape) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_registry_specs():
    for name in CLASSIC:
        spec = methods.get(name)
        assert spec.name == name and spec.chunkwise
    assert methods.get("linear").base_is_input and not methods.get("linear").needs_base
    assert methods.get("slerp").max_models == 1
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "slerp"):
        assert methods.get(name).prepare is not None


# ------------------------------------------------------------------------------------------ DARE
def dare_delta(name="dare_linear", *, shape=(300, 400), density=0.3, seed=0, tensor="t", rows=None, **extra):
    """One expert on a zero base with weight 1: the output is exactly the dropped-and-rescaled tau."""
    tau = randn(*shape, seed=99) + 0.5  # no zeros, so kept entries are exactly the non-zero outputs
    return tau, run_in_memory(
        methods.get(name),
        [tau],
        torch.zeros(shape),
        name=tensor,
        rows_per_chunk=rows,
        weight=(1.0,),
        density=(density,),
        random_seed=seed,
        **extra,
    )


def test_dare_kept_fraction_and_inverse_density_rescale():
    density = 0.3
    tau, out = dare_delta(density=density)
    kept = out != 0
    n = kept.numel()
    sd = math.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - n * density) < 5 * sd
    close(out[kept], tau[kept] * (1 / density))
    assert torch.all(out[~kept] == 0)


def test_dare_l1_rescale_matches_norm():
    tau, out = dare_delta(shape=(100, 120), density=0.25, rescale_rule="l1", rows=7)
    close(out.abs().double().sum(), tau.abs().double().sum(), dtype=torch.float32)
    kept = out != 0
    ratio = out[kept] / tau[kept]  # one common multiplier, near 1/density
    close(ratio, torch.full_like(ratio, float(ratio[0])))
    # sum|tau * keep| / (density * sum|tau|) has relative sd sqrt((1 - d) / (d n)) * rms|tau| / mean|tau|
    n = tau.numel()
    sd = math.sqrt(0.75 / (0.25 * n)) * float(tau.pow(2).mean().sqrt() / tau.abs().mean())
    assert abs(1 / (float(ratio[0]) * 0.25) - 1) < 5 * sd


def test_dare_without_rescale_and_density_edges():
    tau, out = dare_delta(shape=(30, 40), density=0.5, rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], tau[kept]) and 0 < int(kept.sum()) < kept.numel()
    tau, out = dare_delta(shape=(30, 40), density=1.0)
    assert torch.equal(out, tau)
    tau, out = dare_delta(shape=(30, 40), density=0.0)
    assert torch.equal(out, torch.zeros_like(tau))


def test_dare_determinism_and_stream_separation():
    masks = {}
    for key in [(0, "t"), (1, "t"), (0, "u")]:
        _, a = dare_delta(shape=(50, 60), density=0.5, seed=key[0], tensor=key[1], rows=1)
        _, b = dare_delta(shape=(50, 60), density=0.5, seed=key[0], tensor=key[1], rows=None)
        assert torch.equal(a, b)  # deterministic, independent of chunking
        masks[key] = a != 0
    keys = list(masks)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            agree = float((masks[keys[i]] == masks[keys[j]]).float().mean())
            assert abs(agree - 0.5) < 0.05  # independent streams agree on ~half the entries
    assert stream_key(0, "t", 0) != stream_key(0, "t", 1)


def test_dare_experts_get_different_masks():
    shape = (40, 50)
    tau = randn(*shape, seed=5) + 0.5
    spec = methods.get("dare_linear")
    masks = []
    for w in ((1.0, 0.0), (0.0, 1.0)):  # same tau for both experts: only the expert index differs
        out = run_in_memory(spec, [tau, tau], torch.zeros(shape), weight=w, density=(0.5, 0.5))
        masks.append(out != 0)
    agree = float((masks[0] == masks[1]).float().mean())
    assert abs(agree - 0.5) < 0.06


def test_dare_ties_consensus_on_kept_entries():
    shape = (30, 40)
    base = torch.zeros(shape)
    t1, t2 = randn(*shape, seed=1), randn(*shape, seed=2)
    spec = methods.get("dare_ties")
    out = run_in_memory(spec, [t1, t2], base, name="x", weight=(1.0, 1.0), density=(0.6, 0.6), random_seed=4)
    # rebuild the per-expert survivors from dare_linear with one expert switched off at a time (same streams)
    lin = methods.get("dare_linear")
    d1 = run_in_memory(lin, [t1, t2], base, name="x", weight=(1.0, 0.0), density=(0.6, 0.6), random_seed=4)
    d2 = run_in_memory(lin, [t1, t2], base, name="x", weight=(0.0, 1.0), density=(0.6, 0.6), random_seed=4)
    sign = torch.where(d1 + d2 >= 0, 1.0, -1.0)
    expected = d1 * (torch.sign(d1) == sign) + d2 * (torch.sign(d2) == sign)
    close(out, expected)


def test_dare_refuses_bad_params():
    with pytest.raises(ValueError, match="rescale_rule"):
        dare_delta(shape=(2, 2), rescale_rule="l2")
    with pytest.raises(ValueError, match="density"):
        dare_delta(shape=(2, 2), density=-0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CLASSIC)
def test_cuda_matches_cpu_bit_for_bit(name):
    """Statistics are integer histograms and elementwise pairwise sums, masks are counter-based Philox, merges are
    elementwise: a CUDA worker must write the same bits as a CPU worker."""
    spec = methods.get(name)
    shape = (64, 48)
    base = randn(*shape, seed=11)
    tensors = [base + randn(*shape, seed=20 + i, scale=0.1) for i in range(1 if name == "slerp" else 3)]
    if name == "linear":
        tensors, base = [base] + tensors[:2], None
    params = params_for(name, len(tensors))
    cpu = run_in_memory(spec, tensors, base, name="w", rows_per_chunk=5, **params)
    gpu = run_in_memory(
        spec, [t.cuda() for t in tensors], None if base is None else base.cuda(), name="w", rows_per_chunk=7, **params
    )
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
