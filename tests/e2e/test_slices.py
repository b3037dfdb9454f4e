"""`slices:` recipes against mergekit 0.1.5 (in-process): frankenmerges with more or fewer layers than the inputs,
several sources per slice, per-source / per-slice parameters, per-slice base models, per-slice gradients; the
output config's layer count; transformers loads the frankenmerge and generates; bad slices are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shardmerge.jobs.merge import run_merge


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer base and two experts perturbed from it (float32)."""
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("slices4")
    out = {"base": build_llm(root / "base", seed=3, num_hidden_layers=4)}
    for k in (1, 2):
        out[f"e{k}"] = build_llm(root / f"e{k}", base=out["base"], perturb_seed=20 + k)
    return out


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def mergekit_merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's result of a recipe, run in-process (no subprocess per case)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    mk_run(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(lazy_unpickle=True, copy_tokenizer=True))
    return load_dir(out)


def ours(recipe: dict, tmp: Path, name: str = "sm", **kw) -> dict[str, torch.Tensor]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_merge(path, tmp / name, workers=0, shard_size="30KB", chunk_mb=0.003, progress=False, **kw)
    return load_dir(tmp / name)


def assert_match(mine: dict, theirs: dict, what: str) -> None:
    assert set(mine) == set(theirs), f"{what}: tensor sets differ: {sorted(set(mine) ^ set(theirs))[:8]}"
    for name, t in theirs.items():
        o, t = mine[name].float(), t.float()
        err = (o - t).abs().max() / t.abs().max().clamp_min(1e-12)
        assert err <= 1e-3, f"{what}: {name}: relative max error {err:.2e}"


def _src(m, a, b, **params):
    d = {"model": str(m), "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


def slice_cases(f: dict[str, Path]) -> dict[str, dict]:
    b, e1, e2 = f["base"], f["e1"], f["e2"]
    return {
        # more layers than any input, overlapping ranges of two models
        "frankenmerge_6": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [{"sources": [_src(e1, 0, 3)]}, {"sources": [_src(e2, 1, 4)]}],
        },
        # fewer layers than the inputs
        "frankenmerge_3": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [{"sources": [_src(b, 0, 1)]}, {"sources": [_src(e1, 2, 4)]}],
        },
        # per-slice gradients (t runs over each slice on its own), per-slice base model, filters
        "slerp_gradients": {
            "merge_method": "slerp",
            "base_model": str(e1),
            "dtype": "float32",
            "parameters": {"t": 0.5},
            "slices": [
                {
                    "sources": [_src(e1, 0, 2), _src(e2, 0, 2)],
                    "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": [0.9, 0.1]}]},
                },
                {
                    "sources": [_src(e1, 1, 4), _src(e2, 1, 4)],
                    "base_model": str(e2),
                    "parameters": {"t": [0.2, 0.7, 0.4]},
                },
            ],
        },
        # per-source > per-slice > global parameters, a one-layer slice (t = 1)
        "linear_precedence": {
            "merge_method": "linear",
            "dtype": "float32",
            "parameters": {"weight": 0.3, "normalize": False},
            "slices": [
                {"sources": [_src(e1, 0, 2, weight=[1.0, 0.2]), _src(e2, 2, 4)], "parameters": {"weight": 0.6}},
                {"sources": [_src(b, 0, 2), _src(e1, 1, 3), _src(e2, 2, 4)], "parameters": {"normalize": True}},
                {"sources": [_src(e1, 3, 4), _src(e2, 3, 4, weight=[0.5, 2.0])]},
            ],
        },
        # a task-vector method with the base among each slice's sources and per-source density
        "ties_slices": {
            "merge_method": "ties",
            "base_model": str(b),
            "dtype": "float32",
            "parameters": {"density": 0.6, "weight": 1.0},
            "slices": [
                {"sources": [_src(b, 0, 4), _src(e1, 0, 4, density=0.4), _src(e2, 0, 4)]},
                {
                    "sources": [_src(b, 1, 3), _src(e1, 1, 3), _src(e2, 1, 3, weight=0.5)],
                    "parameters": {"density": [0.3, 0.9]},
                },
            ],
        },
    }


CASES = ["frankenmerge_6", "frankenmerge_3", "slerp_gradients", "linear_precedence", "ties_slices"]
LAYERS = {"frankenmerge_6": 6, "frankenmerge_3": 3, "slerp_gradients": 5, "linear_precedence": 5, "ties_slices": 6}


