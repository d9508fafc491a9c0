"""Null moments of large sections: exact k1, k2 by selected inversion, deflated control-variate k3, k4."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import coords_for, make_adata

import spatialscale
from spatialscale import kernel as K


def test_centring_expansion_matches_dense_traces():
    """tr((HKH)^r) from tr(K^r) and 1'K^j 1 equals the dense traces."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 30))
    k = a @ a.T + 0.5 * np.eye(30)
    h = np.eye(30) - 1.0 / 30
    kc = h @ k @ h
    traces = [np.trace(np.linalg.matrix_power(k, r)) for r in range(1, 5)]
    ones = np.ones(30)
    moments = [ones @ np.linalg.matrix_power(k, j) @ ones for j in range(1, 5)]
    expected = [np.trace(np.linalg.matrix_power(kc, r)) for r in range(1, 5)]
    np.testing.assert_allclose(K.centred_power_sums(np.array(traces), np.array(moments), 30), expected, rtol=1e-11)


@pytest.mark.parametrize("geometry", ["grid", "hex", "random"])
@pytest.mark.parametrize("standardize", [True, False])
def test_selected_power_sums_against_dense(geometry, standardize):
    """k1, k2 exact to rounding; k3, k4 within their reported standard error (and that small); seeded."""
    xy = coords_for(geometry, 2500, np.random.default_rng(1))
    exact = K.build_kernel(xy, params=K.KernelParams(standardize_cov=standardize, power_sums="exact"))
    params = K.KernelParams(standardize_cov=standardize, power_sums="selected")
    a, b = K.build_kernel(xy, params=params), K.build_kernel(xy, params=params)
    assert a.power_sum_method == "selected"
    np.testing.assert_array_equal(a.power_sums, b.power_sums)
    assert a.token == b.token
    np.testing.assert_allclose(a.power_sums[:2], exact.power_sums[:2], rtol=1e-10)
    assert a.power_sum_se[0] == a.power_sum_se[1] == 0.0
    rel_se = a.power_sum_se[2:] / exact.power_sums[2:]
    assert np.all(rel_se > 0) and np.all(rel_se < 2e-3)
    err = np.abs(a.power_sums[2:] - exact.power_sums[2:])
    assert np.all(err <= 5 * a.power_sum_se[2:])
    # and far closer than SPLISOSM's plain probes
    hutch = K.build_kernel(xy, params=K.KernelParams(standardize_cov=standardize, power_sums="hutchinson"))
    assert np.abs(hutch.power_sums[1] / exact.power_sums[1] - 1) > 1e-6


def test_k2_is_estimated_when_the_graph_is_too_large_for_exact(monkeypatch):
    """Above the work limit k2 comes from the deflated probes too, with its standard error."""
    xy = coords_for("grid", 2500, np.random.default_rng(1))
    exact = K.build_kernel(xy, params=K.KernelParams(power_sums="exact"))
    monkeypatch.setattr(K, "EXACT_K2_MAX_WORK", 1.0)
    est = K.build_kernel(xy, params=K.KernelParams(power_sums="selected"))
    np.testing.assert_allclose(est.power_sums[0], exact.power_sums[0], rtol=1e-10)
    assert est.power_sum_se[0] == 0.0 and 0 < est.power_sum_se[1] < 1e-3 * exact.power_sums[1]
    assert np.all(np.abs(est.power_sums[1:] - exact.power_sums[1:]) <= 5 * est.power_sum_se[1:])


def test_auto_method_by_size():
    params = K.KernelParams()
    assert params.power_sum_method(5000) == "exact"
    assert params.power_sum_method(5001) == "selected"
    assert K.KernelParams(power_sums="hutchinson").power_sum_method(10) == "hutchinson"
    with pytest.raises(ValueError, match="power_sums"):
        K.KernelParams(power_sums="lanczos")


@pytest.mark.slow
def test_pvalues_of_large_section_match_the_dense_kernel(tmp_path):
    """At 6,000 spots (dense kernel still fits): selected p-values within 1e-3 relative of the exact ones
    for p down to 1e-10 (SPLISOSM's 60-probe estimate is far off); method and errors in the attributes."""
    adata = make_adata(n=6000, n_genes=40, geometry="hex", seed=6)
    exact = spatialscale.ingest(adata, tmp_path / "exact.zarr", power_sums="exact")
    selected = spatialscale.ingest(adata, tmp_path / "selected.zarr")
    hutch = spatialscale.ingest(adata, tmp_path / "hutch.zarr", power_sums="hutchinson")
    assert selected.kernel_attrs["power_sum_method"] == "selected"
    rel_k = np.abs(np.array(selected.kernel_attrs["power_sums"]) / exact.kernel_attrs["power_sums"] - 1)
    assert rel_k[:2].max() < 1e-10 and rel_k[2:].max() < 1e-3
    worst = {}
    for method in ("hsic-ir", "hsic-gc"):
        ref = spatialscale.sv_test(exact, method=method, scheduler="threads", progress=False)["sv_pvalue"].values
        keep = ref >= 1e-10
        assert keep.sum() >= 20
        for name, store in (("selected", selected), ("hutchinson", hutch)):
            ds = spatialscale.sv_test(store, method=method, scheduler="threads", progress=False)
            p = ds["sv_pvalue"].values
            worst[name, method] = np.max(np.abs(p[keep] / ref[keep] - 1))
        assert ds.attrs["kernel_power_sum_method"] == "hutchinson"
    assert max(worst["selected", m] for m in ("hsic-ir", "hsic-gc")) < 1e-3
    assert max(worst["hutchinson", m] for m in ("hsic-ir", "hsic-gc")) > 1e-3


@pytest.mark.slow
def test_kernel_build_at_100000_spots():
    """A Visium-like lattice of 10^5 spots: selected inversion and selected power sums, deterministic,
    k1 exact (n - 1'K1/n), small standard errors; seconds on 2 cores (the bench has the times)."""
    from spatialscale.simulate import grid_coords

    xy = grid_coords(100_000, "hex", 0)
    a = K.build_kernel(xy)
    assert a.power_sum_method == "selected"
    op = K.SparseCAROperator(a.precision)
    u = op.solve(np.ones(a.n))
    np.testing.assert_allclose(a.power_sums[0], a.n - u.sum() / a.n, rtol=1e-12)
    # unit diagonal of the standardised covariance, checked on a sample of spots by unit-vector solves
    idx = np.random.default_rng(0).choice(a.n, 32, replace=False)
    e = np.zeros((a.n, 32))
    e[idx, np.arange(32)] = 1.0
    np.testing.assert_allclose(op.solve(e)[idx, np.arange(32)], 1.0, rtol=1e-10)
    assert a.power_sum_se[1] == 0.0 and np.all(a.power_sum_se[2:] / a.power_sums[2:] < 2e-3)
    b = K.build_kernel(xy)
    np.testing.assert_array_equal(a.power_sums, b.power_sums)
