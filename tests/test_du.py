"""Differential usage (hsic, t-fisher, t-tippett) against SPLISOSM 1.2.0, on the engine."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import spatialscale
from spatialscale import InputError
from tests.conftest import make_adata

splisosm = pytest.importorskip("splisosm")

COVS = {"hsic": ["cont", "region", "bin"], "t-fisher": ["bin", "region"], "t-tippett": ["bin", "region"]}


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    a = make_adata(300, 12, zero_spots=0.15, seed=3)
    rng = np.random.default_rng(0)
    a.obs["cont"] = rng.normal(size=a.n_obs) + 0.1 * a.obsm["spatial"][:, 0]
    a.obs["bin"] = (rng.random(a.n_obs) > 0.6).astype(float)
    a.obs["level"] = rng.integers(0, 3, a.n_obs).astype(float)
    store = spatialscale.ingest(a, tmp_path_factory.mktemp("du") / "s.zarr")
    return a, store


def _splisosm_du(adata, covs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmNP()
        ref.setup_data(adata, layer="counts", group_iso_by="gene_symbol", design_mtx=covs)
        ref.test_differential_usage(print_progress=False, **kw)
    return ref


def assert_matches_splisosm(ds, ref, stat_rtol=1e-5):
    """Statistics within 1e-5 and p-values within 1e-4 relative.

    SPLISOSM computes the ratios in float32, so tiny statistics (near 0) carry
    its rounding (~1e-7 of the largest statistic) and p-values below float32's
    range underflow to 0 there: those are compared on the scale of the data.
    """
    res = ref._du_test_results
    ours = ds.sel(gene=[str(g) for g in ref.gene_names])
    assert list(ours.covariate.values) == list(ref.covariate_names)
    s, s_ref = ours.du_statistic.values, np.asarray(res["statistic"], dtype=float)
    finite = np.isfinite(s_ref)
    np.testing.assert_allclose(s[finite], s_ref[finite], rtol=stat_rtol, atol=2e-6 * np.abs(s_ref[finite]).max())
    big = finite & (np.abs(s_ref) > 0.01 * np.abs(s_ref[finite]).max())
    np.testing.assert_allclose(s[big], s_ref[big], rtol=stat_rtol)
    p, p_ref = ours.du_pvalue.values, np.asarray(res["pvalue"], dtype=float)
    ok = p_ref > 1e-8
    assert ok.sum() >= 0.5 * ok.size
    np.testing.assert_allclose(p[ok], p_ref[ok], rtol=1e-4)
    tiny = (p_ref > 1e-30) & ~ok
    np.testing.assert_allclose(np.log10(p[tiny]), np.log10(p_ref[tiny]), rtol=1e-3)
    assert np.all(p[p_ref == 0] < 1e-30)
    np.testing.assert_allclose(ours.du_pvalue_adj.values[ok], np.asarray(res["pvalue_adj"])[ok], rtol=1e-4)


@pytest.mark.parametrize("method", ["hsic", "t-fisher", "t-tippett"])
@pytest.mark.parametrize("transformation,nan_filling", [("none", "mean"), ("none", "none"), ("clr", "mean"),
                                                        ("ilr", "none"), ("radial", "mean")])
def test_du_matches_splisosm(section, method, transformation, nan_filling):
    adata, store = section
    ref = _splisosm_du(adata, COVS[method], method=method, ratio_transformation=transformation,
                       nan_filling=nan_filling)
    # SPLISOSM one-hot encodes every level: per_level=True is its layout
    ds = spatialscale.du_test(store, COVS[method], method=method, transformation=transformation,
                              nan_filling=nan_filling, per_level=True, scheduler="threads", progress=False)
    # Tippett's statistic is the smallest isoform p-value: compared as a p-value
    assert_matches_splisosm(ds, ref, stat_rtol=1e-4 if method == "t-tippett" else 1e-5)
    assert ds.attrs["method"] == method and ds.attrs["test"] == "differential_usage"
    used = ds.n_spots_used.values
    if nan_filling == "mean":
        assert np.all(used == store.n_spots)
    else:
        assert np.all(used < store.n_spots) and np.all(used > 0.7 * store.n_spots)


def test_du_on_a_local_cluster_is_batch_invariant(section, client, tmp_path):
    _, store = section
    covs = ["cont", "region", "bin"]
    a = spatialscale.du_test(store, covs, method="hsic", client=client, batch_size=1, progress=False,
                             out=tmp_path / "du.zarr")
    b = spatialscale.du_test(store, covs, method="hsic", scheduler="threads", progress=False)
    # batched BLAS sums differ in the last bits; Liu amplifies that to ~1e-8
    np.testing.assert_allclose(a.du_pvalue.values, b.du_pvalue.values, rtol=1e-7)
    np.testing.assert_allclose(a.du_statistic.values, b.du_statistic.values, rtol=1e-12)
    assert a.attrs["execution"] == "distributed"
    back = spatialscale.open_results(tmp_path / "du.zarr")
    np.testing.assert_array_equal(back.du_statistic.values, a.du_statistic.values)
    assert back.du_statistic.dims == ("gene", "covariate")


def test_du_finds_the_covariate_that_drives_usage(tmp_path):
    from spatialscale.simulate import simulate_section

    adata = simulate_section(600, 40, n_sv=0, n_du=10, effect=1.0, seed=5)  # DU genes follow celltype == ct1
    adata.obs["noise"] = np.random.default_rng(1).normal(size=adata.n_obs)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    is_du = adata.var.groupby("gene_symbol", observed=True)["is_du"].first()
    for method in ("hsic", "t-fisher"):
        covs = ["celltype", "noise"] if method == "hsic" else ["celltype"]
        # hsic tests celltype's three levels jointly; the t-tests need one level against the rest
        ds = spatialscale.du_test(store, covs, method=method, per_level=method != "hsic", scheduler="threads",
                                  progress=False)
        truth = is_du.loc[ds.gene.values].to_numpy()
        hits = ds.du_pvalue_adj.sel(covariate="celltype" if method == "hsic" else "celltype_ct1").values < 0.05
        assert hits[truth].mean() >= 0.8, method
        assert hits[~truth].sum() <= 2, method
        if method == "hsic":
            assert (ds.du_pvalue_adj.sel(covariate="noise").values < 0.05).sum() <= 1


def test_bad_du_input_leaves_no_results(section, tmp_path):
    adata, store = section
    out = tmp_path / "du.zarr"
    cases = [
        (["nope"], {}, "not found"),
        (np.ones(store.n_spots), {}, "constant"),
        (["level"], {"method": "t-fisher"}, "binary"),
        (["cont"], {"method": "t-tippett"}, "binary"),
        (np.r_[np.nan, np.arange(store.n_spots - 1.0)], {}, "NaN"),
        (np.arange(store.n_spots - 3.0), {}, "spots"),
        (["cont"], {"method": "hsic-xyz"}, "unknown method"),
        (["cont"], {"method": "hsic", "transformation": "log"}, "unknown transformation"),
        (["cont"], {"method": "hsic", "residualize": "both"},
         r"'residualize' does not apply to method 'hsic' \(it applies to hsic-gp\)"),
        (["cont"], {"method": "hsic", "model": "glmm-full"}, "glmm-score"),
    ]
    for covs, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            spatialscale.du_test(store, covs, out=out, scheduler="threads", progress=False, **kw)
        assert not out.exists()


@pytest.mark.parametrize("residualize", ["cov_only", "both"])
def test_hsic_gp_matches_splisosm_sklearn_backend(section, residualize):
    from scipy.stats import spearmanr

    adata, store = section
    covs = ["cont", "region", "bin"]
    ref = _splisosm_du(adata, covs, method="hsic-gp", residualize=residualize)
    ds = spatialscale.du_test(store, covs, method="hsic-gp", residualize=residualize, gp={"backend": "exact"},
                              per_level=True, scheduler="threads", progress=False)
    ours = ds.sel(gene=[str(g) for g in ref.gene_names])
    p, p_ref = ours.du_pvalue.values.ravel(), np.asarray(ref._du_test_results["pvalue"], dtype=float).ravel()
    rho = spearmanr(-np.log10(p), -np.log10(np.maximum(p_ref, 1e-300))).statistic
    assert rho >= 0.99, rho
    # the same GP optimum: statistics agree closely, not just in rank
    s_ref = np.asarray(ref._du_test_results["statistic"], dtype=float).ravel()
    np.testing.assert_allclose(ours.du_statistic.values.ravel(), s_ref, rtol=1e-3, atol=1e-4 * s_ref.max())
    assert ds.attrs["residualize"] == residualize and ds.attrs["gp_backend"] == "exact"
