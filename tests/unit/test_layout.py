"""Tensor roles per architecture, MLLM <-> base-LLM pairing for PlaM, and a plan-only 72B-shaped check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmerge.engine.layout.roles import (
    Layout,
    TargetSet,
    TensorRole,
    check_lm_pairs,
    classify,
    detect_family,
    map_lm_tensors,
    targets_for,
)
from shardmerge.engine.methods.base import Chunk, TensorInfo
from shardmerge.engine.tiny_models import BASE_LLM_FAMILY, MLLM_FAMILIES, build_base_llm, build_mllm, legacy_name

TINY_LAYERS = 3


def _read(model_dir: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """config dict and name -> shape from the safetensors headers (no tensor data)."""
    config = json.loads((model_dir / "config.json").read_text())
    index_file = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        if index_file.exists()
        else ["model.safetensors"]
    )
    shapes = {}
    for fname in files:
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return config, shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every MLLM family in both namings (same seed, so the same weights) plus its base LLM."""
    root = tmp_path_factory.mktemp("layout")
    out = {}
    for fam in MLLM_FAMILIES:
        for naming in ("current", "legacy"):
            d = build_mllm(root / f"{fam}_{naming}", fam, seed=0, naming=naming, num_layers=TINY_LAYERS)
            out[fam, naming] = _read(d)
        out[fam, "base"] = _read(build_base_llm(root / f"{fam}_base", fam, seed=1, from_mllm=d))
    return out


def _expected_module(current_name: str) -> str:
    """Independent ground truth from the current in-memory names (transformers' module tree)."""
    if current_name.startswith(("model.language_model.", "lm_head.")):
        return "language_model"
    if current_name.startswith(
        (
            "model.multi_modal_projector.",
            "model.visual.merger.",
            "model.visual.deepstack_merger_list.",
            "model.image_newline",
        )
    ):
        return "projector"
    if current_name.startswith(("model.visual.", "model.vision_tower.")):
        return "vision_tower"
    raise AssertionError(f"unexpected tensor {current_name}")


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_every_tiny_tensor_has_its_role_in_both_namings(tiny, family):
    config, shapes = tiny[family, "current"]
    lay = Layout.from_config(config, shapes, source=f"{family}-current")
    leg_config, leg_shapes = tiny[family, "legacy"]
    leg = Layout.from_config(leg_config, leg_shapes, source=f"{family}-legacy")
    assert lay.family == leg.family == family and lay.is_mllm
    assert lay.num_layers == leg.num_layers == TINY_LAYERS
    lm_layers, vision_blocks, proj_layers = set(), set(), set()
    for name in shapes:
        role = lay.role(name)
        assert role.module == _expected_module(name), name
        assert leg.role(legacy_name(family, name)) == role, name  # legacy and current names agree
        if role.kind == "layer":
            prefix = f"model.language_model.layers.{role.layer}."
            assert name == prefix + role.sub
            lm_layers.add(role.layer)
        elif role.kind == "vision_block":
            assert f".{role.layer}.{role.sub}" in name
            vision_blocks.add(role.layer)
        elif role.kind == "projector_layer":
            proj_layers.add(role.layer)
    assert lm_layers == set(range(TINY_LAYERS))
    assert vision_blocks == {0, 1}
    assert proj_layers == {0, 1}
    kinds = {lay.role(n).kind: n for n in shapes}
    assert kinds["embed"] == "model.language_model.embed_tokens.weight"
    assert kinds["final_norm"] == "model.language_model.norm.weight"
    assert kinds["lm_head"] == "lm_head.weight"


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_names_written_by_save_pretrained(tmp_path, family):
    """transformers 5.23 save_pretrained writes its own mix of names (hub names for Qwen2.5-VL / LLaVA, but the
    CLIP tower without `vision_model.`): every tensor still gets the same role counts as the in-memory names."""
    from transformers import AutoModelForImageTextToText

    src = build_mllm(tmp_path / "src", family, seed=0, num_layers=TINY_LAYERS)
    AutoModelForImageTextToText.from_pretrained(str(src)).save_pretrained(str(tmp_path / "saved"))
    config, shapes = _read(tmp_path / "saved")
    _, cur_shapes = _read(src)
    saved = Layout.from_config(config, shapes)
    cur = Layout.from_config(config, cur_shapes)

    def census(lay, names):
        out = {}
        for n in names:
            r = lay.role(n)
            key = (r.module, r.kind, r.layer, r.sub if r.kind in ("layer", "projector_layer") else None)
            out[key] = out.get(key, 0) + 1
        return out

    assert census(saved, shapes) == census(cur, cur_shapes)


