"""Tiny random models built locally (no downloads) for the demo, tests and benchmarks.

Every builder writes a Hugging Face-layout directory (config.json, safetensors shards + index, tokenizer files)
so the rest of the engine treats it exactly like a real checkpoint.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardmerge.engine.layout import families

TINY_LLM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)
_TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)  # <s>, </s>, <pad> of `write_tokenizer`
# Tiny-model builder entries of the decoder-only LLM families (config kwargs for `build_llm(family=...)`; a family
# without one gets TINY_LLM): GPT-2 names its sizes differently (and stores its linears as Conv1D, (in, out));
# Gemma's and Qwen3's head_dim is their own key (defaults 256 and 128); Phi-3, OLMo 2, Qwen3 and Mistral
# default to special-token ids outside a 128-token vocabulary.
TINY_FAMILY = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128),
    "gemma": dict(TINY_LLM, head_dim=8),
    "gemma2": dict(TINY_LLM, head_dim=8),
    "gemma3_text": dict(TINY_LLM, head_dim=8),
    "granite": dict(TINY_LLM),
    "mistral": dict(TINY_LLM, **_TINY_IDS),
    "qwen3": dict(TINY_LLM, head_dim=8, **_TINY_IDS),
    "phi3": dict(TINY_LLM, **_TINY_IDS),  # fused qkv_proj / gate_up_proj
    "olmo2": dict(TINY_LLM, **_TINY_IDS),  # q_norm / k_norm over the whole projection, post-norms only
}


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
    base: Path | str | None = None,
    perturb_seed: int | None = None,
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
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, trust_remote_code=False)
        perturb_(model, perturb_seed if perturb_seed is not None else seed)
    else:
        kw = {**TINY_FAMILY.get(family, TINY_LLM), **overrides}
        count_key = families.get(family).layer_count_key if family in families.names() else "num_hidden_layers"
        if count_key != "num_hidden_layers" and "num_hidden_layers" in kw:
            kw[count_key] = kw.pop("num_hidden_layers")
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


# ---------------------------------------------------------------------------------------------------------------
# Tiny multimodal LLMs (Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, LLaVA-NeXT) and their base LLMs
# ---------------------------------------------------------------------------------------------------------------

NAMINGS = ("current", "legacy")

# Byte-level tokenizer: ids 0..255 are bytes, the family's special tokens follow in this order, so any text
# (benchmark questions included) encodes without <unk>. The config's token ids are derived from these lists.
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
TINY_MM_VOCAB = 272  # 256 bytes + specials, rounded up to a multiple of 16

TINY_MM_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    vocab_size=TINY_MM_VOCAB,
    rms_norm_eps=1e-6,
)

# Simplified versions of the real chat templates; they expand an image item exactly like the originals
# (Qwen: <|vision_start|><|image_pad|><|vision_end|>; LLaVA: "<image>\n" before the text), the processor step
# (or the caller) then repeats the image token once per visual feature.
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyTokens:
    """A tiny byte-level tokenizer style: its special tokens (after the 256 bytes, in this order), the token each
    config id names, the tokenizer's special-token roles and its chat template."""

    specials: tuple[str, ...]
    text_ids: tuple[tuple[str, str], ...]  # language-model config key -> token (bos / eos / pad)
    media_ids: tuple[tuple[str, str], ...]  # MLLM config key -> token (image, video, vision start / end)
    roles: tuple[tuple[str, str], ...]  # tokenizer role -> token
    template: str


_QWEN_TOKENS = TinyTokens(
    _QWEN_SPECIALS,
    (("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")),
    (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ),
    (("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>")),
    _QWEN_TEMPLATE,
)
_LLAVA_TOKENS = TinyTokens(
    _LLAVA_SPECIALS,
    (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")),
    (("image_token_id", "<image>"),),
    (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>")),
    _LLAVA_TEMPLATE,
)


def _mrope_section(text: Mapping) -> list[int]:
    """M-RoPE split of head_dim/2 rotary frequencies into (temporal, height, width), like Qwen's [16, 24, 24]."""
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen2_5_vl_config(text: dict, vision: dict, ids: dict):
    from transformers import Qwen2_5_VLConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(text)}
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)


def _qwen3_vl_config(text: dict, vision: dict, ids: dict):
    from transformers import Qwen3VLConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(text)}
    rope["mrope_interleaved"] = True
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    return Qwen3VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)


def _llava_kwargs(text: dict, vision: dict, ids: dict) -> dict:
    side = vision["image_size"] // vision["patch_size"]  # one image = side**2 patches = image tokens
    return dict(text_config={"model_type": "llama", **text}, vision_config=vision, image_seq_length=side**2, **ids)


def _llava_config(text: dict, vision: dict, ids: dict):
    from transformers import LlavaConfig

    return LlavaConfig(**_llava_kwargs(text, vision, ids))


