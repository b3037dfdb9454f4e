"""Three stages and the plateau of a probe curve, with cluster-bootstrap confidence intervals.

With m(c) the mean metric at cut c and p(c) = (m(c) - m(0)) / (m(L) - m(0)):
  early-modal separation  the cuts 0..e where p stays <= delta (a prefix: p(0) = 0 by definition)
  late-modal degradation  c* .. L, c* = the smallest cut with p(c') >= 1 - epsilon for every c' >= c
  mid-modal alignment     the cuts in between

The rule is applied to the isotonic (monotone, pool-adjacent-violators) fit of m(c) rather than to the raw means:
masking fewer layers never removes information, so the true curve is monotone, and on a monotone curve "every
later cut is above the threshold" is "this cut is". On raw means the rule waits for the *last* noisy dip below
1 - epsilon, so c* drifts up with noise and sample size; the fit pools those dips with their neighbours.

Intervals come from a bootstrap that resamples whole groups (a question with its MMBench circular copies, an image
with its POPE/GQA/MME questions) within each benchmark, so correlated rows are not counted as independent. Pooling
over benchmarks is by default macro (each benchmark weighs the same: its mean curve, then the mean over
benchmarks); `pooling="samples"` weighs every sample the same. The c* interval is the 2.5 / 97.5 % percentile of
the bootstrap c* with integer (cut) endpoints. When the CI of m(L) - m(0) contains 0 the benchmark does not need
the image and the stages mean nothing: the result carries a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CI_LEVEL = 0.95
POOLINGS = ("macro", "samples")


@dataclass(frozen=True)
class Plateau:
    """Stages and plateau of one curve (one benchmark, or all pooled)."""

    cuts: tuple
    n_samples: int
    curve: tuple  # m(c)
    curve_ci: tuple  # ((lo, hi), ...) per cut
    normalized: tuple  # p(c) of the raw means; NaN when m(L) == m(0)
    normalized_ci: tuple
    gap: float  # m(L) - m(0)
    gap_ci: tuple
    early: tuple | None  # (first cut, last cut) of each stage, None when empty
    mid: tuple | None
    late: tuple | None
    plateau_start: int | None  # c*; None when the curve is flat
    plateau_start_ci: tuple | None  # (lo, hi) cuts
    undefined_resamples: int  # bootstrap resamples with a flat fitted curve (no c*)
    warning: str | None
    fitted: tuple = ()  # p(c) of the isotonic fit: what the stage rule reads
    n_groups: int = 0  # resampling units
    pooling: str = "samples"

    def to_json(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def normalize(curve: np.ndarray) -> np.ndarray:
    """p(c) along the last axis; NaN where m(L) == m(0)."""
    gap = curve[..., -1:] - curve[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (curve - curve[..., :1]) / np.where(gap != 0, gap, 1.0), np.nan)


def isotonic(curves: np.ndarray, increasing: bool = True) -> np.ndarray:
    """Least-squares monotone fit of each row (equal weights): fit(c) = max_{i<=c} min_{j>=c} mean(curve[i..j])."""
    y = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    y = y if increasing else -y
    k = y.shape[-1]
    csum = np.concatenate([np.zeros(y.shape[:-1] + (1,)), np.cumsum(y, axis=-1)], axis=-1)
    i, j = np.triu_indices(k)
    means = np.full(y.shape[:-1] + (k, k), np.inf)  # means[i, j] = mean(y[i..j]) for j >= i
    means[..., i, j] = (csum[..., j + 1] - csum[..., i]) / (j - i + 1)
    lowest = np.flip(np.minimum.accumulate(np.flip(means, axis=-1), axis=-1), axis=-1)  # min over j >= c
    lowest[..., np.tril_indices(k, -1)[0], np.tril_indices(k, -1)[1]] = -np.inf  # only i <= c
    out = lowest.max(axis=-2)
    return out if increasing else -out


def plateau_index(p: np.ndarray, epsilon: float) -> np.ndarray:
    """Index (into the cut list) of c* per row of p: smallest i with p[j] >= 1 - eps for all j >= i; -1 if NaN."""
    p = np.atleast_2d(p)
    ok = p >= 1.0 - epsilon
    suffix = np.flip(np.logical_and.accumulate(np.flip(ok, axis=-1), axis=-1), axis=-1)
    first = np.where(suffix.any(axis=-1), suffix.argmax(axis=-1), p.shape[-1] - 1)
    return np.where(np.isnan(p).any(axis=-1), -1, first)


def early_end_index(p: np.ndarray, delta: float) -> int:
    """Index of the last cut of the early stage: the longest prefix with p <= delta (at least cut 0)."""
    above = np.nonzero(~(p <= delta))[0]
    return int(above[0]) - 1 if len(above) else len(p) - 1


def plateau_fit(
    curves: np.ndarray, increasing: bool, epsilon: float, *, wide: float = 0.2, rounds: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """c* index and fitted p(c) per row of `curves` (n, n_cuts); index -1 and NaN where the fit is flat.

    f = isotonic fit (monotone in the point estimate's direction). The plateau level T is the mean of the raw
    curve over the plateau itself, not f(L): the top of an isotonic fit is the largest of the tail averages and
    is biased up by a single high cut, which would push c* to L. Start from the cuts with f >= f(0) + (1 - wide)
    (f(L) - f(0)), then alternate T = mean(m[c*..L]) and c* = first cut with f >= f(0) + (1 - eps)(T - f(0)).
    """
    m = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    m = m if increasing else -m
    f = isotonic(m, True)
    k = m.shape[-1]
    tail = np.flip(np.cumsum(np.flip(m, axis=-1), axis=-1), axis=-1) / np.arange(k, 0, -1)  # mean(m[c..L])
    base, top = f[:, :1], f[:, -1:]
    flat = ((top - base)[:, 0] <= 0) | (m[:, -1] - m[:, 0] <= 0)  # no gain from the image in this direction
    star = np.argmax(f >= base + (1 - wide) * (top - base), axis=-1)
    rows = np.arange(m.shape[0])
    for _ in range(rounds):
        level = tail[rows, star][:, None]
        reached = f >= base + (1 - epsilon) * (level - base)
        star = np.where(reached.any(axis=-1), np.argmax(reached, axis=-1), k - 1)
    level = tail[rows, star][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (f - base) / np.where(level > base, level - base, np.nan)
    p[flat] = np.nan
    return np.where(flat | ~(level[:, 0] > base[:, 0]), -1, star), p


def _interval(samples: np.ndarray, axis: int = 0):
    """Percentile interval ignoring NaN resamples (NaN where every resample is NaN: a flat curve)."""
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    if not np.isnan(samples).any():
        return np.percentile(samples, lo, axis=axis), np.percentile(samples, hi, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are expected for flat curves
        return np.nanpercentile(samples, lo, axis=axis), np.nanpercentile(samples, hi, axis=axis)


def _strata(values: np.ndarray, groups, strata) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stratum (benchmark): per-group metric sums (n_groups, n_cuts) and group sizes (n_groups,)."""
    n = values.shape[0]
    groups = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
    strata = np.zeros(n, dtype=str) if strata is None else np.asarray(strata).astype(str)
    if groups.shape != (n,) or strata.shape != (n,):
        raise ValueError(f"groups and strata need one label per sample ({n}), got {groups.shape} / {strata.shape}")
    out = []
    for s in np.unique(strata):
        rows = strata == s
        labels, inv = np.unique(groups[rows], return_inverse=True)
        sums = np.zeros((len(labels), values.shape[1]))
        np.add.at(sums, inv, values[rows])
        out.append((sums, np.bincount(inv, minlength=len(labels)).astype(float)))
    return out


def _resample_counts(rng, n_groups: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_groups) counts of each group in a resample of n_groups draws with replacement."""
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups)) + np.arange(n_boot)[:, None] * n_groups
    return np.bincount(draws.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(float)


def pooled_curves(parts, weights: list | None = None, pooling: str = "macro") -> np.ndarray:
    """m(c) from per-stratum group sums; `weights[k]` (n_boot, n_groups_k) are bootstrap counts (None: all 1)."""
    curves, total, count = [], 0.0, 0.0
    for k, (sums, sizes) in enumerate(parts):
        w = np.ones((1, len(sizes))) if weights is None else weights[k]
        s, c = w @ sums, (w @ sizes)[:, None]
        curves.append(s / c)
        total, count = total + s, count + c
    return np.mean(curves, axis=0) if pooling == "macro" else total / count


def find_plateau(
    values: np.ndarray,
    cuts: Sequence[int],
    *,
    delta: float = 0.1,
    epsilon: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    groups=None,
    strata=None,
    pooling: str = "macro",
) -> Plateau:
    """Stages and plateau from per-sample metrics `values` (n_samples, n_cuts), cuts ascending from 0 to L.

    `groups` labels the resampling unit of each sample (default: the sample itself), `strata` its benchmark."""
    values = np.asarray(values, dtype=np.float64)
    cuts = [int(c) for c in cuts]
    _validate(values, cuts, delta, epsilon, n_boot, pooling)
    parts = _strata(values, groups, strata)
    curve = pooled_curves(parts, None, pooling)[0]
    rng = np.random.default_rng(seed)
    weights = [_resample_counts(rng, len(sizes), n_boot) for _, sizes in parts]
    boot = pooled_curves(parts, weights, pooling)  # (n_boot, n_cuts)
    gap = float(curve[-1] - curve[0])
    increasing = gap >= 0
    star_arr, fit_arr = plateau_fit(curve[None], increasing, epsilon)
    star, fit = int(star_arr[0]), fit_arr[0]
    boot_star = plateau_fit(boot, increasing, epsilon)[0]
    defined = boot_star >= 0
    gap_lo, gap_hi = _interval(boot[:, -1] - boot[:, 0])
    warning = None
    if gap == 0 or (gap_lo <= 0 <= gap_hi):
        warning = (
            f"m(L) - m(0) = {gap:.4g} with {CI_LEVEL:.0%} CI [{gap_lo:.4g}, {gap_hi:.4g}] includes 0: "
            "masking the image changes nothing beyond noise; this benchmark does not need vision and its "
            "stages are not meaningful"
        )
    star_ci = None
    if defined.any():
        at = np.array([cuts[i] for i in boot_star[defined]])
        q = (1 - CI_LEVEL) / 2 * 100
        star_ci = (int(np.percentile(at, q, method="lower")), int(np.percentile(at, 100 - q, method="higher")))
    p = normalize(curve)
    p_lo, p_hi = _interval(normalize(boot))
    c_lo, c_hi = _interval(boot)
    stages = _stages(fit, cuts, delta, star) if star >= 0 else (None, None, None)
    return Plateau(
        cuts=tuple(cuts),
        n_samples=int(values.shape[0]),
        curve=tuple(curve.tolist()),
        curve_ci=tuple(zip(c_lo.tolist(), c_hi.tolist())),
        normalized=tuple(p.tolist()),
        normalized_ci=tuple(zip(p_lo.tolist(), p_hi.tolist())),
        gap=gap,
        gap_ci=(float(gap_lo), float(gap_hi)),
        early=stages[0],
        mid=stages[1],
        late=stages[2],
        plateau_start=cuts[star] if star >= 0 else None,
        plateau_start_ci=star_ci,
        undefined_resamples=int((~defined).sum()),
        warning=warning,
        fitted=tuple(fit.tolist()),
        n_groups=int(sum(len(s) for _, s in parts)),
        pooling=pooling,
    )


def _stages(p: np.ndarray, cuts: list, delta: float, star: int):
    early_end = min(early_end_index(p, delta), star - 1) if star > 0 else -1
    early = (cuts[0], cuts[early_end]) if early_end >= 0 else None
    mid = (cuts[early_end + 1], cuts[star - 1]) if star - 1 >= early_end + 1 else None
    late = (cuts[star], cuts[-1])
    return early, mid, late


def _validate(values: np.ndarray, cuts: list, delta: float, epsilon: float, n_boot: int, pooling: str) -> None:
    if values.ndim != 2 or values.shape[1] != len(cuts) or values.shape[0] == 0:
        raise ValueError(f"values must be (n_samples >= 1, {len(cuts)} cuts), got shape {values.shape}")
    if cuts != sorted(set(cuts)) or cuts[0] != 0 or len(cuts) < 2:
        raise ValueError(f"cuts must be strictly ascending, start at 0 and end at L, got {cuts}")
    if not np.isfinite(values).all():
        raise ValueError("values hold NaN or infinity; every (sample, cut) needs a finite metric")
    if not (0 <= delta < 1 and 0 <= epsilon < 1 and delta < 1 - epsilon):
        raise ValueError(f"need 0 <= delta < 1 - epsilon < 1, got delta={delta}, epsilon={epsilon}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
