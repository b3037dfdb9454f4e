"""Model-family facts, one entry per family: how a checkpoint of the family names its tensors (per on-disk naming),
how the family is recognised (config model_type, architectures, config keys, tensor names), which base LLMs an
MLLM's language model comes from, where transformers' module tree keeps its projector, and how its image
placeholder token is spelled and stored in config.json.

Everything that depends on the family reads this table: tensor roles (`layout.roles`), PivotMerge calibration's
projector modules (`plan.forms.pivot_calibration`), the probe's image-token lookup (`probe.core`) and the tiny-model
builders (`tiny_models`, `probe.fixtures`). Adding a family is one `Family` entry here (plus a tiny-model builder
entry in `tiny_models` for its tests); docs/families.md walks through it.

Tensor classification is by name alone and family-independent: the roots of every naming of every family are
merged into one list per module, most specific first, and the first matching root wins. The roots of different
families do not collide once ordered that way (e.g. Qwen2.5-VL legacy `model.layers.*` vs current
`model.language_model.*`); `tests/unit/test_families.py` checks it on each family's tiny model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

MLLM, LLM = "mllm", "llm"
_ROOT_FIELDS = ("lm", "head", "vision", "projector", "newline")


@dataclass(frozen=True)
class Naming:
    """One on-disk naming of a family's tensors: the name root of each module. Each field lists the spellings of
    that root seen on disk, the canonical one first (renames between namings map canonical to canonical)."""

    name: str  # "current" (transformers' in-memory names), "legacy" (the hub's historical names), "original", ...
    lm: tuple[str, ...]  # language-model root: decoder layers, token embeddings and final norm below it
    head: tuple[str, ...] = ("lm_head.",)
    vision: tuple[str, ...] = ()  # vision-tower root (Qwen-VL: its projector lives below it, see projector_in_vision)
    projector: tuple[str, ...] = ()  # projector root outside the vision tower
    newline: tuple[str, ...] = ()  # full tensor names of a learned image-row separator (LLaVA-NeXT), a projector tensor
    flat_config: bool = False  # config.json keeps the language-model fields at the top level (no text_config)


@dataclass(frozen=True)
class Family:
    """Facts about one model family. `name` is what `layout.roles.detect_family` reports."""

    name: str
    kind: str  # "llm" | "mllm"
    namings: tuple[Naming, ...]
    model_types: tuple[str, ...] = ()  # config.json model_type values of the family
    architectures: tuple[str, ...] = ()  # config `architectures` that decide the family before model_type
    config_keys: tuple[str, ...] = ()  # config keys whose presence decides the family before model_type
    name_markers: tuple[str, ...] = ()  # regexes over the newline-joined tensor names, all found: this family
    # (used when config.json says nothing known; the family with more markers is tried first)
    layers: tuple[str, ...] = ("layers",)  # decoder-layer containers below the LM root: `<lm><c>.<i>.<sub>`
    embed: tuple[str, ...] = ("embed_tokens.",)  # embedding tensors below the LM root
    final_norm: tuple[str, ...] = ("norm.",)  # final norm below the LM root
    layer_count_key: str = "num_hidden_layers"  # config key of the decoder-layer count (text_config's for an MLLM)
    vision_blocks: tuple[str, ...] = ()  # vision-block containers below the vision root: `<vision><c>.<j>.<sub>`
    projector_in_vision: tuple[str, ...] = ()  # sub-roots below the vision root that are the projector (Qwen-VL)
    projector_modules: tuple[str, ...] = ()  # transformers module names (suffixes) whose output is projected
    # image features fed to the LM input; `x.*` = any child of a module named x
    deepstack_modules: tuple[str, ...] = ()  # as projector_modules, for those whose output is added to the LM's
    # hidden states after its decoder layers (Qwen3-VL deepstack mergers)
    base_llms: tuple[str, ...] = ()  # base-LLM families (model_type) the MLLM's language model may be paired with
    image_token: str | None = None  # the image placeholder token the vision features replace
    image_token_keys: tuple[str, ...] = ()  # config keys holding the placeholder's id, preferred first
    image_tokens: str | None = None  # how one image becomes tokens: "grid" (Qwen-VL patches merged 2x2, M-RoPE),
    # "fixed" (LLaVA: image_seq_length per image), "anyres" (LLaVA-NeXT tiles + row separators)

    @property
    def is_mllm(self) -> bool:
        return self.kind == MLLM

    def naming(self, name: str) -> Naming:
        """The naming called `name`; a family published under one naming only has it under every name."""
        for n in self.namings:
            if n.name == name:
                return n
        if len(self.namings) == 1:
            return self.namings[0]
        raise ValueError(f"family {self.name}: no naming {name!r}; it has {', '.join(n.name for n in self.namings)}")

    def rename(self, name: str, src: str, dst: str) -> str:
        """A tensor name of naming `src` under naming `dst` (canonical root to canonical root; a name below no
        root of `src` is returned unchanged)."""
        a, b = self.naming(src), self.naming(dst)
        rules = [(getattr(a, f)[0], getattr(b, f)[0]) for f in _ROOT_FIELDS if getattr(a, f) and getattr(b, f)]
        for old, new in sorted(rules, key=lambda r: -len(r[0])):  # the most specific root first
            if name.startswith(old):
                return new + name[len(old) :]
        return name


def _llm(name: str, **kw) -> Family:
    """A decoder-only LLM named like Llama (`model.layers.i.*`, `model.embed_tokens`, `model.norm`, `lm_head`)."""
    return Family(name, LLM, (Naming("current", ("model.",)),), model_types=(name,), **kw)


_QWEN_VL_CURRENT = Naming("current", ("model.language_model.",), vision=("model.visual.",))
_LLAVA_CURRENT = Naming(
    "current",
    ("model.language_model.",),
    # transformers 4.5x kept CLIP's `vision_model.` level below the tower
    vision=("model.vision_tower.", "model.vision_tower.vision_model."),
    projector=("model.multi_modal_projector.",),
)
_LLAVA_LEGACY = Naming(
    "legacy",
    ("language_model.model.",),
    head=("language_model.lm_head.",),
    vision=("vision_tower.vision_model.", "vision_tower."),  # transformers 5 save_pretrained drops `vision_model.`
    projector=("multi_modal_projector.",),
)
_LLAVA_COMMON = dict(
    kind=MLLM,
    vision_blocks=("encoder.layers",),
    projector_modules=("multi_modal_projector",),
    base_llms=("llama", "mistral"),
    image_token="<image>",
    image_token_keys=("image_token_id", "image_token_index"),  # llava-hf configs before transformers 4.5x: _index
)
_QWEN_VL_COMMON = dict(
    kind=MLLM,
    vision_blocks=("blocks",),
    projector_modules=("visual.merger",),
    image_token="<|image_pad|>",
    image_token_keys=("image_token_id",),
    image_tokens="grid",
)
_VISUAL = r"(?m)^(model\.)?visual\."

FAMILIES: tuple[Family, ...] = (
    # ---- decoder-only LLMs (any other LLM still plans through the same name rules, as family "llm")
    _llm("llama"),
    _llm("mistral"),
    _llm("qwen2"),
    _llm("qwen3"),
    _llm("gemma"),
    _llm("gemma2"),
    _llm("gemma3_text"),
    _llm("granite"),
    _llm("phi3"),
    _llm("olmo2"),
    Family(
        "gpt2",
        LLM,
        (Naming("current", ("transformer.",)),),
        model_types=("gpt2",),
        layers=("h",),
        embed=("wte.", "wpe."),  # token and position embeddings
        final_norm=("ln_f.",),
        layer_count_key="n_layer",
    ),
    # ---- multimodal LLMs
    Family(
        "qwen2_5_vl",
        namings=(_QWEN_VL_CURRENT, Naming("legacy", ("model.",), vision=("visual.",), flat_config=True)),
        model_types=("qwen2_5_vl", "qwen2_vl"),  # Qwen2-VL names its tensors as Qwen2.5-VL does
        name_markers=(_VISUAL,),
        projector_in_vision=("merger.",),
        base_llms=("qwen2",),
        **_QWEN_VL_COMMON,
    ),
    Family(
        "qwen3_vl",
        namings=(_QWEN_VL_CURRENT,),  # published with the current names only
        model_types=("qwen3_vl",),
        name_markers=(_VISUAL, r"deepstack_merger_list\."),
        projector_in_vision=("merger.", "deepstack_merger_list."),
        deepstack_modules=("deepstack_merger_list.*",),
        base_llms=("qwen3",),
        **_QWEN_VL_COMMON,
    ),
    Family(
        "llava",
        namings=(_LLAVA_CURRENT, _LLAVA_LEGACY),
        model_types=("llava",),
        name_markers=(r"multi_modal_projector\.",),
        image_tokens="fixed",
        **_LLAVA_COMMON,
    ),
    Family(
        "llava_next",
        namings=(
            replace(_LLAVA_CURRENT, newline=("model.image_newline",)),
            replace(_LLAVA_LEGACY, newline=("image_newline",)),
        ),
        model_types=("llava_next",),
        name_markers=(r"multi_modal_projector\.", r"image_newline"),
        image_tokens="anyres",
        **_LLAVA_COMMON,
    ),
    Family(  # the original LLaVA repository's checkpoints (LlavaLlamaForCausalLM), not loadable by transformers
        "llava_original",
        namings=(
            Naming(
                "original",
                ("model.",),
                # an unfrozen CLIP tower is saved whole, below the tower wrapper
                vision=("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
                projector=("model.mm_projector.",),
                newline=("model.image_newline",),
            ),
        ),
        model_types=("llava_llama", "llava_mistral"),
        architectures=("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"),
        config_keys=("mm_projector_type",),
        name_markers=(r"mm_projector\.",),
        projector_modules=("mm_projector",),
        **{k: v for k, v in _LLAVA_COMMON.items() if k not in ("projector_modules", "image_token_keys")},
    ),
)
# vision blocks directly below a vision root, for towers of families not in the table
GENERIC_VISION_BLOCKS = ("layers",)

_BY_NAME = {f.name: f for f in FAMILIES}
if len(_BY_NAME) != len(FAMILIES):
    raise RuntimeError("model-family table: duplicate family names")


def get(name: str) -> Family:
    """The table entry of family `name`; ValueError listing the known families otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}") from None


