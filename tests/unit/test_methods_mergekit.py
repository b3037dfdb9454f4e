"""Classic methods against mergekit 0.1.5's own tensor-level implementations on the same float32 tensors.

Deterministic methods must agree within 1e-3 relative (max |ours - mergekit| / max |mergekit|); the data is
continuous random, so magnitudes are never tied and both pick the same entries. DARE draws its mask from a different
RNG than mergekit's torch.bernoulli, so it is compared exactly where randomness vanishes (density 1) and
statistically elsewhere.
"""

from __future__ import annotations

import math

import mergekit.merge_methods.registry as mk_registry  # declared test dependency (pyproject: test extra)
import pytest
import torch
from mergekit.merge_methods.base import TensorGroup

import shardmerge.engine.methods as methods
from tests.oracles.methods import run_in_memory

REL = 1e-3
OUR_EXTRAS = {"dare_linear": {"random_seed", "rescale_rule"}, "dare_ties": {"random_seed", "rescale_rule"}}
CLASSIC = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs", "breadcrumbs_ties")


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def models(shape, n, seed=0, spread=0.05):
    base = randn(*shape, seed=seed)
    return base, [base + randn(*shape, seed=seed + 1 + i, scale=spread * (1 + i)) for i in range(n)]


def mergekit(name, base, tensors, params):
    """mergekit's own merge of one tensor group (base first when given), parameters as in a YAML recipe."""
    entries = ([base] if base is not None else []) + list(tensors)
    group = TensorGroup.from_tensors(entries, base_index=0 if base is not None else None, name="t")
    return mk_registry.get(name)([group], parameters=params)[0]


def ours(name, base, tensors, params, rows=3):
    return run_in_memory(
        methods.get(name), tensors, base, name="model.layers.1.mlp.up_proj.weight", rows_per_chunk=rows, **params
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", CLASSIC)
def test_parameter_names_scopes_and_defaults_are_mergekits(name):
    spec = methods.get(name)
    theirs = {p.name: p for p in mk_registry.get(name).spec.parameters}
    mine = {**spec.per_model_params, **spec.global_params}
    assert set(mine) - OUR_EXTRAS.get(name, set()) == set(theirs)
    for pname, p in theirs.items():
        assert (pname in spec.per_model_params) == (p.scope.value != "shared"), pname
        assert mine[pname] == (None if p.required else p.default), pname
    if name.startswith("dare"):
        assert spec.global_params["random_seed"] == 0


CASES = [
    ("task_arithmetic", dict(weight=[0.7, 0.4, 1.1])),
    ("task_arithmetic", dict(weight=[0.7, 0.4, 1.1], normalize=True, **{"lambda": 0.6})),
    ("ties", dict(weight=[0.7, 0.4, 1.1], density=[0.2, 0.5, 0.9])),
    ("ties", dict(weight=[1.0, -0.5, 0.8], density=[0.3, 0.3, 0.6], normalize=False, **{"lambda": 1.4})),
    ("ties", dict(weight=[0.7, 0.4, 1.1], density=[0.2, 0.5, 1.0], rescale=True, int8_mask=True)),
    ("breadcrumbs", dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.7, 0.9], gamma=[0.01, 0.05, 0.2])),
    ("breadcrumbs", dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.9, 1.0], gamma=[0.3, 0.2, 0.1], rescale=True)),
    ("breadcrumbs_ties", dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.7, 0.9], gamma=[0.01, 0.05, 0.2])),
    (
        "breadcrumbs_ties",
        dict(weight=[0.7, 0.4, 1.1], density=[0.4, 0.4, 0.4], gamma=[0.1, 0.1, 0.1], normalize=True, **{"lambda": 0.5}),
    ),
]


@pytest.mark.parametrize("shape", [(48, 33), (257,), (6, 5, 7)])
@pytest.mark.parametrize("name,params", CASES)
def test_task_vector_methods_match_mergekit(name, params, shape):
    base, xs = models(shape, 3, seed=len(shape))
    ref = mergekit(name, base, xs, params)
    assert rel_err(ours(name, base, xs, params, rows=5), ref) < REL


