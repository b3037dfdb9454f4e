"""PivotMerge's data-driven contributions (`contribution: data` + `calibration:`, shardmerge.engine.plan.forms.pivot_calibration).

The engine's gains (vision tower once, projector roots re-run with swapped layers, language model cut to one layer)
are compared with a naive computation written here from METHODS.md's words: load every expert fully with
transformers, build the pivot projector, and for every (layer, expert) swap run the whole image path again and
take cosine(mean projected image features, mean caption token embeddings). Then: the gains reach the plan and the
report (lambda = softmax(gain / T)), the merged output is verified and loads, a saved pivot_calibration.json
reproduces the same bytes, --resume reuses the saved calibration, and every bad input is one clear error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from shardmerge.engine.io.shard_files import state_dir
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.plan.forms.pivot_calibration import ARTIFACT, Calibration
from shardmerge.engine.recipe.schema import parse_recipe
from shardmerge.engine.tiny_models import build_mllm
from shardmerge.engine.tiny_models import derive_projector_expert as derive
from shardmerge.engine.verify import verify_dir
from shardmerge.jobs.merge import run_merge

# naive full-model path vs the engine's hooked path: the same float32 ops on the same inputs, except that the
# engine's vision tower runs inside a 1-layer model (identical weights): gains agree to float32 rounding
GAIN_TOL = {"atol": 2e-6, "rtol": 0.0}
FAMILIES = [("llava", "legacy"), ("llava", "current"), ("qwen2_5_vl", "legacy"), ("qwen3_vl", "current")]
MAIN_ROOTS = {"llava": "multi_modal_projector", "qwen2_5_vl": "visual.merger", "qwen3_vl": "visual.merger"}


def png(seed: int, size=(56, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


CAPTIONS = ["a red square", "two birds on a wire", "a photo of a cat", "text on a sign", "blue water"]


def write_pairs(path: Path, n: int = 4, **columns) -> Path:
    cols = columns or {"image": [png(i) for i in range(n)], "caption": CAPTIONS[:n]}
    pq.write_table(pa.table(cols), path)
    return path


def experts_of(root: Path, family: str, naming: str) -> list[Path]:
    init = build_mllm(root / "init", family, seed=0, num_layers=2, naming=naming)
    return [derive(init, root / f"expert_{c}", seed=i) for i, c in enumerate("abc")]


def recipe(experts, pairs, **params) -> dict:
    top = {k: params.pop(k) for k in ("calibration",) if k in params}
    return {
        "merge_method": "pivot",
        "models": [str(e) for e in experts],
        "dtype": "float32",
        "calibration": str(pairs),
        **top,
        "parameters": {"pivot": "mean", "contribution": "data", "temperature": 0.05, **params},
    }


def cosine(pairs: Path) -> dict:
    """The calibration mapping with the matched-cosine score (what the naive reference computes)."""
    return {"path": str(pairs), "score": "cosine"}


def plan_calibration(plan) -> Calibration:
    ((name, text),) = plan.artifacts
    assert name == ARTIFACT
    return Calibration.from_json(text, name)


# ---------------------------------------------------------------- naive reference


def naive_gains(experts, pairs_rows, family: str, init=None) -> dict[str, list[float]]:
    """gains[layer] per expert, from full models and full image passes (no hooks, no functional_call); the pivot
    is the experts' mean, or the projector of the `init` model dir."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    models = [AutoModelForImageTextToText.from_pretrained(str(e), dtype=torch.float32).eval() for e in experts]
    proj = [m.get_submodule("model." + MAIN_ROOTS[family]) for m in models]
    states = [{k: v.clone() for k, v in p.state_dict().items()} for p in proj]
    pivot = {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}
    if init is not None:
        pivot = (
            AutoModelForImageTextToText.from_pretrained(str(init), dtype=torch.float32)
            .get_submodule("model." + MAIN_ROOTS[family])
            .state_dict()
        )
    model, tok = models[0], AutoTokenizer.from_pretrained(str(experts[0]))
    ip = AutoImageProcessor.from_pretrained(str(experts[0]))
    prefix = "merger." if family.startswith("qwen") else ""
    layers = sorted({k.rsplit(".", 1)[0] for k in pivot})

    def score(state, image, caption) -> float:
        proj[0].load_state_dict(state)
        px = {
            k: v
            for k, v in ip(images=[image], return_tensors="pt").items()
            if k in ("pixel_values", "image_grid_thw", "image_sizes")
        }
        feats = model.model.get_image_features(**px).pooler_output[0]
        ids = torch.tensor(tok(caption, add_special_tokens=False)["input_ids"])
        emb = model.get_input_embeddings()(ids).mean(dim=0)
        return float(torch.nn.functional.cosine_similarity(feats.reshape(-1, feats.shape[-1]).mean(0), emb, dim=0))

    gains = {prefix + layer: [0.0] * len(experts) for layer in layers}
    with torch.no_grad():
        for data, caption in pairs_rows:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            base = score(pivot, image, caption)
            for layer in layers:
                for k, s in enumerate(states):
                    swapped = {n: (s[n] if n.rsplit(".", 1)[0] == layer else v) for n, v in pivot.items()}
                    gains[prefix + layer][k] += (score(swapped, image, caption) - base) / len(pairs_rows)
    return gains


