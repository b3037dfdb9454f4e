"""PivotMerge end to end: 3 tiny LLaVA-style experts that differ only in the projector, merged by the `pivot`
recipe form (mean / init / model:<name> pivots) and by the baselines (linear, task_arithmetic, ties, tsv, iso_c,
cart on the projector, the rest passed through); each output is verified, loaded with transformers and compared
with an in-memory merge of the same tensors; the per-layer report, the backbone check and the recipe-form errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from shardmerge.engine import methods
from shardmerge.engine.methods import pivot as pm
from shardmerge.engine.plan.build import COPY, build_plan
from shardmerge.engine.recipe.schema import parse_recipe
from shardmerge.engine.tiny_models import build_mllm, derive_projector_expert, mm_inputs
from shardmerge.engine.verify import verify_dir
from shardmerge.jobs.merge import run_merge
from tests.oracles.methods import run_in_memory

PROJ = "model.multi_modal_projector."
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
# dtype -> (atol, rtol): float32 engine output vs the same float32 method run in memory (same ops, same order)
TOL = {torch.float32: (0.0, 0.0), "logits": (1e-5, 1e-5)}


def disk(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pivot_e2e")
    init = build_mllm(root / "init", "llava", seed=0, num_layers=2)
    experts = [derive_projector_expert(init, root / f"expert_{c}", seed=i) for i, c in enumerate("abc")]
    return {"root": root, "init": init, "experts": experts, "tensors": [disk(e) for e in experts]}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def pivot_recipe(llava, tmp_path, **params) -> dict:
    top = {
        k: params.pop(k)
        for k in ("init_model", "calibration", "allow_different_backbones", "allow_unaligned", "models")
        if k in params
    }
    data = {
        "merge_method": "pivot",
        "models": [{"model": str(e)} for e in llava["experts"]],
        "dtype": "float32",
        "parameters": {
            "pivot": "mean",
            "energy": 0.9,
            "density": 0.2,
            "temperature": 1.0,
            "scale": 1.0,
            "contribution": "data_free",
            **params,
        },
    }
    return {**data, **top}


def logits(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if state is not None:
        missing = model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys
    image = Image.fromarray((np.random.RandomState(3).rand(40, 50, 3) * 255).astype("uint8"))
    with torch.no_grad():
        return model(**mm_inputs(model_dir, CHAT, [image])).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind=torch.float32) -> None:
    atol, rtol = TOL[kind]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def check_output(out: Path, expected_proj: dict[str, torch.Tensor], backbone: dict[str, torch.Tensor]) -> None:
    """Verified, projector = the in-memory merge, every other tensor bit-identical to the backbone source, and the
    loaded model's logits equal those of the backbone model with the expected projector loaded into it."""
    assert verify_dir(out) == []
    got = disk(out)
    assert set(got) == set(backbone)
    for name, t in got.items():
        if name in expected_proj:
            assert_close(t, expected_proj[name])
        else:
            assert torch.equal(t, backbone[name]), name
    atol, rtol = TOL["logits"]
    torch.testing.assert_close(logits(out), logits(out, expected_proj), atol=atol, rtol=rtol)


def reference_pivot(llava, base: dict | None = None, gains=None, **params) -> tuple[dict, dict]:
    """In-memory pivot_merge of every projector tensor: (tensors, reports)."""
    out, reports = {}, {}
    for name in sorted(n for n in llava["tensors"][0] if n.startswith(PROJ)):
        xs = [t[name].float() for t in llava["tensors"]]
        layer_weight = None
        if name.endswith(".bias"):  # a bias follows its weight's lambda
            w = name[: -len("bias")] + "weight"
            stack = torch.stack([t[w].float() for t in llava["tensors"]])
            layer_weight = (stack, stack.mean(0) if base is None else base[w].float())
        out[name], reports[name] = pm.pivot_merge(
            xs,
            None if base is None else base[name].float(),
            gains=gains,
            layer_weight=layer_weight,
            info=methods.TensorInfo(name, tuple(xs[0].shape), None, 2),
            **params,
        )
    return out, reports


def test_experts_differ_only_in_the_projector(llava):
    a, b = llava["tensors"][0], llava["tensors"][1]
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and all(k.startswith(PROJ) for k in differ)
    assert len(differ) == len([k for k in a if k.startswith(PROJ)])


