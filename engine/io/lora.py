"""LoRA inputs: `model: base+adapter` (mergekit's spelling) or a PEFT adapter directory as a model.

The adapted model is never built: each adapted weight is a LoraMeta (shardmerge.engine.io.gather) whose rows are W + s * B A,
formed per row chunk when the merge reads them (mergekit instead saves a whole merge_and_unload() copy first).
s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with per-module rank_pattern / alpha_pattern.
`modules_to_save` tensors replace the base's; embedding adapters (lora_embedding_A/B) are applied like Linear
ones. What the engine cannot reproduce exactly (DoRA, trained biases, other PEFT types) is refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from shardmerge.engine.io.checkpoint import (
    Checkpoint,
    TensorMeta,
    open_checkpoint,
    parse_safetensors_header,
    resolve_model_dir,
)
from shardmerge.engine.io.gather import LoraMeta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$|^(.*)\.(lora_embedding_A|lora_embedding_B)$")


def is_adapter_dir(ref: str) -> bool:
    """A local directory holding a PEFT adapter and no model weights of its own."""
    p = Path(ref).expanduser()
    return os.path.isfile(p / ADAPTER_CONFIG) and not any(p.glob("model*.safetensors"))  # os.path: no OSError


def open_model(ref: str) -> Checkpoint:
    """open_checkpoint, plus LoRA references: `base+adapter`, or an adapter dir (its base from
    adapter_config.json's base_model_name_or_path)."""
    ref = str(ref)
    if "+" in ref and not os.path.exists(Path(ref).expanduser()):
        base_ref, _, adapter_ref = ref.partition("+")
        if "+" in adapter_ref:
            raise ValueError(f"model {ref!r}: expected base+adapter with one '+', got {ref.count('+')}")
        return _adapted(ref, base_ref, adapter_ref)
    if is_adapter_dir(ref):
        cfg = _adapter_config(resolve_model_dir(ref), ref)
        base_ref = cfg.get("base_model_name_or_path")
        if not base_ref:
            raise ValueError(
                f"model {ref!r}: {ADAPTER_CONFIG} has no base_model_name_or_path; write the model as "
                "base_model+adapter instead"
            )
        return _adapted(ref, base_ref, ref)
    return open_checkpoint(ref)


def _adapter_config(root: Path, ref: str) -> dict:
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"adapter {ref!r}: {root} has no {ADAPTER_CONFIG}; is this a PEFT LoRA adapter?")
    from shardmerge.engine.io.loaders import load_json_file

    cfg = load_json_file(path, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: {ADAPTER_CONFIG} must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters are")
    if cfg.get("use_dora"):
        raise ValueError(f"{path}: use_dora is set; DoRA adapters are not supported (merge them with peft first)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(
            f"{path}: bias {cfg.get('bias')!r} / lora_bias: adapters with trained biases are not "
            "supported (merge them with peft first)"
        )
    return cfg


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the first key matching the end of the module's name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(cfg: dict, module: str) -> float:
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _adapted(ref: str, base_ref: str, adapter_ref: str) -> Checkpoint:
    base = open_checkpoint(base_ref)
    root = resolve_model_dir(adapter_ref)
    cfg = _adapter_config(root, adapter_ref)
    wpath = root / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise ValueError(f"adapter {adapter_ref!r}: {root} has no {ADAPTER_WEIGHTS}")
    metas = parse_safetensors_header(wpath)
    tensors = dict(base.tensors)
    pairs: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in metas.items():
        name = key.removeprefix(_PREFIX)
        m = _LORA_KEY.match(name)
        if m:
            module = m.group(1) or m.group(3)
            pairs.setdefault(module, {})[m.group(2) or m.group(4)] = meta
            continue
        name = name.replace(".base_layer.", ".")  # saved embedding base weights (save_embedding_layers)
        _target(base, name, key, wpath)
        if tuple(meta.shape) != tuple(base.tensors[name].shape):
            raise ValueError(
                f"{wpath}: tensor {key!r}: shape {list(meta.shape)} differs from the base model's "
                f"{name!r} {list(base.tensors[name].shape)}"
            )
        tensors[name] = meta  # modules_to_save: the adapter's copy replaces the base tensor
    for module, parts in sorted(pairs.items()):
        tensors[module + ".weight"] = _lora_meta(cfg, module, parts, tensors, base, wpath)
    ck = Checkpoint(ref, base.root, tensors)
    ck.extra_files = (str(wpath), str(root / ADAPTER_CONFIG))
    return ck


def _target(base: Checkpoint, name: str, key: str, wpath: Path) -> None:
    if name not in base.tensors:
        raise ValueError(
            f"{wpath}: adapter tensor {key!r} targets {name!r}, which the base model {base.ref} "
            "does not have; is this adapter for another model?"
        )


def _lora_meta(cfg: dict, module: str, parts: dict, tensors: dict, base: Checkpoint, wpath: Path) -> LoraMeta:
    name = module + ".weight"
    _target(base, name, f"{_PREFIX}{module}.lora_A", wpath)
    w = tensors[name]
    emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a = parts.get("lora_embedding_A" if emb else "lora_A")
    b = parts.get("lora_embedding_B" if emb else "lora_B")
    if a is None or b is None:
        raise ValueError(f"{wpath}: module {module!r} has only one of its LoRA A/B matrices")
    layout = "embedding" if emb else ("fan_in_fan_out" if cfg.get("fan_in_fan_out") else "linear")
    if len(w.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{wpath}: module {module!r}: LoRA A {list(a.shape)} / B {list(b.shape)} do not fit "
            f"the base weight {list(w.shape)}"
        )
    out_in = (b.shape[0], a.shape[1]) if layout == "linear" else (a.shape[1], b.shape[0])
    if tuple(w.shape) != out_in:
        raise ValueError(
            f"{wpath}: module {module!r}: LoRA product is {list(out_in)}, the base weight {name!r} is {list(w.shape)}"
        )
    return LoraMeta(
        w.name,
        w.file,
        w.dtype,
        w.shape,
        w.begin,
        w.end,
        base=w,
        a_meta=a,
        b_meta=b,
        scale=float(_scale(cfg, module)),
        layout=layout,
    )