@pytest.mark.parametrize("family, naming", FAMILIES)
def test_gains_equal_the_naive_full_model_computation(tmp_path, family, naming):
    experts = experts_of(tmp_path, family, naming)
    pairs = write_pairs(tmp_path / "pairs.parquet", n=3)
    plan = build_plan(parse_recipe(recipe(experts, pairs, calibration=cosine(pairs))))
    cal = plan_calibration(plan)
    expected = naive_gains(experts, list(zip([png(i) for i in range(3)], CAPTIONS[:3])), family)
    assert cal.pairs == 3 and set(expected) <= set(cal.layers)
    for layer, want in expected.items():
        torch.testing.assert_close(torch.tensor(cal.layers[layer]["gains"]), torch.tensor(want), **GAIN_TOL)
        assert max(abs(g) for g in want) > 1e-4, "the experts' projectors must change the score"
    # every projector tensor's op carries its layer's gains as the per-model `gain`
    for t in plan.tensors():
        if t.op == "pivot":
            assert dict(t.params)["gain"] == cal.gains_for(t.name)


def test_init_pivot_gains_equal_the_naive_computation(tmp_path):
    """pivot: init -> the swaps go into the shared initialisation's projector (the experts' own tensors unchanged)."""
    experts = experts_of(tmp_path, "llava", "current")
    pairs = write_pairs(tmp_path / "pairs.parquet", n=2)
    data = {**recipe(experts, pairs, pivot="init", calibration=cosine(pairs)), "init_model": str(tmp_path / "init")}
    cal = plan_calibration(build_plan(parse_recipe(data)))
    expected = naive_gains(
        experts, list(zip([png(i) for i in range(2)], CAPTIONS[:2])), "llava", init=tmp_path / "init"
    )
    mean = plan_calibration(build_plan(parse_recipe(recipe(experts, pairs, calibration=cosine(pairs)))))
    for layer, want in expected.items():
        torch.testing.assert_close(torch.tensor(cal.layers[layer]["gains"]), torch.tensor(want), **GAIN_TOL)
        assert cal.layers[layer]["gains"] != mean.layers[layer]["gains"]  # another pivot, other gains


def test_pivot_expert_has_zero_gain_everywhere(tmp_path):
    """pivot: model:expert_a -> swapping in expert a's layer changes nothing: its gain is exactly 0 for every
    layer, deepstack mergers included (Qwen3-VL)."""
    experts = experts_of(tmp_path, "qwen3_vl", "current")
    pairs = write_pairs(tmp_path / "pairs.parquet", n=2)
    cal = plan_calibration(
        build_plan(parse_recipe(recipe(experts, pairs, pivot="model:expert_a", calibration=cosine(pairs))))
    )
    assert any(layer.startswith("deepstack_merger_list.") for layer in cal.layers)
    for layer, rec in cal.layers.items():
        assert rec["gains"][0] == 0.0, layer
        assert any(g != 0.0 for g in rec["gains"][1:]), layer


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("calib")
    experts = experts_of(root, "llava", "current")
    return {"root": root, "experts": experts, "pairs": write_pairs(root / "pairs.parquet", n=4)}


