"""Attention-focus analysis: how much the answer position looks at the image, layer by layer.

For the answer position (end of the prompt) and every decoder layer: the attention mass on image tokens (averaged
over heads) and the entropy of the attention restricted to image tokens (renormalised; in nats, averaged over
heads). Low entropy = focused on a few image regions. Computed from the probabilities the model itself uses (the
probe attention records the last query row), so it works with SDPA and for any architecture the probe supports.
Comparing two models (before/after a merge) is `focus_delta`; `image_grid` gives the token layout for heat maps.

Telling relevance from concentration:
- `weighted_entropy`: per-head entropy weighted by the head's image mass (a head that barely looks at the image and
  is diffuse there says little; the plain mean over heads counts it fully).
- visual attention sinks: a few image tokens with very large hidden-state norms soak up attention whatever the
  question (`sink_tokens`: norm > SINK_FACTOR x the median image-token norm in some decoder layer's input);
  `Focus.without(sinks)` recomputes mass/entropy with them removed.
- `box_focus`: with a region box of the question, the share of the image attention inside the box and whether the
  most-attended image token lies in it (pointing game).
- `paired_bootstrap`: the mean before/after difference of a per-sample quantity with a percentile interval,
  resampling question groups and keeping each sample's pair together.
- `range_means`: means over the merged layer range and over the other layers, reported separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shardmerge.engine.probe import attention
from shardmerge.engine.probe.core import LMParts, ProbeInputs


@dataclass(frozen=True)
class Focus:
    """Per-layer attention focus of one sample at its answer position."""

    mass: tuple  # per layer: attention mass on image tokens, in [0, 1]
    entropy: tuple  # per layer: entropy (nats) over image tokens of the renormalised attention
    per_token: torch.Tensor  # (L, n_image_tokens): head-averaged attention on each image token
    weighted_entropy: tuple = ()  # per layer: sum_h mass_h * entropy_h / sum_h mass_h
    per_head: torch.Tensor | None = None  # (L, heads, n_image_tokens): attention of each head on each image token
    sinks: tuple = ()  # indices (among the image tokens) of visual attention sinks, when computed

    def without(self, tokens: Sequence[int]) -> Focus:
        """The same focus with the given image tokens (e.g. sinks) removed before mass and entropy."""
        if self.per_head is None:
            raise ValueError("Focus.without needs the per-head attention (from focus_from_rows)")
        keep = torch.ones(self.per_head.shape[-1], dtype=torch.bool)
        keep[list(tokens)] = False
        return _from_heads(self.per_head[..., keep].double(), sinks=())


def _from_heads(img: torch.Tensor, sinks: tuple) -> Focus:
    """img: (L, heads, n) attention of each head on each image token."""
    head_mass = img.sum(dim=-1)  # (L, heads)
    q = img / head_mass.clamp_min(1e-30)[..., None]
    head_entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(dim=-1)
    weighted = (head_mass * head_entropy).sum(-1) / head_mass.sum(-1).clamp_min(1e-30)
    return Focus(
        tuple(float(v) for v in head_mass.mean(-1)),
        tuple(float(v) for v in head_entropy.mean(-1)),
        img.mean(dim=1).float(),
        tuple(float(v) for v in weighted),
        img.float(),
        sinks,
    )


def focus_from_rows(rows: dict, image_mask: torch.Tensor, num_layers: int) -> Focus:
    """Focus from recorded last-row probabilities {layer: (1, heads, K)}; K >= number of prompt positions."""
    missing = [i for i in range(num_layers) if i not in rows]
    if missing:
        raise RuntimeError(f"attention focus: layers {missing} recorded nothing; expected every decoder layer")
    img = [rows[layer][0, :, : image_mask.shape[0]].double()[:, image_mask] for layer in range(num_layers)]
    return _from_heads(torch.stack(img), sinks=())


SINK_FACTOR = 4.0


def sink_tokens(hidden_in: Sequence[torch.Tensor], image_mask: torch.Tensor, factor: float = SINK_FACTOR) -> tuple:
    """Image tokens (indices among the image tokens) whose hidden-state norm entering some decoder layer exceeds
    `factor` x that layer's median image-token norm: the visual attention sinks."""
    if factor <= 1:
        raise ValueError(f"sink factor must be > 1, got {factor}")
    sinks: set = set()
    for h in hidden_in:
        norms = h[0][image_mask.to(h.device)].float().norm(dim=-1).cpu()
        sinks |= set(torch.nonzero(norms > factor * norms.median()).flatten().tolist())
    return tuple(sorted(sinks))


