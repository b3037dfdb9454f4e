"""Attention-focus analysis: how much the answer position looks at the image, layer by layer.

For the answer position (end of the prompt) and every decoder layer: the attention mass on image tokens (averaged
over heads) and the entropy of the attention restricted to image tokens (renormalised; in nats, averaged over
heads). Low entropy = focused on a few image regions. Computed from the probabilities the model itself uses (the
probe attention records the last query row), so it works with SDPA and for any architecture the probe supports.
Comparing two models (before/after a merge) is `focus_delta`; `image_grid` gives the token layout for heat maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardmerge.engine.probe import attention
from shardmerge.engine.probe.core import LMParts, ProbeInputs


@dataclass(frozen=True)
class Focus:
    """Per-layer attention focus of one sample at its answer position."""

    mass: tuple  # per layer: attention mass on image tokens, in [0, 1]
    entropy: tuple  # per layer: entropy (nats) over image tokens of the renormalised attention
    per_token: torch.Tensor  # (L, n_image_tokens): head-averaged attention on each image token


def focus_from_rows(rows: dict, image_mask: torch.Tensor, num_layers: int) -> Focus:
    """Focus from recorded last-row probabilities {layer: (1, heads, K)}; K >= number of prompt positions."""
    missing = [i for i in range(num_layers) if i not in rows]
    if missing:
        raise RuntimeError(f"attention focus: layers {missing} recorded nothing; expected every decoder layer")
    mass, entropy, per_token = [], [], []
    for layer in range(num_layers):
        probs = rows[layer][0, :, : image_mask.shape[0]].double()  # (heads, S)
        img = probs[:, image_mask]
        head_mass = img.sum(dim=-1)
        q = img / head_mass.clamp_min(1e-30)[:, None]
        head_entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(dim=-1)
        mass.append(float(head_mass.mean()))
        entropy.append(float(head_entropy.mean()))
        per_token.append(img.mean(dim=0).float())
    return Focus(tuple(mass), tuple(entropy), torch.stack(per_token))


@torch.no_grad()
def attention_focus(model, parts: LMParts, inputs: ProbeInputs, cut: int | None = None) -> Focus:
    """Focus of the unmasked model (cut=None) or of the model masked from `cut` on."""
    recorder = attention.AttentionRecorder()
    c = parts.num_layers if cut is None else cut
    with attention.masking(c, inputs.image_mask, recorder=recorder):
        model(**inputs.model_kwargs, use_cache=False)
    return focus_from_rows(recorder.rows, inputs.image_mask, parts.num_layers)


def focus_delta(before: Focus, after: Focus) -> dict:
    """Per-layer change of mass and entropy (after - before), e.g. across a merge."""
    if len(before.mass) != len(after.mass):
        raise ValueError(f"focus of {len(before.mass)} vs {len(after.mass)} layers; compare models of equal depth")
    return dict(
        mass=[a - b for a, b in zip(after.mass, before.mass)],
        entropy=[a - b for a, b in zip(after.entropy, before.entropy)],
    )


def image_grid(inputs: ProbeInputs, config) -> tuple[int, int]:
    """(rows, cols) of the image tokens: Qwen's merged patch grid, a square for LLaVA, else one row."""
    n = int(inputs.image_mask.sum())
    grid = inputs.model_kwargs.get("image_grid_thw")
    if grid is not None:
        vision = getattr(config, "vision_config", None)
        merge = getattr(vision, "spatial_merge_size", 2)
        t, h, w = (int(x) for x in grid[0])
        if t * (h // merge) * (w // merge) == n:
            return h // merge, t * (w // merge)
    side = int(math.isqrt(n))
    return (side, side) if side * side == n else (1, n)
