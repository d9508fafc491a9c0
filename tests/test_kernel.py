"""Spatial kernel: graph, precision, standardisation and power sums."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import coords_for

from spatialscale import kernel as K


@pytest.mark.parametrize("geometry", ["grid", "hex", "random"])
def test_knn_graph_matches_splisosm(geometry):
    splisosm_kernel = pytest.importorskip("splisosm.kernel")
    xy = coords_for(geometry, 400, np.random.default_rng(0))
    ref = splisosm_kernel._build_adj_from_coords(xy.astype(np.float32), 4, mutual_neighbors=True)
    ours = K.knn_adjacency(xy, 4)
    assert (ours != ref).nnz == 0
    assert (ours != ours.T).nnz == 0
    assert ours.diagonal().sum() == np.sum(np.asarray(ours.sum(1)).ravel() == ours.diagonal())


def test_isolated_spot_gets_self_loop():
    xy = np.r_[coords_for("grid", 16, np.random.default_rng(0)), [[100.0, 100.0]]]
    w = K.knn_adjacency(xy, 4)
    assert w[16, 16] == 1.0 and w[16].nnz == 1


@pytest.mark.parametrize("geometry", ["grid", "random"])
def test_inverse_diagonal_is_exact(geometry):
    xy = coords_for(geometry, 900, np.random.default_rng(1))
    m = K.car_precision(K.knn_adjacency(xy, 4), 0.99)
    expected = np.diag(np.linalg.inv(m.toarray()))
    np.testing.assert_allclose(K.inverse_diagonal(m), expected, rtol=1e-10)
    np.testing.assert_allclose(K.inverse_diagonal(m, method="selected"), expected, rtol=1e-10)
    # the banded recurrence and the wide-graph fallback agree too
    np.testing.assert_allclose(K.inverse_diagonal(m, method="banded"), expected, rtol=1e-10)
    np.testing.assert_allclose(K.inverse_diagonal(m, method="banded", max_band=1), expected, rtol=1e-10)


def test_inverse_diagonal_falls_back_without_numba(monkeypatch):
    """Without numba the banded recurrence gives the same diagonal."""
    import spatialscale.selinv as S

    xy = coords_for("grid", 400, np.random.default_rng(2))
    m = K.car_precision(K.knn_adjacency(xy, 4), 0.9)
    expected = np.diag(np.linalg.inv(m.toarray()))

    def no_numba():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(S, "_takahashi", no_numba)
    np.testing.assert_allclose(K.inverse_diagonal(m), expected, rtol=1e-10)
    with pytest.raises(ImportError):
        K.inverse_diagonal(m, method="selected")


@pytest.mark.parametrize("weighted", [False, True])
def test_selected_inversion_on_disconnected_weighted_graphs(weighted):
    """Several components, isolated spots (self loops) and weighted user graphs: exact to rounding."""
    rng = np.random.default_rng(3)
    xy = np.r_[coords_for("random", 300, rng), coords_for("grid", 200, rng) + 1000.0, [[5000.0, 5000.0]]]
    w = K.knn_adjacency(xy, 4)
    if weighted:
        w = K.symmetrise_adjacency(w.multiply(rng.uniform(0.2, 3.0, size=w.shape)).tocsr())
    m = K.car_precision(w, 0.95)
    expected = np.diag(np.linalg.inv(m.toarray()))
    np.testing.assert_allclose(K.inverse_diagonal(m, method="selected"), expected, rtol=1e-11)


def test_standardised_kernel_has_unit_diagonal_and_exact_power_sums():
    xy = coords_for("random", 300, np.random.default_rng(2))
    kern = K.build_kernel(xy)
    cov = np.linalg.inv(kern.precision.toarray())
    np.testing.assert_allclose(np.diag(cov), 1.0, rtol=1e-10)
    h = np.eye(300) - 1.0 / 300
    lam = np.linalg.eigvalsh(h @ cov @ h)
    lam = lam[lam > 1e-8]
    np.testing.assert_allclose(kern.power_sums, [np.sum(lam**r) for r in range(1, 5)], rtol=1e-9)
    assert kern.power_sum_method == "exact"


def test_power_sums_from_the_glmm_eigenpairs_equal_the_dense_ones():
    """build_kernel(eigenpairs=True): one eigendecomposition gives the GLMM's basis and the exact power sums."""
    xy = coords_for("hex", 400, np.random.default_rng(3))
    dense = K.build_kernel(xy)
    both = K.build_kernel(xy, eigenpairs=True)
    np.testing.assert_allclose(both.power_sums, dense.power_sums, rtol=1e-11)
    lam, vec = both.eigenpairs
    ref_lam, ref_vec = K.kernel_eigenpairs(dense.precision)
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-12)
    np.testing.assert_allclose(np.abs(vec.T @ ref_vec).diagonal(), 1.0, atol=1e-8)
    assert dense.eigenpairs is None and both.power_sum_method == "exact"