def test_specific_roles():
    cases = {
        "visual.merger.mlp.2.bias": ("projector", "projector_layer", 1, "merger.mlp.2.bias"),
        "visual.merger.ln_q.weight": ("projector", "projector_other", None, "merger.ln_q.weight"),
        "model.visual.deepstack_merger_list.1.linear_fc2.weight": (
            "projector",
            "projector_layer",
            1,
            "deepstack_merger_list.1.linear_fc2.weight",
        ),
        "multi_modal_projector.linear_1.weight": ("projector", "projector_layer", 0, "linear_1.weight"),
        "model.mm_projector.2.weight": ("projector", "projector_layer", 1, "2.weight"),
        "model.mm_projector.weight": ("projector", "projector_layer", 0, "weight"),
        "image_newline": ("projector", "projector_other", None, "image_newline"),
        "vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight": (
            "vision_tower",
            "vision_block",
            23,
            "mlp.fc1.weight",
        ),
        "model.vision_tower.vision_tower.vision_model.encoder.layers.5.layer_norm1.bias": (
            "vision_tower",
            "vision_block",
            5,
            "layer_norm1.bias",
        ),
        # transformers 5.23 save_pretrained writes LLaVA's CLIP tower without the vision_model. level
        "vision_tower.encoder.layers.1.mlp.fc2.bias": ("vision_tower", "vision_block", 1, "mlp.fc2.bias"),
        "vision_tower.embeddings.class_embedding": ("vision_tower", "vision_other", None, "embeddings.class_embedding"),
        "visual.patch_embed.proj.weight": ("vision_tower", "vision_other", None, "patch_embed.proj.weight"),
        "language_model.model.layers.31.self_attn.o_proj.weight": (
            "language_model",
            "layer",
            31,
            "self_attn.o_proj.weight",
        ),
        "language_model.lm_head.weight": ("language_model", "lm_head", None, "lm_head.weight"),
        "model.layers.7.self_attn.rotary_emb.inv_freq": ("language_model", "layer", 7, "self_attn.rotary_emb.inv_freq"),
    }
    for name, want in cases.items():
        r = classify(name)
        assert (r.module, r.kind, r.layer, r.sub) == want, name
    assert classify("model.foo.weight") is None and classify("transformer.encoder.layers.0.weight") is None
    # GPT-2's decoder blocks, embeddings and final norm are language-model roles
    assert classify("transformer.h.0.attn.c_attn.weight") == TensorRole(
        "language_model", "layer", 0, "attn.c_attn.weight"
    )
    assert classify("transformer.wpe.weight").kind == "embed" and classify("transformer.ln_f.bias").kind == "final_norm"


def _llava_original_names(layers: int) -> list[str]:
    names = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.image_newline",
        "model.mm_projector.0.weight",
        "model.mm_projector.0.bias",
        "model.mm_projector.2.weight",
        "model.mm_projector.2.bias",
        "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    ]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return names