def test_merge_with_calibration_end_to_end(llava, tmp_path):
    from transformers import AutoModelForImageTextToText

    data = recipe(llava["experts"], llava["pairs"], temperature=0.02, standardize=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    run_merge(tmp_path / "r.yaml", out, workers=0, progress=False)
    assert verify_dir(out) == []
    cal = Calibration.from_json((out / ARTIFACT).read_text(), ARTIFACT)
    report = json.loads((out / "pivot_report.json").read_text())
    rows = [r for r in report["tensors"] if r["kind"] == "svd"]  # 1-D tensors (biases) are averaged, no lambda
    assert {r["tensor"] for r in rows} == {
        n for n in cal.layers["linear_1"]["tensors"] + cal.layers["linear_2"]["tensors"] if n.endswith(".weight")
    }
    for row in rows:
        gains = torch.tensor(cal.gains_for(row["tensor"]), dtype=torch.float64)
        assert row["contribution"] == pytest.approx(gains.tolist(), abs=0)
        assert row["lambda"] == pytest.approx(torch.softmax(gains / 0.02, dim=0).tolist(), rel=1e-6)
        assert sum(row["lambda"]) == pytest.approx(1.0, abs=1e-6)
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.model_type == "llava"

    # the saved calibration file as `calibration:` gives the same merge, byte for byte
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump({**data, "calibration": str(out / ARTIFACT)}))
    run_merge(tmp_path / "r2.yaml", tmp_path / "out2", workers=0, progress=False)
    shards = lambda d: [(s["file"], s["sha256"]) for s in json.loads((d / MANIFEST).read_text())["shards"]]
    assert shards(tmp_path / "out2") == shards(out)


def test_resume_reuses_the_saved_calibration_only_when_it_matches(llava, tmp_path):
    data = parse_recipe(recipe(llava["experts"], llava["pairs"]))
    fresh = plan_calibration(build_plan(data))
    state = tmp_path / "state"
    state.mkdir()
    doctored = {
        **json.loads(fresh.to_json()),
        "layers": {k: {**v, "gains": [g + 0.5 for g in v["gains"]]} for k, v in fresh.layers.items()},
    }
    (state / ARTIFACT).write_text(json.dumps(doctored))
    reused = plan_calibration(build_plan(data, state=state))
    assert reused.layers["linear_1"]["gains"] == [g + 0.5 for g in fresh.layers["linear_1"]["gains"]]
    (state / ARTIFACT).write_text(json.dumps({**doctored, "fingerprint": "0" * 64}))
    assert plan_calibration(build_plan(data, state=state)).layers == fresh.layers  # stale: recomputed


def test_executor_saves_the_calibration_for_resume(llava, tmp_path):
    from shardmerge.engine.run.executor import execute

    plan = build_plan(parse_recipe(recipe(llava["experts"], llava["pairs"])))
    out = tmp_path / "out"
    execute(plan, out, workers=0, progress=False)
    assert (out / ARTIFACT).read_text() == plan.artifacts[0][1]
    assert not state_dir(out).exists()  # finished: the state dir (and its copy) is gone


def test_hf_image_structs_and_max_pairs(llava, tmp_path):
    pairs = write_pairs(
        tmp_path / "hf.parquet", image=[{"bytes": png(i), "path": f"{i}.png"} for i in range(5)], text=CAPTIONS
    )
    data = recipe(llava["experts"], pairs, calibration={"path": str(pairs), "max_pairs": 2})
    assert plan_calibration(build_plan(parse_recipe(data))).pairs == 2


BAD_PAIRS = [
    (dict(picture=[png(0)], caption=["x"]), r"no image column \(looked for"),
    (dict(image=[png(0)], label=["x"]), r"no caption column"),
    (dict(image=[png(0), png(1)], caption=["fine", "  "]), r"row 1: caption '  ' is empty"),
    (dict(image=[png(0), b"not an image"], caption=["a", "b"]), r"row 1: image is not decodable"),
    (dict(image=pa.array([], pa.binary()), caption=pa.array([], pa.string())), r"no image-caption pairs"),
]


@pytest.mark.parametrize("columns, match", BAD_PAIRS)
def test_bad_calibration_files_name_the_file_and_row(llava, tmp_path, columns, match):
    pairs = write_pairs(tmp_path / "bad.parquet", **columns)
    with pytest.raises(ValueError, match=match) as err:
        build_plan(parse_recipe(recipe(llava["experts"], pairs)))
    assert "bad.parquet" in str(err.value)