def _llava_next_config(text: dict, vision: dict, ids: dict):
    from transformers import LlavaNextConfig

    s = vision["image_size"]
    return LlavaNextConfig(
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **_llava_kwargs(text, vision, ids)
    )


# PIL-backed image processors (no torchvision) sized so that one image is a handful of tokens.
def _qwen2_5_vl_images():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def _qwen3_vl_images():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def _llava_images():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def _llava_next_images():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
    )


@dataclass(frozen=True)
class TinyMllm:
    """The tiny-model builder entry of one MLLM family; its naming, roots and image token are in the family table
    (`shardmerge.engine.layout.families`)."""

    config: Callable[[dict, dict, dict], Any]  # (text kwargs, vision kwargs, media token ids) -> transformers config
    vision: Mapping[str, Any]  # vision-tower kwargs of the on-disk tiny model
    tokens: TinyTokens
    image_processor: Callable[[], Any]
    processor: str | None = None  # transformers processor class saved with the model (Qwen's needs torchvision)
    head_dim: bool = False  # the language model's config carries head_dim (else transformers derives it)


_TINY_QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)
_TINY_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=32,
)
TINY_MLLM: dict[str, TinyMllm] = {
    "qwen2_5_vl": TinyMllm(
        _qwen2_5_vl_config,
        dict(_TINY_QWEN_VISION, patch_size=14, fullatt_block_indexes=[1], window_size=56),
        _QWEN_TOKENS,
        _qwen2_5_vl_images,
    ),
    "qwen3_vl": TinyMllm(
        _qwen3_vl_config,
        dict(_TINY_QWEN_VISION, patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[1]),
        _QWEN_TOKENS,
        _qwen3_vl_images,
        head_dim=True,
    ),
    "llava": TinyMllm(_llava_config, _TINY_CLIP, _LLAVA_TOKENS, _llava_images, "LlavaProcessor"),
    "llava_next": TinyMllm(_llava_next_config, _TINY_CLIP, _LLAVA_TOKENS, _llava_next_images, "LlavaNextProcessor"),
}
# the families with a tiny builder, in family-table order
MLLM_FAMILIES = tuple(f for f in families.names(families.MLLM) if f in TINY_MLLM)
# the base LLM each MLLM's language model was initialised from (PlaM mixes the two): the table's first
BASE_LLM_FAMILY = {f: families.get(f).base_llms[0] for f in MLLM_FAMILIES}


def _mllm_family(family: str) -> str:
    """The tiny MLLM family of an MLLM family or of a base-LLM family (the first MLLM built on it)."""
    if family in TINY_MLLM:
        return family
    for f in MLLM_FAMILIES:
        if family in families.get(f).base_llms:
            return f
    raise ValueError(f"no tiny MLLM builder for family {family!r}; expected one of {', '.join(MLLM_FAMILIES)}")


def special_token_ids(family: str) -> dict[str, int]:
    """Token -> id of the tiny byte-level tokenizer for an MLLM family or base-LLM family."""
    return {tok: 256 + i for i, tok in enumerate(TINY_MLLM[_mllm_family(family)].tokens.specials)}


def media_token_ids(family: str) -> dict[str, int]:
    """The MLLM config's media token ids (image_token_id, ...) of the tiny tokenizer of `family`."""
    ids = special_token_ids(family)
    return {key: ids[tok] for key, tok in TINY_MLLM[_mllm_family(family)].tokens.media_ids}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_mm_tokenizer(out: Path, family: str) -> None:
    """A byte-level tokenizer with the family's special tokens at fixed ids and its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    style = TINY_MLLM[_mllm_family(family)].tokens
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in style.specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **dict(style.roles))
    fast.chat_template = style.template
    for s, want in special_token_ids(family).items():
        got = fast.convert_tokens_to_ids(s)
        if got != want:
            raise RuntimeError(f"tiny tokenizer for {family}: special token {s!r} got id {got}, expected {want}")
    fast.save_pretrained(str(out))


def _text_kwargs(family: str, num_layers: int, overrides: dict) -> dict:
    """LM hyper-parameters shared by an MLLM's language model and its base LLM (so PlaM can mix them)."""
    ids = special_token_ids(family)
    kw = {**TINY_MM_TEXT, "num_hidden_layers": num_layers, **overrides}
    kw.update({key: ids[tok] for key, tok in TINY_MLLM[_mllm_family(family)].tokens.text_ids})
    return kw