def test_original_llava_detection_and_roles():
    names = _llava_original_names(4)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "num_hidden_layers": 4,
        "mm_projector_type": "mlp2x_gelu",
    }
    lay = Layout.from_config(config, names)
    assert lay.family == "llava_original" and lay.num_layers == 4
    assert lay.role("model.mm_projector.2.weight").layer == 1
    assert lay.role("model.image_newline").module == "projector"
    assert (
        lay.role("model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight").kind
        == "vision_block"
    )
    assert lay.lm_key("model.layers.3.mlp.down_proj.weight") == (3, "mlp.down_proj.weight")
    assert lay.lm_key("model.mm_projector.0.weight") is None
    # no config at all: the names decide
    assert Layout.from_config({}, names).family == "llava_original"
    assert Layout.from_config({}, names).num_layers == 4


def test_generic_detection_from_names(tiny):
    for fam in MLLM_FAMILIES:
        for naming in ("current", "legacy"):
            _, shapes = tiny[fam, naming]
            assert detect_family({}, list(shapes)) == fam, (fam, naming)
    _, base_shapes = tiny["llava", "base"]
    assert detect_family({}, list(base_shapes)) == "llm"


@pytest.mark.parametrize("family", MLLM_FAMILIES)
@pytest.mark.parametrize("naming", ["current", "legacy"])
def test_mllm_to_base_mapping(tiny, family, naming):
    config, shapes = tiny[family, naming]
    bconfig, bshapes = tiny[family, "base"]
    mllm = Layout.from_config(config, shapes, source="mllm")
    base = Layout.from_config(bconfig, bshapes, source="base")
    assert base.family == BASE_LLM_FAMILY[family] and not base.is_mllm
    mapping = map_lm_tensors(mllm, base)
    lm_names = [n for n in shapes if mllm.role(n).module == "language_model"]
    assert sorted(mapping) == sorted(lm_names)
    assert sorted(mapping.values()) == sorted(bshapes)  # one-to-one onto the whole base LLM
    for m, b in mapping.items():
        assert mllm.lm_key(m) == base.lm_key(b)
        assert shapes[m] == bshapes[b]
    pairing = check_lm_pairs(mllm, base, shapes, bshapes, targets="qkvo", layers=[1, 2])
    subs_per_layer = 7 if family == "qwen2_5_vl" else 4  # Qwen2 has q/k/v biases
    assert len(pairing.pairs) == 2 * subs_per_layer
    assert {mllm.role(m).layer for m, _ in pairing.pairs} == {1, 2}
    assert all(b.startswith(("model.layers.1.self_attn.", "model.layers.2.self_attn.")) for _, b in pairing.pairs)
    assert pairing.notes == ()


def _pair(tiny, family, naming="current"):
    config, shapes = tiny[family, naming]
    bconfig, bshapes = tiny[family, "base"]
    return (
        Layout.from_config(config, shapes, source=f"{family}-mllm"),
        dict(shapes),
        Layout.from_config(bconfig, bshapes, source=f"{family}-base"),
        dict(bshapes),
    )


def test_pairing_errors(tiny):
    mllm, ms, base, bs = _pair(tiny, "qwen2_5_vl")
    llama_config, llama_shapes = tiny["llava", "base"]
    other = Layout.from_config(llama_config, llama_shapes, source="llama-base")
    with pytest.raises(ValueError, match=r"llama-base \(llama\).*qwen2"):
        map_lm_tensors(mllm, other)
    with pytest.raises(ValueError, match="is a multimodal model"):
        map_lm_tensors(mllm, mllm)
    # a targeted tensor missing in the base: named, with both models
    gone = "model.layers.2.self_attn.k_proj.bias"
    short = Layout.from_config(tiny["qwen2_5_vl", "base"][0], [n for n in bs if n != gone], source="cut-base")
    with pytest.raises(ValueError, match=r"missing in base cut-base.*layers\.2\.self_attn\.k_proj\.bias"):
        check_lm_pairs(mllm, short, ms, bs, targets="attn")
    # ... but not targeted (mlp only): fine
    assert check_lm_pairs(mllm, short, ms, bs, targets="mlp").pairs
    # shape mismatch names both tensors and shapes
    bad = dict(bs, **{"model.layers.0.mlp.up_proj.weight": (130, 64)})
    with pytest.raises(
        ValueError,
        match=r"model\.language_model\.layers\.0\.mlp\.up_proj\.weight \(128, 64\) vs "
        r"model\.layers\.0\.mlp\.up_proj\.weight \(130, 64\)",
    ):
        check_lm_pairs(mllm, base, ms, bad, targets="all")
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        check_lm_pairs(mllm, base, ms, bs, layers=[5])
    with pytest.raises(ValueError, match="match no tensor"):
        check_lm_pairs(mllm, base, ms, bs, targets=["self_attn.q_norm.weight"])