def test_recipe_errors(llava, tmp_path):
    base = recipe(llava["experts"], llava["pairs"])
    cases = [
        (
            {**base, "parameters": {**base["parameters"], "contribution": "data_free"}},
            "calibration: given, but contribution is 'data_free'",
        ),
        (
            {**base, "models": [{"model": str(e), "parameters": {"gain": 0.1}} for e in llava["experts"]]},
            "per-model gain given and a calibration set",
        ),
        ({**base, "calibration": str(tmp_path / "missing.parquet")}, "missing.parquet is not a file"),
    ]
    (tmp_path / "not.parquet").write_text("hello")
    cases.append(({**base, "calibration": str(tmp_path / "not.parquet")}, "not a readable Parquet file"))
    other = Calibration("f" * 64, ("x", "y", "z"), 1, {}, ())
    (tmp_path / "other.json").write_text(other.to_json())
    cases.append(({**base, "calibration": str(tmp_path / "other.json")}, r"computed for experts \['x', 'y', 'z'\]"))
    for data, match in cases:
        with pytest.raises(ValueError, match=match):
            build_plan(parse_recipe(data))


def test_interrupted_merge_resumes_with_the_saved_calibration(llava, tmp_path, monkeypatch):
    """A merge that fails after its first unit keeps the calibration in its state dir; --resume plans with it
    (calibrate is not called again) and finishes with the same bytes as an uninterrupted merge."""
    import shardmerge.engine.plan.forms.pivot_calibration as pc
    import shardmerge.engine.run.executor as ex

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(llava["experts"], llava["pairs"])))
    run_merge(tmp_path / "r.yaml", tmp_path / "clean", workers=0, progress=False)
    real, calls = ex.run_unit, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "run_unit", fail_second)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_merge(tmp_path / "r.yaml", tmp_path / "out", workers=0, progress=False)
    assert (state_dir(tmp_path / "out") / ARTIFACT).is_file()
    monkeypatch.setattr(ex, "run_unit", real)
    monkeypatch.setattr(pc, "calibrate", lambda *a, **k: pytest.fail("calibration recomputed on --resume"))
    run_merge(tmp_path / "r.yaml", tmp_path / "out", workers=0, progress=False, resume=True)
    shards = lambda d: json.loads((d / MANIFEST).read_text())["shards"]
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")
    assert (tmp_path / "out" / ARTIFACT).read_text() == (tmp_path / "clean" / ARTIFACT).read_text()


