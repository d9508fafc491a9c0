"""The pure statistics: nulls, responses and the per-batch SV function."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spatialscale.stats import bh_adjust, liu_pvalue, permutation_pvalue, welch_pvalue
from spatialscale.stats.responses import helmert_basis, ratio_response


def test_liu_matches_splisosm_on_random_mixtures():
    hsic = pytest.importorskip("splisosm.utils.hsic")
    rng = np.random.default_rng(0)
    for _ in range(50):
        lam = rng.gamma(0.5, 1.0, size=rng.integers(1, 40))
        c = np.array([np.sum(lam**r) for r in range(1, 5)])
        t = rng.uniform(0, 3) * c[0]
        ref = hsic.liu_sf_from_cumulants(t, {r + 1: c[r] for r in range(4)})
        np.testing.assert_allclose(liu_pvalue(np.array([t]), c[None])[0], ref, rtol=1e-10, atol=1e-15)


def test_liu_is_exact_for_a_single_chi2():
    # one component: Q = chi2_1, Liu reduces to the exact tail
    c = np.ones((1, 4))
    for t in (0.1, 1.0, 3.84, 10.0):
        np.testing.assert_allclose(liu_pvalue(np.array([t]), c), stats.chi2.sf(t, 1), rtol=1e-6)


def test_liu_tracks_monte_carlo_tail():
    rng = np.random.default_rng(1)
    lam = np.array([3.0, 1.0, 0.5, 0.2, 0.2, 0.1])
    draws = (rng.chisquare(1, size=(200_000, lam.size)) * lam).sum(1)
    c = np.array([[np.sum(lam**r) for r in range(1, 5)]])
    for q in (0.5, 0.9, 0.99):
        t = np.quantile(draws, q)
        assert abs(liu_pvalue(np.array([t]), c)[0] - (1 - q)) < 0.15 * (1 - q) + 2e-3


def test_welch_matches_scaled_chi2():
    c = np.array([[4.0, 2.0, 0, 0]])
    g, h = 2.0 / 4.0, 16.0 / 2.0
    np.testing.assert_allclose(welch_pvalue(np.array([6.0]), c), stats.chi2.sf(6.0 / g, h))


def test_degenerate_null_gives_p_one():
    c = np.zeros((1, 4))
    assert liu_pvalue(np.array([1.0]), c)[0] == 1.0
    assert welch_pvalue(np.array([0.0]), c)[0] == 1.0


def test_permutation_pvalue_counts_ties_and_floor():
    p = permutation_pvalue(np.array([5.0, 0.0]), np.array([[1.0, 5.0, 6.0], [1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(p, [3 / 4, 4 / 4])


def test_bh_matches_scipy_and_keeps_nan():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    out = bh_adjust(p)
    assert np.isnan(out[2])
    np.testing.assert_allclose(out[[0, 1, 3, 4]], stats.false_discovery_control(p[[0, 1, 3, 4]]))


def test_helmert_basis_is_orthonormal_contrast():
    v = helmert_basis(5)
    np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(v.sum(0), 0, atol=1e-12)


def test_ratio_response_fills_uncovered_spots_with_the_mean():
    counts = np.array([[[2, 2], [0, 0], [3, 1], [1, 3]]], dtype=float)
    y, covered = ratio_response(counts)
    assert covered.tolist() == [[True, False, True, True]]
    ratios = np.array([[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(y[0, [0, 2, 3]], ratios - ratios.mean(0))
    np.testing.assert_allclose(y[0, 1], 0)


def test_simplex_statistic_equals_full_statistic():
    from conftest import coords_for

    from spatialscale.kernel import SparseCAROperator, build_kernel
    from spatialscale.stats.hsic import quadratic_statistic, quadratic_statistic_simplex

    rng = np.random.default_rng(0)
    op = SparseCAROperator(build_kernel(coords_for("random", 200, rng)).precision)
    counts = rng.poisson(2.0, size=(5, 200, 4)).astype(float)
    y, _ = ratio_response(counts)
    np.testing.assert_allclose(quadratic_statistic_simplex(op, y), quadratic_statistic(op, y), rtol=1e-10)


def test_exact_permutation_moments_match_permutations():
    from spatialscale.kernel import _dense_centred_kernel, build_kernel
    from spatialscale.stats.nulls import permutation_moments

    rng = np.random.default_rng(3)
    n = 40
    kd = _dense_centred_kernel(build_kernel(rng.uniform(0, 6, (n, 2))).precision)
    y = (rng.random((n, 3)) < 0.2).astype(float)  # discrete, bounded responses
    y -= y.mean(0)
    b = y @ y.T
    sums = np.array([np.trace(np.linalg.matrix_power(kd, r)) for r in range(1, 5)])
    mu = np.linalg.eigvalsh(y.T @ y)
    f = np.array([[np.sum(mu**r) for r in range(1, 5)]])
    mean, var = permutation_moments(sums, np.sum(np.diag(kd) ** 2), f, np.array([np.sum(np.diag(b) ** 2)]), n)
    draws = np.array([np.sum(kd * b[np.ix_(pp, pp)]) for pp in (rng.permutation(n) for _ in range(40000))])
    assert mean[0] == pytest.approx(draws.mean(), rel=0.01)
    assert var[0] == pytest.approx(draws.var(), rel=0.03)
    # the chi-square mixture's variance, 2 sum (lambda mu / (n-1))^2 (n-1)^2, overstates it here
    assert 2 * sums[1] * f[0, 1] / (n - 1) ** 2 > 1.1 * var[0]


def test_liu_perm_in_a_batch_uses_the_kernel_diagonal(tmp_path):
    import spatialscale
    from spatialscale.kernel import _dense_centred_kernel
    from spatialscale.simulate import null_section
    from spatialscale.stats.sv import sv_batch
    from spatialscale.worker import kernel_diag_sq, kernel_operator

    store = spatialscale.ingest(null_section(n_spots=150, n_genes=6, seed=2), tmp_path / "s.zarr")
    kd = _dense_centred_kernel(store.precision())
    assert kernel_diag_sq(str(store.path), store.kernel_token) == pytest.approx(np.sum(np.diag(kd) ** 2), rel=1e-10)
    op, sums = kernel_operator(str(store.path), store.kernel_token)
    counts = store.gene_counts(store.genes.index[0])[None]
    liu = sv_batch(counts, op, sums)
    exact = sv_batch(counts, op, sums, null="liu-perm", kernel_diag_sq=np.sum(np.diag(kd) ** 2))
    np.testing.assert_array_equal(exact["statistic"], liu["statistic"])  # the statistic is the same
    assert exact["pvalue"][0] != liu["pvalue"][0]
    np.testing.assert_array_equal(exact["null_cumulants"], liu["null_cumulants"])
    assert np.isfinite(exact["null_statistic"][0]) and exact["null_statistic"][0] != liu["null_statistic"][0]
    with pytest.raises(ValueError, match="needs kernel_diag_sq"):
        sv_batch(counts, op, sums, null="liu-perm")


def test_compiled_response_passes_equal_numpy(monkeypatch):
    """The numba passes (ratios centred over covered spots, per-gene Gram matrices) equal the NumPy expressions,
    and so do the statistics and p-values built on them."""
    from spatialscale.kernel import DenseKernelOperator, KernelParams, build_kernel, exact_power_sums
    from spatialscale.stats import _numba, hsic, responses
    from spatialscale.stats.sv import sv_batch

    rng = np.random.default_rng(7)
    counts = rng.poisson(0.4, (4, 9_001, 3)).astype(float)  # more spots than one block of partial sums
    counts[1] = 0.0  # a gene without counts
    counts[2, :, 1] = 0.0
    y, covered = _numba.centred_ratios(counts)
    total = counts.sum(axis=2)
    want = np.where(total[..., None] > 0, counts / np.maximum(total, 1)[..., None], 0.0)
    mean = want.sum(1, keepdims=True) / np.maximum((total > 0).sum(1), 1)[:, None, None]
    want = np.where(total[..., None] > 0, want - mean, 0.0)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-14)  # the mean differs by summation order only
    np.testing.assert_array_equal(covered, total > 0)
    np.testing.assert_allclose(_numba.batch_gram(y), np.einsum("bnd,bne->bde", y, y), rtol=1e-13, atol=1e-12)

    side = 30
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float)
    kern = build_kernel(xy, params=KernelParams())
    op, sums = DenseKernelOperator(kern.precision), exact_power_sums(kern.precision)
    c = rng.poisson(2.0, (5, side * side, 3)).astype(float)
    fast = sv_batch(c, op, sums)
    monkeypatch.setattr(responses, "compiled_available", lambda: False)
    monkeypatch.setattr(hsic, "compiled_available", lambda: False)
    slow = sv_batch(c, op, sums)
    np.testing.assert_allclose(fast["statistic"], slow["statistic"], rtol=1e-12)
    np.testing.assert_allclose(fast["pvalue"], slow["pvalue"], rtol=1e-10)