def test_layer_count_and_unknown_tensor_errors(tiny):
    config, shapes = tiny["llava", "current"]
    with pytest.raises(ValueError, match=r"no known role: model\.weird\.weight"):
        Layout.from_config(config, [*shapes, "model.weird.weight"], source="x")
    lay = Layout.from_config(config, [*shapes, "model.weird.weight"], unknown="other")
    assert lay.role("model.weird.weight").module == "other"
    with pytest.raises(ValueError, match="policy"):
        Layout.from_config(config, shapes, unknown="skip")
    with pytest.raises(ValueError, match=r"config says 3 .* missing layers \[2\]"):
        Layout.from_config(config, [n for n in shapes if ".layers.2." not in n or "vision" in n])
    mllm = Layout.from_config(config, shapes, source="m")
    two = build_free_base(tiny, layers=2)
    with pytest.raises(ValueError, match="has 3 language-model layers"):
        map_lm_tensors(mllm, two)


def build_free_base(tiny, layers: int) -> Layout:
    bconfig, bshapes = tiny["llava", "base"]
    names = [n for n in bshapes if not any(f".layers.{i}." in n for i in range(layers, TINY_LAYERS))]
    return Layout.from_config(dict(bconfig, num_hidden_layers=layers), names, source="short-base")


def test_vocab_difference_is_a_note_not_an_error(tiny):
    mllm, ms, base, bs = _pair(tiny, "llava", "legacy")
    bs = dict(bs, **{"model.embed_tokens.weight": (256, 64), "lm_head.weight": (256, 64)})
    pairing = check_lm_pairs(mllm, base, ms, bs, targets="qkvo")
    assert len(pairing.notes) == 2 and all("vocabulary differs" in n for n in pairing.notes)
    assert "language_model.model.embed_tokens.weight (272, 64)" in " ".join(pairing.notes)


def test_target_groups():
    subs = [
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "mlp.gate_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.rotary_emb.inv_freq",
    ]
    pick = {g: [s for s in subs if targets_for(g)(s)] for g in ("qkvo", "attn", "mlp", "norms", "all")}
    assert pick["qkvo"] == subs[:5]
    assert pick["attn"] == subs[:7]
    assert pick["mlp"] == subs[7:9]
    assert pick["norms"] == [subs[5], subs[6], subs[9], subs[10]]
    assert pick["all"] == subs[:-1]  # the RoPE buffer is never a target
    mixed = targets_for(["mlp", "input_layernorm.weight"])
    assert mixed == TargetSet(("mlp",), ("input_layernorm.weight",))
    assert [s for s in subs if mixed(s)] == subs[7:10]
    assert not mixed(None)
    for bad in ("qkv", [], ["attn", 3]):
        with pytest.raises(ValueError):
            targets_for(bad)


# ---------------------------------------------------------------------------------------------- plan-only 72B


def _lm_shapes(prefix: str, head: str, layers: int, hidden: int, inter: int, vocab: int, kv: int) -> dict:
    shapes = {f"{prefix}embed_tokens.weight": (vocab, hidden), f"{prefix}norm.weight": (hidden,), head: (vocab, hidden)}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.q_proj.bias": (hidden,),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    return shapes


