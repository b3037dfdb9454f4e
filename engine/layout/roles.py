"""Which tensor of a checkpoint is what: language-model decoder layer i (and which sub-module), embeddings, final
norm, lm_head, vision-tower block j, projector layer l, for Qwen2.5-VL / Qwen2-VL, Qwen3-VL, LLaVA-1.5 / NeXT
(llava-hf legacy and current on-disk names), original LLaVA (`model.mm_projector.*`) and plain decoder LLMs
(Qwen2.5, Qwen3, Llama / Vicuna, Mistral: `model.layers.i.*`). The name roots and family facts come from the
family table, `layout.families`.

Pure: names and the config dict only, no tensor data. The planner groups work units by `role(name).layer`, applies
recipe `modules:` by `role(name).module`, and PlaM pairs MLLM language-model tensors with base-LLM tensors through
`map_lm_tensors` / `check_lm_pairs` because the two name them differently on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from shardmerge.engine.layout import families

MODULES = ("language_model", "vision_tower", "projector", "other")
UNKNOWN_POLICIES = ("error", "other")

# Every family fact (roots, layer containers, model types, base LLMs) comes from the family table.
MLLM_FAMILIES = families.names(families.MLLM)
# base-LLM families (config model_type) each MLLM family's language model may be paired with
BASE_FAMILIES = {name: families.get(name).base_llms for name in MLLM_FAMILIES}
# config keys holding the language model's decoder-layer count (text_config's first, for an MLLM)
LAYER_COUNT_KEYS = families.LAYER_COUNT_KEYS

# Name roots, most specific first (the first matching root wins), merged over every naming of every family.
_HEAD_ROOTS = families.HEAD_ROOTS
_PROJECTOR_ROOTS = families.PROJECTOR_ROOTS
_NEWLINE_NAMES = families.NEWLINE_NAMES  # LLaVA-NeXT's learned row separator
_VISION_ROOTS = families.VISION_ROOTS
_PROJECTOR_IN_VISION = families.PROJECTOR_IN_VISION  # Qwen-VL's projector lives inside the vision module
_LM_ROOTS = families.LM_ROOTS


def _alternatives(items) -> str:
    return "|".join(re.escape(i) for i in items)


_LM_LAYER = re.compile(rf"^(?:{_alternatives(families.LM_LAYER_CONTAINERS)})\.(\d+)\.(.+)$")
_VISION_BLOCK = re.compile(rf"^(?:{_alternatives(families.VISION_BLOCK_CONTAINERS)})\.(\d+)\.(.+)$")
_SEQ_LINEAR = re.compile(r"(?:^|\.)(\d+)\.(?:weight|bias)$")  # nn.Sequential(Linear, GELU, Linear, ...)
_NAMED_LINEAR = re.compile(r"(?:^|\.)linear_(?:fc)?(\d+)\.(?:weight|bias)$")  # linear_1 / linear_fc1


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is. `layer`: LM decoder layer, vision block or projector linear index (0-based);
    `sub`: the name below that unit (`self_attn.q_proj.weight`), or below the module root for the rest."""

    module: str  # language_model | vision_tower | projector | other
    kind: str  # layer | embed | final_norm | lm_head | vision_block | vision_other | projector_layer |
    #            projector_other | other
    layer: int | None = None
    sub: str | None = None


def _lm_role(rest: str) -> TensorRole | None:
    m = _LM_LAYER.match(rest)
    if m:
        return TensorRole("language_model", "layer", int(m.group(1)), m.group(2))
    if rest.startswith(families.EMBED_NAMES):
        return TensorRole("language_model", "embed", None, rest)
    if rest.startswith(families.FINAL_NORM_NAMES):
        return TensorRole("language_model", "final_norm", None, rest)
    return None