def test_hutchinson_power_sums_are_seeded_and_close():
    xy = coords_for("grid", 400, np.random.default_rng(0))
    exact = K.build_kernel(xy).power_sums
    params = K.KernelParams(power_sums="hutchinson", n_probes=400)
    a, b = K.build_kernel(xy, params=params), K.build_kernel(xy, params=params)
    assert a.power_sum_method == "hutchinson"
    np.testing.assert_array_equal(a.power_sums, b.power_sums)
    assert a.token == b.token
    np.testing.assert_allclose(a.power_sums, exact, rtol=0.1)
    # the reported standard errors are those of the probe means
    assert np.all(a.power_sum_se > 0) and np.all(a.power_sum_se < 0.05 * exact)


def test_user_adjacency_is_symmetrised_and_weighted():
    a = sp.csr_matrix(np.array([[0, 2.0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    w = K.symmetrise_adjacency(a)
    np.testing.assert_allclose(w.toarray(), [[0, 1.0, 0], [1.0, 0, 1.0], [0, 1.0, 0]])
    with pytest.raises(ValueError, match="non-negative"):
        K.symmetrise_adjacency(-a)


def test_operators_agree():
    xy = coords_for("hex", 250, np.random.default_rng(3))
    kern = K.build_kernel(xy)
    y = np.random.default_rng(4).normal(size=(250, 5))
    y -= y.mean(0)
    sparse_q = K.SparseCAROperator(kern.precision).quadratic_columns(y)
    dense_q = K.DenseKernelOperator(kern.precision, "cpu").quadratic_columns(y)
    np.testing.assert_allclose(sparse_q, dense_q, rtol=1e-9)
    np.testing.assert_allclose(
        K.SparseCAROperator(kern.precision).apply(y), K.DenseKernelOperator(kern.precision).apply(y), atol=1e-9
    )


@pytest.mark.parametrize("rho", [-0.1, 1.0, float("nan")])
def test_invalid_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        K.KernelParams(rho=rho)


@pytest.mark.parametrize("geometry", ["grid", "random"])
def test_sparse_cg_operator_matches_sparse_lu(geometry):
    """The device path for large sections (batched Jacobi-CG in torch), run here on the CPU."""
    kern = K.build_kernel(coords_for(geometry, 1500, np.random.default_rng(4)))
    y = np.random.default_rng(5).standard_normal((1500, 12))
    y -= y.mean(0)
    lu, cg = K.SparseCAROperator(kern.precision), K.SparseCGOperator(kern.precision)
    np.testing.assert_allclose(cg.quadratic_columns(y), lu.quadratic_columns(y), rtol=1e-9)
    np.testing.assert_allclose(cg.apply(y), lu.apply(y), rtol=0, atol=1e-8 * np.abs(lu.apply(y)).max())
    assert 0 < cg.iterations < 1500
    with pytest.raises(RuntimeError, match="did not reach"):
        K.SparseCGOperator(kern.precision, max_iter=3).apply(y)


def test_selected_inversion_closes_a_factor_whose_fill_cancelled():
    """SuperLU drops fill entries that cancel to exactly zero (seen on 10^6-spot lattices); the recurrence
    needs them. Factor L = [[1], [.5, 1], [.5, 0, 1]], D = I: column 0's rows {1, 2} need Z_21, which the
    stored pattern (no entry at (2, 1)) lacks until it is closed."""
    import spatialscale.selinv as S

    takahashi, close = S._takahashi()
    indptr, indices, lval = np.array([0, 2, 2, 2]), np.array([1, 2]), np.array([0.5, 0.5])
    _, ok = takahashi(indptr, indices, lval, np.ones(3), np.zeros(3))
    assert not ok
    cptr, cidx, cval = close(indptr, indices, lval)
    np.testing.assert_array_equal(cptr, [0, 2, 3, 3])
    np.testing.assert_array_equal(cidx, [1, 2, 2])
    np.testing.assert_array_equal(cval, [0.5, 0.5, 0.0])
    zd, ok = takahashi(cptr, cidx, cval, np.ones(3), np.zeros(3))
    low = np.array([[1, 0, 0], [0.5, 1, 0], [0.5, 0, 1.0]])
    assert ok
    np.testing.assert_allclose(zd, np.diag(np.linalg.inv(low @ low.T)), rtol=1e-14)


@pytest.mark.slow
def test_selected_inversion_on_a_large_lattice():
    """At 300,000 spots of a Visium-like lattice: the selected path runs (no fallback) and equals the
    banded recurrence."""
    from spatialscale.simulate import grid_coords

    m = K.car_precision(K.knn_adjacency(grid_coords(300_000, "hex", 0), 4), 0.99)
    np.testing.assert_allclose(K.inverse_diagonal(m, method="selected"), K.inverse_diagonal(m, method="banded"),
                               rtol=1e-10)
