"""Tiny MLLM / base-LLM builders: complete HF dirs that transformers loads and runs on an image + text prompt."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from shardmerge.engine.tiny_models import (
    BASE_LLM_FAMILY,
    MLLM_FAMILIES,
    build_base_llm,
    build_llm,
    build_mllm,
    legacy_name,
    mm_inputs,
    special_token_ids,
)

CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the square red? A or B"}]}]


def _image(seed: int, h: int = 40, w: int = 50) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _disk_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(model_dir / fname), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_mllm_loads_in_both_namings_and_sees_the_image(tmp_path, family):
    from transformers import AutoModelForImageTextToText

    t0 = time.perf_counter()
    cur = build_mllm(tmp_path / "cur", family, seed=1, naming="current")
    elapsed = time.perf_counter() - t0
    leg = build_mllm(tmp_path / "leg", family, seed=1, naming="legacy")
    assert elapsed < 3.0, f"building a tiny {family} took {elapsed:.2f}s"

    cur_names, leg_names = set(_disk_tensors(cur)), set(_disk_tensors(leg))
    assert {legacy_name(family, n) for n in cur_names} == leg_names
    if family != "qwen3_vl":  # Qwen3-VL was published with the current names
        assert cur_names != leg_names
    for d in (cur, leg):  # every file a real checkpoint dir has
        for f in (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
            "generation_config.json",
            "model.safetensors.index.json",
        ):
            assert (d / f).exists(), f"{d} lacks {f}"

    m_cur = AutoModelForImageTextToText.from_pretrained(str(cur))
    m_leg = AutoModelForImageTextToText.from_pretrained(str(leg))
    assert m_cur.config.model_type == family
    # the loaded weights are exactly the ones on disk (legacy names converted on load by transformers)
    disk = _disk_tensors(leg)
    for name, t in m_cur.state_dict().items():
        assert torch.equal(t, disk[legacy_name(family, name)]), name

    x1 = mm_inputs(cur, CHAT, [_image(0)])
    image_id = m_cur.config.image_token_id
    n_img = int((x1["input_ids"] == image_id).sum())
    assert 1 <= n_img <= 32, f"{family}: {n_img} image tokens"
    out_cur, out_leg = _logits(m_cur, x1), _logits(m_leg, x1)
    assert out_cur.shape == (1, x1["input_ids"].shape[1], m_cur.config.text_config.vocab_size)
    assert torch.isfinite(out_cur).all()
    assert torch.equal(out_cur, out_leg)
    # a different image with the same token count changes the answer logits: the image is really used
    x2 = mm_inputs(cur, CHAT, [_image(1)])
    assert torch.equal(x1["input_ids"], x2["input_ids"])
    assert (_logits(m_cur, x2)[0, -1] - out_cur[0, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_tokenizer_special_ids_match_config(tmp_path, family):
    from transformers import AutoTokenizer

    d = build_mllm(tmp_path / "m", family, seed=0)
    config = json.loads((d / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = special_token_ids(family)
    image_tok = "<|image_pad|>" if family.startswith("qwen") else "<image>"
    image_id = config.get("image_token_id", config.get("image_token_index"))  # LLaVA writes the old key
    assert tok.convert_tokens_to_ids(image_tok) == image_id == ids[image_tok]
    if family.startswith("qwen"):
        assert tok.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
        assert tok.convert_tokens_to_ids("<|vision_end|>") == config["vision_end_token_id"]
    # byte-level: arbitrary text round-trips, one id per byte
    text = "Question: what colour? Ünïcode (A) or (B)"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert len(enc) == len(text.encode("utf-8")) and max(enc) < 256
    assert tok.decode(enc) == text


def test_seeds_and_base_perturbation(tmp_path):
    a = _disk_tensors(build_mllm(tmp_path / "a", "qwen2_5_vl", seed=0))
    a2 = _disk_tensors(build_mllm(tmp_path / "a2", "qwen2_5_vl", seed=0))
    b = _disk_tensors(build_mllm(tmp_path / "b", "qwen2_5_vl", seed=1))
    ft = _disk_tensors(build_mllm(tmp_path / "ft", "qwen2_5_vl", base=tmp_path / "a", perturb_seed=5, naming="legacy"))
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert not torch.equal(a[name], b[name])
    diff = ft[legacy_name("qwen2_5_vl", name)] - a[name]
    assert 0.005 < float(diff.std()) < 0.05  # perturb_ scale 0.02 around the base, not a fresh init
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        build_mllm(tmp_path / "bad", "llava", base=tmp_path / "a")
    with pytest.raises(ValueError, match="naming"):
        build_mllm(tmp_path / "bad2", "llava", naming="hub")
    with pytest.raises(ValueError, match="family"):
        build_mllm(tmp_path / "bad3", "gpt4v")


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_base_llm_matches_mllm_language_model_shapes(tmp_path, family):
    from transformers import AutoModelForCausalLM

    mllm = build_mllm(tmp_path / "m", family, seed=0, num_layers=3)
    base = build_base_llm(tmp_path / "b", family, seed=2, from_mllm=mllm)
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == BASE_LLM_FAMILY[family]
    model = AutoModelForCausalLM.from_pretrained(str(base))
    m_shapes = {k: tuple(v.shape) for k, v in _disk_tensors(mllm).items()}
    b_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lm = [k for k in m_shapes if k.startswith("model.language_model.")]
    assert len(lm) == len(b_shapes) - 1  # all but lm_head
    for k in lm:
        assert b_shapes["model." + k[len("model.language_model.") :]] == m_shapes[k], k
    assert b_shapes["lm_head.weight"] == m_shapes["lm_head.weight"]
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_base_llm_family_checks_and_overrides(tmp_path):
    mllm = build_mllm(tmp_path / "m", "qwen3_vl", seed=0)
    with pytest.raises(ValueError, match="qwen3"):
        build_base_llm(tmp_path / "b", "qwen2", from_mllm=mllm)
    base = build_base_llm(tmp_path / "b2", "qwen3", from_mllm=mllm, vocab_size=288)
    config = json.loads((base / "config.json").read_text())
    assert config["vocab_size"] == 288 and config["num_hidden_layers"] == 2 and config["head_dim"] == 16


def test_build_llm_unchanged(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_llm(tmp_path / "llm", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    assert model.config.vocab_size == 128 and AutoTokenizer.from_pretrained(str(d)).vocab_size == 128
