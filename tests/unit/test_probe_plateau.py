"""Stage / plateau detection on synthetic curves with known answers, bootstrap CIs, the no-vision warning."""

import numpy as np
import pytest

from shardmerge.engine.probe import plateau

L = 12
CUTS = list(range(L + 1))
# a true normalised curve with early stage 0..2 (p <= 0.1), mid 3..5, plateau from c* = 6 (p >= 0.95 after)
TRUE_P = np.array([0, 0.02, 0.04, 0.3, 0.6, 0.85, 0.985, 0.99, 0.99, 1, 0.995, 1, 1.0])


def test_noise_free_curve_gives_exact_stages():
    values = np.tile(0.2 + 0.5 * TRUE_P, (5, 1))  # every sample identical: no sampling noise at all
    res = plateau.find_plateau(values, CUTS, n_boot=50)
    assert res.plateau_start == 6 and res.plateau_start_ci == (6.0, 6.0)
    assert (res.early, res.mid, res.late) == ((0, 2), (3, 5), (6, 12))
    np.testing.assert_allclose(res.normalized, TRUE_P, atol=1e-12)
    assert res.warning is None and res.gap == pytest.approx(0.5)


def test_bernoulli_samples_recover_the_plateau_with_a_ci():
    rng = np.random.default_rng(1)
    acc = 0.3 + 0.6 * TRUE_P
    values = (rng.random((3000, L + 1)) < acc).astype(float)
    res = plateau.find_plateau(values, CUTS, n_boot=300, seed=3)
    assert res.plateau_start == 6
    lo, hi = res.plateau_start_ci
    assert lo <= 6 <= hi and hi - lo <= 3
    for c in range(L + 1):
        p_lo, p_hi = res.normalized_ci[c]
        assert p_lo - 0.02 <= TRUE_P[c] <= p_hi + 0.02
    assert res.early == (0, 2) and res.warning is None
    # same seed, same answer; a different seed moves the CI a little, never the point estimate
    assert plateau.find_plateau(values, CUTS, n_boot=300, seed=3) == res
    assert plateau.find_plateau(values, CUTS, n_boot=300, seed=4).plateau_start == 6


def test_flat_benchmark_warns_that_vision_is_not_needed():
    rng = np.random.default_rng(0)
    values = (rng.random((150, L + 1)) < 0.6).astype(float)
    res = plateau.find_plateau(values, CUTS, n_boot=200)
    assert res.warning is not None and "does not need vision" in res.warning
    lo, hi = res.gap_ci
    assert lo <= 0 <= hi


def test_exactly_flat_curve_has_no_plateau():
    res = plateau.find_plateau(np.ones((4, L + 1)), CUTS, n_boot=20)
    assert res.plateau_start is None and res.late is None and res.warning is not None
    assert res.undefined_resamples == 20
    assert all(np.isnan(res.normalized))


def test_plateau_needs_every_later_cut_above_threshold():
    """A dip after the first crossing moves c* behind the dip."""
    p = np.array([[0, 0.5, 0.97, 0.9, 0.96, 1.0]])
    assert plateau.plateau_index(p, 0.05).tolist() == [4]
    assert plateau.plateau_index(p, 0.15).tolist() == [2]
    assert plateau.early_end_index(np.array([0, 0.05, 0.2, 0.05, 1.0]), 0.1) == 1  # a prefix, not a set


def test_decreasing_metric_kl_normalises_the_same_way():
    kl = np.tile(2.0 * (1 - TRUE_P), (3, 1))  # KL: large when masked early, 0 at c = L
    res = plateau.find_plateau(kl, CUTS, n_boot=20)
    assert res.plateau_start == 6 and res.gap == pytest.approx(-2.0)


def test_subset_of_cuts():
    cuts = [0, 2, 4, 6, 8, 10, 12]
    values = np.tile(TRUE_P[cuts], (3, 1))
    res = plateau.find_plateau(values, cuts, n_boot=20)
    assert res.plateau_start == 6 and res.early == (0, 2) and res.mid == (4, 4)


def test_invalid_inputs_are_value_errors():
    with pytest.raises(ValueError, match="shape"):
        plateau.find_plateau(np.zeros((3, 4)), CUTS)
    with pytest.raises(ValueError, match="ascending"):
        plateau.find_plateau(np.zeros((3, 3)), [0, 2, 1])
    with pytest.raises(ValueError, match="NaN"):
        plateau.find_plateau(np.full((2, 3), np.nan), [0, 1, 2])
    with pytest.raises(ValueError, match="delta"):
        plateau.find_plateau(np.zeros((2, 3)), [0, 1, 2], delta=0.6, epsilon=0.5)


def test_json_has_no_nan():
    import json

    res = plateau.find_plateau(np.ones((4, 3)), [0, 1, 2], n_boot=5)
    text = json.dumps(res.to_json(), allow_nan=False)
    assert '"plateau_start": null' in text
