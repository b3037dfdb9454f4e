"""The recipe-form registry (shardmerge.engine.plan.forms): every form module registers a form, each recipe gets
exactly the form its keys and method say, and a method that exists only as a form is refused elsewhere."""

from __future__ import annotations

import pytest

from shardmerge.engine.plan import forms
from shardmerge.engine.recipe.model import Recipe
from shardmerge.engine.recipe.schema import parse_recipe

RECIPES = {
    "standard": {"merge_method": "linear", "models": ["a", "b"]},
    "slices": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
    "plam": {"merge_method": "plam", "mllm": "m", "base_llm": "b", "parameters": {"layers": [0, 1]}},
    "pivot": {"merge_method": "pivot", "models": ["a", "b"], "parameters": {"pivot": "mean"}},
    "pivot alias": {"merge_method": "pivotmerge", "models": ["a", "b"], "parameters": {"pivot": "mean"}},
}


def test_every_form_module_registers_one_form():
    assert forms.form_modules() == ["pivot", "plam", "slices", "standard"]
    assert [f.name for f in forms.forms()] == ["slices", "pivot", "plam", "standard"]  # the catch-all last


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_each_recipe_has_the_form_its_keys_and_method_say(case):
    recipe = Recipe.model_validate(RECIPES[case])
    assert forms.form_of(recipe).name == case.split()[0]


def test_methods_owned_by_a_form():
    assert forms.form_for_method("plam").name == "plam"
    assert forms.form_for_method("pivotmerge").name == "pivot"  # aliases resolve to the method's form
    assert forms.form_for_method("ties") is None


def test_a_form_owned_method_cannot_serve_a_module_or_a_slice():
    with pytest.raises(ValueError, match=r"modules\.projector\.merge_method: 'pivot' has its own recipe form"):
        parse_recipe(
            {"merge_method": "linear", "models": ["a", "b"], "modules": {"projector": {"merge_method": "pivot"}}}
        )
    with pytest.raises(ValueError, match="slices: merge_method 'plam' has its own recipe form"):
        parse_recipe({"merge_method": "plam", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})


def test_only_the_pivot_form_reads_calibration():
    cal = {"calibration": "pairs.parquet"}
    with pytest.raises(ValueError, match="calibration: only used by merge_method pivot"):
        parse_recipe({**RECIPES["standard"], **cal})
    with pytest.raises(ValueError, match="calibration: only used by merge_method pivot"):
        parse_recipe({**RECIPES["plam"], **cal})


def test_a_name_or_method_is_registered_once():
    taken = forms.forms()[1]
    with pytest.raises(ValueError, match="already registered"):
        forms.register(forms.Form(taken.name, check=taken.check, items=taken.items))
    with pytest.raises(ValueError, match="already registered"):
        forms.register(forms.Form("other", check=taken.check, items=taken.items, methods=("plam",)))
