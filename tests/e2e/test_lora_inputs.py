"""LoRA inputs (`base+adapter`, an adapter dir): the merge equals merging peft's merge_and_unload() model; the
adapted rows are formed per chunk; an adapter naming a tensor the base lacks is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardmerge.engine.tiny_models import build_llm
from shardmerge.jobs.merge import run_merge


def _tensors(d: Path) -> dict:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = build_llm(root / "base", seed=0)
    ft = build_llm(root / "ft", base=base, perturb_seed=1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        init_lora_weights=False,
        rank_pattern={"v_proj": 2},
    )
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(root / "adapter")
    merged = pm.merge_and_unload()
    merged.save_pretrained(root / "merged", max_shard_size="50KB")
    return {"base": base, "ft": ft, "adapter": root / "adapter", "merged": root / "merged"}


RECIPE = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {lora}
    parameters: {{weight: 0.6}}
  - model: {ft}
    parameters: {{weight: 0.4}}
dtype: float32
"""


def test_lora_input_equals_merge_and_unload(lora_models, tmp_path):
    from transformers import AutoModelForCausalLM

    m = {k: str(v) for k, v in lora_models.items()}
    outs = {}
    for tag, lora in (("plus", f"{m['base']}+{m['adapter']}"), ("dir", m["adapter"]), ("ref", m["merged"])):
        (tmp_path / f"{tag}.yaml").write_text(RECIPE.format(lora=lora, **m))
        run_merge(
            tmp_path / f"{tag}.yaml", tmp_path / tag, workers=0, shard_size="30KB", chunk_mb=0.001, progress=False
        )
        outs[tag] = _tensors(tmp_path / tag)
    for tag in ("plus", "dir"):
        assert set(outs[tag]) == set(outs["ref"])
        for name, t in outs["ref"].items():
            torch.testing.assert_close(outs[tag][name], t, rtol=1e-5, atol=1e-6, msg=f"{tag}: {name}")
    AutoModelForCausalLM.from_pretrained(tmp_path / "plus").generate(torch.tensor([[1, 5]]), max_new_tokens=2)


def test_adapter_targeting_a_missing_tensor_is_an_error(lora_models, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora_models["adapter"] / "adapter_config.json").read_text())
    t = load_file(lora_models["adapter"] / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(4, 32)
    t["base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(t, str(bad / "adapter_model.safetensors"))
    (tmp_path / "r.yaml").write_text(
        RECIPE.format(lora=f"{lora_models['base']}+{bad}", **{k: str(v) for k, v in lora_models.items()})
    )
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: adapter tensor .*x_proj.lora_A.* targets "
        r"'model.layers.0.self_attn.x_proj.weight', which the base model",
    ):
        run_merge(tmp_path / "r.yaml", tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out" / "shardmerge_manifest.json").exists()


def test_model_reference_at_revision_resolves_from_the_local_cache(tmp_path, monkeypatch):
    """mergekit's `org/model@revision`: a tag or commit found in the local HF cache; an absent one is an error
    naming the id and the revision, and nothing is downloaded."""
    from safetensors.torch import save_file

    from shardmerge.engine.io.checkpoint import open_checkpoint

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for ref in ("org/tiny@v1", f"org/tiny@{commit}"):
        assert open_checkpoint(ref).root == snap
    with pytest.raises(
        ValueError,
        match=r"model 'org/tiny@v2': not a local directory and not in the local Hugging "
        r"Face cache at revision 'v2'",
    ):
        open_checkpoint("org/tiny@v2")
    with pytest.raises(ValueError, match=r"expected org/model or org/model@revision"):
        open_checkpoint("org/tiny@a@b")
