"""della, della_linear, sce, ram, ramplus_tl on in-memory tensors: closed forms, mergekit 0.1.5's own tensor-level
implementations (deterministic ones within 1e-3 relative, DELLA in distribution: its mask comes from another RNG),
and bit-identical results for any row chunking."""

from __future__ import annotations

import math

import mergekit.merge_methods.registry as mk_registry
import pytest
import torch

import shardmerge.engine.methods as methods
from shardmerge.engine.methods.della import DellaStats, keep_mask
from shardmerge.kernels.philox import philox, stream_key
from tests.oracles.methods import run_in_memory
from tests.unit.test_methods_mergekit import REL, mergekit, models, ours, randn, rel_err

NEW = ("della", "della_linear", "sce", "ram", "ramplus_tl")
NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("name", NEW)
def test_parameter_names_scopes_and_defaults_are_mergekits(name):
    spec = methods.get(name)
    theirs = {p.name: p for p in mk_registry.get(name).spec.parameters}
    mine = {**spec.per_model_params, **spec.global_params}
    extras = {"random_seed"} if name.startswith("della") else set()
    assert set(mine) - extras == set(theirs)
    for pname, p in theirs.items():
        assert (pname in spec.per_model_params) == (p.scope.value != "shared"), pname
        assert mine[pname] == (None if p.required else p.default), pname
    assert spec.needs_base and spec.chunkwise and spec.min_models == 1 and spec.max_models is None


# ------------------------------------------------------------------------------------------ closed forms
def test_ram_closed_form():
    base = torch.zeros(6)
    a = torch.tensor([0.5, 0.0, 0.2, -0.4, 1e-6, 0.0])
    b = torch.tensor([0.0, 0.3, 0.4, 0.2, 0.0, 0.0])
    out = run_in_memory(methods.get("ram"), [a, b], base)
    # unique -> whole, overlap -> mean of contributors, |tau| <= epsilon -> nobody, nobody -> base
    assert torch.equal(out, torch.tensor([0.5, 0.3, 0.3, -0.1, 0.0, 0.0]))