def _projector_role(rest: str) -> TensorRole:
    m = _NAMED_LINEAR.search(rest)
    if m:
        return TensorRole("projector", "projector_layer", int(m.group(1)) - 1, rest)
    m = _SEQ_LINEAR.search(rest)
    if m:
        return TensorRole("projector", "projector_layer", int(m.group(1)) // 2, rest)
    if rest in ("weight", "bias"):  # a single nn.Linear projector (original LLaVA "linear")
        return TensorRole("projector", "projector_layer", 0, rest)
    return TensorRole("projector", "projector_other", None, rest)


def _vision_role(rest: str) -> TensorRole:
    if rest.startswith(_PROJECTOR_IN_VISION):
        return _projector_role(rest)
    m = _VISION_BLOCK.match(rest)
    if m:
        return TensorRole("vision_tower", "vision_block", int(m.group(1)), m.group(2))
    return TensorRole("vision_tower", "vision_other", None, rest)


def classify(name: str) -> TensorRole | None:
    """The role of `name` from its name alone, or None when no known root matches."""
    if name in _NEWLINE_NAMES:
        return TensorRole("projector", "projector_other", None, "image_newline")
    for root in _HEAD_ROOTS:
        if name.startswith(root):
            return TensorRole("language_model", "lm_head", None, "lm_head." + name[len(root) :])
    for root in _PROJECTOR_ROOTS:
        if name.startswith(root):
            return _projector_role(name[len(root) :])
    for root in _VISION_ROOTS:
        if name.startswith(root):
            return _vision_role(name[len(root) :])
    for root in _LM_ROOTS:
        if name.startswith(root):
            return _lm_role(name[len(root) :])
    return None


def _text_config(config: Mapping) -> Mapping:
    return config.get("text_config") or config


def detect_family(config: Mapping, names: Sequence[str]) -> str:
    """Family from config.json (model_type, architectures); from the tensor names when the config says nothing
    we know. LLMs are reported by their model_type (llama, qwen2, ...); unknown LLMs as "llm"."""
    found = families.by_config(config) or families.by_names(names)
    return found.name if found is not None else "llm"


@dataclass(frozen=True)
class Layout:
    """Roles of every tensor of one checkpoint. Build with `Layout.from_config`."""

    family: str
    num_layers: int
    names: tuple[str, ...]
    source: str = ""  # the model's path or id, for error messages
    unknown: str = "error"
    _roles: tuple[TensorRole, ...] = field(default=(), repr=False)

    @property
    def is_mllm(self) -> bool:
        return self.family in MLLM_FAMILIES

    @cached_property
    def _by_name(self) -> dict[str, TensorRole]:
        return dict(zip(self.names, self._roles))

    @classmethod
    def from_config(cls, config: Mapping, names: Iterable[str], *, source: str = "", unknown: str = "error") -> Layout:
        """Classify every name. `unknown="error"` (default): a tensor with no known role is a ValueError listing
        them all; `unknown="other"`: such tensors get module "other" (the caller then decides what to do)."""
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown-tensor policy {unknown!r}: expected one of {', '.join(UNKNOWN_POLICIES)}")
        names = tuple(names)
        family = detect_family(config, names)
        roles = [classify(n) for n in names]
        bad = [n for n, r in zip(names, roles) if r is None]
        if bad and unknown == "error":
            raise ValueError(
                f"{source or 'checkpoint'} ({family}): {len(bad)} tensor(s) with no known role: "
                f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; expected language-model, vision-tower or "
                f"projector names; pass unknown='other' to accept them as module 'other'"
            )
        other = TensorRole("other", "other")
        roles_t = tuple(r or other for r in roles)
        num_layers = _check_layers(config, names, roles_t, source or "checkpoint")
        return cls(family, num_layers, names, source, unknown, roles_t)

    def role(self, name: str) -> TensorRole:
        """Role of a tensor of this checkpoint (or of any name, classified under this layout's policy)."""
        known = self._by_name.get(name)
        if known is not None:
            return known
        got = classify(name)
        if got is None:
            if self.unknown == "error":
                raise ValueError(
                    f"{self.source or 'checkpoint'} ({self.family}): tensor {name!r} has no known "
                    "role (not a language-model, vision-tower or projector name)"
                )
            return TensorRole("other", "other")
        return got

    def lm_key(self, name: str) -> tuple[int | None, str] | None:
        """(layer, sub) of a language-model tensor, shared by an MLLM and its base LLM: (3, 'mlp.up_proj.weight'),
        (None, 'embed_tokens.weight'), (None, 'norm.weight'), (None, 'lm_head.weight'); None for the rest."""
        r = self.role(name)
        return (r.layer, r.sub) if r.module == "language_model" else None


def _check_layers(config: Mapping, names: Sequence[str], roles: Sequence[TensorRole], source: str) -> int:
    """LM layer count from config (text_config or top level), cross-checked with the names: a missing or extra
    decoder layer is a broken checkpoint or a wrong config."""
    found = sorted({r.layer for r in roles if r.kind == "layer"})
    text = _text_config(config)
    declared = next((text[k] for k in LAYER_COUNT_KEYS if k in text), None)
    if declared is None:
        return found[-1] + 1 if found else 0
    if not isinstance(declared, int) or declared < 0:
        raise ValueError(f"{source}: config num_hidden_layers = {declared!r}, expected a non-negative integer")
    if found and found != list(range(declared)):
        missing = sorted(set(range(declared)) - set(found))
        extra = [i for i in found if i >= declared]
        raise ValueError(
            f"{source}: config says {declared} language-model layers but the tensors have "
            f"missing layers {missing[:8]} / extra layers {extra[:8]}"
        )
    return declared


# --------------------------------------------------------------------------------------------------------------
# PlaM: which tensors of a decoder layer are targeted, and the MLLM <-> base-LLM pairing
# --------------------------------------------------------------------------------------------------------------

_QKVO = frozenset(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias"))
_BUFFERS = ("rotary_emb.",)  # old checkpoints stored RoPE inv_freq per layer: not a weight
TARGET_GROUPS = ("qkvo", "attn", "mlp", "norms", "all")


def _in_group(group: str, sub: str) -> bool:
    if any(b in sub for b in _BUFFERS):
        return False
    if group == "qkvo":
        return sub in _QKVO
    if group == "attn":
        return sub.startswith("self_attn.")
    if group == "mlp":
        return sub.startswith(("mlp.", "block_sparse_moe."))
    if group == "norms":  # every normalisation in the layer, q_norm / k_norm included
        module = sub.rsplit(".", 1)[0]
        return module.endswith(("norm", "layernorm"))
    return group == "all"


@dataclass(frozen=True)
class TargetSet:
    """Which sub-modules of an LM decoder layer a PlaM merge touches: named groups (qkvo = q/k/v/o projection
    weights and biases; attn = everything under self_attn, i.e. qkvo + q_norm/k_norm; mlp; norms = every norm of
    the layer; all) and/or exact subs ('self_attn.q_proj.weight'). Callable on a sub; frozen so it ships to Ray."""

    groups: tuple[str, ...] = ()
    subs: tuple[str, ...] = ()

    def __call__(self, sub: str | None) -> bool:
        if sub is None:
            return False
        return sub in self.subs or any(_in_group(g, sub) for g in self.groups)


def targets_for(spec: str | Sequence[str]) -> TargetSet:
    """A TargetSet from 'qkvo' | 'attn' | 'mlp' | 'norms' | 'all', or a list of those and exact sub names."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError(f"PlaM targets: empty list; expected some of {', '.join(TARGET_GROUPS)} or sub names")
    groups, subs = [], []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"PlaM target {item!r}: expected a string")
        if item in TARGET_GROUPS:
            groups.append(item)
        elif "." in item:  # an exact sub such as self_attn.q_proj.weight
            subs.append(item)
        else:
            raise ValueError(
                f"PlaM target {item!r}: expected one of {', '.join(TARGET_GROUPS)} or a tensor sub "
                "name such as 'self_attn.q_proj.weight'"
            )
    return TargetSet(tuple(dict.fromkeys(groups)), tuple(dict.fromkeys(subs)))


def _label(layout: Layout, what: str) -> str:
    return f"{what} {layout.source or '(unnamed)'} ({layout.family})"


def _check_pairable(mllm: Layout, base: Layout) -> None:
    if not mllm.is_mllm:
        raise ValueError(
            f"{_label(mllm, 'MLLM')} is not a multimodal model; expected one of {', '.join(MLLM_FAMILIES)}"
        )
    if base.is_mllm:
        raise ValueError(
            f"{_label(base, 'base')} is a multimodal model; expected the base LLM of {_label(mllm, 'MLLM')}"
        )
    allowed = BASE_FAMILIES[mllm.family]
    if base.family != "llm" and base.family not in allowed:
        raise ValueError(
            f"{_label(base, 'base')} is a {base.family} LLM, but {_label(mllm, 'MLLM')}'s language "
            f"model is a {' / '.join(allowed)}; pass the base LLM this MLLM was trained from"
        )
    if mllm.num_layers != base.num_layers:
        raise ValueError(
            f"{_label(mllm, 'MLLM')} has {mllm.num_layers} language-model layers but "
            f"{_label(base, 'base')} has {base.num_layers}"
        )


def map_lm_tensors(mllm: Layout, base: Layout) -> dict[str, str]:
    """MLLM language-model tensor name -> base-LLM tensor name, paired by (layer, sub) whatever the on-disk
    naming (legacy or current) of either side. Tensors without a counterpart are left out: `check_lm_pairs`
    decides which absences are errors."""
    _check_pairable(mllm, base)
    base_by_key: dict = {}
    for n in base.names:
        key = base.lm_key(n)
        if key is not None:
            base_by_key[key] = n
    out = {}
    for n in mllm.names:
        key = mllm.lm_key(n)
        if key is not None and key in base_by_key:
            out[n] = base_by_key[key]
    return out


@dataclass(frozen=True)
class LmPairing:
    """The checked PlaM pairs (targeted MLLM tensor, base tensor), in MLLM name order, and notes that are not
    errors (vocabulary-size differences of embed / lm_head, which PlaM copies from the MLLM anyway)."""

    pairs: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)


def check_lm_pairs(
    mllm: Layout,
    base: Layout,
    mllm_shapes: Mapping[str, Sequence[int]],
    base_shapes: Mapping[str, Sequence[int]],
    *,
    targets: TargetSet | str | Sequence[str] = "qkvo",
    layers: Iterable[int] | None = None,
) -> LmPairing:
    """Pair every targeted MLLM decoder-layer tensor (layer in `layers`, default all; sub in `targets`) with its
    base tensor. A targeted tensor missing in the base, or of another shape, is a ValueError naming both models
    and tensors (never a silent skip); so is a layer outside the model or a target that matches nothing."""
    tset = targets if isinstance(targets, TargetSet) else targets_for(targets)
    mapping = map_lm_tensors(mllm, base)
    wanted = set(range(mllm.num_layers)) if layers is None else set(layers)
    outside = sorted(i for i in wanted if not 0 <= i < mllm.num_layers)
    if outside:
        raise ValueError(f"PlaM layers {outside}: {_label(mllm, 'MLLM')} has layers 0..{mllm.num_layers - 1}")
    pairs, missing, mismatch = [], [], []
    for n in mllm.names:
        r = mllm.role(n)
        if r.kind != "layer" or r.layer not in wanted or not tset(r.sub):
            continue
        b = mapping.get(n)
        if b is None:
            missing.append(n)
        elif tuple(mllm_shapes[n]) != tuple(base_shapes[b]):
            mismatch.append(f"{n} {tuple(mllm_shapes[n])} vs {b} {tuple(base_shapes[b])}")
        else:
            pairs.append((n, b))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} targeted tensor(s) missing in {_label(base, 'base')}: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
        )
    if mismatch:
        problems.append(
            f"{len(mismatch)} shape mismatch(es) between {_label(mllm, 'MLLM')} and "
            f"{_label(base, 'base')}: {'; '.join(mismatch[:4])}{' ...' if len(mismatch) > 4 else ''}"
        )
    if problems:
        raise ValueError("PlaM pairing failed: " + " | ".join(problems))
    if wanted and not pairs:
        raise ValueError(
            f"PlaM targets {tset} match no tensor of layers {sorted(wanted)[:8]} in {_label(mllm, 'MLLM')}"
        )
    return LmPairing(tuple(pairs), _vocab_notes(mllm, base, mapping, mllm_shapes, base_shapes))


def _vocab_notes(mllm: Layout, base: Layout, mapping: Mapping[str, str], mllm_shapes, base_shapes) -> tuple:
    notes = []
    for n, b in mapping.items():
        r = mllm.role(n)
        if r.kind in ("embed", "lm_head") and tuple(mllm_shapes[n]) != tuple(base_shapes[b]):
            notes.append(
                f"{r.kind}: {_label(mllm, 'MLLM')} {n} {tuple(mllm_shapes[n])} vs {_label(base, 'base')} "
                f"{b} {tuple(base_shapes[b])} (vocabulary differs; PlaM keeps the MLLM's)"
            )
    return tuple(notes)
