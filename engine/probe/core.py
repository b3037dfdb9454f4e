"""Where the probe plugs into a multimodal model: the language model's decoder layers, final norm and head, and the
image-token id; plus the per-sample input bundle both probe paths consume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from shardmerge.engine.layout import families
from shardmerge.engine.probe import attention


@dataclass(frozen=True)
class LMParts:
    """The language model inside an MLLM, as the probe needs it."""

    decoder: torch.nn.Module  # the text model holding `layers` and `norm`
    layers: tuple  # decoder layers 0..L-1
    norm: torch.nn.Module  # final norm applied to the last layer's output
    head: torch.nn.Module  # output embedding (lm_head)
    image_token_id: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def image_token_id(config) -> int:
    """The id of the image placeholder token that the vision features replace, under the config keys the family
    table lists (the model's own family's first)."""
    family = families.by_config({"model_type": getattr(config, "model_type", None)})
    keys = tuple(dict.fromkeys((family.image_token_keys if family else ()) + families.IMAGE_TOKEN_KEYS))
    for name in keys:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"model config {type(config).__name__} has no {' / '.join(keys)}; "
        "the probe needs the image placeholder token id (is this a multimodal model?)"
    )


def find_lm_parts(model: torch.nn.Module) -> LMParts:
    """Locate decoder layers, final norm and head of the language model; errors name what is missing."""
    kind = type(model).__name__
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None:
        raise ValueError(f"{kind}: cannot find the language model's decoder layers (get_decoder().layers)")
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise ValueError(f"{kind}: language model needs a final `norm` and an output embedding (lm_head)")
    expected = getattr(_text_config(model.config), "num_hidden_layers", None)
    if expected is not None and expected != len(layers):
        raise ValueError(f"{kind}: config says {expected} decoder layers, model has {len(layers)}")
    return LMParts(decoder, tuple(layers), norm, head, image_token_id(model.config))


def install(model: torch.nn.Module) -> LMParts:
    """Switch `model` to the probe attention function and tag each decoder layer's modules with its index.

    Outside `attention.masking(...)` the model then computes exactly what SDPA computes."""
    attention.register()
    parts = find_lm_parts(model)
    model.set_attn_implementation(attention.ATTN_NAME)
    for i, layer in enumerate(parts.layers):
        for module in layer.modules():
            setattr(module, attention.LAYER_ATTR, i)
    model.eval()
    return parts


def check_fast_path_supported(model: torch.nn.Module) -> None:
    """The fast path re-runs decoder layers with a plain causal mask: sliding-window layers would be wrong."""
    cfg = _text_config(model.config)
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise ValueError(
            f"{type(model).__name__}: fast path supports full-attention decoder layers only, got layer types "
            f"{sorted(types)} (use_sliding_window={getattr(cfg, 'use_sliding_window', False)}); use the exact path"
        )


@dataclass(frozen=True)
class ProbeInputs:
    """One prompt, ready for the model: its forward kwargs (batch 1) and which positions are image tokens."""

    model_kwargs: Mapping[str, Any]  # input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids...
    image_mask: torch.Tensor  # (S,) bool

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_kwargs["input_ids"]

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def answer_pos(self) -> int:
        """The position whose next-token distribution answers the question (the end of the prompt)."""
        return self.seq_len - 1


def make_inputs(model_kwargs: Mapping[str, Any], image_token: int, *, sample: str | None = None) -> ProbeInputs:
    """Validate a batch-1 model input and derive the image-token positions from its ids."""
    where = f"sample {sample!r}: " if sample is not None else ""
    ids = model_kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{where}input_ids must be a (1, S) tensor, got {shape}")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError(f"{where}attention_mask has padding; the probe runs one unpadded prompt at a time")
    image_mask = ids[0] == image_token
    n_image = int(image_mask.sum())
    if n_image == 0:
        raise ValueError(f"{where}prompt has no image tokens (id {image_token}); expected the expanded placeholder")
    if bool(image_mask[-1]):
        raise ValueError(f"{where}prompt ends with an image token; the answer position must be a text token")
    return ProbeInputs(dict(model_kwargs), image_mask)


def to_device(inputs: ProbeInputs, device) -> ProbeInputs:
    """The model kwargs on the model's device; the image mask stays on the CPU (it is indexing metadata)."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.model_kwargs.items()}
    return ProbeInputs(kwargs, inputs.image_mask.cpu())


# Per-position model kwargs that grow with the sequence (everything else — pixels, grids — describes the image).
_PER_POSITION = {"input_ids": None, "attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}


def append_tokens(inputs: ProbeInputs, token_ids) -> ProbeInputs:
    """The same prompt with text tokens appended (for teacher-forced answers and step-by-step references)."""
    new = torch.as_tensor(list(token_ids), dtype=inputs.input_ids.dtype).reshape(1, -1)
    kwargs = dict(inputs.model_kwargs)
    for name, fill in _PER_POSITION.items():
        value = kwargs.get(name)
        if value is None:
            continue
        extra = new if fill is None else torch.full_like(new, fill, dtype=value.dtype)
        kwargs[name] = torch.cat([value, extra.to(value.device, value.dtype)], dim=1)
    mask = torch.cat([inputs.image_mask, torch.zeros(new.shape[1], dtype=torch.bool)])
    return ProbeInputs(kwargs, mask)