def mllm_config(family: str, text: dict, vision: Mapping | None = None, ids: Mapping | None = None):
    """A transformers config for a tiny MLLM of `family` with language-model kwargs `text`, vision-tower kwargs
    `vision` (default: the on-disk tiny model's) and media token ids `ids` (default: the tiny tokenizer's)."""
    if family not in TINY_MLLM:
        raise ValueError(f"unknown MLLM family {family!r}; expected one of {', '.join(MLLM_FAMILIES)}")
    entry = TINY_MLLM[family]
    if not entry.head_dim:
        text = {k: v for k, v in text.items() if k != "head_dim"}
    vision = copy.deepcopy(dict(entry.vision if vision is None else vision))
    return entry.config(text, vision, dict(media_token_ids(family) if ids is None else ids))


def _write_processor_files(out: Path, family: str) -> None:
    """Tokenizer, chat template and image-processor config; for LLaVA also processor_config.json (its processor
    works without torchvision). Qwen's processor class needs torchvision (video processor), see `mm_inputs`."""
    write_mm_tokenizer(out, family)
    image_processor = TINY_MLLM[family].image_processor()
    image_processor.save_pretrained(str(out))  # preprocessor_config.json, as hub dirs have
    processor = TINY_MLLM[family].processor
    if processor is None:
        return
    import transformers
    from transformers import AutoTokenizer

    cls = getattr(transformers, processor)
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    # llava-hf values: the CLS token is one extra vision token that the "default" strategy drops again
    proc = cls(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=TINY_MLLM[family].vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    proc.save_pretrained(str(out))


def mm_inputs(model_dir: Path | str, messages: list[dict], images: list) -> dict[str, torch.Tensor]:
    """Model inputs (input_ids, attention_mask, pixel values, grid/size tensors) for one chat with images,
    without torchvision: Qwen's processor classes require it for their video processor, so for Qwen the image
    tokens are expanded here exactly as Qwen2_5_VLProcessor does (grid_t*grid_h*grid_w / merge_size**2 pads
    per image) and mm_token_type_ids (1 = image token) is added; LLaVA uses its own processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    family = families.by_config(config)
    if family is None or family.image_tokens != "grid":
        proc = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
        text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(proc(text=[text], images=images or None, return_tensors="pt"))
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = family.image_token
    if text.count(pad) != len(images):
        raise ValueError(f"{model_dir}: the chat has {text.count(pad)} image slots but {len(images)} images")
    out: dict[str, torch.Tensor] = {}
    if images:
        ip = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
        out.update(ip(images=images, return_tensors="pt"))
        counts = [int(g.prod()) // ip.merge_size**2 for g in out["image_grid_thw"]]
        parts = text.split(pad)
        text = parts[0] + "".join("<|placeholder|>" * n + rest for n, rest in zip(counts, parts[1:]))
        text = text.replace("<|placeholder|>", pad)
    enc = tok(text, return_tensors="pt")
    out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    image_id = config.get("image_token_id")
    out["mm_token_type_ids"] = (enc["input_ids"] == image_id).long()
    return out


def legacy_name(family: str, name: str) -> str:
    """The hub's historical on-disk name of a tensor whose in-memory (current) transformers name is `name`, as the
    family table's namings say. Qwen3-VL was published with the current names, so its legacy naming is the
    identity."""
    return families.get(family).rename(name, "current", "legacy")


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, mult in units.items():
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * mult)
    return int(size)


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: str | int = "50KB") -> None:
    """Write `tensors` as HF-style shards (model-0000i-of-0000N.safetensors) + model.safetensors.index.json."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _legacy_config(family: str, config: dict) -> dict:
    """Some hub configs (Qwen2.5-VL's) keep the language-model fields at the top level (no text_config)."""
    if not families.get(family).naming("legacy").flat_config:
        return config
    text = {k: v for k, v in config.pop("text_config").items() if k not in ("model_type", "dtype")}
    return {**text, **config}


def _save_mllm(model, out: Path, family: str, naming: str, max_shard_size: str | int) -> None:
    """Config + weights under the chosen on-disk naming (save_pretrained would pick one for us)."""
    state = model.state_dict()
    rename = (lambda n: legacy_name(family, n)) if naming == "legacy" else (lambda n: n)
    tensors = {rename(n): t for n, t in state.items()}
    if len(tensors) != len(state):
        raise RuntimeError(f"{family} {naming} renaming collapsed {len(state) - len(tensors)} tensor names")
    write_safetensors(out, tensors, max_shard_size)
    config = model.config.to_dict()
    if naming == "legacy":
        config = _legacy_config(family, config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _informative_(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves norms at exactly 1 and biases at 0; make every tensor carry seeded information."""
    gen = _seeded(seed + 7919)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def build_mllm(
    out: Path | str,
    family: str,
    *,
    seed: int = 0,
    naming: str = "current",
    dtype: torch.dtype = torch.float32,
    base: Path | str | None = None,
    perturb_seed: int | None = None,
    num_layers: int = 2,
    max_shard_size: str | int = "50KB",
    **text_overrides,
) -> Path:
    """Write a tiny random MLLM of `family` (see MLLM_FAMILIES): model weights under `naming` ("current" =
    transformers' in-memory names, "legacy" = the hub's historical names), config, byte-level tokenizer with the
    model's special tokens, chat template and a PIL image processor. With `base` (a dir written by this function),
    start from its weights and perturb them (seeded), so several MLLMs share a starting point like fine-tunes."""
    from transformers import AutoModelForImageTextToText

    _check_choice("MLLM family", family, MLLM_FAMILIES)
    _check_choice("naming", naming, NAMINGS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if base is not None:
        base_type = json.loads((Path(base) / "config.json").read_text()).get("model_type")
        if base_type != family:
            raise ValueError(f"build_mllm: base {base} is a {base_type!r} model, expected family {family!r}")
        model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32, trust_remote_code=False)
        perturb_(model, perturb_seed if perturb_seed is not None else seed)
    else:
        config = mllm_config(family, _text_kwargs(family, num_layers, text_overrides))
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        _informative_(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    _save_mllm(model, out, family, naming, max_shard_size)
    _write_processor_files(out, family)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 8}))
    return out


def _mllm_text_config(mllm: Path) -> tuple[str, dict]:
    """(family, language-model config dict) of an MLLM dir, for either config style (nested or flat)."""
    config = json.loads((Path(mllm) / "config.json").read_text())
    family = config.get("model_type")
    _check_choice("MLLM family (model_type in config.json)", family, MLLM_FAMILIES)
    return family, config.get("text_config") or config


def build_base_llm(
    out: Path | str,
    family: str,
    *,
    seed: int = 0,
    from_mllm: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    base: Path | str | None = None,
    perturb_seed: int | None = None,
    num_layers: int = 2,
    max_shard_size: str | int = "50KB",
    **overrides,
) -> Path:
    """Write the tiny base LLM of an MLLM family (qwen2 for qwen2_5_vl, qwen3 for qwen3_vl, llama for LLaVA);
    `family` may name the MLLM family or the base family directly. With `from_mllm`, the language-model shapes
    (layers, hidden, heads, vocab ...) are copied from that MLLM dir so PlaM can mix the two; `overrides` still win
    (e.g. a different vocab_size). The tokenizer is the MLLM family's byte-level one."""
    mm_family = {v: k for k, v in reversed(list(BASE_LLM_FAMILY.items()))}.get(family, family)
    _check_choice("base LLM family", mm_family, MLLM_FAMILIES)
    llm_family = BASE_LLM_FAMILY[mm_family]
    shape: dict = {}
    if from_mllm is not None:
        src_family, text = _mllm_text_config(Path(from_mllm))
        if BASE_LLM_FAMILY[src_family] != llm_family:
            raise ValueError(
                f"build_base_llm: {from_mllm} is a {src_family} MLLM whose base family is "
                f"{BASE_LLM_FAMILY[src_family]!r}, not {llm_family!r}"
            )
        keys = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "rms_norm_eps",
            "max_position_embeddings",
        )
        shape = {k: text[k] for k in keys if k in text}
        if TINY_MLLM[mm_family].head_dim:
            shape["head_dim"] = text.get("head_dim", TINY_MM_TEXT["head_dim"])
    kw = {**_text_kwargs(mm_family, num_layers, {}), **shape, **overrides}
    if not TINY_MLLM[mm_family].head_dim:
        kw.pop("head_dim", None)
    build_llm(
        out,
        seed=seed,
        family=llm_family,
        dtype=dtype,
        base=base,
        perturb_seed=perturb_seed,
        max_shard_size=max_shard_size,
        tokenizer=False,
        **kw,
    )
    write_mm_tokenizer(Path(out), mm_family)
    return Path(out)


def derive_projector_expert(init: Path | str, out: Path | str, seed: int, scale: float = 0.05) -> Path:
    """A copy of the MLLM dir `init` whose floating-point projector tensors (only) get a seeded update: a shared
    direction (the same for every seed) plus an expert-specific one, so several experts agree on part of the shared
    space and conflict elsewhere -- PivotMerge's setting (experts sharing the vision tower and the LLM)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from shardmerge.engine.layout.roles import classify

    init, out = Path(init), Path(out)
    shutil.copytree(init, out)
    g, shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(1234)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f))
        names = [
            k
            for k, v in tensors.items()
            if (r := classify(k)) is not None and r.module == "projector" and v.is_floating_point()
        ]
        for k in names:
            v = tensors[k]
            tensors[k] = v + scale * (torch.randn(v.shape, generator=shared) + torch.randn(v.shape, generator=g))
        if names:
            save_file(tensors, str(f), metadata={"format": "pt"})
    return out
