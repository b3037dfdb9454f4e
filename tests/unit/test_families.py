"""The family table, walked entry by entry: every family's tiny model builds and every tensor gets the role that
the family's own roots give it (so the merged, family-independent roots do not collide); for an MLLM, in every
naming, the probe finds its language-model layers and image token, and calibration finds its projector roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from shardmerge.engine import tiny_models
from shardmerge.engine.layout import families
from shardmerge.engine.layout.roles import Layout, classify, detect_family

# the one MLLM family without a tiny builder: transformers cannot load original LLaVA checkpoints
# (tests/unit/test_layout.py classifies its names)
NOT_BUILDABLE = {"llava_original"}
LAYERS = 3


def _names(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted(json.loads(index.read_text())["weight_map"])
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _longest(name: str, roots) -> str | None:
    hits = [r for r in roots if name.startswith(r)]
    return max(hits, key=len) if hits else None


def expected(fam: families.Family, naming: families.Naming, name: str) -> tuple[str, str, int | None, str | None]:
    """(module, kind, layer, sub) of a tensor from this family's own entry alone (no other family's roots)."""
    if name in naming.newline:
        return ("projector", "projector_other", None, "image_newline")
    candidates = [(r, m) for m, roots in (("head", naming.head), ("projector", naming.projector)) for r in roots] + [
        (r, m) for m, roots in (("vision", naming.vision), ("lm", naming.lm)) for r in roots
    ]
    hits = [(r, m) for r, m in candidates if name.startswith(r)]
    assert hits, f"{fam.name} ({naming.name}): {name} is below none of the family's roots"
    root, module = max(hits, key=lambda h: len(h[0]))
    rest = name[len(root) :]
    if module == "head":
        return ("language_model", "lm_head", None, "lm_head." + rest)
    if module == "projector" or (module == "vision" and rest.startswith(fam.projector_in_vision)):
        kind = classify(name).kind  # the projector's linear numbering is generic (tests/unit/test_layout.py)
        assert kind in ("projector_layer", "projector_other"), name
        return ("projector", kind, classify(name).layer, rest)
    if module == "vision":
        container = _longest(rest, [c + "." for c in fam.vision_blocks])
        if container:
            index, sub = rest[len(container) :].split(".", 1)
            return ("vision_tower", "vision_block", int(index), sub)
        return ("vision_tower", "vision_other", None, rest)
    container = _longest(rest, [c + "." for c in fam.layers])
    if container:
        index, sub = rest[len(container) :].split(".", 1)
        return ("language_model", "layer", int(index), sub)
    if rest.startswith(fam.embed):
        return ("language_model", "embed", None, rest)
    assert rest.startswith(fam.final_norm), f"{fam.name}: {name} is below the LM root but no layer/embed/norm"
    return ("language_model", "final_norm", None, rest)


def check_roles(fam: families.Family, naming: families.Naming, config: dict, names: list[str]) -> Layout:
    lay = Layout.from_config(config, names, source=f"{fam.name}-{naming.name}")
    assert lay.family == fam.name and lay.is_mllm == fam.is_mllm
    assert lay.num_layers == LAYERS
    for n in names:
        r = lay.role(n)
        assert (r.module, r.kind, r.layer, r.sub) == expected(fam, naming, n), n
    layers = {lay.role(n).layer for n in names if lay.role(n).kind == "layer"}
    assert layers == set(range(LAYERS))
    return lay


def test_table_is_consistent():
    assert set(families.names()) == {f.name for f in families.FAMILIES}
    for fam in families.FAMILIES:
        assert fam.namings and fam.kind in (families.LLM, families.MLLM)
        assert families.by_config({"model_type": fam.model_types[0]}) is fam
        if fam.is_mllm:
            assert fam.base_llms and all(families.get(b).kind == families.LLM for b in fam.base_llms)
            assert fam.projector_modules and fam.name_markers and fam.image_token
    # every MLLM family has a tiny builder (but the one transformers cannot load), with the table's image token
    assert set(families.names(families.MLLM)) - set(tiny_models.TINY_MLLM) == NOT_BUILDABLE
    for name, entry in tiny_models.TINY_MLLM.items():
        assert dict(entry.tokens.media_ids)["image_token_id"] == families.get(name).image_token
    with pytest.raises(ValueError, match="unknown model family 'gpt4v'.*llama"):
        families.get("gpt4v")


@pytest.mark.parametrize("family", families.names(families.LLM))
def test_llm_family_builds_and_classifies(tmp_path, family):
    from transformers import AutoModelForCausalLM

    fam = families.get(family)
    d = tiny_models.build_llm(tmp_path / family, family=family, num_hidden_layers=LAYERS)
    config, names = _config(d), _names(d)
    assert config["model_type"] == family and config[fam.layer_count_key] == LAYERS
    check_roles(fam, fam.namings[0], config, names)
    assert detect_family({}, names) == "llm"  # LLM names alone name no family
    model = AutoModelForCausalLM.from_pretrained(str(d))
    assert set(model.state_dict()) >= set(names)


def _calibration_roots(d: Path, fam: families.Family, names: list[str], lay: Layout):
    from shardmerge.engine.plan.forms import pivot_calibration as pc

    model = pc.load_parts(str(d), "cpu")
    roots = pc.projector_roots(model)
    patterns = fam.projector_modules + fam.deepstack_modules
    for root in roots:  # each root is one of this family's projector modules
        assert any(families.module_matches(root, p) for p in patterns), root
        assert pc._is_deepstack(root) == any(families.module_matches(root, p) for p in fam.deepstack_modules)
    for p in patterns:  # ... and each of them is found
        assert any(families.module_matches(r, p) for r in roots), (fam.name, p)
    projector = [n for n in names if lay.role(n).module == "projector"]
    layers = pc._layers(projector, pc._param_index(model, roots), str(d))  # every projector tensor is placed
    assert sorted(n for ts in layers.tensors.values() for n in ts) == sorted(projector)
    off_path = {n for layer, ts in layers.tensors.items() if layers.root[layer] is None for n in ts}
    assert off_path == {n for n in projector if lay.role(n).sub == "image_newline"}  # added after projection


@pytest.mark.parametrize("family", tiny_models.MLLM_FAMILIES)
def test_mllm_family_builds_classifies_probes_and_calibrates(tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from shardmerge.engine.probe import core

    fam = families.get(family)
    for naming in tiny_models.NAMINGS:
        d = tiny_models.build_mllm(tmp_path / naming, family, seed=0, naming=naming, num_layers=LAYERS)
        config, names = _config(d), _names(d)
        lay = check_roles(fam, fam.naming(naming), config, names)
        assert {lay.role(n).module for n in names} == {"language_model", "vision_tower", "projector"}
        assert detect_family({}, names) == family  # the names alone show the family
        model = AutoModelForImageTextToText.from_pretrained(str(d))
        parts = core.find_lm_parts(model)
        assert parts.num_layers == LAYERS
        image_id = AutoTokenizer.from_pretrained(str(d)).convert_tokens_to_ids(fam.image_token)
        assert parts.image_token_id == image_id == core.image_token_id(model.config)
        _calibration_roots(d, fam, names, lay)
    base_dir = tiny_models.build_base_llm(tmp_path / "base", family, seed=1, from_mllm=d)
    base = families.get(fam.base_llms[0])
    check_roles(base, base.namings[0], _config(base_dir), _names(base_dir))


def test_rename_between_namings():
    fam = families.get("llava_next")
    pairs = {
        "model.language_model.layers.0.mlp.up_proj.weight": "language_model.model.layers.0.mlp.up_proj.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "model.vision_tower.encoder.layers.1.mlp.fc1.bias": "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",
        "model.multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
        "model.image_newline": "image_newline",
    }
    for cur, leg in pairs.items():
        assert fam.rename(cur, "current", "legacy") == leg
        assert fam.rename(leg, "legacy", "current") == cur
    qwen3 = families.get("qwen3_vl")  # one naming only: every naming is it
    assert qwen3.rename("model.visual.merger.norm.weight", "current", "legacy") == "model.visual.merger.norm.weight"
    with pytest.raises(ValueError, match="no naming 'hub'"):
        fam.naming("hub")
