"""PlaM end to end: recipe -> plan (headers only) -> merge -> HF dir that transformers loads and runs on image + text.

Tiny Qwen2.5-VL, Qwen3-VL and LLaVA models (current and legacy on-disk names) with their tiny base LLMs. The changed
tensor set is derived here from the in-memory names, independently of shardmerge.engine.layout.roles; every targeted tensor is
checked against the closed form in float64, every other tensor byte for byte against the MLLM.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe, parse_recipe
from shardmerge.engine.tiny_models import build_base_llm, build_mllm, legacy_name, mm_inputs
from shardmerge.jobs.merge import run_merge

LAYERS = 3
# output dtype -> (atol, rtol) of the merged tensor against the float64 closed form: float32 rounding of two
# products and a sum; bfloat16 adds the final cast (8 mantissa bits)
TOL = {torch.float32: (1e-7, 1e-6), torch.bfloat16: (1e-5, 2**-8)}
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it? A or B"}]}]
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")
_LM = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")  # transformers' in-memory (current) names


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """(family, naming) -> MLLM dir, (family, "base") -> base-LLM dir; current and legacy share weights."""
    root = tmp_path_factory.mktemp("plam")
    out = {}
    for fam in FAMILIES:
        for naming in ("current", "legacy"):
            out[fam, naming] = build_mllm(root / f"{fam}_{naming}", fam, seed=0, naming=naming, num_layers=LAYERS)
        out[fam, "base"] = build_base_llm(root / f"{fam}_base", fam, seed=1, from_mllm=out[fam, "current"])
    out["llava", "bf16"] = build_mllm(root / "llava_bf16", "llava", seed=2, num_layers=LAYERS, dtype=torch.bfloat16)
    out["llava", "bf16_base"] = build_base_llm(
        root / "llava_bf16_base", "llava", seed=3, from_mllm=out["llava", "bf16"], dtype=torch.bfloat16
    )
    return out


def _disk(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 50, 3) * 255).astype("uint8"))


def _in_group(target: str, sub: str) -> bool:
    """Ground truth for the target groups (independent of shardmerge.engine.layout.roles)."""
    if target == "qkvo":
        return re.fullmatch(r"self_attn\.[qkvo]_proj\.(weight|bias)", sub) is not None
    if target == "attn":
        return sub.startswith("self_attn.")
    if target == "mlp":
        return sub.startswith("mlp.")
    if target == "norms":
        return sub.split(".")[-2].endswith("norm")
    if target == "all":
        return True
    return sub == target


def _coefficients(params: dict, layer: int) -> tuple[float, float]:
    """(a, b) of W = a W_mllm + b W_base for one layer; gradients written so that layer i is the i-th value."""

    def at(v):
        return v[layer] if isinstance(v, list) else v

    if "weights" in params:
        return at(params["weights"]["mllm"]), at(params["weights"]["base"])
    alpha = at(params.get("alpha", 0.1))
    return 1 - alpha, alpha


# (family, naming, parameters): every family in both namings, every target group, every coefficient form
CASES = [
    ("qwen2_5_vl", "current", {"layers": [1, 2], "alpha": 0.1, "targets": "qkvo"}),
    ("qwen2_5_vl", "legacy", {"plateau": "probe.json", "weights": {"mllm": 0.9, "base": 0.3}, "targets": "attn"}),
    ("qwen3_vl", "current", {"layers": [0, 2], "alpha": [0.1, 0.3, 0.5], "targets": "attn"}),
    ("qwen3_vl", "legacy", {"layers": [2, 2], "alpha": 0.5, "targets": ["mlp", "self_attn.q_proj.weight"]}),
    ("llava", "current", {"layers": [0, 1], "alpha": 0.25, "targets": "norms"}),
    ("llava", "legacy", {"layers": [1, 2], "weights": {"mllm": [0.7, 0.8, 1.0], "base": 0.3}, "targets": "all"}),
    ("llava", "bf16", {"layers": [0, 2], "targets": "qkvo"}),  # default alpha 0.1
]


def _write_probe(path: Path, plateau_start, num_layers: int = LAYERS) -> Path:
    """A probe.json in the schema shardmerge.engine.probe.runner writes (only the keys PlaM reads matter)."""
    path.write_text(
        json.dumps(
            {
                "model": "m",
                "metric": "accuracy",
                "num_layers": num_layers,
                "cuts": list(range(num_layers + 1)),
                "plateau_start": plateau_start,
                "warnings": [],
            }
        )
    )
    return path


def _recipe(path: Path, mllm: Path, base: Path, params: dict) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump({"merge_method": "plam", "mllm": str(mllm), "base_llm": str(base), "parameters": params})
    )
    return path


def _expected_targets(family: str, naming: str, params: dict, current_names) -> dict[str, tuple[str, int]]:
    """On-disk MLLM name -> (base name, layer) of every tensor the recipe must change."""
    if "layers" in params:
        first, last = params["layers"]
    else:
        first, last = 1, LAYERS - 1  # the probe.json below says plateau_start = 1
    targets = params.get("targets", "qkvo")
    targets = [targets] if isinstance(targets, str) else targets
    out = {}
    for n in current_names:
        m = _LM.match(n)
        if m and first <= int(m.group(1)) <= last and any(_in_group(t, m.group(2)) for t in targets):
            disk = legacy_name(family, n) if naming == "legacy" else n
            out[disk] = (f"model.layers.{m.group(1)}.{m.group(2)}", int(m.group(1)))
    return out


@pytest.mark.parametrize("family,naming,params", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_plam_merge_changes_exactly_the_targets(models, tmp_path, family, naming, params):
    from transformers import AutoModelForImageTextToText

    mllm = models[family, naming]
    base = models[family, "bf16_base" if naming == "bf16" else "base"]
    _write_probe(tmp_path / "probe.json", plateau_start=1)
    recipe = _recipe(tmp_path / "plam.yaml", mllm, base, params)  # plateau path is relative to the recipe
    run_merge(recipe, tmp_path / "out", workers=0, shard_size="40KB", chunk_mb=0.001, progress=False)

    ref = AutoModelForImageTextToText.from_pretrained(str(mllm))
    current = ref.state_dict()
    expected = _expected_targets(family, "current" if naming == "bf16" else naming, params, current)
    assert len(expected) >= 2
    got, m_disk, b_disk = _disk(tmp_path / "out"), _disk(mllm), _disk(base)
    assert set(got) == set(m_disk)  # same on-disk names as the MLLM (legacy stays legacy)
    for name, w in m_disk.items():
        if name not in expected:
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), f"{name} was not copied bit-exact"
            continue
        b_name, layer = expected[name]
        a, b = _coefficients(params, layer)
        want = a * w.double() + b * b_disk[b_name].double()
        atol, rtol = TOL[w.dtype]
        assert got[name].dtype == w.dtype
        torch.testing.assert_close(got[name].double(), want, atol=atol, rtol=rtol, msg=name)
        assert not torch.equal(got[name], w), f"{name} is targeted but unchanged"

    # config, tokenizer, processor and chat template come from the MLLM
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (mllm / f).read_bytes(), f
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((mllm / "config.json").read_text())

    # loads with transformers and runs image + text; logits equal an in-memory merge through the same method
    from shardmerge.engine import methods
    from tests.oracles.methods import run_in_memory

    spec = methods.get("plam")
    disk_to_current = {(legacy_name(family, n) if naming == "legacy" else n): n for n in current}
    merged_sd = dict(current)
    for name, (b_name, layer) in expected.items():
        a, b = _coefficients(params, layer)
        coeff = {"alpha": b} if "weights" not in params else {"weights_mllm": a, "weights_base": b}
        w = run_in_memory(spec, [m_disk[name].float(), b_disk[b_name].float()], None, **coeff)
        merged_sd[disk_to_current[name]] = w.to(m_disk[name].dtype)
    ref.load_state_dict(merged_sd)
    out_model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"))
    inputs = mm_inputs(tmp_path / "out", CHAT, [_image(0)])
    with torch.no_grad():
        logits = out_model(**inputs).logits
        ref_logits = ref(**inputs).logits
    assert torch.isfinite(logits).all() and logits.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(logits, ref_logits)


def test_plan_records_ops_layers_and_grouping(models):
    """Plan items: plam ops hold (W_mllm, W_base) metas and the per-layer alpha; units follow layout roles."""
    mllm, base = models["qwen3_vl", "legacy"], models["qwen3_vl", "base"]
    recipe = parse_recipe(
        {
            "merge_method": "plam",
            "mllm": str(mllm),
            "base_llm": str(base),
            "parameters": {"layers": [1, 2], "alpha": [0.0, 0.2, 0.4], "targets": "qkvo"},
        }
    )
    plan = build_plan(recipe, shard_size="40KB")
    plam = [t for t in plan.tensors() if t.op == "plam"]
    assert len(plam) == 2 * 4  # Qwen3 has no q/k/v biases: q/k/v/o weights of layers 1 and 2
    for t in plam:
        assert t.inputs[0].file.startswith(str(mllm)) and t.inputs[1].file.startswith(str(base))
        assert t.inputs[1].name == t.name.replace("model.language_model.", "model.")
        assert dict(t.params)["alpha"] == pytest.approx(0.2 * t.layer) and t.num_layers == LAYERS
    assert {t.op for t in plan.tensors()} == {"plam", "copy"}
    keys = [u.key for u in plan.units]
    assert keys[: LAYERS + 1] == ["embed"] + [f"model.language_model.layers.{i}" for i in range(LAYERS)]
    assert "model.visual.blocks.0" in keys and "projector" in keys and keys.count("lm_head") == 1
    names = [t.name for t in plan.tensors()]
    assert len(names) == len(set(names)) == len(_disk(mllm))
    assert plan.config_source == str(mllm) and plan.tokenizer_source == str(mllm)


# ---------------------------------------------------------------------------------------------- errors


def _plan(mllm, base, **params):
    return build_plan(
        parse_recipe({"merge_method": "plam", "mllm": str(mllm), "base_llm": str(base), "parameters": params})
    )


@pytest.fixture()
def no_reads(monkeypatch):
    """Planning must fail (or succeed) from headers alone: any tensor-data read is a test failure."""
    import shardmerge.engine.io.checkpoint

    def boom(*a, **kw):
        raise AssertionError("tensor data was read during planning")

    monkeypatch.setattr(shardmerge.engine.io.checkpoint, "read_rows", boom)


def _without(src: Path, dst: Path, drop: str) -> Path:
    """A copy of a model dir with one tensor removed from its shard and the index."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"].pop(drop)
    tensors = load_file(str(shard))
    del tensors[drop]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_pairing_errors_before_any_data_is_read(models, tmp_path, no_reads):
    q25, q25_base = models["qwen2_5_vl", "legacy"], models["qwen2_5_vl", "base"]
    with pytest.raises(ValueError, match=r"is a qwen3 LLM.*qwen2"):  # base of another family
        _plan(q25, models["qwen3_vl", "base"], layers=[0, 1])
    with pytest.raises(ValueError, match=r"is a llama LLM.*qwen2"):
        _plan(q25, models["llava", "base"], layers=[0, 1])
    with pytest.raises(ValueError, match="is a multimodal model"):
        _plan(q25, models["qwen2_5_vl", "current"], layers=[0, 1])
    with pytest.raises(ValueError, match=r"layers: \[1, 3\] is outside .* layers 0\.\.2"):
        _plan(q25, q25_base, layers=[1, 3])
    cut = _without(q25_base, tmp_path / "cut", "model.layers.2.self_attn.v_proj.bias")
    with pytest.raises(ValueError, match=r"missing in base .*cut.*model\.layers\.2\.self_attn\.v_proj\.bias"):
        _plan(q25, cut, layers=[2, 2])
    _plan(q25, cut, layers=[0, 1])  # the missing tensor is not targeted there: fine
    with pytest.raises(ValueError, match=r"missing in base .*cut"):
        _plan(q25, cut, layers=[0, 2], targets="attn")
    narrow = build_base_llm(tmp_path / "narrow", "qwen2_5_vl", from_mllm=q25, num_key_value_heads=4)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch.*layers\.0\.self_attn\.k_proj\.weight \(32, 64\) vs "
        r"model\.layers\.0\.self_attn\.k_proj\.weight \(64, 64\)",
    ):
        _plan(q25, narrow, layers=[0, 0])
    short = build_base_llm(tmp_path / "short", "qwen2_5_vl", from_mllm=q25, intermediate_size=96)
    _plan(q25, short, layers=[0, 2], targets="qkvo")  # MLP shapes differ but are not targeted
    with pytest.raises(ValueError, match=r"shape mismatch.*mlp\.up_proj\.weight \(128, 64\) vs .*\(96, 64\)"):
        _plan(q25, short, layers=[0, 2], targets="mlp")
    two = build_base_llm(tmp_path / "two", "qwen2_5_vl", from_mllm=q25, num_hidden_layers=2)
    with pytest.raises(ValueError, match="has 3 language-model layers but .* has 2"):
        _plan(q25, two, layers=[0, 1])


