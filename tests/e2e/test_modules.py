"""`modules:` recipes: per-module methods and parameters for MLLMs (language model / vision tower / projector), with
`passthrough` copying a module verbatim. Expected outputs are computed here per tensor from an independent
name -> module rule and the registered methods applied to whole in-memory tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from shardmerge.engine import methods
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe, parse_recipe
from shardmerge.engine.tiny_models import build_mllm, legacy_name, mm_inputs
from shardmerge.jobs.merge import run_merge
from tests.oracles.methods import run_in_memory

CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red? A or B"}]}]


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict:
    """Per family: a base MLLM and two fine-tunes of it (seeded perturbations); LLaVA in the legacy naming."""
    root = tmp_path_factory.mktemp("modules")
    out = {}
    for fam, naming in (("qwen2_5_vl", "current"), ("llava", "legacy")):
        base = build_mllm(root / f"{fam}_base", fam, seed=0, naming=naming, num_layers=2)
        out[fam] = {
            "base": base,
            "naming": naming,
            **{
                f"e{k}": build_mllm(root / f"{fam}_e{k}", fam, base=base, perturb_seed=k, naming=naming) for k in (1, 2)
            },
        }
    return out


def _module(current_name: str) -> str:
    """Ground truth from transformers' in-memory module tree (not shardmerge.engine.layout.roles)."""
    if current_name.startswith(("model.multi_modal_projector.", "model.visual.merger.")):
        return "projector"
    if current_name.startswith(("model.visual.", "model.vision_tower.")):
        return "vision_tower"
    if current_name.startswith(("model.language_model.", "lm_head.")):
        return "language_model"
    raise AssertionError(f"unexpected tensor {current_name}")


def _disk(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(3).rand(40, 50, 3) * 255).astype("uint8"))


def _check_loads_and_runs(ref_dir: Path, out_dir: Path, expected_current: dict) -> None:
    """The output loads with transformers; image + text logits equal a model holding the expected tensors."""
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(str(ref_dir))
    ref.load_state_dict({k: v.to(torch.float32) for k, v in expected_current.items()})
    out = AutoModelForImageTextToText.from_pretrained(str(out_dir))
    inputs = mm_inputs(out_dir, CHAT, [_image()])
    with torch.no_grad():
        got, want = out(**inputs).logits, ref(**inputs).logits
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_ties_language_model_keep_vision_tower(experts, tmp_path):
    """The issue's example: TIES the language model, keep the vision tower (passthrough from base_model), and a
    task-arithmetic projector with its own lambda (mergekit's module names as keys)."""
    fam = experts["qwen2_5_vl"]
    recipe = _recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "ties",
            "base_model": str(fam["base"]),
            "models": [
                {"model": str(fam["e1"]), "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": str(fam["e2"]), "parameters": {"weight": 0.5, "density": 0.7}},
            ],
            "modules": {
                "vision_tower": {"merge_method": "passthrough"},
                "multi_modal_projector": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
            },
        },
    )
    run_merge(recipe, tmp_path / "out", workers=0, shard_size="60KB", chunk_mb=0.02, progress=False)
    got, base, e1, e2 = (_disk(d) for d in (tmp_path / "out", fam["base"], fam["e1"], fam["e2"]))
    assert set(got) == set(base)
    per_model = dict(weight=(1.0, 0.5), density=(0.5, 0.7))
    counts = {}
    for name, b in base.items():
        module = _module(name)
        counts[module] = counts.get(module, 0) + 1
        if module == "vision_tower":
            assert torch.equal(got[name], b), name
            continue
        method, extra = ("task_arithmetic", {"lambda": 0.5}) if module == "projector" else ("ties", {})
        want = run_in_memory(methods.get(method), [e1[name], e2[name]], b, name=name, **per_model, **extra)
        assert torch.equal(got[name], want), name
        assert not torch.equal(got[name], b), name
    assert counts["vision_tower"] > 10 and counts["projector"] >= 4 and counts["language_model"] > 10
    expected = {n: got[n] for n in got}  # current naming: disk names are the in-memory names
    _check_loads_and_runs(fam["base"], tmp_path / "out", expected)