def test_ramplus_tl_closed_form():
    base = torch.zeros(2, 4)
    a = torch.tensor([[1.0, 2.0, 0.0, 4.0], [0.0, 0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # a: unique at (0,0),(0,3) -> 2; overlap (0,1),(1,2) -> 2; rho = 1 -> lambda = 1 + 0.5 * clamp(1, 0, 0.8) = 1.4
    # b: unique at (0,2) -> 1; overlap 2 -> rho = 2 -> lambda = 1 + 0.5 * 0.8 = 1.4 (clamped)
    out = run_in_memory(methods.get("ramplus_tl"), [a, b], base, rows_per_chunk=1, r=0.5, alpha=0.8)
    want = torch.tensor([[1.4, 2.0, 4.2, 5.6], [0.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(out, want, rtol=1e-6)
    out = run_in_memory(methods.get("ramplus_tl"), [a, b], base, r=0.5, alpha=1.5)  # b: lambda = 1 + 0.5 * 1.5
    assert torch.allclose(out[0, 2], torch.tensor(3.0 * 1.75)) and torch.allclose(out[0, 0], torch.tensor(1.5))


def test_sce_closed_form_keeps_exactly_k_ties_by_flat_index():
    base = torch.zeros(2, 3)
    # variance across the two experts: (a - b)^2 / 4 -> [[1, 1, 0.25], [1, 0, 0.25]]; nnz = 5
    a = torch.tensor([[2.0, 2.0, 1.0], [2.0, 0.5, 1.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    # select_topk 0.5: k = int(5 * 0.5) = 2 of the three tied 1.0 entries, the first two in flat order
    for rows in (1, 2):
        out = run_in_memory(methods.get("sce"), [a, b], base, rows_per_chunk=rows, select_topk=0.5)
        kept_a = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
        # weights ∝ mean square of the selected taus: a -> 8/6, b -> 0 -> w = (1, 0); b's zeros never agree
        assert torch.equal(out, kept_a), rows
    out = run_in_memory(methods.get("sce"), [a, -b + 1.0], base)  # no selection: weighted mean of agreeing signs
    ta, tb = a, -b + 1.0
    wa, wb = float(ta.square().mean()), float(tb.square().mean())
    want = (ta * wa + tb * wb) / (wa + wb)  # all entries positive: both agree everywhere
    assert torch.allclose(out, want, rtol=1e-6)


def test_della_mask_is_the_keyed_rank_threshold():
    tau = randn(7, 50, seed=1)
    d, eps, seed = 0.5, 0.3, 11
    key = stream_key(seed, NAME, 0)
    stats = DellaStats(keys=(key,), density=(d,), epsilon=(eps,), scales=(1.0,))
    from shardmerge.engine.methods.base import Chunk

    mask = keep_mask(stats, 0, Chunk(0, 7, 0), tau)
    ranks = tau.abs().argsort(1).argsort(1).double()
    p = (d - eps) + ranks / 49 * 2 * eps
    r = philox(key, torch.arange(tau.numel())).reshape(tau.shape) >> 8
    assert torch.equal(mask, r < torch.floor(p * 2**24 + 0.5).long())


def test_della_keeps_by_rank_and_rescales_l1():
    shape, d, eps = (256, 400), 0.4, 0.2
    base, (x,) = models(shape, 1, seed=3)
    tau = x - base
    out = ours("della_linear", base, [x], dict(weight=[1.0], density=[d], epsilon=[eps]), rows=37) - base
    kept = out != 0
    ranks = tau.abs().argsort(1).argsort(1).float() / (shape[1] - 1)
    n_bin = kept.numel() / 5
    for b in range(5):  # keep rate per rank quintile = mean p over it, within 5 sd
        sel = (ranks >= b / 5) & (ranks < (b + 1) / 5)
        p = (d - eps) + 2 * eps * (b + 0.5) / 5
        assert abs(float(kept[sel].float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n_bin), b
    assert abs(float(out.abs().double().sum()) / float(tau.abs().double().sum()) - 1) < 1e-4  # L1 match


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_refuses_epsilon_outside_mergekits_range(name):
    base, xs = models((4, 5), 1, seed=2)
    with pytest.raises(ValueError, match=r"density 0.2 \+/- epsilon 0.25 must lie in \(0, 1\)"):
        ours(name, base, xs, dict(weight=[1.0], density=[0.2], epsilon=[0.25]))


# ------------------------------------------------------------------------------------------ mergekit, tensor level
DETERMINISTIC = [
    ("ram", {}),
    ("ram", dict(epsilon=0.03)),
    ("ramplus_tl", {}),
    ("ramplus_tl", dict(epsilon=0.04, r=0.5, alpha=2.0)),
    ("ramplus_tl", dict(epsilon=0.06, r=0.3, alpha=0.1)),
    ("sce", {}),
    ("sce", dict(select_topk=0.3)),
    ("sce", dict(select_topk=0.75, int8_mask=True)),
    ("sce", dict(select_topk=0.0)),
    ("della", dict(weight=[0.7, 0.4, 1.1])),  # density 1: no randomness, TIES consensus
    ("della_linear", dict(weight=[0.7, 0.4, 1.1], normalize=True, **{"lambda": 0.6})),
]


@pytest.mark.parametrize("shape", [(48, 33), (257,), (6, 5, 7)])
@pytest.mark.parametrize("name,params", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(name, params, shape):
    base, xs = models(shape, 3, seed=len(shape))
    ref = mergekit(name, base, xs, params)
    assert rel_err(ours(name, base, xs, params, rows=5), ref) < REL
    if name == "ramplus_tl" and params:  # the amplification is exercised: some entries have one contributor
        counts = sum(((x - base).abs() > params["epsilon"]).int() for x in xs)
        assert bool((counts == 1).any())


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_statistics_match_mergekit(name):
    shape = (300, 300)
    base, xs = models(shape, 3, seed=11)
    params = dict(weight=[0.5, 0.8, 1.0], density=[0.5, 0.4, 0.7], epsilon=[0.2, 0.1, 0.25])
    torch.manual_seed(2)
    theirs = mergekit(name, base, xs, params) - base
    mine = ours(name, base, xs, params, rows=64) - base
    ta = ours("task_arithmetic", base, xs, dict(weight=params["weight"])) - base
    assert abs(float(mine.abs().mean()) / float(theirs.abs().mean()) - 1) < 0.02
    share = [float((d != 0).float().mean()) for d in (mine, theirs)]
    assert abs(share[0] - share[1]) < 0.01
    corr = [float(torch.corrcoef(torch.stack([d.flatten(), ta.flatten()]))[0, 1]) for d in (mine, theirs)]
    assert abs(corr[0] - corr[1]) < 0.02


# ------------------------------------------------------------------------------------------ chunking
CHUNKED = [
    ("della", dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.3, 0.6], epsilon=[0.1, 0.2, 0.05], random_seed=3)),
    ("della_linear", dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.3, 0.6])),
    ("sce", dict(select_topk=0.4)),
    ("ram", dict(epsilon=0.03)),
    ("ramplus_tl", dict(epsilon=0.04, r=0.5, alpha=2.0)),
]


@pytest.mark.parametrize("shape", [(40, 24), (5, 6, 7)])
@pytest.mark.parametrize("name,params", CHUNKED)
def test_bits_do_not_depend_on_row_chunking(name, params, shape):
    base, xs = models(shape, 3, seed=4)
    whole = ours(name, base, xs, params, rows=None)
    for rows in (1, 3):
        assert torch.equal(ours(name, base, xs, params, rows=rows), whole), rows


def test_della_vector_ranks_span_element_chunks():
    """A 1-d tensor is one row for mergekit; the engine may cut it into element chunks: ranks stay whole-vector."""
    from shardmerge.engine.methods.base import Chunk, TensorInfo

    spec = methods.get("della")
    base, xs = models((300,), 2, seed=6)
    params = dict(
        weight=(1.0, 0.5),
        density=(0.5, 0.4),
        epsilon=(0.2, 0.2),
        int8_mask=False,
        normalize=True,
        rescale=True,
        random_seed=0,
        **{"lambda": 1.0},
    )
    info = TensorInfo(name="model.norm.weight", shape=(300,))

    def run(step):
        cs = [Chunk(r, min(300, r + step), r) for r in range(0, 300, step)]
        read = lambda: ((c, [x[c.row_start : c.row_stop] for x in xs], base[c.row_start : c.row_stop]) for c in cs)
        stats = spec.prepare(read, info=info, **params)
        return torch.cat(
            [
                spec.merge(
                    [x[c.row_start : c.row_stop] for x in xs],
                    base[c.row_start : c.row_stop],
                    stats=stats,
                    chunk=c,
                    info=info,
                    **params,
                )
                for c in cs
            ]
        )

    assert torch.equal(run(7), run(300))


def test_sce_variance_has_torch_var_bits():
    from shardmerge.engine.methods.sce import _variance

    for k, shape in ((2, (64, 48)), (3, (300,)), (5, (7, 6, 5))):
        base, xs = models(shape, k, seed=k)
        for data in (xs, [x.bfloat16().float() for x in xs]):  # continuous and bf16-grid task vectors
            b = base.bfloat16().float() if data is not xs else base
            want = torch.var(torch.stack([x - b for x in data]), dim=0, unbiased=False)
            assert torch.equal(_variance(data, b), want)


def test_recipes_accept_mergekits_unbounded_values():
    """mergekit bounds neither ramplus_tl's alpha/r nor sce's select_topk; a recipe with them is not refused."""
    from shardmerge.engine.recipe.schema import parse_recipe

    for method, params in (
        ("ramplus_tl", {"alpha": 2.5, "r": 1.5}),
        ("sce", {"select_topk": 1.5}),
        ("della", {"epsilon": 0.05, "random_seed": 3}),
    ):
        models = [{"model": "e", "parameters": {"weight": 1.0, "density": 0.5}}] if method == "della" else ["e"]
        parse_recipe(
            {"merge_method": method, "base_model": "b", "models": models, "parameters": params}, source="r.yaml"
        )
    with pytest.raises(ValueError, match=r"r.yaml: parameters.epsilon: epsilon must be >= 0, got -1"):
        parse_recipe(
            {"merge_method": "ram", "base_model": "b", "models": ["e"], "parameters": {"epsilon": -1}}, source="r.yaml"
        )
