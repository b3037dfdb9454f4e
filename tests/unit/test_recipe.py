"""Recipe validation: mergekit-compatible forms accepted; typos and wrong types rejected naming the YAML path."""

from __future__ import annotations

import pytest

from shardmerge.engine import methods
from shardmerge.engine.recipe.checks import evaluate_setting, resolve_params
from shardmerge.engine.recipe.schema import Condition, load_recipe, parse_recipe

GOOD = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
        {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}], "density": 0.5}},
    ],
    "parameters": {"normalize": True, "lambda": 1.0},
    "dtype": "bfloat16",
}


def test_accepts_mergekit_forms():
    r = parse_recipe(GOOD)
    assert r.model_refs == ["a", "b"] and r.output_dtype_code == "BF16"
    spec = methods.get("ties")
    p = resolve_params(r, spec, "model.layers.1.mlp.up_proj.weight", t=0.5)
    assert p["weight"] == (0.5, 0.9) and p["density"] == (0.5, 0.5) and p["lambda"] == 1.0
    p = resolve_params(r, spec, "model.layers.0.self_attn.q_proj.weight", t=0.0)
    assert p["weight"] == (0.5, 0.1) and p["density"] == (0.2, 0.5)


def test_gradients_interpolate_like_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([1, 2, 3, 4], "x", 1.0) == 4
    assert evaluate_setting([Condition(filter="attn", value=[0.0, 1.0]), Condition(value=7)], "a.attn.q", 1.0) == 1.0
    assert evaluate_setting([Condition(filter="attn", value=3)], "mlp", 0.0) is None


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"merge_method": "tiez"}, r"merge_method: unknown merge_method 'tiez'; known methods: .*ties"),
        ({"bogus_key": 1}, r"bogus_key: unknown key"),
        (
            {"models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
            r"models\[0\]\.parameters\.weight: expected a number, got 'heavy'",
        ),
        (
            {"models": [{"model": "a", "parameters": {"density": 1.5}}]},
            r"models\[0\]\.parameters\.density: density must be in \(0, 1\]",
        ),
        ({"models": [{"model": "a", "parameters": {"density": 0}}]}, r"density must be in \(0, 1\]"),
        ({"parameters": {"normalise": True}}, r"parameters\.normalise: unknown parameter for merge_method 'ties'"),
        ({"parameters": {"normalize": "yes"}}, r"parameters\.normalize: expected true/false"),
        ({"dtype": "float8"}, r"dtype: unknown dtype 'float8'"),
        ({"base_model": None}, r"base_model: merge_method 'ties' needs a base_model"),
        ({"models": []}, r"models: at least one model"),
        ({"models": [{"model": "a", "weight": 1}]}, r"models\[0\]\.weight: unknown key"),
    ],
)
def test_errors_quote_the_yaml_path(patch, match):
    data = {**GOOD, **patch}
    with pytest.raises(ValueError, match=match):
        parse_recipe(data, source="r.yaml")


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("merge_method: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_relative_model_paths_resolve_against_recipe_dir(tmp_path):
    (tmp_path / "m1").mkdir()
    (tmp_path / "r.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n"
        "  - model: org/hub-id\n    parameters: {weight: 1}\n"
    )
    r = load_recipe(tmp_path / "r.yaml")
    assert r.model_refs == [str((tmp_path / "m1").resolve()), "org/hub-id"]


def test_recipe_hash_is_stable_and_sensitive():
    assert parse_recipe(GOOD).hash() == parse_recipe(dict(GOOD)).hash()
    assert parse_recipe(GOOD).hash() != parse_recipe({**GOOD, "dtype": "float32"}).hash()


def test_bare_model_strings_are_model_entries():
    r = parse_recipe(
        {
            "merge_method": "linear",
            "models": ["a", {"model": "b", "parameters": {"weight": 2}}],
            "parameters": {"weight": 1},
        }
    )
    assert r.model_refs == ["a", "b"] and r.models[0].parameters == {}


def test_calibration_forms_and_refusals():
    r = parse_recipe({"merge_method": "pivot", "models": ["a", "b"], "calibration": "pairs.parquet"}, source="r.yaml")
    assert r.calibration.path == "pairs.parquet" and r.calibration.max_pairs == 256
    r = parse_recipe(
        {
            "merge_method": "pivot",
            "models": ["a", "b"],
            "calibration": {"path": "p.parquet", "max_pairs": 8, "caption_column": "text"},
        },
        source="r.yaml",
    )
    assert (r.calibration.max_pairs, r.calibration.caption_column) == (8, "text")
    with pytest.raises(ValueError, match=r"r.yaml: calibration.max_pairs: .*greater than 0"):
        parse_recipe(
            {"merge_method": "pivot", "models": ["a", "b"], "calibration": {"path": "p.parquet", "max_pairs": 0}},
            source="r.yaml",
        )
    with pytest.raises(ValueError, match=r"r.yaml: calibration.pairs: unknown key"):
        parse_recipe(
            {"merge_method": "pivot", "models": ["a", "b"], "calibration": {"path": "p.parquet", "pairs": 3}},
            source="r.yaml",
        )
    with pytest.raises(ValueError, match="calibration: only used by merge_method pivot"):
        parse_recipe(
            {"merge_method": "linear", "models": ["a", "b"], "calibration": "p.parquet", "parameters": {"weight": 1}},
            source="r.yaml",
        )