def test_module_gradients_and_passthrough_source_legacy_llava(experts, tmp_path):
    """Legacy LLaVA names: linear over the language model, SLERP over the vision tower with t running across its
    own blocks (block j of 2: t = j), and the projector copied from the second expert."""
    fam = experts["llava"]
    recipe = _recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "base_model": str(fam["e1"]),
            "models": [
                {"model": str(fam["e1"]), "parameters": {"weight": 0.3}},
                {"model": str(fam["e2"]), "parameters": {"weight": 0.7}},
            ],
            "modules": {
                "vision_tower": {"merge_method": "slerp", "parameters": {"t": [0.0, 1.0]}},
                "projector": {"merge_method": "passthrough", "source": str(fam["e2"])},
            },
        },
    )
    run_merge(recipe, tmp_path / "out", workers=0, shard_size="60KB", chunk_mb=0.002, progress=False)
    got, e1, e2 = (_disk(d) for d in (tmp_path / "out", fam["e1"], fam["e2"]))
    from transformers import AutoModelForImageTextToText

    current = list(AutoModelForImageTextToText.from_pretrained(str(fam["e1"])).state_dict())
    expected = {}
    blocks = set()
    for cur in current:
        disk = legacy_name("llava", cur)
        module = _module(cur)
        if module == "projector":
            want = e2[disk]
        elif module == "language_model":
            want = run_in_memory(methods.get("linear"), [e1[disk], e2[disk]], None, name=disk, weight=(0.3, 0.7))
        else:  # CLIP encoder layer j of 2 -> t = j; embeddings and the pre/post norms -> t = 0 (first value)
            j = int(cur.split("encoder.layers.")[1].split(".")[0]) if "encoder.layers." in cur else 0
            blocks.add(j)
            want = run_in_memory(methods.get("slerp"), [e2[disk]], e1[disk], name=disk, t=float(j))
        assert torch.equal(got[disk], want.to(got[disk].dtype)), disk
        expected[cur] = want
    assert blocks == {0, 1}
    a_block1 = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(got[a_block1], e2[a_block1]) and not torch.equal(got[a_block1], e1[a_block1])
    _check_loads_and_runs(fam["e1"], tmp_path / "out", expected)


def test_units_follow_layout_roles(experts):
    fam = experts["qwen2_5_vl"]
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": str(fam["e1"])}, {"model": str(fam["e2"])}],
            "parameters": {"weight": 1.0},
            "modules": {"projector": {"merge_method": "passthrough"}},
        }
    )
    plan = build_plan(recipe, shard_size="1GB")
    keys = [u.key for u in plan.units]
    assert keys == (
        [
            "embed",
            "model.language_model.layers.0",
            "model.language_model.layers.1",
            "other",
            "lm_head",
            "vision_tower",
            "model.visual.blocks.0",
            "model.visual.blocks.1",
            "projector",
        ]
    )
    for u in plan.units:
        assert len({_module(t.name) for t in u.tensors}) == 1, u.key
        assert all(t.layer is None for t in u.tensors if not u.key.startswith("model.language_model.layers."))
    proj = [t for u in plan.units if u.key == "projector" for t in u.tensors]
    assert proj and all(t.op == "copy" and t.inputs[0].file.startswith(str(fam["e1"])) for t in proj)
    assert {t.op for t in plan.tensors() if _module(t.name) != "projector"} == {"linear"}
    names = [t.name for t in plan.tensors()]
    assert len(names) == len(set(names)) == len(_disk(fam["e1"]))


def test_plain_llm_modules(llm_family, tmp_path):
    """For a plain LLM every tensor belongs to the language model: a passthrough of it copies the source model;
    a module that the model lacks is an error, not a silently ignored entry."""
    fam = {k: str(v) for k, v in llm_family.items()}
    data = {
        "merge_method": "task_arithmetic",
        "base_model": fam["base"],
        "models": [
            {"model": fam["e1"], "parameters": {"weight": 0.5}},
            {"model": fam["e2"], "parameters": {"weight": 0.5}},
        ],
        "modules": {"text_decoder": {"merge_method": "passthrough", "source": fam["e2"]}},
    }
    run_merge(_recipe(tmp_path / "r.yaml", data), tmp_path / "out", workers=0, progress=False)
    got, e2 = _disk(tmp_path / "out"), _disk(llm_family["e2"])
    assert set(got) == set(e2) and all(torch.equal(got[n], e2[n]) for n in e2)
    plan = build_plan(
        parse_recipe({**data, "modules": {"language_model": {"merge_method": "linear"}}}), shard_size="30KB"
    )
    assert {t.op for t in plan.tensors()} == {"linear"}
    assert [u.key for u in plan.units] == ["embed", "model.layers.0", "model.layers.1", "other", "lm_head"]
    with pytest.raises(ValueError, match=r"modules\.vision_tower: model .* \(llama\) has no vision_tower tensors"):
        build_plan(parse_recipe({**data, "modules": {"vision_tower": {"merge_method": "passthrough"}}}))


