"""End to end: recipe → plan → streamed, chunked merge → verified HF dir that transformers loads, with logits equal
to an in-memory merge of the same state dicts; byte-identical across chunk sizes and unit counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardmerge.engine import methods
from shardmerge.engine.methods.base import Chunk, TensorInfo
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe
from shardmerge.jobs.merge import run_merge
from tests.conftest import write_recipe

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.3}}\n"
    "  - model: {e2}\n    parameters: {{weight: [0.7, 0.2]}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 0.5}}\n  - model: {e2}\n    parameters: {{weight: 0.8}}\n"
    "parameters: {{lambda: 0.9}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: [0.3, 0.9]}}\n"
    "  - model: {e3}\n    parameters: {{weight: 0.7, density: 0.7}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: 0.6}}\nparameters: {{random_seed: 7}}\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    "slerp": "merge_method: slerp\nbase_model: {e1}\nmodels:\n  - model: {e1}\n  - model: {e2}\n"
    "parameters:\n  t:\n    - filter: self_attn\n      value: [0.0, 0.5, 0.3, 0.7, 1.0]\n    - value: 0.5\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}\n",
}


def in_memory_merge(recipe_path: Path) -> dict[str, torch.Tensor]:
    """The reference: each method applied once to whole in-memory tensors (no chunking, no files written)."""
    from safetensors.torch import load_file

    recipe = load_recipe(recipe_path)
    plan = build_plan(recipe)
    spec = methods.get(recipe.merge_method)
    out = {}
    for t in plan.tensors():
        load = lambda m: load_file(m.file)[m.name].float()
        xs = [load(m) for m in t.inputs]
        base = load(t.base) if t.base is not None else None
        whole = Chunk(0, t.shape[0] if t.shape else 1, 0)
        info = TensorInfo(t.name, t.shape, t.layer, t.num_layers)
        params = dict(t.params)
        stats = spec.prepare(lambda: iter([(whole, xs, base)]), info=info, **params) if spec.prepare else None
        out[t.name] = spec.merge(xs, base, stats=stats, chunk=whole, info=info, **params)
    return out


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(4, 128, (2, 12))


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_merge_loads_and_matches_in_memory_merge(method, llm_family, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", RECIPES[method].format(**{k: str(v) for k, v in llm_family.items()}))
    run_merge(recipe, tmp_path / "out", workers=0, shard_size="30KB", chunk_mb=0.002, progress=False)
    expected = in_memory_merge(recipe)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sd = model.state_dict()
    for name, want in expected.items():
        assert torch.equal(sd[name], want.to(sd[name].dtype)), name
    ref = AutoModelForCausalLM.from_pretrained(str(next(iter(llm_family.values()))))
    ref.load_state_dict({k: v.to(torch.float32) for k, v in expected.items()})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    changed = [n for n in expected if not torch.equal(expected[n], load_state(llm_family["e1"])[n].float())]
    assert len(changed) > len(expected) // 2, "the merge left most tensors unchanged"


_STATE = {}


def load_state(path):
    if path not in _STATE:
        from transformers import AutoModelForCausalLM

        _STATE[path] = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    return _STATE[path]


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("model-*.safetensors"))}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_bytes_identical_across_chunk_sizes(method, llm_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPES[method].format(**{k: str(v) for k, v in llm_family.items()}))
    outs = []
    for i, chunk_mb in enumerate([0.0005, 1, 64]):
        run_merge(recipe, tmp_path / f"o{i}", workers=0, shard_size="30KB", chunk_mb=chunk_mb, progress=False)
        outs.append(_shards(tmp_path / f"o{i}"))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 1


def test_bytes_identical_for_any_unit_order(llm_family, tmp_path):
    """Units run in reverse order (as another worker count/placement would) give the same shards."""
    from shardmerge.engine.run.driver import Driver

    recipe = write_recipe(tmp_path / "r.yaml", RECIPES["ties"].format(**{k: str(v) for k, v in llm_family.items()}))
    run_merge(recipe, tmp_path / "fwd", workers=0, shard_size="30KB", progress=False)
    orig = Driver.__init__

    def reversed_init(self, *a, **kw):
        orig(self, *a, **kw)
        self.pending.reverse()

    Driver.__init__ = reversed_init
    try:
        run_merge(recipe, tmp_path / "rev", workers=0, shard_size="30KB", progress=False)
    finally:
        Driver.__init__ = orig
    assert _shards(tmp_path / "fwd") == _shards(tmp_path / "rev")


def test_output_layout_contract(llm_family, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        RECIPES["ties"].format(**{k: str(v) for k, v in llm_family.items()}) + "out_dtype: bfloat16\n",
    )
    s = run_merge(recipe, tmp_path / "out", workers=0, shard_size="30KB", progress=False)
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
        "README.md",
        "shardmerge_manifest.json",
        "generation_config.json",
        "chat_template.jinja",
    } <= names
    assert not (out / ".shardmerge").exists()
    man = json.loads((out / "shardmerge_manifest.json").read_text())
    assert man["plan_hash"] == s["plan_hash"] and len(man["shards"]) == s["shards"] > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "merge_method" in (out / "README.md").read_text()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == s["bytes"]
    from safetensors import safe_open

    with safe_open(str(out / man["shards"][0]["file"]), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_bf16_inputs_merge_in_float32(llm_family_bf16, tmp_path):
    fam = {k: str(v) for k, v in llm_family_bf16.items()}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        "  - model: {e1}\n    parameters: {{weight: 0.5}}\n  - model: {e2}\n"
        "    parameters: {{weight: 0.5}}\n".format(**fam),
    )
    run_merge(recipe, tmp_path / "out", workers=0, progress=False)
    from safetensors.torch import load_file

    got = {}
    for p in (tmp_path / "out").glob("model-*.safetensors"):
        got.update(load_file(p))
    e = {k: load_state(Path(fam[k])) for k in ("base", "e1", "e2")}
    name = "model.layers.1.mlp.down_proj.weight"
    b, a1, a2 = (e[k][name].float() for k in ("base", "e1", "e2"))
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], (b + 0.5 * (a1 - b) + 0.5 * (a2 - b)).to(torch.bfloat16))