def test_vocabulary_difference_is_reported_not_merged(models, tmp_path, no_reads):
    mllm = models["llava", "current"]
    big = build_base_llm(tmp_path / "big", "llava", from_mllm=mllm, vocab_size=288)
    plan = _plan(mllm, big, layers=[0, 2], targets="all")
    notes = " ".join(plan.notes)
    assert "embed" in notes and "lm_head" in notes and "vocabulary differs" in notes
    by_name = {t.name: t for t in plan.tensors()}
    for n in ("model.language_model.embed_tokens.weight", "lm_head.weight", "model.language_model.norm.weight"):
        assert by_name[n].op == "copy" and by_name[n].inputs[0].file.startswith(str(mllm))
    assert sum(t.op == "plam" for t in plan.tensors()) == 3 * 9  # every tensor of every decoder layer


def test_plateau_forms(models, tmp_path, no_reads):
    mllm, base = models["qwen2_5_vl", "current"], models["qwen2_5_vl", "base"]

    def plam_layers(plan):
        return sorted({t.layer for t in plan.tensors() if t.op == "plam"})

    assert plam_layers(_plan(mllm, base, plateau=str(_write_probe(tmp_path / "p0.json", 0)))) == [0, 1, 2]
    assert plam_layers(_plan(mllm, base, plateau=str(_write_probe(tmp_path / "p2.json", 2)))) == [2]
    for start, match in (
        (3, r"plateau_start = 3, expected a layer in 0\.\.2"),
        (None, "found no plateau"),
        (-1, "expected a layer"),
    ):
        with pytest.raises(ValueError, match=match):
            _plan(mllm, base, plateau=str(_write_probe(tmp_path / "bad.json", start)))
    with pytest.raises(ValueError, match="probed a model with 28 layers, but the MLLM has 3"):
        _plan(mllm, base, plateau=str(_write_probe(tmp_path / "other.json", 20, num_layers=28)))
    with pytest.raises(ValueError, match="does not exist"):
        _plan(mllm, base, plateau=str(tmp_path / "nope.json"))
    (tmp_path / "junk.json").write_text('{"cuts": [0, 1]}')
    with pytest.raises(ValueError, match="has no 'plateau_start'"):
        _plan(mllm, base, plateau=str(tmp_path / "junk.json"))
    # a relative plateau path resolves against the recipe's directory
    (tmp_path / "sub").mkdir()
    _write_probe(tmp_path / "sub" / "probe.json", 1)
    recipe = load_recipe(_recipe(tmp_path / "sub" / "r.yaml", mllm, base, {"plateau": "probe.json"}))
    assert recipe.parameters["plateau"] == str(tmp_path / "sub" / "probe.json")
    assert plam_layers(build_plan(recipe)) == [1, 2]


