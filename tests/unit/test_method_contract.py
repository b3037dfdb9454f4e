"""The method contract: specs declare their parameters (kind, default, range), input contract, streaming and
memory; recipe checks read the declarations; modules are discovered; aliases resolve to one spec."""

from __future__ import annotations

import dataclasses

import pytest

from shardmerge.engine import methods
from shardmerge.engine.methods.base import MethodSpec, Param
from shardmerge.engine.recipe.schema import parse_recipe


def _svd_recipe(method: str, **params) -> dict:
    return {
        "merge_method": method,
        "base_model": "base",
        "parameters": params,
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
    }


@pytest.mark.parametrize(
    "method,params",
    [
        ("iso_c", {"alpha": 1.3}),
        ("tsv", {"alpha": 1.3}),
        ("iso_cts", {"alpha": 2.0}),
        ("tsv", {"rank_fraction": 1.5}),
        ("tsv", {"rank_fraction": 3.0}),
    ],
)
def test_svd_scales_and_tsv_rank_fraction_above_one_are_accepted(method, params):
    """alpha scales the merged task vector (the papers tune it above 1); tsv's rank_fraction gives each of the K
    tasks rank_fraction * r / K directions, so values up to K are meaningful."""
    parse_recipe(_svd_recipe(method, **params), source="r.yaml")