@pytest.mark.parametrize("case", CASES)
def test_slices_match_mergekit(case, four_layer, tmp_path):
    recipe = slice_cases(four_layer)[case]
    mine = ours(recipe, tmp_path)
    assert_match(mine, mergekit_merge(recipe, tmp_path / "mk"), case)
    cfg = json.loads((tmp_path / "sm" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == LAYERS[case]
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == LAYERS[case]


def test_head_merges_every_source_of_the_last_slice(four_layer, tmp_path):
    """The final norm and LM head merge across all of the last slice's sources (mergekit 0.1.5 pairs them with
    only as many of them as the first slice has, dropping the rest): closed form for linear."""
    b, e1, e2 = four_layer["base"], four_layer["e1"], four_layer["e2"]
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 1.0},
        "slices": [
            {"sources": [_src(e1, 0, 1)]},
            {"sources": [_src(b, 1, 2, weight=2.0), _src(e1, 1, 2), _src(e2, 1, 2)]},
        ],
    }
    mine = ours(recipe, tmp_path)
    tb, t1, t2 = load_dir(b), load_dir(e1), load_dir(e2)
    for name in ("lm_head.weight", "model.norm.weight"):
        want = (2 * tb[name] + t1[name] + t2[name]) / 4
        torch.testing.assert_close(mine[name], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(mine["model.embed_tokens.weight"], t1["model.embed_tokens.weight"])


def test_frankenmerge_loads_and_generates(four_layer, tmp_path):
    """The 6-layer passthrough frankenmerge is a working model: transformers loads it with 6 layers, its layers are
    the inputs' (renumbered), and it generates."""
    from transformers import AutoModelForCausalLM

    recipe = slice_cases(four_layer)["frankenmerge_6"]
    mine = ours(recipe, tmp_path)
    e1, e2 = load_dir(four_layer["e1"]), load_dir(four_layer["e2"])
    assert torch.equal(mine["model.layers.2.mlp.down_proj.weight"], e1["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(mine["model.layers.3.mlp.down_proj.weight"], e2["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(mine["model.layers.5.self_attn.q_proj.weight"], e2["model.layers.3.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sm"))
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    out = model.generate(torch.tensor([[1, 5, 7, 9]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_slices_bytes_independent_of_chunks_and_workers(four_layer, tmp_path):
    recipe = slice_cases(four_layer)["slerp_gradients"]
    a = ours(recipe, tmp_path, "a")
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_merge(path, tmp_path / "b", workers=0, shard_size="30KB", chunk_mb=64, progress=False)
    b = load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def _plan_error(recipe: dict, tmp: Path) -> str:
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(ValueError) as exc:
        build_plan(load_recipe(path), source=str(path))
    return str(exc.value)


def test_bad_slices_are_clear_errors(four_layer, tmp_path):
    b, e1 = str(four_layer["base"]), str(four_layer["e1"])
    msg = _plan_error({"merge_method": "linear", "slices": [{"sources": [_src(b, 0, 2), _src(e1, 0, 3)]}]}, tmp_path)
    assert "slices[0].sources" in msg and "same number of layers" in msg and "[2, 3]" in msg
    msg = _plan_error({"merge_method": "passthrough", "slices": [{"sources": [_src(b, 2, 6)]}]}, tmp_path)
    assert "slices[0].sources[0].layer_range" in msg and "layer 4" in msg and b in msg
    msg = _plan_error({"merge_method": "passthrough", "slices": [{"sources": [_src(b, 2, 2)]}]}, tmp_path)
    assert "0 <= first < stop" in msg
    msg = _plan_error(
        {"merge_method": "passthrough", "slices": [{"sources": [_src(b, 0, 2), _src(e1, 0, 2)]}]}, tmp_path
    )
    assert "exactly one source" in msg
    msg = _plan_error(
        {
            "merge_method": "ties",
            "base_model": b,
            "parameters": {"density": 0.5, "weight": 1.0},
            "slices": [{"sources": [_src(e1, 0, 2)]}],
        },
        tmp_path,
    )
    assert "slices[0].base_model" in msg and "among the slice's sources" in msg
    msg = _plan_error(
        {"merge_method": "linear", "models": [{"model": b}], "slices": [{"sources": [_src(b, 0, 2)]}]}, tmp_path
    )
    assert "either `slices:` or `models:`" in msg
    msg = _plan_error(
        {"merge_method": "linear", "slices": [{"sources": [_src(b, 0, 2, wieght=1.0), _src(e1, 0, 2)]}]}, tmp_path
    )
    assert "slices[0].sources[0].parameters.wieght" in msg and "unknown parameter" in msg


def test_mllm_slices_address_the_language_model(tmp_path):
    """On a LLaVA the slices stack language-model layers; the vision tower and projector are the reference
    model's (the first slice's first source), text_config's layer count follows, and transformers loads it."""
    from transformers import AutoModelForImageTextToText

    from shardmerge.engine.tiny_models import build_mllm

    a = build_mllm(tmp_path / "a", "llava", seed=1, num_layers=2)
    b = build_mllm(tmp_path / "b", "llava", base=a, perturb_seed=4)
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [{"sources": [_src(a, 0, 2)]}, {"sources": [_src(b, 1, 2)]}],
    }
    mine = ours(recipe, tmp_path)
    ta, tb = load_dir(a), load_dir(b)
    vision = [n for n in ta if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(torch.equal(mine[n], ta[n]) for n in vision)
    lm = "model.language_model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(mine[lm.format(2)], tb[lm.format(1)]) and torch.equal(mine[lm.format(1)], ta[lm.format(1)])
    assert lm.format(3) not in mine
    cfg = json.loads((tmp_path / "sm" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "sm"))
    assert len(model.model.language_model.layers) == 3
    out = model.generate(input_ids=torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