@pytest.mark.parametrize(
    "params,match",
    [
        ({}, "exactly one of `layers: \\[first, last\\]` and `plateau: probe.json` \\(got neither\\)"),
        ({"layers": [0, 1], "plateau": "p.json"}, "got both"),
        ({"layers": [2, 1]}, r"parameters\.layers: expected 0 <= first <= last"),
        ({"layers": [0, 1, 2]}, r"parameters\.layers: expected \[first, last\]"),
        ({"layers": 1}, r"expected \[first, last\]"),
        ({"layers": [0, 1], "alpha": 1.5}, r"parameters\.alpha: alpha must be in \[0, 1\]"),
        ({"layers": [0, 1], "alpha": [0.1, 2.0]}, r"alpha must be in \[0, 1\]"),
        ({"layers": [0, 1], "alpha": 0.1, "weights": {"mllm": 0.9, "base": 0.3}}, "not both"),
        ({"layers": [0, 1], "weights": {"mllm": 0.9}}, r"parameters\.weights"),
        ({"layers": [0, 1], "weights": {"mllm": 0.9, "bsae": 0.3}}, r"parameters\.weights"),
        ({"layers": [0, 1], "weights": 0.9}, r"parameters\.weights: expected \{mllm"),
        ({"layers": [0, 1], "weights_mllm": 0.9}, "go together"),
        ({"layers": [0, 1], "targets": "ffn"}, r"parameters\.targets: PlaM target 'ffn'"),
        ({"layers": [0, 1], "targets": ["qkvo", 3]}, r"parameters\.targets: expected target names"),
        ({"layers": [0, 1], "lambda": 0.5}, r"parameters\.lambda: unknown parameter for merge_method 'plam'"),
        ({"layers": [0, 1], "plateau": 3}, "got both"),
    ],
)
def test_recipe_errors(params, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe({"merge_method": "plam", "mllm": "m", "base_llm": "b", "parameters": params}, source="r.yaml")


def test_recipe_form_errors():
    base = {"merge_method": "plam", "mllm": "m", "base_llm": "b", "parameters": {"layers": [0, 1]}}
    with pytest.raises(ValueError, match="needs both `mllm:` and `base_llm:`"):
        parse_recipe({k: v for k, v in base.items() if k != "base_llm"})
    with pytest.raises(ValueError, match="models: not used by merge_method plam"):
        parse_recipe({**base, "models": [{"model": "x"}]})
    with pytest.raises(ValueError, match="modules: not used by merge_method plam"):
        parse_recipe({**base, "modules": {"vision_tower": {"merge_method": "passthrough"}}})
    r = parse_recipe({**base, "parameters": {"layers": [0, 1], "weights": {"mllm": [0.9, 1], "base": 0.3}}})
    assert r.parameters["weights"].mllm == [0.9, 1]


# ---------------------------------------------------------------------------------------------- 72B plan only


def _qwen25_72b_shapes(lm: str, vis: str | None) -> dict[str, tuple[int, ...]]:
    """Qwen2.5-VL-72B / Qwen2.5-72B tensor shapes (config: 80 layers, hidden 8192, 64 heads / 8 KV heads of 128,
    intermediate 29568, vocab 152064; vision: 32 blocks of width 1280, intermediate 3456, out 8192)."""
    L, H, I, V, KV = 80, 8192, 29568, 152064, 1024
    s = {f"{lm}embed_tokens.weight": (V, H), f"{lm}norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"{lm}layers.{i}."
        s.update(
            {
                p + "self_attn.q_proj.weight": (H, H),
                p + "self_attn.q_proj.bias": (H,),
                p + "self_attn.k_proj.weight": (KV, H),
                p + "self_attn.k_proj.bias": (KV,),
                p + "self_attn.v_proj.weight": (KV, H),
                p + "self_attn.v_proj.bias": (KV,),
                p + "self_attn.o_proj.weight": (H, H),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
            }
        )
    if vis is None:
        return s
    W, VI = 1280, 3456
    s.update(
        {
            vis + "patch_embed.proj.weight": (W, 3, 2, 14, 14),
            vis + "merger.ln_q.weight": (W,),
            vis + "merger.mlp.0.weight": (4 * W, 4 * W),
            vis + "merger.mlp.0.bias": (4 * W,),
            vis + "merger.mlp.2.weight": (H, 4 * W),
            vis + "merger.mlp.2.bias": (H,),
        }
    )
    for j in range(32):
        p = f"{vis}blocks.{j}."
        s.update(
            {
                p + "attn.qkv.weight": (3 * W, W),
                p + "attn.qkv.bias": (3 * W,),
                p + "attn.proj.weight": (W, W),
                p + "attn.proj.bias": (W,),
                p + "norm1.weight": (W,),
                p + "norm2.weight": (W,),
                p + "mlp.gate_proj.weight": (VI, W),
                p + "mlp.gate_proj.bias": (VI,),
                p + "mlp.up_proj.weight": (VI, W),
                p + "mlp.up_proj.bias": (VI,),
                p + "mlp.down_proj.weight": (W, VI),
                p + "mlp.down_proj.bias": (W,),
            }
        )
    return s


def _sparse_checkpoint(out: Path, shapes: dict, config: dict, shard_bytes: int = 5 * 10**9) -> int:
    """A hub-style bf16 checkpoint whose shards hold real safetensors headers and no data (sparse files of the
    full size): open_checkpoint and the planner see a 72B model without a byte of weights on disk."""
    out.mkdir()
    shards: list[dict] = [{}]
    used = 0
    for name in sorted(shapes):
        n = 2 * int(np.prod(shapes[name]))
        if shards[-1] and used + n > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = n
        used += n
    weight_map, total = {}, 0
    for i, members in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, n in members.items():
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(body).to_bytes(8, "little") + body)
            f.truncate(8 + len(body) + pos)
        total += pos
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(config))
    return total