@pytest.mark.slow
def test_pivot_mean_end_to_end_on_ray_with_report(llava, tmp_path, caplog):
    recipe = write_recipe(tmp_path / "pivot.yaml", pivot_recipe(llava, tmp_path))
    caplog.set_level(logging.INFO, logger="shardmerge.report")
    summary = run_merge(recipe, tmp_path / "out", workers=1, shard_size="60KB", progress=False)
    assert summary["verified"] and summary["units"] > 1
    expected, reports = reference_pivot(llava, pivot="mean", energy=0.9, density=0.2, temperature=1.0, scale=1.0)
    out = tmp_path / "out"
    check_output(out, expected, llava["tensors"][0])
    doc = json.loads((out / "pivot_report.json").read_text())
    assert doc["merge_method"] == "pivot" and doc["models"] == [str(e) for e in llava["experts"]]
    rows = {r["tensor"]: r for r in doc["tensors"]}
    assert set(rows) == set(expected)
    for name, rep in reports.items():
        row = rows[name]
        assert row["layer"] == (0 if "linear_1" in name else 1) and row["module"] == "projector"
        assert row["kind"] == rep["kind"]
        if rep["kind"] == "svd":
            assert (row["rank_u"], row["rank_v"]) == (rep["rank_u"], rep["rank_v"]) and row["rank_u"] >= 1
            assert row["energy_u"] >= 0.9 and row["energy_v"] >= 0.9  # the energy rule keeps >= rho
            assert 0.0 <= row["conflict_fraction"] <= 1.0
            assert row["lambda"] == rep["lambda"] and math.isclose(sum(row["lambda"]), 1.0, rel_tol=1e-6)
            assert any(name in r.getMessage() and "shared rank" in r.getMessage() for r in caplog.records)
    assert not (out / ".shardmerge").exists()


def test_pivot_init_and_model_pivots(llava, tmp_path):
    init = disk(llava["init"])
    data = pivot_recipe(llava, tmp_path, pivot="init", init_model=str(llava["init"]))
    run_merge(write_recipe(tmp_path / "init.yaml", data), tmp_path / "init", workers=0, progress=False)
    expected, _ = reference_pivot(llava, init, pivot="init", scale=1.0)
    check_output(tmp_path / "init", expected, init)
    # model:<name> by directory name; the named expert is the pivot and the backbone source; precomputed gains
    data = pivot_recipe(llava, tmp_path, pivot="model:expert_b", contribution="data", scale=0.5, standardize=False)
    data["models"] = [{"model": str(e), "parameters": {"gain": g}} for e, g in zip(llava["experts"], (0.1, 0.5, 2))]
    run_merge(write_recipe(tmp_path / "model.yaml", data), tmp_path / "model", workers=0, progress=False)
    b = llava["tensors"][1]
    expected, reports = reference_pivot(
        llava, b, gains=(0.1, 0.5, 2.0), pivot="model:expert_b", contribution="data", scale=0.5, standardize=False
    )
    check_output(tmp_path / "model", expected, b)
    lam = torch.softmax(torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64), 0).tolist()
    rows = json.loads((tmp_path / "model" / "pivot_report.json").read_text())["tensors"]
    for row in rows:
        if row["kind"] == "svd":
            assert row["lambda"] == pytest.approx(lam, rel=1e-6)


BASELINES = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "tsv": {},
    "iso_c": {},
    "cart": {"rank_fraction": 0.25},
}


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baselines_on_the_projector(llava, tmp_path, method):
    """Each baseline merges the projector (the shared backbone is passed through from the init model)."""
    spec = methods.get(method)
    params = BASELINES[method]
    data = {
        "merge_method": method,
        "base_model": str(llava["init"]),
        "dtype": "float32",
        "models": [
            {"model": str(e), "parameters": {"weight": 1.0}} if "weight" in spec.per_model_params else {"model": str(e)}
            for e in llava["experts"]
        ],
        "parameters": params,
        "modules": {"vision_tower": {"merge_method": "passthrough"}, "language_model": {"merge_method": "passthrough"}},
    }
    run_merge(write_recipe(tmp_path / "r.yaml", data), tmp_path / "out", workers=0, progress=False)
    init = disk(llava["init"])
    expected = {}
    for name in (n for n in init if n.startswith(PROJ)):
        xs = [t[name].float() for t in llava["tensors"]]
        base = None if spec.base_is_input else init[name].float()  # linear: an unlisted base is unused
        weights = {"weight": (1.0,) * len(xs)} if "weight" in spec.per_model_params else {}
        expected[name] = run_in_memory(spec, xs, base, name=name, **weights, **params)
    check_output(tmp_path / "out", expected, init)
    assert not (tmp_path / "out" / "pivot_report.json").exists()


