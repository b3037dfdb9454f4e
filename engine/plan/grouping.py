"""Work-unit grouping and output order of tensor names, from their layout roles (shardmerge.engine.layout.roles).

Every form orders its items by `group_key`, and the builder makes one work unit per group: embeddings, one unit
per language-model decoder layer, final norm and unknown tensors ("other"), lm_head, the vision tower's
non-block tensors, one unit per vision block, the projector. Names the layout does not know fall back to the
generic numbered-block rule (`.layers.i.`, `.blocks.i.`, `.h.i.`), so LLMs of any family still plan.
"""

from __future__ import annotations

import re

from shardmerge.engine.io.checkpoint import Checkpoint
from shardmerge.engine.layout.roles import Layout, TensorRole, classify

NUMBERED_BLOCK = re.compile(r"^(.*?)\.(layers|blocks|h)\.(\d+)\.")


def regex_layers(names) -> int:
    """Decoder layers by the numbered-block rule alone (`.layers.i.`): 1 + the largest i, 0 without any."""
    idx = [int(m.group(3)) for n in names if (m := NUMBERED_BLOCK.match(n)) and m.group(2) == "layers"]
    return max(idx) + 1 if idx else 0


def layout_of(ckpt: Checkpoint) -> Layout:
    """Roles of a checkpoint's tensors (shardmerge.engine.layout.roles); names the layout does not know get module "other" and
    are grouped by the generic numbered-block rule, so LLMs of any family still plan."""
    return Layout.from_config(ckpt.config, ckpt.tensors, source=ckpt.ref, unknown="other")


def num_layers_of(ckpt: Checkpoint) -> int:
    """Language-model decoder layers: config (text_config first), cross-checked with the names by the layout."""
    return layout_of(ckpt).num_layers or regex_layers(ckpt.tensors)


def _numbered_group(name: str) -> tuple:
    """Grouping of names without a known role: numbered blocks (`.layers.i.`, `.blocks.i.`, `.h.i.`), embeddings
    and head alone, the rest together."""
    m = NUMBERED_BLOCK.match(name)
    if m:
        return (1, m.group(1) + "." + m.group(2), int(m.group(3)))
    if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
        return (0, "embed", 0)
    if name.endswith("lm_head.weight"):
        return (3, "lm_head", 0)
    return (2, "other", 0)


def block_root(name: str, role: TensorRole) -> str:
    """`model.language_model.layers` for `model.language_model.layers.3.mlp.up_proj.weight`."""
    return name[: len(name) - len(role.sub) - 1].rsplit(".", 1)[0]


_ROLE_GROUPS = {
    "embed": (0, "embed", 0),
    "final_norm": (2, "other", 0),
    "lm_head": (3, "lm_head", 0),
    "vision_other": (4, "vision_tower", 0),
    "projector_layer": (6, "projector", 0),
    "projector_other": (6, "projector", 0),
}


def group_key(name: str) -> tuple:
    """Work-unit grouping (and output order) by layout role: embeddings, one unit per LM decoder layer, final norm
    and unknown tensors ("other"), lm_head, the vision tower's non-block tensors, one unit per vision block, the
    projector. For plain LLMs this is the order and grouping the engine has always written."""
    role = classify(name)
    if role is None or role.module == "other":
        return _numbered_group(name)
    if role.kind in ("layer", "vision_block"):
        return (1 if role.kind == "layer" else 5, block_root(name, role), role.layer)
    return _ROLE_GROUPS[role.kind]


def lm_layer(name: str) -> int | None:
    """The language-model decoder layer of a tensor, None for everything else (vision blocks included)."""
    role = classify(name)
    if role is None or role.module == "other":
        m = NUMBERED_BLOCK.match(name)
        return int(m.group(3)) if m and m.group(2) == "layers" and "visual" not in m.group(1) else None
    return role.layer if role.kind == "layer" else None
