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
