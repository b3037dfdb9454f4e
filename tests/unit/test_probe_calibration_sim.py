"""The plateau rule and its intervals on planted curves whose c* is known: accuracy and calibrated coverage.

Simulated probe answers: sample i has a difficulty u_i ~ U(0, 1) and is right at cut c when u_i < q(c), with
q(c) = 0.3 + 0.55 p(c) for the planted normalised curve p (so answers are monotone in c per sample, as real ones
mostly are); then each (sample, cut) answer is replaced by a coin flip with probability `noise` (independently).
The "hard" curve has its last mid-stage cut (19, p = 0.94) just below the rule's threshold 1 - epsilon = 0.95, so
c* = 20 is genuinely uncertain at every sample size; on easier curves the interval is conservative.
"""

import numpy as np
import pytest

from shardmerge.engine.probe import plateau

L = 28
CUTS = list(range(L + 1))
C = np.arange(L + 1)
HARD = np.where(C >= 20, 1.0, np.clip(0.94 * (C - 8) / 11, 0, 1))
EASY = np.clip((C - 8) / 12, 0, 1)
SETTINGS = [(n, noise) for n in (150, 1500) for noise in (0.0, 0.1, 0.2)]


def _answers(p, n, noise, rng):
    q = 0.3 + 0.55 * p
    v = (rng.random((n, 1)) < q).astype(float)
    flip = rng.random(v.shape) < noise
    v[flip] = rng.random(int(flip.sum())) < 0.5
    return v


def test_planted_curves_have_c_star_20():
    for p in (HARD, EASY):
        assert plateau.plateau_index(p, 0.05).tolist() == [20]


@pytest.mark.parametrize("n,noise", SETTINGS)
def test_plateau_estimate_and_interval_are_calibrated(n, noise):
    rng = np.random.default_rng(1)
    runs = [plateau.find_plateau(_answers(HARD, n, noise, rng), CUTS, n_boot=200, seed=r) for r in range(80)]
    err = np.mean([abs(r.plateau_start - 20) for r in runs])
    coverage = np.mean([r.plateau_start_ci[0] <= 20 <= r.plateau_start_ci[1] for r in runs])
    assert err <= 1.0, f"mean |c* - 20| = {err}"
    assert 0.90 <= coverage <= 0.99, f"coverage {coverage}"
    assert all(isinstance(v, int) for r in runs for v in r.plateau_start_ci)


@pytest.mark.parametrize("n,noise", SETTINGS)
def test_plateau_estimate_on_a_sharp_kink(n, noise):
    rng = np.random.default_rng(2)
    est = [plateau.find_plateau(_answers(EASY, n, noise, rng), CUTS, n_boot=1).plateau_start for _ in range(80)]
    assert np.mean(np.abs(np.array(est) - 20)) <= 1.0


def test_isotonic_fit_equals_pool_adjacent_violators():
    def pava(v):
        blocks = []
        for x in v:
            blocks.append([x, 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                (a, na), (b, nb) = blocks.pop(), blocks.pop()
                blocks.append([(a * na + b * nb) / (na + nb), na + nb])
        return np.concatenate([[m] * w for m, w in blocks])

    y = np.random.default_rng(0).random((40, 13))
    np.testing.assert_allclose(plateau.isotonic(y), [pava(r) for r in y], atol=1e-12)
    np.testing.assert_allclose(plateau.isotonic(y, increasing=False), [-pava(-r) for r in y], atol=1e-12)


def test_circular_copies_are_resampled_together():
    """Four identical copies per question (MMBench CircularEval): the group bootstrap's interval matches the one
    of the de-duplicated questions, and resampling the copies as independent rows would halve it."""
    rng = np.random.default_rng(3)
    base = _answers(HARD, 200, 0.1, rng)
    copies = np.repeat(base, 4, axis=0)
    groups = np.repeat(np.arange(200), 4)
    width = lambda r: r.gap_ci[1] - r.gap_ci[0]
    dedup = plateau.find_plateau(base, CUTS, n_boot=400)
    grouped = plateau.find_plateau(copies, CUTS, n_boot=400, groups=groups)
    naive = plateau.find_plateau(copies, CUTS, n_boot=400)
    assert grouped.n_groups == 200 and naive.n_groups == 800
    assert width(grouped) > 1.6 * width(naive)
    assert width(grouped) == pytest.approx(width(dedup), rel=0.15)
    assert grouped.plateau_start == dedup.plateau_start


def test_macro_pooling_weighs_each_benchmark_the_same():
    small = np.tile(np.where(C >= 10, 1.0, 0.0), (10, 1))  # 10 samples
    large = np.tile(np.where(C >= 20, 1.0, 0.0), (990, 1))
    values = np.vstack([small, large])
    strata = ["a"] * 10 + ["b"] * 990
    macro = plateau.find_plateau(values, CUTS, n_boot=50, strata=strata)
    pooled = plateau.find_plateau(values, CUTS, n_boot=50, strata=strata, pooling="samples")
    np.testing.assert_allclose(macro.curve, (small[0] + large[0]) / 2)
    np.testing.assert_allclose(pooled.curve, (10 * small[0] + 990 * large[0]) / 1000)
    assert macro.pooling == "macro" and pooled.plateau_start == 20
    with pytest.raises(ValueError, match="pooling"):
        plateau.find_plateau(values, CUTS, pooling="mean")