@pytest.mark.slow
def test_calibration_as_a_ray_task_equals_the_driver_one(llava, tmp_path, monkeypatch):
    """where: ray runs the same calibration as a Ray task (CPU here: the embedded instance has no GPU); where: auto
    off a cluster stays in the driver (no Ray started)."""
    import ray

    data = recipe(llava["experts"], llava["pairs"])
    driver = plan_calibration(build_plan(parse_recipe(data)))
    from shardmerge.engine.run.ray_session import connect

    connect(num_cpus=2)  # as the merge does: a fresh local instance even with a `ray start` cluster on the machine
    try:
        remote = plan_calibration(
            build_plan(parse_recipe({**data, "calibration": {"path": str(llava["pairs"]), "where": "ray"}}))
        )
        bad = write_pairs(tmp_path / "bad.parquet", image=[png(0)], caption=[" "])
        with pytest.raises(ValueError, match="row 0: caption ' ' is empty"):  # the task's error, unwrapped
            build_plan(parse_recipe({**data, "calibration": {"path": str(bad), "where": "ray"}}))
        with monkeypatch.context() as m:  # auto on a cluster without GPUs: calibrated in the driver, no task
            m.setenv("RAY_ADDRESS", "auto")
            m.setattr(ray, "remote", lambda *a, **k: pytest.fail("a task on a cluster without GPUs"))
            assert plan_calibration(build_plan(parse_recipe(data))).layers == driver.layers
    finally:
        ray.shutdown()
    assert remote.fingerprint != driver.fingerprint  # `where` is part of the settings
    for layer, rec in driver.layers.items():
        torch.testing.assert_close(torch.tensor(remote.layers[layer]["gains"]), torch.tensor(rec["gains"]), **GAIN_TOL)
    import shardmerge.engine.run.ray_session as rp

    monkeypatch.setattr(rp, "connect", lambda *a, **k: pytest.fail("Ray started off a cluster"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert plan_calibration(build_plan(parse_recipe(data))).layers == driver.layers


def naive_contrastive_gains(experts, pairs_rows, family: str) -> dict[str, list[float]]:
    """gains[layer] per expert with the contrastive score, from full models and full image passes: for each
    projector state, per image i: cos(f_i, g_i) - mean_{j != i} cos(f_i, g_j); gain = mean_i(swap - pivot)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    models = [AutoModelForImageTextToText.from_pretrained(str(e), dtype=torch.float32).eval() for e in experts]
    proj = [m.get_submodule("model." + MAIN_ROOTS[family]) for m in models]
    states = [{k: v.clone() for k, v in p.state_dict().items()} for p in proj]
    pivot = {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}
    model, tok = models[0], AutoTokenizer.from_pretrained(str(experts[0]))
    ip = AutoImageProcessor.from_pretrained(str(experts[0]))
    prefix = "merger." if family.startswith("qwen") else ""
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d, _ in pairs_rows]
    caps = [
        model.get_input_embeddings()(torch.tensor(tok(c, add_special_tokens=False)["input_ids"])).mean(0)
        for _, c in pairs_rows
    ]

    def scores(state) -> list[float]:
        proj[0].load_state_dict(state)
        out = []
        feats = []
        for image in images:
            px = {
                k: v
                for k, v in ip(images=[image], return_tensors="pt").items()
                if k in ("pixel_values", "image_grid_thw", "image_sizes")
            }
            f = model.model.get_image_features(**px).pooler_output[0]
            feats.append(f.reshape(-1, f.shape[-1]).mean(0))
        n = len(images)
        for i in range(n):
            cos = [float(torch.nn.functional.cosine_similarity(feats[i], caps[j], dim=0)) for j in range(n)]
            out.append(cos[i] - (sum(cos) - cos[i]) / (n - 1))
        return out

    layers = sorted({k.rsplit(".", 1)[0] for k in pivot})
    gains = {}
    with torch.no_grad():
        base = scores(pivot)
        for layer in layers:
            gains[prefix + layer] = []
            for s in states:
                sw = scores({n: (s[n] if n.rsplit(".", 1)[0] == layer else v) for n, v in pivot.items()})
                gains[prefix + layer].append(sum(a - b for a, b in zip(sw, base)) / len(base))
    return gains


@pytest.mark.parametrize("family, naming", [("llava", "current"), ("qwen2_5_vl", "legacy"), ("qwen3_vl", "current")])
def test_contrastive_gains_equal_the_naive_computation(tmp_path, family, naming):
    """The default score: matched minus mismatched captions, against a naive full-model computation; the main
    projector's layers get non-zero gains, Qwen3-VL's deepstack mergers are excluded (gain 0, a plan note)."""
    experts = experts_of(tmp_path, family, naming)
    pairs = write_pairs(tmp_path / "pairs.parquet", n=4)
    plan = build_plan(parse_recipe(recipe(experts, pairs)))
    cal = plan_calibration(plan)
    expected = naive_contrastive_gains(experts, list(zip([png(i) for i in range(4)], CAPTIONS[:4])), family)
    for layer, want in expected.items():
        got = torch.tensor(cal.layers[layer]["gains"], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **GAIN_TOL)
        assert max(abs(g) for g in want) > 1e-4, layer
    deep = [layer for layer in cal.layers if layer.startswith("deepstack_merger_list.")]
    assert bool(deep) == (family == "qwen3_vl")
    for layer in deep:
        assert cal.layers[layer]["gains"] == [0.0, 0.0, 0.0]
        assert any(layer in n and "deepstack" in n for n in plan.notes)


def test_pairs_are_a_seeded_sample(llava, tmp_path):
    from shardmerge.engine.plan.forms.pivot_calibration import read_pairs
    from shardmerge.engine.recipe.schema import CalibrationRecipe

    pairs = write_pairs(
        tmp_path / "many.parquet", image=[png(i % 5) for i in range(40)], caption=[f"caption {i}" for i in range(40)]
    )
    rows = {s: [r for r, _, _ in read_pairs(CalibrationRecipe(path=str(pairs), max_pairs=6, seed=s))] for s in (0, 1)}
    assert rows[0] != rows[1] and rows[0] != list(range(6)) and rows[0] == sorted(rows[0]) and len(rows[0]) == 6
    assert rows[0] == [r for r, _, _ in read_pairs(CalibrationRecipe(path=str(pairs), max_pairs=6, seed=0))]
    assert len(read_pairs(CalibrationRecipe(path=str(pairs), max_pairs=100))) == 40
    one = write_pairs(tmp_path / "one.parquet", n=1)
    with pytest.raises(ValueError, match="one.parquet: the contrastive score .* at least 2 pairs, got 1"):
        build_plan(parse_recipe(recipe(llava["experts"], one)))