@pytest.mark.parametrize("naming", ["legacy", "current"])
def test_plan_only_qwen25_vl_72b(tmp_path, naming, no_reads):
    text = dict(
        num_hidden_layers=80,
        hidden_size=8192,
        intermediate_size=29568,
        vocab_size=152064,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
    if naming == "legacy":  # as on the hub: flat config, model.* / visual.* names
        mllm_cfg = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], **text}
        lm, vis = "model.", "visual."
    else:
        mllm_cfg = {
            "model_type": "qwen2_5_vl",
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": {"model_type": "qwen2_5_vl_text", **text},
        }
        lm, vis = "model.language_model.", "model.visual."
    m_shapes = _qwen25_72b_shapes(lm, vis)
    m_total = _sparse_checkpoint(tmp_path / "Qwen2.5-VL-72B", m_shapes, mllm_cfg)
    _sparse_checkpoint(
        tmp_path / "Qwen2.5-72B",
        _qwen25_72b_shapes("model.", None),
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **text},
    )
    assert m_total > 140 * 10**9  # really 72B-shaped (bf16)
    _write_probe(tmp_path / "probe.json", 60, num_layers=80)
    t0 = time.perf_counter()
    plan = build_plan(
        parse_recipe(
            {
                "merge_method": "plam",
                "mllm": str(tmp_path / "Qwen2.5-VL-72B"),
                "base_llm": str(tmp_path / "Qwen2.5-72B"),
                "parameters": {
                    "plateau": str(tmp_path / "probe.json"),
                    "targets": "qkvo",
                    "weights": {"mllm": 0.9, "base": 0.3},
                },
            }
        )
    )
    seconds = time.perf_counter() - t0
    plam = [t for t in plan.tensors() if t.op == "plam"]
    assert len(plam) == 7 * 20 and {t.layer for t in plam} == set(range(60, 80))
    assert all(dict(t.params)["weights_mllm"] == 0.9 and dict(t.params)["weights_base"] == 0.3 for t in plam)
    q60 = next(t for t in plam if t.name == f"{lm}layers.60.self_attn.q_proj.weight")
    assert q60.inputs[1].name == "model.layers.60.self_attn.q_proj.weight" and q60.inputs[1].shape == (8192, 8192)
    assert len(plan.tensors()) == len(m_shapes) and plan.total_bytes == m_total
    keys = [u.key for u in plan.units]  # embed, 80 decoder layers, norm, lm_head, vision stem, 32 blocks, merger
    assert len(keys) == 1 + 80 + 1 + 1 + 1 + 32 + 1 and keys[0] == "embed" and keys[-1] == "projector"
    assert all(s.size <= 5 * 10**9 + len(s.header) or len(s.tensors) == 1 for s in plan.shards)
    assert seconds < 10.0, f"planning a 72B PlaM merge took {seconds:.1f}s"