def _qwen25_vision_shapes(root: str, blocks: int, width: int, inter: int, out_hidden: int) -> dict:
    shapes = {
        root + "patch_embed.proj.weight": (width, 3, 2, 14, 14),
        root + "merger.ln_q.weight": (width,),
        root + "merger.mlp.0.weight": (4 * width, 4 * width),
        root + "merger.mlp.0.bias": (4 * width,),
        root + "merger.mlp.2.weight": (out_hidden, 4 * width),
        root + "merger.mlp.2.bias": (out_hidden,),
    }
    for j in range(blocks):
        p = f"{root}blocks.{j}."
        shapes.update(
            {
                p + "attn.qkv.weight": (3 * width, width),
                p + "attn.qkv.bias": (3 * width,),
                p + "attn.proj.weight": (width, width),
                p + "attn.proj.bias": (width,),
                p + "norm1.weight": (width,),
                p + "norm2.weight": (width,),
            }
        )
        for m in ("gate_proj", "up_proj"):
            shapes.update({p + f"mlp.{m}.weight": (inter, width), p + f"mlp.{m}.bias": (inter,)})
        shapes.update({p + "mlp.down_proj.weight": (width, inter), p + "mlp.down_proj.bias": (width,)})
    return shapes


@pytest.mark.parametrize("naming", ["legacy", "current"])
def test_plan_only_qwen25_vl_72b(naming):
    t0 = time.perf_counter()
    L, H, I, V, KV = 80, 8192, 29568, 152064, 1024
    lm_prefix, vis_root = ("model.", "visual.") if naming == "legacy" else ("model.language_model.", "model.visual.")
    mllm_shapes = {
        **_lm_shapes(lm_prefix, "lm_head.weight", L, H, I, V, KV),
        **_qwen25_vision_shapes(vis_root, 32, 1280, 3420, H),
    }
    text = dict(num_hidden_layers=L, hidden_size=H, intermediate_size=I, vocab_size=V)
    mllm_config = (
        {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], **text}
        if naming == "legacy"
        else {"model_type": "qwen2_5_vl", "text_config": text}
    )
    base_shapes = _lm_shapes("model.", "lm_head.weight", L, H, I, V, KV)
    base_config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **text}

    mllm = Layout.from_config(mllm_config, mllm_shapes, source="Qwen2.5-VL-72B")
    base = Layout.from_config(base_config, base_shapes, source="Qwen2.5-72B")
    assert (mllm.family, mllm.num_layers, base.family, base.num_layers) == ("qwen2_5_vl", 80, "qwen2", 80)
    counts = {}
    for n in mllm_shapes:
        r = mllm.role(n)
        counts[r.module] = counts.get(r.module, 0) + 1
    assert counts == {"language_model": 3 + 12 * 80, "vision_tower": 1 + 12 * 32, "projector": 5}
    assert {mllm.role(n).layer for n in mllm_shapes if mllm.role(n).kind == "vision_block"} == set(range(32))

    mapping = map_lm_tensors(mllm, base)
    assert len(mapping) == 3 + 12 * 80 and set(mapping.values()) == set(base_shapes)
    s = 60  # e.g. c* from a probe
    pairing = check_lm_pairs(mllm, base, mllm_shapes, base_shapes, targets="qkvo", layers=range(s, L))
    assert len(pairing.pairs) == 7 * (L - s)
    assert pairing.pairs[0] == (
        f"{lm_prefix}layers.60.self_attn.q_proj.weight",
        "model.layers.60.self_attn.q_proj.weight",
    )
    elems = sum(mllm_shapes[m][0] * (mllm_shapes[m][1] if len(mllm_shapes[m]) > 1 else 1) for m, _ in pairing.pairs)
    assert elems == (L - s) * (2 * H * H + 2 * KV * H + H + 2 * KV)
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------------------------- PlaM method
TOL = {torch.float32: (1e-6, 1e-6)}  # dtype -> (atol, rtol); the method computes in float32