@torch.no_grad()
def attention_focus(
    model, parts: LMParts, inputs: ProbeInputs, cut: int | None = None, *, sink_factor: float = SINK_FACTOR
) -> Focus:
    """Focus of the unmasked model (cut=None) or of the model masked from `cut` on, with its sink tokens found
    from the hidden states entering each decoder layer."""
    recorder = attention.AttentionRecorder()
    c = parts.num_layers if cut is None else cut
    hidden: dict = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: hidden.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(parts.layers)
    ]
    try:
        with attention.masking(c, inputs.image_mask, recorder=recorder):
            model(**inputs.model_kwargs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    f = focus_from_rows(recorder.rows, inputs.image_mask, parts.num_layers)
    sinks = sink_tokens([hidden[i] for i in sorted(hidden)], inputs.image_mask, sink_factor)
    return Focus(f.mass, f.entropy, f.per_token, f.weighted_entropy, f.per_head, sinks)


def box_focus(per_token: torch.Tensor, grid: tuple, image_size: tuple, box: Sequence[float]) -> dict:
    """Attention inside a region box, per layer: `inside` = share of the image attention on tokens whose cell
    centre lies in the box, `hit` = the most-attended token does (pointing game).

    per_token (L, n) head-averaged attention on the image tokens laid out row-major on `grid` (rows, cols) over
    the whole image; image_size (width, height) and box (x0, y0, x1, y1) in the image's pixels."""
    rows, cols = grid
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"bbox {list(box)} is not x0 < x1, y0 < y1 inside the {width}x{height} image")
    if per_token.shape[-1] != rows * cols:
        raise ValueError(f"{per_token.shape[-1]} image tokens do not fill the {rows}x{cols} grid")
    cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * width / cols
    cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * height / rows
    inside = ((cy[:, None] >= y0) & (cy[:, None] <= y1) & (cx[None, :] >= x0) & (cx[None, :] <= x1)).flatten()
    if not bool(inside.any()):
        raise ValueError(f"bbox {list(box)} contains no image-token centre of the {rows}x{cols} grid")
    att = per_token.double()
    share = att[:, inside].sum(-1) / att.sum(-1).clamp_min(1e-30)
    hit = inside[att.argmax(-1)]
    return {"inside": [float(v) for v in share], "hit": [bool(v) for v in hit]}


def paired_bootstrap(
    before: Sequence[float],
    after: Sequence[float],
    groups: Sequence | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Mean of after - before over paired samples with a percentile interval from resampling whole groups
    (question groups / images; default: each sample its own group)."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired samples need two equal-length 1-D sequences, got {b.shape} and {a.shape}")
    diff = a - b
    labels = list(range(len(diff))) if groups is None else list(groups)
    if len(labels) != len(diff):
        raise ValueError(f"{len(labels)} group labels for {len(diff)} pairs")
    index: dict = {}
    for i, g in enumerate(labels):
        index.setdefault(g, []).append(i)
    members = list(index.values())
    sums = np.array([diff[m].sum() for m in members])
    counts = np.array([len(m) for m in members], dtype=np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(members), size=(n_boot, len(members)))
    boots = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(diff.mean()), "ci": [float(lo), float(hi)], "pairs": len(diff), "groups": len(members)}


def range_means(values: Sequence[float], layers: tuple) -> dict:
    """Mean of a per-layer quantity over the merged layers (start..end inclusive) and over the other layers."""
    start, end = layers
    v = np.asarray(values, dtype=np.float64)
    if not 0 <= start <= end < len(v):
        raise ValueError(f"layer range {start}..{end} outside 0..{len(v) - 1}")
    inside = np.zeros(len(v), dtype=bool)
    inside[start : end + 1] = True
    return {
        "merged": float(v[inside].mean()),
        "others": float(v[~inside].mean()) if (~inside).any() else None,
        "layers": [start, end],
    }


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