def test_relative_passthrough_source_resolves_against_recipe_dir(llm_family, tmp_path):
    import shutil

    shutil.copytree(llm_family["e1"], tmp_path / "e1")
    data = {
        "merge_method": "linear",
        "models": [{"model": "e1"}, {"model": str(llm_family["e2"])}],
        "parameters": {"weight": 1.0},
        "modules": {"language_model": {"merge_method": "passthrough", "source": "e1"}},
    }
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", data))
    assert recipe.modules["language_model"].source == str(tmp_path / "e1") == recipe.models[0].model


_TOP = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}


@pytest.mark.parametrize(
    "modules,extra,match",
    [
        ({"vision": {"merge_method": "passthrough"}}, {}, r"modules\.vision: unknown module; expected one of"),
        (
            {"language_model": {"merge_method": "linear"}, "text_decoder": {"merge_method": "linear"}},
            {},
            r"modules\.text_decoder: module 'language_model' is already configured",
        ),
        (
            {"vision_tower": {"merge_method": "passthrough", "parameters": {"t": 0.5}}},
            {},
            r"modules\.vision_tower\.parameters: passthrough .* takes no parameters",
        ),
        (
            {"vision_tower": {"merge_method": "passthrough", "source": "c"}},
            {},
            r"modules\.vision_tower\.source: 'c' is not a model of this recipe",
        ),
        ({"vision_tower": {"merge_method": "linear", "source": "a"}}, {}, "only merge_method passthrough"),
        ({"vision_tower": {"merge_method": "ties"}}, {}, r"modules\.vision_tower\.merge_method: 'ties' needs a base"),
        ({"vision_tower": {"merge_method": "nope"}}, {}, r"modules\.vision_tower\.merge_method: unknown merge_method"),
        (
            {"projector": {"merge_method": "linear", "parameters": {"lambda": 2}}},
            {},
            r"modules\.projector\.parameters\.lambda: unknown parameter for merge_method 'linear'",
        ),
        ({"projector": {"merge_method": "plam"}}, {}, "has its own recipe form"),
        ({"projector": {"merge_method": "slerp"}}, {"base_model": "a"}, r"modules\.projector\.parameters\.t: required"),
        (
            {"projector": {"merge_method": "slerp", "parameters": {"t": 0.5}}},
            {"models": [{"model": "a"}, {"model": "b"}, {"model": "c"}], "base_model": "a"},
            r"modules\.projector\.merge_method: merge_method 'slerp' takes 1 input model\(s\), got 2",
        ),
    ],
)
def test_module_recipe_errors(modules, extra, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe({**_TOP, **extra, "modules": modules}, source="r.yaml")


def test_per_model_parameters_may_serve_a_module_method():
    """density belongs to TIES (the language model's method here), not to the top-level linear: accepted; a key
    that no method of the recipe knows is still an error naming the top-level method's keys."""
    data = {
        **_TOP,
        "base_model": "a",
        "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}],
        "modules": {"language_model": {"merge_method": "ties"}},
    }
    assert parse_recipe(data).modules["language_model"].merge_method == "ties"
    bad = {**data, "models": [{"model": "a"}, {"model": "b", "parameters": {"densty": 0.5}}]}
    with pytest.raises(ValueError, match=r"models\[1\]\.parameters\.densty: unknown parameter .* known: weight"):
        parse_recipe(bad)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        parse_recipe({**data, "models": [{"model": "a"}, {"model": "b", "parameters": {"density": 1.5}}]})
