"""Figures of the probe: the cut-layer curve with its stages and CI (probe.png), attention-focus heat maps."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shardmerge.engine.probe.plateau import Plateau

_STAGE_COLORS = {"early": "#d9534f", "mid": "#f0ad4e", "late": "#5cb85c"}
_STAGE_NAMES = {"early": "early-modal separation", "mid": "mid-modal alignment", "late": "late-modal degradation"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(
    path: Path, pooled: Plateau, per_bench: Mapping[str, Plateau], *, metric: str, title: str | None = None
) -> Path:
    """m(c) of the pooled samples with its bootstrap band, the three stages shaded, c* and its CI marked;
    right panel: the normalised curves p(c) of every benchmark."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    cuts = np.array(pooled.cuts)
    for name in ("early", "mid", "late"):
        span = getattr(pooled, name)
        if span is None:
            continue
        for a in (ax, ax_p):
            a.axvspan(
                span[0] - 0.5,
                span[1] + 0.5,
                color=_STAGE_COLORS[name],
                alpha=0.15,
                label=_STAGE_NAMES[name] if a is ax else None,
            )
    lo, hi = np.array(pooled.curve_ci).T
    ax.fill_between(cuts, lo, hi, color="#337ab7", alpha=0.25, label="95% bootstrap CI")
    ax.plot(cuts, pooled.curve, "o-", color="#337ab7", ms=3, label=f"all ({pooled.n_samples} samples)")
    if pooled.plateau_start is not None:
        for a in (ax, ax_p):
            a.axvline(pooled.plateau_start, color="k", ls="--", lw=1)
        if pooled.plateau_start_ci is not None:
            lo_c, hi_c = pooled.plateau_start_ci
            ax.axvspan(lo_c - 0.1, hi_c + 0.1, ymin=0, ymax=0.04, color="k", alpha=0.6, label="c* 95% CI")
    ax.set_xlabel("cut layer c (image keys blocked in layers c..L-1)")
    ax.set_ylabel(metric)
    star = "none" if pooled.plateau_start is None else f"{pooled.plateau_start} (CI {pooled.plateau_start_ci})"
    ax.set_title(title or f"vision-token-masking probe, plateau start c* = {star}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    for name, res in sorted(per_bench.items()):
        ax_p.plot(res.cuts, res.normalized, "o-", ms=2, label=name + (" (no vision gap!)" if res.warning else ""))
    p_lo, p_hi = np.array(pooled.normalized_ci, dtype=float).T
    ax_p.fill_between(cuts, p_lo, p_hi, color="k", alpha=0.12, label="pooled 95% CI")
    ax_p.plot(cuts, pooled.normalized, "k-", lw=2, label="pooled")
    ax_p.set_xlabel("cut layer c")
    ax_p.set_ylabel("p(c) = (m(c) - m(0)) / (m(L) - m(0))")
    if not np.isfinite(np.asarray(pooled.normalized, dtype=float)).any():  # m(L) == m(0): p(c) is undefined
        ax_p.set_xlim(cuts.min() - 0.5, cuts.max() + 0.5)
        ax_p.set_ylim(-0.05, 1.05)
        ax_p.text(
            0.5,
            0.5,
            "p(c) undefined:\nm(L) = m(0), masking the image changes nothing",
            transform=ax_p.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            color="#a94442",
        )
    ax_p.legend(fontsize=7, loc="best")
    for a in (ax, ax_p):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if pooled.warning:
        fig.text(0.01, 0.01, textwrap.fill("WARNING: " + pooled.warning, 180), fontsize=7, color="#a94442")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_focus(path: Path, image_bytes: bytes, per_token, grid: tuple, mass, entropy, *, sample: str) -> Path:
    """The sample's image with the layer-averaged attention on image tokens overlaid as a heat map (left), and
    the per-layer image mass and entropy (right)."""
    from PIL import Image

    plt = _pyplot()
    img = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    heat = np.asarray(per_token, dtype=np.float64).mean(axis=0).reshape(grid)
    fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(10, 4))
    ax_img.imshow(img)
    ax_img.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest")
    ax_img.set_title(f"sample {sample}: attention on image tokens (mean over layers)", fontsize=9)
    ax_img.axis("off")
    layers = np.arange(len(mass))
    ax_curve.plot(layers, mass, "o-", label="mass on image tokens")
    ax_curve.set_xlabel("decoder layer")
    ax_curve.set_ylabel("attention mass")
    ax_e = ax_curve.twinx()
    ax_e.plot(layers, entropy, "s--", color="#d9534f", label="entropy over image tokens (nats)")
    ax_e.set_ylabel("entropy (nats)")
    ax_e.ticklabel_format(axis="y", useOffset=False)
    from matplotlib.ticker import MaxNLocator

    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.legend(loc="upper left", fontsize=7)
    ax_e.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
