"""Decoder-only LLM families beyond Llama: GPT-2 (Conv1D linears, `transformer.h.i`, position embeddings, tied
head), Gemma-2, Gemma-3 text (q_norm / k_norm, tied head), Granite, Phi-3 (fused qkv_proj / gate_up_proj), OLMo 2
(q_norm / k_norm over the whole projection, post-norms only), Qwen3 (q_norm / k_norm) and Mistral. Each merges
with mergekit's methods (linear, ties, slerp) equal to mergekit 0.1.5, as a `slices:` frankenmerge, verifies,
loads in transformers and generates; every method plans every tensor of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardmerge.engine import methods
from tests.e2e.test_slices import assert_match, load_dir, mergekit_merge, ours

FAMILIES = ["gpt2", "gemma2", "gemma3_text", "granite", "phi3", "olmo2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp(request.param)
    out = {"base": build_llm(root / "base", seed=11, family=request.param, num_hidden_layers=3)}
    for k in (1, 2):
        out[f"e{k}"] = build_llm(root / f"e{k}", base=out["base"], perturb_seed=40 + k)
    return request.param, out


def _recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, e1, e2 = (str(m[k]) for k in ("base", "e1", "e2"))
    models = [
        {"model": e1, "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": e2, "parameters": {"weight": [0.2, 0.9], "density": 0.8}},
    ]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": e1, "parameters": {"weight": 0.3}}, {"model": e2, "parameters": {"weight": 0.7}}],
            "dtype": "float32",
        },
        "ties": {"merge_method": "ties", "base_model": b, "models": models, "dtype": "float32"},
        "slerp": {
            "merge_method": "slerp",
            "base_model": e1,
            "models": [{"model": e1}, {"model": e2}],
            "parameters": {"t": [0.1, 0.9]},
            "dtype": "float32",
        },
        "frankenmerge": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": e1, "layer_range": [0, 3]}]},
                {"sources": [{"model": e2, "layer_range": [1, 3]}]},
            ],
        },
    }


def _layer_key(cfg: dict) -> int:
    return cfg.get("num_hidden_layers", cfg.get("n_layer"))


@pytest.mark.parametrize("case", ["linear", "ties", "slerp", "frankenmerge"])
def test_family_merges_match_mergekit_and_generate(family, case, tmp_path):
    from transformers import AutoModelForCausalLM

    from shardmerge.engine.verify import verify_dir

    fam, m = family
    recipe = _recipes(m)[case]
    mine = ours(recipe, tmp_path)
    assert verify_dir(tmp_path / "sm") == []
    inputs = load_dir(m["base"])
    if case != "frankenmerge":  # every input tensor is written
        assert set(mine) == set(inputs), f"{fam}: output tensors differ from the input's"
    cfg = json.loads((tmp_path / "sm" / "config.json").read_text())
    if case == "frankenmerge":
        _check_frankenmerge(fam, m, mine, cfg)
    if case != "frankenmerge" or "layer_types" not in cfg:
        # mergekit 0.1.5 sets only the layer count, which transformers 5 refuses when the config lists
        # per-layer `layer_types` (Gemma-2/3): there its frankenmerge fails and the closed form above is the check
        assert_match(mine, mergekit_merge(recipe, tmp_path / "mk"), f"{fam} {case}")
    assert _layer_key(cfg) == (5 if case == "frankenmerge" else 3)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sm"))
    out = model.generate(torch.tensor([[3, 8, 13]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def _check_frankenmerge(fam: str, m: dict[str, Path], mine: dict, cfg: dict) -> None:
    """Output layers 0-2 are e1's layers 0-2, layers 3-4 e2's layers 1-2; embeddings e1's, norm and head e2's;
    the layer types follow the layers."""
    e1, e2 = load_dir(m["e1"]), load_dir(m["e2"])
    root = "transformer.h" if fam == "gpt2" else "model.layers"
    for name, t in mine.items():
        if name.startswith(root + "."):
            layer, sub = name[len(root) + 1 :].split(".", 1)
            src, i = (e1, int(layer)) if int(layer) < 3 else (e2, int(layer) - 2)
            assert torch.equal(t, src[f"{root}.{i}.{sub}"]), name
        else:  # embeddings from the first slice, final norm and head from the last
            src = e1 if any(k in name for k in ("embed_tokens", "wte", "wpe")) else e2
            assert torch.equal(t, src[name]), name
    if "layer_types" in cfg:
        types = json.loads((m["e1"] / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == types[:3] + types[1:3]


def _recipe_for(spec, m: dict[str, Path]) -> dict:
    """A minimal `models:` recipe for a method: two experts (or one), the base when it takes one."""
    experts = [str(m["e1"]), str(m["e2"])][: spec.max_models or 2]
    params = {p.name: (0.5 if p.kind == "float" else 1) for p in spec.params if p.required and not p.per_model}
    per_model = {p.name: 0.5 for p in spec.params if p.required and p.per_model}
    r = {
        "merge_method": spec.name,
        "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
        "parameters": params,
    }
    if spec.base in ("required", "optional"):
        r["base_model"] = str(m["base"])
    if spec.name == "slerp":  # two models, one of them the base
        r["models"] = [{"model": str(m["e1"])}, {"model": str(m["e2"])}]
        r["base_model"] = str(m["e1"])
    return r


def test_every_method_plans_every_tensor(family, tmp_path):
    """Each registered method with the `models:` form places every tensor of the family's checkpoints."""
    import yaml

    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    fam, m = family
    names = set(load_dir(m["base"]))
    own_form = {"plam", "pivot"}
    checked = []
    for spec in methods.specs():
        if spec.name in own_form:
            continue
        path = tmp_path / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump(_recipe_for(spec, m)))
        plan = build_plan(load_recipe(path), source=str(path))
        assert {t.name for t in plan.tensors()} == names, f"{fam} {spec.name}"
        checked.append(spec.name)
    assert {"linear", "ties", "slerp", "tsv"} <= set(checked)
