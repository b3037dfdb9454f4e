"""passthrough, nearswap, model_stock, nuslerp, multislerp, karcher, arcee_fusion: closed forms, mergekit 0.1.5's
own tensor-level implementations on the same float32 tensors (within 1e-3 relative), and bit-identical results
for every row chunking (the whole-tensor statistics are exact over all chunks)."""

from __future__ import annotations

import math

import mergekit.merge_methods.registry as mk_registry
import pytest
import torch

import shardmerge.engine.methods as methods
from tests.oracles.methods import run_in_memory
from tests.unit.test_methods_mergekit import mergekit, models, rel_err

REL = 1e-3
NEW = ("passthrough", "nearswap", "model_stock", "nuslerp", "multislerp", "karcher", "arcee_fusion")
NAME = "model.layers.1.mlp.up_proj.weight"


def ours(name, base, tensors, params, rows=3):
    return run_in_memory(methods.get(name), tensors, base, name=NAME, rows_per_chunk=rows, **params)


@pytest.mark.parametrize("name", NEW)
def test_parameter_names_scopes_defaults_and_contract_are_mergekits(name):
    spec = methods.get(name)
    mk = mk_registry.get(name)
    theirs = {p.name: p for p in mk.spec.parameters}
    assert {p.name for p in spec.params} == set(theirs) and spec.mergekit_name == name
    for pname, p in theirs.items():
        mine = spec.param(pname)
        assert mine.per_model == (p.scope.value != "shared"), pname
        if p.required:
            assert mine.required, pname
        elif p.default is None:  # mergekit's "not given": our NaN sentinel
            assert math.isnan(mine.default), pname
        else:
            assert mine.default == p.default, pname


# (method, uses a base, number of other models, parameters): every option of every method
CASES = [
    ("passthrough", False, 1, {}),
    ("passthrough", False, 1, {"scale": [0.5]}),
    ("nearswap", True, 1, {"t": 0.02}),
    ("nearswap", True, 1, {"t": 0.05}),
    ("model_stock", True, 3, {}),
    ("model_stock", True, 2, {"filter_wise": True}),
    ("model_stock", True, 3, {"filter_wise": True}),
    ("nuslerp", False, 2, {"weight": [0.3, 0.7]}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.7]}),
    ("nuslerp", True, 2, {"weight": [1.0, 0.5], "nuslerp_flatten": False}),
    ("nuslerp", True, 2, {"weight": [0.2, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", False, 2, {"weight": [0.5, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", False, 3, {"weight": [0.2, 0.3, 0.5]}),
    ("multislerp", True, 3, {"weight": [1.0, 2.0, 0.5]}),
    ("multislerp", True, 2, {"weight": [0.4, 0.4], "normalize_weights": False}),
    ("karcher", False, 4, {}),
    ("karcher", False, 3, {"max_iter": 2, "tol": 1e-3}),
    ("arcee_fusion", True, 1, {}),
]


@pytest.mark.parametrize("shape", [(48, 33), (257,), (6, 5, 7)])
@pytest.mark.parametrize("name,with_base,n,params", CASES)
def test_matches_mergekit_and_is_chunk_independent(name, with_base, n, params, shape):
    base, experts = models(shape, n, seed=3)
    b = base if with_base else None
    theirs = mergekit(name, b, experts, params)
    got = ours(name, b, experts, params)
    assert rel_err(got, theirs) <= REL, f"{name} {params} {shape}: {rel_err(got, theirs):.2e}"
    for rows in (1, None):
        assert torch.equal(ours(name, b, experts, params, rows=rows), got), rows
    if name in ("nearswap", "arcee_fusion"):  # the case takes some entries from each side
        took = (got == experts[0]).float().mean()
        assert 0 < took < 1 and not torch.equal(got, base), float(took)


def test_passthrough_closed_form():
    x = torch.randn(5, 4)
    assert torch.equal(ours("passthrough", None, [x], {}), x)
    assert torch.equal(ours("passthrough", None, [x], {"scale": [0.25]}), x * 0.25)


def test_nearswap_closed_form():
    a = torch.zeros(3)
    b = torch.tensor([0.005, 0.02, 1.0])
    # w = clamp(0.01 / |a - b|, 0, 1) = (1, 0.5, 0.01)
    torch.testing.assert_close(ours("nearswap", a, [b], {"t": 0.01}), torch.tensor([0.005, 0.01, 0.01]))


def test_model_stock_closed_form():
    base = torch.tensor([[1.0, 2.0]])
    o1, o2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, math.sqrt(3) / 2]])  # cos 0.5 -> t = 2 / 3
    got = ours("model_stock", base, [base + o1, base + o2], {})
    torch.testing.assert_close(got, base + (2 / 3) * (o1 + o2) / 2)
    ortho = ours("model_stock", base, [base + o1, base + torch.tensor([[0.0, 3.0]])], {})
    torch.testing.assert_close(ortho, base)  # cos 0 -> t = 0: the base


def test_spherical_methods_closed_form_midpoint():
    """Two orthogonal unit vectors with equal weight: slerp/Karcher midpoint (1, 1) / sqrt(2)."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    torch.testing.assert_close(ours("nuslerp", None, [e1, e2], {"weight": [1.0, 1.0]}), mid)
    torch.testing.assert_close(ours("multislerp", None, [e1, e2], {"weight": [1.0, 1.0]}), mid)
    torch.testing.assert_close(ours("karcher", None, [e1, e2], {}), mid)
    # t = 1/4 of the way: (cos 22.5, sin 22.5); around a base the task vectors are interpolated
    q = torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    torch.testing.assert_close(ours("nuslerp", None, [e1, e2], {"weight": [3.0, 1.0]}), q)
    base = torch.tensor([5.0, -1.0])
    torch.testing.assert_close(ours("nuslerp", base, [base + e1, base + e2], {"weight": [3.0, 1.0]}), base + q)


def test_arcee_fusion_closed_form():
    """1-D: one KL factor, so the threshold is median + 1.5 IQR of |b - a|: sorted |d| = 1..9, 100 gives
    q1 = 3, median = 5, q3 = 7 (indices int(q * 9)) and threshold 11: only the outlier moves to b."""
    a = torch.zeros(10)
    b = torch.tensor([4.0, 1.0, 9.0, 2.0, 100.0, 3.0, 8.0, 5.0, 7.0, 6.0]) * 1e-2
    want = torch.zeros(10)
    want[4] = 1.0
    torch.testing.assert_close(ours("arcee_fusion", a, [b], {}), want)


def test_bad_inputs_name_the_tensor():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="up_proj.*exactly one input model"):
        ours("passthrough", None, [x, x], {"scale": [1.0, 1.0]})
    with pytest.raises(ValueError, match="up_proj.*model_stock needs a base and at least 2"):
        ours("model_stock", x, [x], {})
    with pytest.raises(ValueError, match="up_proj.*nuslerp merges exactly 2"):
        ours("nuslerp", None, [x, x, x], {"weight": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="up_proj.*weighted sum of the unit inputs is zero"):
        e = torch.ones(4, 3)
        ours("multislerp", None, [e, -e, e * 0], {"weight": [1.0, 1.0, 1.0]})
