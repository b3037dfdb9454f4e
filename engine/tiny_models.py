"""Tiny random models built locally (no downloads) for the demo, tests and benchmarks.

Every builder writes a Hugging Face-layout directory (config.json, safetensors shards + index, tokenizer files)
so the rest of the engine treats it exactly like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

TINY_LLM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)


def _seeded(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return gen


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter: turns a base model into a distinct 'fine-tune'."""
    gen = _seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return model


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` entries and a chat template, built without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(out))


def build_llm(
    out: Path | str,
    *,
    seed: int = 0,
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    base: Optional[Path | str] = None,
    perturb_seed: Optional[int] = None,
    max_shard_size: str = "50KB",
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random decoder-only LLM. With `base`, start from that model's weights and perturb them
    (seeded) so that experts share a base like real fine-tunes do."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        perturb_(model, perturb_seed if perturb_seed is not None else seed)
    else:
        kw = {**TINY_LLM, **overrides}
        config = AutoConfig.for_model(family, **kw)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # default init leaves norms at exactly 1.0; make every tensor informative
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=_seeded(seed + p.numel())) * 0.1)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    if tokenizer:
        write_tokenizer(out, model.config.vocab_size)
    gen_cfg = out / "generation_config.json"
    if not gen_cfg.exists():
        gen_cfg.write_text(json.dumps({"do_sample": False, "max_new_tokens": 8}))
    return out