def bump_one_lm_element(src: Path, dst: Path) -> str:
    """A copy of expert `src` with one element of one language-model tensor changed by one ulp."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(f))
        name = next((k for k in sorted(tensors) if "language_model.layers.1.mlp" in k), None)
        if name is not None:
            t = tensors[name].clone()
            t.view(-1)[7] = torch.nextafter(t.view(-1)[7], torch.tensor(math.inf))
            tensors[name] = t
            save_file(tensors, str(f), metadata={"format": "pt"})
            return name
    raise AssertionError("no language-model MLP tensor found")


def test_different_backbones_are_refused_or_taken_from_the_pivot(llava, tmp_path):
    odd = tmp_path / "expert_odd"
    name = bump_one_lm_element(llava["experts"][2], odd)
    data = pivot_recipe(llava, tmp_path, models=[{"model": str(m)} for m in (*llava["experts"][:2], odd)])
    with pytest.raises(
        ValueError,
        match=rf"tensor '{name}' differs between model .*expert_a.* and model "
        rf".*expert_odd.*element 7.*allow_different_backbones",
    ):
        build_plan(parse_recipe(data))
    data.update(allow_different_backbones=True)
    data["parameters"]["pivot"] = "model:expert_odd"
    plan = build_plan(parse_recipe(data))
    ops = {t.name: t for t in plan.tensors()}
    assert ops[name].op == COPY and "expert_odd" in ops[name].inputs[0].file
    assert all((t.op == "pivot") == t.name.startswith(PROJ) for t in plan.tensors())
    assert any("allow_different_backbones" in n for n in plan.notes)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"calibration": "pairs.parquet"}, "calibration: pairs.parquet is not a file"),
        ({"contribution": "data"}, "needs `calibration:` .* or a per-model `gain`"),
        ({"pivot": "init"}, "'init' needs `init_model:`"),
        ({"init_model": "INIT"}, "only used with `pivot: init`"),
        ({"pivot": "model:nobody"}, "is not one of the models"),
        ({"pivot": "median"}, "expected 'mean', 'init' or 'model:<name>'"),
        ({"beta": 0.5}, "scale must be finite and given instead of beta"),
        ({"energy": 1.5}, "energy must be in"),
    ],
)
def test_recipe_form_errors(llava, tmp_path, change, match):
    change = {k: (str(llava["init"]) if v == "INIT" else v) for k, v in change.items()}
    data = pivot_recipe(llava, tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        build_plan(parse_recipe(data))


def test_recipe_form_refuses_other_forms(llava, tmp_path):
    data = pivot_recipe(llava, tmp_path)
    for extra, match in (
        ({"base_model": str(llava["init"])}, "base_model: not used by merge_method pivot"),
        ({"models": [{"model": str(llava["experts"][0])}]}, "at least 2 experts"),
    ):
        with pytest.raises(ValueError, match=match):
            build_plan(parse_recipe({**data, **extra}))


def reinit_projector(src: Path, out: Path, seed: int) -> Path:
    """A copy of `src` whose projector tensors are drawn afresh (same shapes and scale): an independently
    initialised projector on the shared backbone."""
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f))
        for k in [k for k in tensors if k.startswith(PROJ)]:
            tensors[k] = torch.randn(tensors[k].shape, generator=g) * tensors[k].float().std()
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def test_unaligned_projectors_are_refused_and_biases_follow_their_weight(llava, tmp_path):
    odd = reinit_projector(llava["experts"][2], tmp_path / "expert_fresh", seed=99)
    models = [{"model": str(m)} for m in (*llava["experts"][:2], odd)]
    with pytest.raises(
        ValueError,
        match=r"linear_\d.weight.*expert_fresh.*weight cosine -?0\.\d+ \(< 0.2\).*"
        r"pivot: init.*allow_unaligned: true",
    ):
        build_plan(parse_recipe(pivot_recipe(llava, tmp_path, models=models)))
    plan = build_plan(parse_recipe(pivot_recipe(llava, tmp_path, models=models, allow_unaligned=True)))
    assert any("allow_unaligned" in n for n in plan.notes)
    # around the shared init the check does not apply (the init model is the alignment)
    build_plan(parse_recipe(pivot_recipe(llava, tmp_path, models=models, pivot="init", init_model=str(llava["init"]))))
    ops = {t.name: t for t in plan.tensors()}
    bias, weight = ops[PROJ + "linear_1.bias"], ops[PROJ + "linear_1.weight"]
    assert dict(bias.params)["weight_inputs"] == 3 and bias.inputs[3:] == weight.inputs
    # two experts around their mean: the plan says what it reduces to
    two = build_plan(parse_recipe(pivot_recipe(llava, tmp_path, models=models[:2])))
    assert any("plain mean of the two" in n for n in two.notes)