def test_tsv_rank_fraction_is_bounded_by_the_model_count():
    with pytest.raises(
        ValueError,
        match=r"r\.yaml: parameters\.rank_fraction: rank_fraction must be in \(0, 3\], "
        r"got 3\.5",
    ):
        parse_recipe(_svd_recipe("tsv", rank_fraction=3.5), source="r.yaml")
    with pytest.raises(ValueError, match=r"rank_fraction must be in \(0, 3\], got 0"):
        parse_recipe(_svd_recipe("tsv", rank_fraction=0), source="r.yaml")


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("cart", {"rank_fraction": 1.5}, r"rank_fraction must be in \(0, 1\], got 1\.5"),
        ("iso_cts", {"common_fraction": 0}, r"common_fraction must be in \(0, 1\], got 0"),
        ("tsv", {"svd_path": "fast"}, r"svd_path must be one of .*gram.*got 'fast'"),
        ("tsv", {"seed": 1.5}, r"parameters\.seed: expected an integer, got 1\.5"),
        ("tsv", {"alpha": float("inf")}, r"parameters\.alpha: expected a finite number"),
    ],
)
def test_declared_ranges_and_choices_are_enforced(method, params, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(_svd_recipe(method, **params), source="r.yaml")


def test_param_check_messages():
    p = Param("gamma", default=0.01, lo=0, hi=1, hi_open=True)
    p.check(0.0, "w")
    with pytest.raises(ValueError, match=r"^w: gamma must be in \[0, 1\), got 1$"):
        p.check(1, "w")
    q = Param("temperature", default=1.0, lo=0, lo_open=True)
    with pytest.raises(ValueError, match=r"^w: temperature must be > 0, got -1$"):
        q.check(-1, "w")
    assert Param("x", default=float("nan")).range_text() == "" and q.range_text() == "> 0"


def test_every_spec_declares_its_contract():
    for spec in methods.specs():
        names = [p.name for p in spec.params]
        assert set(names) == set(spec.per_model_params) | set(spec.global_params), spec.name
        assert {p.name for p in spec.params if p.per_model} == set(spec.per_model_params)
        assert spec.base in ("required", "optional", "input", "unused")
        assert spec.reference.startswith("https://"), spec.name
        assert spec.doc, spec.name
        if not spec.chunkwise:
            assert spec.memory is not None, spec.name


def test_legacy_dict_form_still_works_and_derives_params():
    spec = MethodSpec(
        name="x",
        merge=lambda *a, **k: None,
        needs_base=False,
        per_model_params={"weight": None},
        global_params={"flag": False, "mode": "a", "s": 1.0},
    )
    kinds = {p.name: (p.kind, p.per_model, p.required) for p in spec.params}
    assert kinds == {
        "weight": ("float", True, True),
        "flag": ("bool", False, False),
        "mode": ("str", False, False),
        "s": ("float", False, False),
    }
    again = dataclasses.replace(methods.get("tsv"), merge_batch=None)  # both forms given and consistent
    assert again.params == methods.get("tsv").params
    with pytest.raises(ValueError, match="disagree"):
        dataclasses.replace(methods.get("tsv"), global_params={"alpha": 2.0})
    with pytest.raises(ValueError, match="contradicts"):
        MethodSpec(name="y", merge=lambda: None, needs_base=False, base="required")


def test_aliases_resolve_to_one_spec():
    assert methods.get("pivotmerge") is methods.get("pivot")
    assert "pivotmerge" not in methods.names() and "pivotmerge" in methods.names(aliases=True)
    assert methods.canonical("pivotmerge") == "pivot"
    with pytest.raises(ValueError, match="already registered"):
        methods.register(dataclasses.replace(methods.get("linear"), name="linear2", aliases=("pivotmerge",)))


def test_modules_are_discovered_and_a_broken_module_is_an_error(monkeypatch):
    mods = methods.method_modules()
    assert {"linear", "ties", "svd", "slerp"} <= set(mods) and "common" not in mods
    monkeypatch.setattr(methods, "_loaded", False)
    monkeypatch.setattr(methods, "method_modules", lambda: mods + ["not_written_yet"])
    with pytest.raises(ModuleNotFoundError, match="not_written_yet"):
        methods.names()
    monkeypatch.setattr(methods, "method_modules", lambda: mods + ["common"])  # a module registering nothing
    monkeypatch.setattr(methods, "_loaded", False)
    with pytest.raises(ImportError, match="common.py registered no merge method"):
        methods.names()


def test_memory_check_reads_the_spec():
    from shardmerge.engine.run.memory import whole_tensor_bytes

    spec = methods.get("tsv")
    assert whole_tensor_bytes("tsv", (8, 3, 2, 2), 2, True) == spec.memory((8, 3, 2, 2), 2, True)
    assert whole_tensor_bytes("tsv", (8, 3, 2, 2), 2, True) == whole_tensor_bytes("tsv", (8, 12), 2, True)


def test_unit_interval_is_per_method_not_per_name():
    """`alpha` is [0, 1] for plam (a mixing weight) but unbounded for the SVD methods (a scale)."""
    assert methods.get("plam").param("alpha").range_text() == "[0, 1]"
    assert methods.get("iso_c").param("alpha").range_text() == ""
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1\.3"):
        methods.get("plam").param("alpha").check(1.3, "w")


def test_docs_methods_table_is_generated_from_the_specs():
    """docs/methods.md is `python -m shardmerge.engine.methods.catalog`'s output: regenerate it when a spec changes."""
    from pathlib import Path

    from shardmerge.engine.methods import catalog

    doc = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    assert doc == catalog.document(), (
        "docs/methods.md is stale: run python -m shardmerge.engine.methods.catalog > docs/methods.md"
    )
    for spec in methods.specs():
        assert f"| `{spec.name}`" in doc
        for p in spec.params:
            assert f"`{p.name}` [" in doc


def test_model_card_names_the_method_from_its_spec():
    from shardmerge.engine.methods.catalog import card_section

    text = card_section("pivotmerge")
    assert "`pivot`" in text and methods.get("pivot").reference in text
    assert "mergekit `ties`" in card_section("ties")


@pytest.mark.parametrize(
    "recipe,match",
    [
        (
            {"merge_method": "model_stock", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}]},
            r"r\.yaml: models: merge_method 'model_stock' takes at least 2 input model\(s\), got 1 \(not counting the base model\)",
        ),
        (
            {
                "merge_method": "nearswap",
                "base_model": "b",
                "parameters": {"t": 0.1},
                "models": [{"model": "x"}, {"model": "y"}],
            },
            r"'nearswap' takes 1 input model\(s\), got 2 \(not counting the base model\)",
        ),
        ({"merge_method": "passthrough", "models": [{"model": "x"}, {"model": "y"}]}, r"'passthrough' takes 1 input"),
        (
            {"merge_method": "arcee_fusion", "models": [{"model": "x"}]},
            r"base_model: merge_method 'arcee_fusion' needs",
        ),
        (
            {"merge_method": "nuslerp", "models": [{"model": "x", "parameters": {"weight": 1}}]},
            r"'nuslerp' takes 2 input model\(s\), got 1",
        ),
        ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "x"}]}, r"parameters\.t: required"),
        (
            {"merge_method": "karcher", "models": [{"model": "x"}], "parameters": {"max_iter": 2.5}},
            r"parameters\.max_iter: expected an integer",
        ),
    ],
)
def test_input_contracts_and_required_parameters_of_the_mergekit_methods(recipe, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(recipe, source="r.yaml")


def test_internal_params_are_declared_and_refused_in_recipes():
    """pivot's `weight_inputs` (set by the planner on a projector bias op) is a declared, internal parameter: the
    spec lists it with its default, a recipe that sets it is refused by name, and it must have a default."""
    weight_inputs = methods.get("pivot").param("weight_inputs")
    assert weight_inputs is not None and weight_inputs.internal and weight_inputs.default == 0
    recipe = {"merge_method": "pivot", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight_inputs": 2}}
    with pytest.raises(ValueError, match=r"parameters\.weight_inputs: set by the planner .*not a recipe parameter"):
        parse_recipe(recipe, source="r.yaml")
    with pytest.raises(ValueError, match="internal parameter needs a default"):
        Param("n", "int", None, internal=True)