def names(kind: str | None = None) -> tuple[str, ...]:
    """Family names in table order, all or of one kind ("llm" / "mllm")."""
    return tuple(f.name for f in FAMILIES if kind is None or f.kind == kind)


def _union(values: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for vs in values for v in vs))


def _roots(field: str) -> tuple[str, ...]:
    """Every spelling of one root across the table, most specific (longest) first."""
    found = _union(getattr(n, field) for f in FAMILIES for n in f.namings)
    return tuple(sorted(found, key=len, reverse=True))


# ---- the merged lists `layout.roles` classifies with
HEAD_ROOTS = _roots("head")
PROJECTOR_ROOTS = _roots("projector")
VISION_ROOTS = _roots("vision")
LM_ROOTS = _roots("lm")
NEWLINE_NAMES = _union(n.newline for f in FAMILIES for n in f.namings)
PROJECTOR_IN_VISION = _union(f.projector_in_vision for f in FAMILIES)
LM_LAYER_CONTAINERS = _union(f.layers for f in FAMILIES)
EMBED_NAMES = _union(f.embed for f in FAMILIES)
FINAL_NORM_NAMES = _union(f.final_norm for f in FAMILIES)
VISION_BLOCK_CONTAINERS = _union([*(f.vision_blocks for f in FAMILIES), GENERIC_VISION_BLOCKS])
LAYER_COUNT_KEYS = _union([f.layer_count_key] for f in FAMILIES)
IMAGE_TOKEN_KEYS = _union(f.image_token_keys for f in FAMILIES)
PROJECTOR_MODULES = _union(f.projector_modules for f in FAMILIES)
DEEPSTACK_MODULES = _union(f.deepstack_modules for f in FAMILIES)


def by_config(config: Mapping) -> Family | None:
    """The family config.json names: architectures / config keys first (original LLaVA configs say model_type
    "llava"), then model_type; None when neither is known."""
    archs = tuple(config.get("architectures") or ())
    for f in FAMILIES:
        if any(a in f.architectures for a in archs) or any(k in config for k in f.config_keys):
            return f
    mtype = config.get("model_type")
    return next((f for f in FAMILIES if mtype in f.model_types), None)


_MARKED = sorted((f for f in FAMILIES if f.name_markers), key=lambda f: -len(f.name_markers))


def by_names(names: Iterable[str]) -> Family | None:
    """The family the tensor names show (the one with the most markers wins among those that all match)."""
    joined = "\n".join(names)
    return next((f for f in _MARKED if all(re.search(m, joined) for m in f.name_markers)), None)


def module_matches(module_name: str, pattern: str) -> bool:
    """A transformers module name against a projector_modules / deepstack_modules pattern: a name suffix, or
    `x.*` for any direct child of a module named x."""
    if pattern.endswith(".*"):
        parts = module_name.split(".")
        return len(parts) >= 2 and parts[-2] == pattern[:-2]
    return module_name.endswith(pattern)
