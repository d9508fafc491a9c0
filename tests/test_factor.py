"""The L D L' factor's triangular sweeps against dense linear algebra, and the operator with and without them."""

import numpy as np
import pytest
import scipy.sparse

import spatialscale.factor as factor
from spatialscale.kernel import KernelParams, SparseCAROperator, prior_kernel_precision, spatial_weights
from spatialscale.simulate import grid_coords


@pytest.fixture(scope="module")
def precision():
    xy = grid_coords(400, "hex", seed=1)
    return prior_kernel_precision(spatial_weights(xy, KernelParams()), KernelParams()).tocsc()


def test_solve_and_half_solve_match_dense(precision, monkeypatch):
    monkeypatch.setattr(factor, "BLOCK_COLUMNS", 7)  # several blocks, the last one partial
    dense = precision.toarray()
    inv = np.linalg.inv(dense)
    f = factor.ldl_factor(precision)
    assert f.n == 400 and np.all(f.d > 0)
    x = np.random.default_rng(0).normal(size=(400, 23))
    np.testing.assert_allclose(f.solve(x), inv @ x, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(f.solve(x[:, 0]), inv @ x[:, 0], rtol=1e-9, atol=1e-11)
    z = f.half_solve(x)
    np.testing.assert_allclose(z.T @ z, x.T @ inv @ x, rtol=1e-9, atol=1e-10)
    # P M P' = L D L' exactly: rebuild M from the factor
    lower = scipy.sparse.csc_matrix((f.lval, f.indices, f.indptr), shape=(400, 400)).toarray() + np.eye(400)
    rebuilt = lower @ np.diag(f.d) @ lower.T
    np.testing.assert_allclose(rebuilt, dense[np.ix_(np.argsort(f.perm), np.argsort(f.perm))], atol=1e-10)


def test_not_positive_definite_is_refused():
    m = scipy.sparse.csc_matrix(np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(factor.FactorError):
        factor.ldl_factor(m)


def test_operator_same_with_and_without_compiled_sweeps(precision, monkeypatch):
    y = np.random.default_rng(2).normal(size=(5, 400, 3))
    y -= y.mean(axis=1, keepdims=True)
    fast = SparseCAROperator(precision)
    assert fast._ldl is not None
    monkeypatch.setattr("spatialscale.stats._numba.compiled_available", lambda: False)
    slow = SparseCAROperator(precision)
    assert slow._ldl is None
    stacked = np.ascontiguousarray(y.transpose(1, 0, 2).reshape(400, 15))
    np.testing.assert_allclose(fast.quadratic_columns(stacked), slow.quadratic_columns(stacked), rtol=1e-10)
    np.testing.assert_allclose(fast.gene_quadratics(y), slow.gene_quadratics(y), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.apply(stacked), slow.apply(stacked), rtol=1e-9, atol=1e-10)
    assert fast.factor_work() == pytest.approx(slow.factor_work())


def test_gene_quadratics_match_dense(precision, monkeypatch):
    monkeypatch.setattr(factor, "BLOCK_COLUMNS", 10)  # genes in blocks of 3 (d = 3), the last one partial
    inv = np.linalg.inv(precision.toarray())
    y = np.random.default_rng(3).normal(size=(8, 400, 3))
    got = factor.ldl_factor(precision).gene_quadratics(y)
    want = np.einsum("bni,nm,bmj->bij", y, inv, y)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_dense_ratio_path_equals_generic_test(precision, monkeypatch):
    """hsic-ir from the stored (n, B p) counts through the factor's ordering = sv_batch with SuperLU solves."""
    from spatialscale.kernel import exact_power_sums
    from spatialscale.stats.sv import sv_batch, sv_batch_dense_ratios

    rng = np.random.default_rng(4)
    counts = rng.poisson(2.0, size=(400, 6 * 3)).astype(np.int32)
    counts[rng.random(400) < 0.3, :3] = 0  # a gene missing from 30% of spots
    counts[:, 3:6] = 0
    counts[7, 3] = 5  # a gene seen in one spot: no variation, p-value 1
    sums = exact_power_sums(precision)
    fast = sv_batch_dense_ratios(counts, 3, SparseCAROperator(precision), sums)
    monkeypatch.setattr("spatialscale.stats._numba.compiled_available", lambda: False)
    slow_op = SparseCAROperator(precision)
    ref = sv_batch(counts.astype(float).reshape(400, 6, 3).transpose(1, 0, 2), slow_op, sums)
    for key in ("statistic", "pvalue", "effect"):
        np.testing.assert_allclose(fast[key], ref[key], rtol=1e-9, atol=1e-300, equal_nan=True)
    assert fast["pvalue"][1] == 1.0 and np.all(fast["pvalue"][[0, 2, 3, 4, 5]] < 1.0)
