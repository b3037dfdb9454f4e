"""Figures of the probe: the cut-layer curve with its stages and CI (probe.png), attention-focus heat maps.

Read at a glance: the title says model, benchmark(s), metric and sample count; legends sit outside the data (below
each panel); heat maps have a colour bar. When the probe finds that masking the image changes nothing beyond noise
(the pooled curve's warning), the stages and c* mean nothing, so none are drawn: the panel says so in large text.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from shardmerge.engine.probe.plateau import Plateau

_STAGE_COLORS = {"early": "#d9534f", "mid": "#f0ad4e", "late": "#5cb85c"}
_STAGE_NAMES = {"early": "early-modal separation", "mid": "mid-modal alignment", "late": "late-modal degradation"}
NOT_MEANINGFUL = "NOT MEANINGFUL"
_WARN = "#a94442"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(ax, ncol: int = 2) -> None:
    """The legend under the axes (outside the data), if the axes has labelled artists."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False
        )


def _names(items: Sequence[str], n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" +{len(items) - n} more" if len(items) > n else "")


def curve_title(pooled: Plateau, per_bench: Mapping, *, metric: str, model: str | None) -> str:
    star = "none" if pooled.plateau_start is None else f"{pooled.plateau_start}"
    if pooled.plateau_start is not None and pooled.plateau_start_ci is not None:
        star += f" (95% CI {pooled.plateau_start_ci[0]}..{pooled.plateau_start_ci[1]})"
    if pooled.warning:
        star = "not meaningful"
    who = Path(model).name if model else "model"
    return (
        f"{who} on {_names(sorted(per_bench)) or 'the benchmark'}: metric {metric}, {pooled.n_samples} samples; "
        f"plateau start c* = {star}"
    )


def curve_figure(
    pooled: Plateau, per_bench: Mapping[str, Plateau], *, metric: str, model: str | None = None, title=None
):
    """The figure of plot_curve (returned open, for tests to inspect; plot_curve saves and closes it)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    meaningful = pooled.warning is None
    fig, (ax, ax_p) = plt.subplots(1, 2, figsize=(12, 5.4), layout="constrained")
    cuts = np.array(pooled.cuts)
    if meaningful:
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
    if meaningful and pooled.plateau_start is not None:
        for a in (ax, ax_p):
            a.axvline(pooled.plateau_start, color="k", ls="--", lw=1, label="c*" if a is ax else None)
        if pooled.plateau_start_ci is not None:
            lo_c, hi_c = pooled.plateau_start_ci
            ax.axvspan(lo_c - 0.1, hi_c + 0.1, ymin=0, ymax=0.04, color="k", alpha=0.6, label="c* 95% CI")
    ax.set_xlabel("cut layer c (image keys blocked in layers c..L-1)")
    ax.set_ylabel(metric)
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
            fontsize=12,
            color=_WARN,
        )
    if not meaningful:
        ax.text(
            0.5,
            0.5,
            f"{NOT_MEANINGFUL}\n" + textwrap.fill(pooled.warning, 48),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=11,
            color=_WARN,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": _WARN},
            fontweight="bold",
        )
    for a in (ax, ax_p):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(ax)
    _legend_below(ax_p)
    fig.suptitle(title or curve_title(pooled, per_bench, metric=metric, model=model), fontsize=10)
    return fig


def plot_curve(
    path: Path,
    pooled: Plateau,
    per_bench: Mapping[str, Plateau],
    *,
    metric: str,
    title: str | None = None,
    model: str | None = None,
) -> Path:
    """m(c) of the pooled samples with its bootstrap band, the three stages shaded, c* and its CI marked (only
    when the curve is meaningful); right panel: the normalised curves p(c) of every benchmark."""
    fig = curve_figure(pooled, per_bench, metric=metric, model=model, title=title)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def focus_figure(
    image_bytes: bytes,
    per_token,
    grid: tuple,
    mass,
    entropy,
    *,
    sample: str,
    model: str | None = None,
    benchmark: str | None = None,
):
    """The figure of plot_focus (returned open, for tests)."""
    from PIL import Image

    plt = _pyplot()
    img = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    heat = np.asarray(per_token, dtype=np.float64).mean(axis=0).reshape(grid)
    fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    ax_img.imshow(img)
    im = ax_img.imshow(
        heat, cmap="inferno", alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest"
    )
    fig.colorbar(im, ax=ax_img, shrink=0.85, label="attention weight (mean over layers)")
    ax_img.set_title(f"sample {sample}: attention on image tokens", fontsize=9)
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
    h1, l1 = ax_curve.get_legend_handles_labels()
    h2, l2 = ax_e.get_legend_handles_labels()
    ax_curve.legend(
        h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
    )
    who = Path(model).name if model else "model"
    fig.suptitle(f"{who}, {benchmark or 'benchmark'} sample {sample}: attention focus per layer", fontsize=10)
    return fig


def plot_focus(
    path: Path,
    image_bytes: bytes,
    per_token,
    grid: tuple,
    mass,
    entropy,
    *,
    sample: str,
    model: str | None = None,
    benchmark: str | None = None,
) -> Path:
    """The sample's image with the layer-averaged attention on image tokens overlaid as a heat map with its colour
    bar (left), and the per-layer image mass and entropy (right)."""
    fig = focus_figure(image_bytes, per_token, grid, mass, entropy, sample=sample, model=model, benchmark=benchmark)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return Path(path)
