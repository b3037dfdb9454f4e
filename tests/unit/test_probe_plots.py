"""probe.png and the focus heat map read at a glance: no stages or c* drawn when the probe says the curve is not
meaningful (large text says so instead); legends outside the data; a colour bar on the heat map; titles naming
model, benchmark, metric and sample count. The PNGs are also written under the test's tmp dir to look at."""

from __future__ import annotations

import numpy as np
import pytest

from shardmerge.engine.probe import fixtures, plateau, plots

CUTS = list(range(9))


def _meaningful() -> plateau.Plateau:
    rng = np.random.default_rng(0)
    step = (np.array(CUTS) >= 4).astype(float)  # the image matters up to layer 4: a clear plateau from c* = 4
    values = np.clip(step[None] * 0.9 + rng.normal(0, 0.05, (40, len(CUTS))), 0, 1)
    return plateau.find_plateau(values, CUTS, n_boot=200)


def _flat() -> plateau.Plateau:
    rng = np.random.default_rng(1)
    return plateau.find_plateau(rng.normal(-2.0, 0.3, (30, len(CUTS))), CUTS, n_boot=200)  # noise, no vision gap


def _stage_spans(fig) -> list:
    stage_colors = {
        tuple(round(v, 3) for v in __import__("matplotlib").colors.to_rgb(c)) for c in plots._STAGE_COLORS.values()
    }
    return [
        p for ax in fig.axes for p in ax.patches if tuple(round(v, 3) for v in p.get_facecolor()[:3]) in stage_colors
    ]


def _vlines(fig) -> list:
    return [ln for ax in fig.axes for ln in ax.lines if ln.get_linestyle() == "--" and len(set(ln.get_xdata())) == 1]


def _texts(fig) -> list:
    return [t for ax in fig.axes for t in ax.texts]


def _outside(fig) -> None:
    """Every legend's box lies outside its axes' data area."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        box, data = leg.get_window_extent(r), ax.get_window_extent(r)
        assert box.y1 <= data.y0 + 1, (box, data)  # below the axes


def test_meaningful_curve_shows_stages_and_c_star(tmp_path):
    pooled = _meaningful()
    assert pooled.warning is None and pooled.plateau_start is not None
    fig = plots.curve_figure(pooled, {"mmstar": pooled}, metric="accuracy", model="/m/Qwen2.5-VL-7B")
    assert _stage_spans(fig) and _vlines(fig)
    assert not any(plots.NOT_MEANINGFUL in t.get_text() for t in _texts(fig))
    title = fig._suptitle.get_text()
    for part in (
        "Qwen2.5-VL-7B",
        "mmstar",
        "metric accuracy",
        f"{pooled.n_samples} samples",
        f"c* = {pooled.plateau_start}",
    ):
        assert part in title, title
    _outside(fig)
    fig.savefig(tmp_path / "probe_meaningful.png", dpi=80)


def test_not_meaningful_curve_has_no_stages_no_c_star_and_says_so(tmp_path):
    pooled = _flat()
    assert pooled.warning and "not meaningful" in pooled.warning
    fig = plots.curve_figure(pooled, {"bench": pooled}, metric="logprob", model="m")
    assert _stage_spans(fig) == [] and _vlines(fig) == []
    big = [t for t in _texts(fig) if plots.NOT_MEANINGFUL in t.get_text()]
    assert big and big[0].get_fontsize() >= 11
    assert "c* = not meaningful" in fig._suptitle.get_text() and "metric logprob" in fig._suptitle.get_text()
    _outside(fig)
    plots.plot_curve(tmp_path / "probe_flat.png", pooled, {"bench": pooled}, metric="logprob", model="m")
    assert (tmp_path / "probe_flat.png").stat().st_size > 10_000


def test_focus_heat_map_has_a_colour_bar_and_an_outside_legend(tmp_path):
    grid = (4, 4)
    per_token = np.random.default_rng(0).random((3, 16))
    fig = plots.focus_figure(
        fixtures.png_bytes(0, (32, 32)),
        per_token,
        grid,
        [0.2, 0.3, 0.4],
        [1.0, 0.9, 0.8],
        sample="q3",
        model="m",
        benchmark="mmb",
    )
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "attention" in bars[0].get_ylabel()
    assert "mmb sample q3" in fig._suptitle.get_text()
    _outside(fig)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels == ["mass on image tokens", "entropy over image tokens (nats)"]  # one legend for both y axes
    fig.savefig(tmp_path / "focus.png", dpi=80)


@pytest.fixture(autouse=True)
def _close():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