@pytest.mark.parametrize("shape", [(40, 24), (100,)])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, normalize):
    base, xs = models(shape, 2, seed=3, spread=0.5)
    params = dict(weight=[0.2, 0.5, 0.9], normalize=normalize)
    ref = mergekit("linear", None, [base] + xs, params)
    assert rel_err(ours("linear", None, [base] + xs, params), ref) < REL


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(40, 24), (100,), (3, 4, 5)])
def test_slerp_matches_mergekit(t, shape):
    base, (other,) = models(shape, 1, seed=5, spread=0.8)  # far apart: the spherical branch
    ref = mergekit("slerp", base, [other], dict(t=t))
    assert rel_err(ours("slerp", base, [other], dict(t=t)), ref) < REL
    near = base + randn(*shape, seed=6, scale=1e-3)  # nearly colinear: mergekit's lerp fallback
    ref = mergekit("slerp", base, [near], dict(t=t))
    assert rel_err(ours("slerp", base, [near], dict(t=t)), ref) < REL


# ------------------------------------------------------------------------------------------ DARE
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_exactly_mergekits(name):
    base, xs = models((30, 20), 2, seed=8)
    params = dict(weight=[0.6, 0.9], density=[1.0, 1.0], normalize=True)
    assert rel_err(ours(name, base, xs, params), mergekit(name, base, xs, params)) < REL


def test_dare_l1_rule_matches_mergekit_norms_and_kept_fraction():
    shape, density = (200, 250), 0.3
    base, (x,) = models(shape, 1, seed=9)
    tau = x - base
    params = dict(weight=[1.0], density=[density])
    torch.manual_seed(0)
    theirs = mergekit("dare_linear", base, [x], params) - base
    mine = ours("dare_linear", base, [x], {**params, "rescale_rule": "l1"}, rows=17) - base
    # both rescale survivors to the original L1 norm (up to the float32 rounding of base + delta - base)
    l1 = float(tau.abs().double().sum())
    assert abs(float(mine.abs().double().sum()) / l1 - 1) < REL
    assert abs(float(theirs.abs().double().sum()) / l1 - 1) < REL
    n = tau.numel()
    bound = 5 * math.sqrt(n * density * (1 - density))
    for out in (mine, theirs):
        assert abs(int((out.abs() > 1e-6).sum()) - n * density) < bound


def test_dare_inverse_density_rule_agrees_in_expectation():
    shape, density = (200, 250), 0.4
    base = torch.zeros(shape)
    x = randn(*shape, seed=10)
    params = dict(weight=[1.0], density=[density])
    torch.manual_seed(1)
    theirs = float(mergekit("dare_linear", base, [x], params).abs().double().sum())  # == sum|tau| (L1 match)
    mine = float(ours("dare_linear", base, [x], params).abs().double().sum())
    sd = math.sqrt(float((x.double() ** 2).sum()) * (1 - density) / density)  # sd of sum|tau| * keep / density
    assert abs(mine - theirs) < 5 * sd


def test_dare_ties_statistics_match_mergekit():
    shape = (300, 300)
    base, xs = models(shape, 3, seed=11)
    params = dict(weight=[0.5, 0.8, 1.0], density=[0.5, 0.4, 0.7], normalize=True)
    torch.manual_seed(2)
    theirs = mergekit("dare_ties", base, xs, params) - base
    mine = ours("dare_ties", base, xs, {**params, "rescale_rule": "l1"}, rows=64) - base
    ta = ours("task_arithmetic", base, xs, dict(weight=params["weight"], normalize=True)) - base
    # same distribution: mean |delta| within 2% (its sampling sd is ~0.3% at 90k entries) ...
    assert abs(float(mine.abs().mean()) / float(theirs.abs().mean()) - 1) < 0.02
    # ... the same share of entries whose merged sign follows the plain weighted sum ...
    agree = [float((torch.sign(d) == torch.sign(ta)).float().mean()) for d in (mine, theirs)]
    assert abs(agree[0] - agree[1]) < 0.02
    # ... and the same correlation with the undropped merge
    corr = [float(torch.corrcoef(torch.stack([d.flatten(), ta.flatten()]))[0, 1]) for d in (mine, theirs)]
    assert abs(corr[0] - corr[1]) < 0.02