def _plam():
    from shardmerge.engine.methods import get

    return get("plam")


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_plam_closed_form(rows):
    from tests.oracles.methods import run_in_memory

    spec = _plam()
    assert (spec.min_models, spec.max_models, spec.needs_base, spec.chunkwise) == (2, 2, False, True)
    gen = torch.Generator().manual_seed(0)
    wm, wb = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    atol, rtol = TOL[torch.float32]
    cases = [
        ({}, 0.9, 0.1),
        ({"alpha": 0.25}, 0.75, 0.25),
        ({"weights_mllm": 0.9, "weights_base": 0.3}, 0.9, 0.3),
        ({"weights_mllm": 1.0, "weights_base": -0.5}, 1.0, -0.5),
    ]
    for params, a, b in cases:
        got = run_in_memory(spec, [wm, wb], None, rows_per_chunk=rows, layer=1, num_layers=2, **params)
        want = wm.double() * a + wb.double() * b
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
        assert got.dtype == torch.float32
    assert torch.equal(run_in_memory(spec, [wm, wb], None, rows_per_chunk=rows, alpha=0.0), wm)
    assert torch.equal(run_in_memory(spec, [wm, wb], None, rows_per_chunk=rows, alpha=1), wb)
    bias = torch.randn(11, generator=gen), torch.randn(11, generator=gen)
    torch.testing.assert_close(
        run_in_memory(spec, list(bias), None, alpha=0.5), (bias[0] + bias[1]) / 2, atol=atol, rtol=rtol
    )


def test_plam_parameter_errors():
    from tests.oracles.methods import run_in_memory

    spec = _plam()
    w = [torch.ones(2, 2), torch.zeros(2, 2)]
    bad = [
        ({"weights_mllm": 0.9}, "weights_base is missing"),
        ({"alpha": 0.2, "weights_mllm": 0.9, "weights_base": 0.3}, "use one form"),
        ({"alpha": 1.5}, r"\[0, 1\]"),
        ({"alpha": float("nan")}, "finite"),
        ({"alpha": True}, "finite"),
    ]
    for params, msg in bad:
        with pytest.raises(ValueError, match=msg):
            run_in_memory(spec, w, None, name="model.layers.0.self_attn.q_proj.weight", **params)
    with pytest.raises(ValueError, match="exactly 2 inputs"):
        run_in_memory(spec, w + [torch.ones(2, 2)], None)
    with pytest.raises(ValueError, match="not as base_model"):
        run_in_memory(spec, w, torch.ones(2, 2))
    info = TensorInfo(name="x", shape=(2, 2))
    with pytest.raises(ValueError, match="shape"):
        spec.merge([torch.ones(2, 2), torch.ones(3, 2)], None, stats=None, chunk=Chunk(0, 2, 0), info=info)
    with pytest.raises(ValueError, match="float32"):
        spec.merge(
            [torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float16)], None, stats=None, chunk=Chunk(0, 2, 0), info=info
        )


def test_plam_on_tiny_pairs(tiny, tmp_path):
    """Layout pairing + method on real tiny checkpoints: targeted tensors become the closed-form mix."""
    from safetensors.torch import load_file

    from tests.oracles.methods import run_in_memory

    root = tmp_path
    m_dir = build_mllm(root / "m", "qwen3_vl", seed=0, naming="legacy", num_layers=TINY_LAYERS)
    b_dir = build_base_llm(root / "b", "qwen3_vl", seed=1, from_mllm=m_dir)
    (mc, ms), (bc, bs) = _read(m_dir), _read(b_dir)
    mllm, base = Layout.from_config(mc, ms, source="m"), Layout.from_config(bc, bs, source="b")
    pairing = check_lm_pairs(mllm, base, ms, bs, targets="attn", layers=[2])
    assert len(pairing.pairs) == 6  # q/k/v/o + q_norm/k_norm
    mt = {k: v for f in sorted(m_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    bt = {k: v for f in sorted(b_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    for m_name, b_name in pairing.pairs:
        got = run_in_memory(_plam(), [mt[m_name], bt[b_name]], None, name=m_name, rows_per_chunk=5, alpha=0.1)
        torch.testing.assert_close(got, 0.9 * mt[m_name] + 0.1 * bt[b_name], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(got, mt[m_name])
