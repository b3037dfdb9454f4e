"""Three stages and the plateau of a probe curve, with bootstrap confidence intervals over samples.

With m(c) the mean metric at cut c and p(c) = (m(c) - m(0)) / (m(L) - m(0)):
  early-modal separation  the cuts 0..e where p stays <= delta (a prefix: p(0) = 0 by definition)
  late-modal degradation  c* .. L, c* = the smallest cut with p(c') >= 1 - epsilon for every c' >= c
  mid-modal alignment     the cuts in between
The paper picks these by eye; here they are a rule, and the bootstrap (resampling samples with replacement) gives
intervals for p(c) and for c*. When the CI of m(L) - m(0) contains 0 the benchmark does not need the image and the
stages mean nothing: the result carries a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

CI_LEVEL = 0.95


@dataclass(frozen=True)
class Plateau:
    """Stages and plateau of one curve (one benchmark, or all pooled)."""

    cuts: tuple
    n_samples: int
    curve: tuple  # m(c)
    curve_ci: tuple  # ((lo, hi), ...) per cut
    normalized: tuple  # p(c); NaN when m(L) == m(0)
    normalized_ci: tuple
    gap: float  # m(L) - m(0)
    gap_ci: tuple
    early: Optional[tuple]  # (first cut, last cut) of each stage, None when empty
    mid: Optional[tuple]
    late: Optional[tuple]
    plateau_start: Optional[int]  # c*; None when the curve is flat
    plateau_start_ci: Optional[tuple]
    undefined_resamples: int  # bootstrap resamples with m(L) == m(0) (no c*)
    warning: Optional[str]

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


def plateau_index(p: np.ndarray, epsilon: float) -> np.ndarray:
    """Index (into the cut list) of c* per row of p: smallest i with p[j] >= 1 - eps for all j >= i; -1 if NaN."""
    p = np.atleast_2d(p)
    ok = p >= 1.0 - epsilon
    # suffix-all: ok[i] and ok[i+1] and ... ; then the first index where it holds
    suffix = np.flip(np.logical_and.accumulate(np.flip(ok, axis=-1), axis=-1), axis=-1)
    first = np.where(suffix.any(axis=-1), suffix.argmax(axis=-1), p.shape[-1] - 1)
    return np.where(np.isnan(p).any(axis=-1), -1, first)


def early_end_index(p: np.ndarray, delta: float) -> int:
    """Index of the last cut of the early stage: the longest prefix with p <= delta (at least cut 0)."""
    above = np.nonzero(~(p <= delta))[0]
    return int(above[0]) - 1 if len(above) else len(p) - 1


def _interval(samples: np.ndarray, axis: int = 0):
    """Percentile interval ignoring NaN resamples (NaN where every resample is NaN: a flat curve)."""
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are expected for flat curves
        return np.nanpercentile(samples, lo, axis=axis), np.nanpercentile(samples, hi, axis=axis)


def find_plateau(values: np.ndarray, cuts: Sequence[int], *, delta: float = 0.1, epsilon: float = 0.05,
                 n_boot: int = 1000, seed: int = 0) -> Plateau:
    """Stages and plateau from per-sample metrics `values` (n_samples, n_cuts), cuts ascending from 0 to L."""
    values = np.asarray(values, dtype=np.float64)
    cuts = [int(c) for c in cuts]
    _validate(values, cuts, delta, epsilon, n_boot)
    curve = values.mean(axis=0)
    p = normalize(curve)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    boot = values[idx].mean(axis=1)  # (n_boot, n_cuts)
    boot_p = normalize(boot)
    boot_star = plateau_index(boot_p, epsilon)
    defined = boot_star >= 0
    gap = float(curve[-1] - curve[0])
    gap_lo, gap_hi = _interval(boot[:, -1] - boot[:, 0])
    star = int(plateau_index(p, epsilon)[0])
    flat = gap == 0 or (gap_lo <= 0 <= gap_hi)
    warning = None
    if flat:
        warning = (f"m(L) - m(0) = {gap:.4g} with {CI_LEVEL:.0%} CI [{gap_lo:.4g}, {gap_hi:.4g}] includes 0: "
                   "masking the image changes nothing beyond noise; this benchmark does not need vision and its "
                   "stages are not meaningful")
    stages = _stages(p, cuts, delta, star) if star >= 0 else (None, None, None)
    star_ci = None
    if defined.any():
        lo, hi = _interval(np.array([cuts[i] for i in boot_star[defined]], dtype=float))
        star_ci = (float(lo), float(hi))
    p_lo, p_hi = _interval(boot_p)
    c_lo, c_hi = _interval(boot)
    return Plateau(
        cuts=tuple(cuts), n_samples=int(values.shape[0]), curve=tuple(curve.tolist()),
        curve_ci=tuple(zip(c_lo.tolist(), c_hi.tolist())), normalized=tuple(p.tolist()),
        normalized_ci=tuple(zip(p_lo.tolist(), p_hi.tolist())), gap=gap, gap_ci=(float(gap_lo), float(gap_hi)),
        early=stages[0], mid=stages[1], late=stages[2], plateau_start=cuts[star] if star >= 0 else None,
        plateau_start_ci=star_ci, undefined_resamples=int((~defined).sum()), warning=warning,
    )


def _stages(p: np.ndarray, cuts: list, delta: float, star: int):
    early_end = min(early_end_index(p, delta), star - 1) if star > 0 else -1
    early = (cuts[0], cuts[early_end]) if early_end >= 0 else None
    mid = (cuts[early_end + 1], cuts[star - 1]) if star - 1 >= early_end + 1 else None
    late = (cuts[star], cuts[-1])
    return early, mid, late


def _validate(values: np.ndarray, cuts: list, delta: float, epsilon: float, n_boot: int) -> None:
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
