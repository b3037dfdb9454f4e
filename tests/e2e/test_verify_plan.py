"""Planning errors name model + tensor; `shardmerge verify` catches a flipped byte, a missing shard, an edited index."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardmerge.engine.plan.build import build_plan, parse_size
from shardmerge.engine.recipe.schema import parse_recipe
from shardmerge.jobs.merge import run_merge
from tests.conftest import write_recipe

TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
)


@pytest.fixture(scope="module")
def merged(llm_family, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("merged")
    recipe = write_recipe(d / "r.yaml", TA.format(**{k: str(v) for k, v in llm_family.items()}))
    run_merge(recipe, d / "out", workers=0, shard_size="30KB", progress=False)
    return d / "out"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardmerge.jobs.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_verify_ok(merged):
    r = _cli("verify", str(merged))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_verify_catches_flipped_byte(merged, tmp_path):
    d = shutil.copytree(merged, tmp_path / "o")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    r = _cli("verify", str(d))
    assert r.returncode == 1 and shard.name in r.stderr and "sha256" in r.stderr


def test_verify_catches_missing_shard(merged, tmp_path):
    d = shutil.copytree(merged, tmp_path / "o")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    r = _cli("verify", str(d))
    assert r.returncode == 1 and shard.name in r.stderr and "missing" in r.stderr


def test_verify_catches_edited_index(merged, tmp_path):
    d = shutil.copytree(merged, tmp_path / "o")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    name = next(n for n, f in idx["weight_map"].items() if f == shards[0])
    idx["weight_map"][name] = shards[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = _cli("verify", str(d))
    assert r.returncode == 1 and name in r.stderr


def test_verify_catches_missing_manifest(merged, tmp_path):
    d = shutil.copytree(merged, tmp_path / "o")
    (d / "shardmerge_manifest.json").unlink()
    r = _cli("verify", str(d))
    assert r.returncode == 1 and "did not finish" in r.stderr


def _variant(src: Path, dst: Path, edit) -> Path:
    """Copy a model dir and rewrite its single-file weights through `edit(state_dict) -> state_dict`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    sd = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(src)).state_dict().items()}
    save_file(edit(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"}, r"has no tensor 'model.norm.weight'"),
        (lambda sd: {**sd, "model.extra.weight": torch.zeros(2)}, r"model.extra.weight.*lacks"),
        (lambda sd: {**sd, "model.norm.weight": torch.zeros(33)}, r"'model.norm.weight': shape \[33\] in model"),
        (lambda sd: {**sd, "model.norm.weight": sd["model.norm.weight"].half()}, r"'model.norm.weight': dtype F16"),
    ],
)
def test_planning_errors_name_model_and_tensor(llm_family, tmp_path, edit, match):
    bad = _variant(llm_family["e2"], tmp_path / "bad", edit)
    fam = {k: str(v) for k, v in llm_family.items()} | {"e2": str(bad)}
    with pytest.raises(ValueError, match=match) as exc:
        build_plan(parse_recipe(__import__("yaml").safe_load(TA.format(**fam))))
    assert str(bad) in str(exc.value)


def test_architecture_mismatch(llm_family, tmp_path):
    d = shutil.copytree(llm_family["e2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    fam = {k: str(v) for k, v in llm_family.items()} | {"e2": str(d)}
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        build_plan(parse_recipe(__import__("yaml").safe_load(TA.format(**fam))))


def test_plan_layout_and_hash(llm_family):
    recipe = parse_recipe(__import__("yaml").safe_load(TA.format(**{k: str(v) for k, v in llm_family.items()})))
    p1, p2 = build_plan(recipe, shard_size="30KB"), build_plan(recipe, shard_size="30KB")
    assert p1.plan_hash == p2.plan_hash and p1 == p2
    assert build_plan(recipe, shard_size="1GB").plan_hash != p1.plan_hash
    keys = [u.key for u in p1.units]
    assert keys == ["embed", "model.layers.0", "model.layers.1", "other", "lm_head"]
    assert all(s.size <= 30_000 + len(s.header) for s in p1.shards)
    for u in p1.units:  # units never straddle shards unless they exceed one
        assert len(u.shards) == 1 or u.nbytes > 30_000, u.key
    assert any(len(u.shards) > 1 for u in p1.units)  # a 33 KB decoder layer is split across 30 KB shards
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 * 2**20
    with pytest.raises(ValueError, match="size"):
        parse_size("five gigs")
