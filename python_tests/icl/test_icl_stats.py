"""ICL sweep statistics against scipy (when importable) and hand-computed values."""
import math

import numpy as np
import pytest

from pnekern.icl.stats import (holm_bonferroni, rankdata, spearman_with_ci, student_t_sf, tost_two_sample)

try:
    import scipy.stats as scipy_stats
except ImportError:  # the numpy paths are still checked against hand-computed values below
    scipy_stats = None

needs_scipy = pytest.mark.skipif(scipy_stats is None, reason="comparison with scipy needs scipy")


def test_student_t_sf_known_values():
    # t = 0 → 1/2; df = 1 is Cauchy: P(T > 1) = 1/4; df = 2: P(T > t) = (1 − t/sqrt(t²+2))/2
    assert student_t_sf(0.0, 7, backend="numpy") == pytest.approx(0.5, abs=1e-14)
    assert student_t_sf(1.0, 1, backend="numpy") == pytest.approx(0.25, abs=1e-12)
    for t in (-3.0, 0.5, 2.0, 10.0):
        expected = 0.5 * (1 - t / math.sqrt(t * t + 2))
        assert student_t_sf(t, 2, backend="numpy") == pytest.approx(expected, rel=1e-10, abs=1e-14)


@needs_scipy
@pytest.mark.parametrize("df", [1, 2.5, 7, 30, 300])
def test_student_t_sf_matches_scipy(df):
    for t in np.linspace(-8, 8, 33):
        assert student_t_sf(float(t), df, backend="numpy") == pytest.approx(float(scipy_stats.t.sf(t, df)),
                                                                           rel=1e-8, abs=1e-14)


def test_rankdata_ties():
    np.testing.assert_array_equal(rankdata([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])


@needs_scipy
@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_spearman_matches_scipy(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y[:5] = y[5]  # ties
    res = spearman_with_ci(x, y, n_boot=500, seed=1, backend=backend)
    ref = scipy_stats.spearmanr(x, y)
    assert res.rho == pytest.approx(ref.statistic, abs=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-8)
    assert res.ci_low < res.rho < res.ci_high


def test_spearman_ci_and_monotone_invariance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + 0.3 * rng.normal(size=60)
    r1 = spearman_with_ci(x, y, n_boot=400, seed=0, backend="numpy")
    r2 = spearman_with_ci(np.exp(x), y ** 3, n_boot=400, seed=0, backend="numpy")
    assert r1.rho == pytest.approx(r2.rho) and r1.rho > 0.8
    assert 0.5 < r1.ci_low < r1.rho < r1.ci_high <= 1.0
    # independent data: the CI straddles 0 and the test does not reject
    r0 = spearman_with_ci(rng.normal(size=60), rng.normal(size=60), n_boot=400, seed=0, backend="numpy")
    assert r0.p_value > 0.01 or r0.ci_low < 0 < r0.ci_high
    with pytest.raises(ValueError):
        spearman_with_ci([1, 2], [1, 2])


@needs_scipy
@pytest.mark.parametrize("equal_var", [False, True])
def test_tost_matches_two_one_sided_scipy_t_tests(equal_var):
    rng = np.random.default_rng(5)
    x = rng.normal(0.1, 1.0, size=50)
    y = rng.normal(0.0, 1.5, size=70)
    low, upp = -0.5, 0.6
    res = tost_two_sample(x, y, low, upp, equal_var=equal_var, backend="numpy")
    p_lo = scipy_stats.ttest_ind(x - low, y, equal_var=equal_var, alternative="greater").pvalue
    p_up = scipy_stats.ttest_ind(x - upp, y, equal_var=equal_var, alternative="less").pvalue
    assert res.p_lower == pytest.approx(p_lo, rel=1e-8)
    assert res.p_upper == pytest.approx(p_up, rel=1e-8)
    assert res.p_value == pytest.approx(max(p_lo, p_up), rel=1e-8)


def test_tost_decides_equivalence():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, 2000), rng.normal(0.02, 1, 2000)
    assert tost_two_sample(a, b, -0.2, 0.2).equivalent(0.05)
    assert not tost_two_sample(a, b + 1.0, -0.2, 0.2).equivalent(0.05)
    with pytest.raises(ValueError, match="low"):
        tost_two_sample(a, b, 0.2, -0.2)


def test_holm_bonferroni_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    reject, adj = holm_bonferroni(p, alpha=0.05)
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone: 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_array_equal(reject, [True, False, False, True])
    _, adj1 = holm_bonferroni([0.6, 0.9])
    np.testing.assert_allclose(adj1, [1.0, 1.0])  # capped at 1
    with pytest.raises(ValueError):
        holm_bonferroni([1.5])
